"""Packages the embedded model's training outputs as `gemma_surgery/assets/tiny`.

Stage 3 of the embedded model's recipe (1: ``embedded_v2_corpus.py`` builds
the corpus and tokenizer; 2: ``train_embedded_v2.py`` trains the model and the
SAE and writes ``eval.json``). This script only copies files into the
package's layout and writes ``manifest.json``; it computes no metric itself::

  tiny/config.json, model.safetensors, tokenizer.model    (Hugging Face)
  tiny/heldout.json                                       (held-out texts)
  tiny/sae/<family>/<folder>/params.safetensors, config.json  (Gemma Scope 2)
  tiny/manifest.json   recipe, environment, logs, metrics, SHA-256 of files

Usage::

  python scripts/package_embedded.py --model-run RUN --sae-run SAE_RUN \\
      --corpus CORPUS_DIR [--out gemma_surgery/assets/tiny]

``RUN`` is the ``--out`` folder of the model stage, ``SAE_RUN`` that of the
SAE stage (they may be the same; the SAE stage's ``eval.json`` carries the
model stage's report forward), ``CORPUS_DIR`` the corpus folder (for
``heldout.json`` and ``corpus.json``). The previous asset folder is replaced
only once the new one is complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "gemma_surgery" / "assets" / "tiny"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.model")


def sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(model_run: pathlib.Path, sae_run: pathlib.Path, corpus: dict) -> dict:
  """The manifest: the runs' reports, without their own file tables."""
  report = json.loads((sae_run / "eval.json").read_text())
  model_report = json.loads((model_run / "eval.json").read_text())
  log = json.loads((model_run / "log.json").read_text())
  model = dict(model_report["model"])
  model["training_log"] = log
  model["corpus"] = corpus
  return {
    "name": report["name"],
    "environment": {
      "model_stage": model_report["environment"],
      "sae_stage": report["environment"],
    },
    "model": model,
    "metrics": model_report["metrics"],
    "sae": report["sae"],
    "targets": report["targets"],
  }


def package(
  model_run: pathlib.Path,
  sae_run: pathlib.Path,
  corpus_dir: pathlib.Path,
  out: pathlib.Path,
) -> dict:
  """Writes the asset folder ``out`` (atomically replacing it); returns the manifest."""
  corpus = json.loads((corpus_dir / "corpus.json").read_text())
  if (
    sha256(model_run / "tokenizer.model")
    != corpus["files"]["tokenizer.model"]["sha256"]
  ):
    raise SystemExit("The model run's tokenizer is not the corpus's tokenizer.")
  info = manifest(model_run, sae_run, corpus)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    staging = pathlib.Path(tmp) / out.name
    staging.mkdir()
    for name in MODEL_FILES:
      shutil.copyfile(model_run / name, staging / name)
    shutil.copyfile(corpus_dir / "heldout.json", staging / "heldout.json")
    sae_dir = staging / info["sae"]["folder"]
    sae_dir.mkdir(parents=True)
    for src, dst in info["sae"]["files"].items():
      shutil.copyfile(sae_run / src, sae_dir / dst)
    info["files"] = {
      p.relative_to(staging).as_posix(): {
        "sha256": sha256(p),
        "bytes": p.stat().st_size,
      }
      for p in sorted(staging.rglob("*"))
      if p.is_file()
    }
    (staging / "manifest.json").write_text(json.dumps(info, indent=1) + "\n")
    old = pathlib.Path(tmp) / "previous"
    if out.exists():
      out.rename(old)
    staging.rename(out)
  return info


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model-run", type=pathlib.Path, required=True)
  parser.add_argument("--sae-run", type=pathlib.Path, required=True)
  parser.add_argument("--corpus", type=pathlib.Path, required=True)
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args()
  info = package(args.model_run, args.sae_run, args.corpus, args.out)
  total = sum(f["bytes"] for f in info["files"].values())
  print(f"{args.out}: {len(info['files'])} files, {total / 2**20:.1f} MiB")


if __name__ == "__main__":
  main()
