"""The `gemma-surgery` command end to end on a fixture checkpoint."""

from __future__ import annotations

import pathlib
import pickle
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import FIXTURES, HF_FIXTURES
from helpers.sae_writers import np_encode, random_sae, write_gs2
from penzai import pz

import gemma_surgery
from gemma_surgery import cli
from gemma_surgery.tour import TourContext
from gemma_surgery.viz import Heatmap

TOKENIZER = FIXTURES / "tokenizer" / "tiny.model"


def test_generate_prints_the_greedy_continuation(capsys):
  source = HF_FIXTURES / "gemma3"
  prompt = "def f"
  assert (
    cli.main(
      [
        "generate",
        str(source),
        "--dtype",
        "float32",
        "--tokenizer",
        str(TOKENIZER),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
      ]
    )
    == 0
  )
  printed = capsys.readouterr().out.rstrip("\n")
  # Independent path: the library API with the same tokenizer and model.
  lm = gemma_surgery.load(source, dtype="float32", tokenizer=TOKENIZER, progress=False)
  ids = lm.tokenizer.encode(prompt, add_bos=True)
  new = gemma_surgery.greedy_generate(lm.model, np.array([ids]), max_new_tokens=12)[0]
  new = [int(t) for t in new]
  if lm.config.eos_id in new:
    new = new[: new.index(lm.config.eos_id)]
  assert printed == prompt + lm.tokenizer.decode(new)


def test_info_prints_the_config(capsys):
  assert cli.main(["info", str(HF_FIXTURES / "gemma2"), "--dtype", "float32"]) == 0
  out = capsys.readouterr().out
  assert "num_layers: 4" in out and "sliding_window: 8" in out


def test_errors_exit_2_with_a_message(capsys, tmp_path):
  assert cli.main(["info", str(tmp_path / "missing" / "a" / "b")]) == 2
  assert "not an existing path" in capsys.readouterr().err


def test_generate_without_tokenizer_is_a_clear_error(capsys):
  code = cli.main(["generate", str(HF_FIXTURES / "gemma2"), "--prompt", "x"])
  assert code == 2
  assert "--tokenizer" in capsys.readouterr().err


def test_module_entry_point_help():
  out = subprocess.run(
    [sys.executable, "-m", "gemma_surgery", "--help"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert all(verb in out for verb in ("tour", "generate", "sae-features", "info"))


def _fixture_args(variant="gemma3"):
  return [
    str(HF_FIXTURES / variant),
    "--dtype",
    "float32",
    "--tokenizer",
    str(TOKENIZER),
  ]


def test_generate_with_a_steering_vector_matches_the_library(capsys, tmp_path):
  vector = np.random.default_rng(0).standard_normal(64).astype(np.float32)
  np.save(tmp_path / "v.npy", vector)
  argv = ["generate", *_fixture_args(), "--prompt", "def f", "--max-new-tokens", "8"]
  assert (
    cli.main(
      [*argv, "--vector", str(tmp_path / "v.npy"), "--layer", "2", "--scale", "6"]
    )
    == 0
  )
  steered_text = capsys.readouterr().out
  assert cli.main(argv) == 0
  plain_text = capsys.readouterr().out
  lm = gemma_surgery.load(
    HF_FIXTURES / "gemma3", dtype="float32", tokenizer=TOKENIZER, progress=False
  )
  named = pz.nx.wrap(jnp.asarray(vector)).tag("embedding")
  model = gemma_surgery.steer(lm.model, "resid_post", 2, named, 6.0)
  out = gemma_surgery.generate(
    model, ["def f"], max_new_tokens=8, tokenizer=lm.tokenizer, eos_id=lm.config.eos_id
  )
  assert steered_text.rstrip("\n") == "def f" + out.text[0]
  assert steered_text != plain_text  # negative control: the vector matters


def test_generate_steering_needs_its_arguments(capsys, tmp_path):
  argv = ["generate", *_fixture_args(), "--prompt", "x"]
  assert cli.main([*argv, "--feature", "3"]) == 2
  assert "--sae" in capsys.readouterr().err
  np.save(tmp_path / "v.npy", np.zeros(64, np.float32))
  assert cli.main([*argv, "--vector", str(tmp_path / "v.npy")]) == 2
  assert "--layer" in capsys.readouterr().err


def test_sae_features_lists_the_top_latents_per_token(capsys, tmp_path):
  arrays = random_sae(0)
  folder = write_gs2(tmp_path, "resid_post", 2, arrays)
  assert (
    cli.main(
      [
        "sae-features",
        *_fixture_args(),
        "--sae",
        str(folder),
        "--prompt",
        "def f(x)",
        "--k",
        "3",
      ]
    )
    == 0
  )
  lines = capsys.readouterr().out.strip().splitlines()
  lm = gemma_surgery.load(
    HF_FIXTURES / "gemma3", dtype="float32", tokenizer=TOKENIZER, progress=False
  )
  ids = lm.tokenizer.encode("def f(x)", add_bos=True)
  patched, acts = gemma_surgery.capture(lm.model, "resid_post", [2])
  patched(pz.nx.wrap(jnp.asarray([ids])).tag("batch", "seq"))
  x = np.asarray(acts["resid_post", 2].unwrap("batch", "seq", "embedding"))[0]
  f = np_encode(x, arrays)
  assert len(lines) == len(ids)
  for line, row in zip(lines[1:], f[1:], strict=True):  # BOS passes through
    top = [int(i) for i in np.argsort(-row, kind="stable")[:3] if row[i] > 0]
    listed = [int(item.split(":")[0]) for item in line.split()[1:] if ":" in item]
    assert listed == top, line
  with pytest.raises(SystemExit):
    cli.main(["sae-features", *_fixture_args(), "--prompt", "x"])  # --sae is required


def test_tour_writes_a_self_contained_report_with_pngs(capsys, tmp_path):
  code = cli.main(
    [
      "tour",
      "--model",
      str(HF_FIXTURES / "gemma2"),
      "--dtype",
      "float32",
      "--tokenizer",
      str(TOKENIZER),
      "--out",
      str(tmp_path),
      "--prompt",
      "def f(a):\n  return a",
    ]
  )
  assert code == 0
  html = (tmp_path / "report.html").read_text()
  for heading in (
    "Logit lens",
    "MLP neurons",
    "Attention",
    "Activation patching",
    "induction",
  ):
    assert heading in html
  assert (
    "https://" not in html.replace("https://www.neuronpedia.org", "")
    and "<script src" not in html
  )
  pngs = sorted(p.name for p in tmp_path.glob("*.png"))
  assert "patching_resid_post.png" in pngs and "heads_induction.png" in pngs
  assert all((tmp_path / p).read_bytes().startswith(b"\x89PNG") for p in pngs)


def _error_line(stderr: str) -> str:
  """The one ``error:`` line of a failed command (no traceback)."""
  lines = [line for line in stderr.splitlines() if "error:" in line]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr
  return lines[0]


@pytest.mark.parametrize("k", ["0", "-3", "two"])
def test_sae_features_k_below_one_is_a_usage_error(capsys, tmp_path, k):
  folder = write_gs2(tmp_path, "resid_post", 2, random_sae(0))
  argv = ["sae-features", *_fixture_args(), "--sae", str(folder), "--prompt", "x"]
  with pytest.raises(SystemExit) as exit_info:
    cli.main([*argv, "--k", k])
  assert exit_info.value.code == 2
  line = _error_line(capsys.readouterr().err)
  assert "argument --k" in line
  assert ("'two' is not an integer" if k == "two" else "valid: 1 or more") in line


def test_sae_features_k_above_the_width_names_the_range(capsys, tmp_path):
  folder = write_gs2(tmp_path, "resid_post", 2, random_sae(0))  # 128 latents
  argv = ["sae-features", *_fixture_args(), "--sae", str(folder), "--prompt", "x"]
  assert cli.main([*argv, "--k", "129"]) == 2
  line = _error_line(capsys.readouterr().err)
  assert "--k 129 is out of range" in line and "valid: 1..128" in line


class _Touch:
  """Unpickling it would create ``marker``."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.touch, (self.marker,))


def _bad_vectors(tmp_path) -> dict[str, tuple]:
  """name -> (path, what the error line must say)."""
  marker = tmp_path / "unpickled"
  np.save(tmp_path / "pickled.npy", np.array([_Touch(marker)], object))
  np.save(tmp_path / "matrix.npy", np.zeros((2, 64), np.float32))
  np.save(tmp_path / "short.npy", np.zeros(10, np.float32))
  np.savez(tmp_path / "archive.npz", v=np.zeros(64, np.float32))
  (tmp_path / "garbage.npy").write_bytes(b"not an npy file")
  (tmp_path / "raw.pkl").write_bytes(pickle.dumps(_Touch(marker)))
  return {
    "missing": (tmp_path / "absent.npy", "no such file"),
    "pickled": (tmp_path / "pickled.npy", "pickled (object) data, which is never"),
    "matrix": (tmp_path / "matrix.npy", "float32 array of shape (2, 64)"),
    "short": (tmp_path / "short.npy", "has 10 values, but the model's d_model is 64"),
    "archive": (tmp_path / "archive.npz", "is an .npz archive"),
    "raw_pickle": (tmp_path / "raw.pkl", "is a pickle (never loaded)"),
    "garbage": (tmp_path / "garbage.npy", "is not a .npy file"),
  }


@pytest.mark.parametrize(
  "name",
  ["missing", "pickled", "matrix", "short", "archive", "garbage", "raw_pickle"],
)
def test_generate_bad_vector_files_exit_2_with_one_error_line(capsys, tmp_path, name):
  path, says = _bad_vectors(tmp_path)[name]
  argv = ["generate", *_fixture_args(), "--prompt", "x", "--layer", "1"]
  assert cli.main([*argv, "--vector", str(path)]) == 2
  err = capsys.readouterr().err
  line = _error_line(err)
  assert str(path) in line and says in line
  assert "shape (64,)" in line or "d_model values" in line  # what is expected
  if name != "short":  # the file is read before the model loads
    assert not any(line.startswith("loaded ") for line in err.splitlines())
  assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("under", [False, True])
def test_tour_out_on_a_file_exits_2_before_loading(capsys, tmp_path, under):
  file = tmp_path / "notes.txt"
  file.write_text("keep me")
  out = file / "tour" if under else file
  argv = ["tour", "--model", str(HF_FIXTURES / "gemma2"), "--tokenizer", str(TOKENIZER)]
  assert cli.main([*argv, "--out", str(out)]) == 2
  err = capsys.readouterr().err
  line = _error_line(err)
  assert repr(str(out)) in line and "a file; pass a folder" in line
  assert repr(str(file)) in line
  assert not any(line.startswith("loaded ") for line in err.splitlines())
  assert file.read_text() == "keep me"


def test_a_skipped_tour_png_is_a_warning_not_silence(tmp_path, monkeypatch):
  ctx = TourContext(
    lm=None,
    prompt="",
    ids=np.zeros((1, 2), np.int32),
    pieces=["a", "b"],
    report=gemma_surgery.viz.Report("t"),
    out=tmp_path,
  )
  values = np.arange(6, dtype=np.float32).reshape(2, 3)
  ctx.heatmap("ok", values, "ok", row_labels=[0, 1], col_labels=[0, 1, 2])
  assert ctx.pngs == [tmp_path / "ok.png"]

  def broken(self, path, **kwargs):
    raise ImportError("No module named 'matplotlib'")

  monkeypatch.setattr(Heatmap, "save_png", broken)
  with pytest.warns(UserWarning, match="skipped lost.png"):
    ctx.heatmap("lost", values, "lost", row_labels=[0, 1], col_labels=[0, 1, 2])
  assert ctx.pngs == [tmp_path / "ok.png"]


def test_error_hints_name_cli_flags_not_python_calls(capsys, tmp_path):
  argv = ["sae-features", *_fixture_args(), "--prompt", "x"]
  code = cli.main([*argv, "--sae", str(tmp_path / "no_such_sae")])
  err = capsys.readouterr().err
  assert code == 2 and err.count("error:") == 1
  assert "--sae-path" in err and "load_sae(" not in err
  # The library itself keeps its Python hint (the CLI translates it).
  with pytest.raises(gemma_surgery.SAEError, match=r"load_sae\(repo_id"):
    gemma_surgery.sae.load_sae(str(tmp_path / "no_such_sae"))
