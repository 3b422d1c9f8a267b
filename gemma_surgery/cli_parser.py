"""The ``gemma-surgery`` argument parser: verbs, flags and their help.

`gemma_surgery.cli` runs the verbs; `synopsis` gives the usage lines the
README's "The command line" section shows (a test keeps them equal).
"""

from __future__ import annotations

import argparse

__all__ = ["build_parser", "synopsis"]


_SOURCE_HELP = (
  "model: 'tiny' (the embedded default), a local path, hf:org/name,"
  " kaggle:owner/model/framework/variation, or a variant name such as gemma2_2b"
)


def _positive_int(text: str) -> int:
  """An argparse ``type``: an integer ≥ 1 (argparse reports the flag)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} is out of range; valid: 1 or more")
  return value


class _Formatter(argparse.RawDescriptionHelpFormatter):
  """A fixed width, so usage lines (and the README's copy of them) are stable."""

  def __init__(self, prog: str):
    super().__init__(prog, width=96)


def build_parser() -> argparse.ArgumentParser:
  """The ``gemma-surgery`` argument parser (every verb)."""
  return _build()[0]


def synopsis() -> list[str]:
  """Every verb's usage line, as the README's "The command line" shows them."""
  _, verbs = _build()
  return [sub.format_usage().removeprefix("usage: ").rstrip() for sub in verbs.values()]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
  parser = argparse.ArgumentParser(
    prog="gemma-surgery",
    description="Load Gemma 1-4 into Penzai, look inside, cut it open.",
    formatter_class=_Formatter,
    epilog="Run 'gemma-surgery VERB --help' for the options of a verb.",
  )
  verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

  def add_model(p, positional: bool = True):
    if positional:
      p.add_argument("source", help=_SOURCE_HELP)
    else:
      p.add_argument("--model", dest="source", default="tiny", help=_SOURCE_HELP)
    p.add_argument(
      "--dtype",
      default=None,
      choices=["bfloat16", "float32"],
      help="parameter dtype (default: float32 for 'tiny', else bfloat16)",
    )
    p.add_argument("--variant", default=None, help="variant of a Kaggle checkpoint")
    p.add_argument(
      "--tokenizer", default=None, help="tokenizer.model or tokenizer.json path"
    )

  def add_distributed(p):
    group = p.add_argument_group(
      "several processes",
      "run the same command on every process; only process 0 prints and"
      " writes files (defaults: $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES,"
      " $JAX_PROCESS_ID; Cloud TPU pods need none)",
    )
    group.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)
    group.add_argument(
      "--mesh",
      default=None,
      help="device mesh, e.g. data=2,model=4 (default on several processes:"
      " model over all devices); every parameter must split over it",
    )
    group.add_argument(
      "--init-timeout",
      type=int,
      default=300,
      help="seconds to wait for the other processes (default 300)",
    )

  def add_sae(p, required: bool):
    p.add_argument(
      "--sae",
      required=required,
      default=None,
      help="SAE: a local folder/file, a Hub repo (with --sae-path), or 'tiny'",
    )
    p.add_argument("--sae-path", default=None, help="the SAE's folder inside --sae")

  tour = verbs.add_parser(
    "tour",
    formatter_class=_Formatter,
    help="run every analysis on a model and write one HTML report (+ PNGs)",
    description="Logit lens, MLP neurons, attention and head scores, induction"
    " and knockouts, activation patching (and SAE views with --sae), written"
    " to DIR/report.html with PNGs of the heatmaps.",
  )
  add_model(tour, positional=False)
  add_sae(tour, required=False)
  tour.add_argument("--out", default="gemma_surgery_tour", help="output folder")
  tour.add_argument("--prompt", default=None, help="prompt to analyse")
  add_distributed(tour)

  gen = verbs.add_parser(
    "generate",
    formatter_class=_Formatter,
    help="print a continuation (greedy or sampled, optionally steered)",
    description="Generate with the fused KV-cached loop. Steering adds"
    " SCALE × a direction at one site and layer on every position: an SAE"
    " feature's decoder row (--sae, --feature) or a saved vector"
    " (--vector FILE.npy with --site and --layer).",
  )
  add_model(gen)
  gen.add_argument("--prompt", required=True)
  gen.add_argument("--max-new-tokens", type=int, default=32)
  gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  gen.add_argument("--top-k", type=int, default=None)
  gen.add_argument("--top-p", type=float, default=None)
  gen.add_argument("--seed", type=int, default=0)
  add_sae(gen, required=False)
  gen.add_argument("--feature", type=int, default=None, help="SAE feature to steer")
  gen.add_argument("--vector", default=None, help=".npy {embedding} steering vector")
  gen.add_argument("--site", default="resid_post", help="site of --vector")
  gen.add_argument("--layer", type=int, default=None, help="layer of --vector")
  gen.add_argument("--scale", type=float, default=1.0, help="steering scale")
  add_distributed(gen)

  feats = verbs.add_parser(
    "sae-features",
    formatter_class=_Formatter,
    help="print the top SAE features of every token",
    description="Splice the SAE (with its error term, so the model is"
    " unchanged) and list the K most active features per token.",
  )
  add_model(feats)
  add_sae(feats, required=True)
  feats.add_argument("--prompt", required=True)
  feats.add_argument(
    "--k",
    type=_positive_int,
    default=5,
    help="features listed per token: 1..the SAE's width (default 5)",
  )
  add_distributed(feats)

  trace = verbs.add_parser(
    "trace",
    formatter_class=_Formatter,
    help="attribution graph of a prompt: DIR/graph.json + DIR/graph.html",
    description="Replace the MLPs by transcoders (or a CLT) with error nodes,"
    " freeze attention and norms, attribute the top logits of the last token"
    " to features, errors and tokens, prune by influence and write"
    " circuit-tracer / Neuronpedia JSON plus an offline HTML view.",
  )
  add_model(trace)
  trace.add_argument("--prompt", required=True)
  trace.add_argument(
    "--transcoders",
    default="tiny",
    help="'tiny', a local transcoder_all (or CLT) folder, or a Hub repo with"
    " --transcoders-path",
  )
  trace.add_argument(
    "--transcoders-path",
    default=None,
    help="folder inside the repo, e.g. transcoder_all/width_16k_l0_small or"
    " clt/width_262k_l0_medium (with --clt)",
  )
  trace.add_argument("--clt", action="store_true", help="the transcoders are a CLT")
  trace.add_argument("--out", default="gemma_surgery_trace", help="output folder")
  trace.add_argument("--node-threshold", type=float, default=0.8)
  trace.add_argument("--edge-threshold", type=float, default=0.98)
  trace.add_argument("--max-logits", type=_positive_int, default=10)
  add_distributed(trace)

  info = verbs.add_parser(
    "info", help="print the architecture", formatter_class=_Formatter
  )
  add_model(info)
  add_distributed(info)

  srv = verbs.add_parser(
    "serve",
    formatter_class=_Formatter,
    help="serve the model over OpenAI-compatible HTTP, with SAE steering",
    description="OpenAI /v1/completions and /v1/chat/completions (a"
    " 'steering' field in the body steers with SAE features) and a"
    " Neuronpedia-style /v1/steer. Requests arriving within --window-ms share"
    " one fused generation, each row with its own steering (needs the 'serve'"
    " extra: pip install gemma-surgery[serve]). On several processes, process"
    " 0 serves and the others run each generation with it.",
  )
  add_model(srv, positional=False)
  add_sae(srv, required=False)
  srv.add_argument("--host", default="127.0.0.1", help="interface (default loopback)")
  srv.add_argument("--port", type=int, default=8000)
  srv.add_argument("--max-batch", type=_positive_int, default=32, help="rows per batch")
  srv.add_argument("--window-ms", type=float, default=10.0, help="batching window")
  srv.add_argument("--max-queue", type=_positive_int, default=256)
  srv.add_argument("--max-prompt-tokens", type=_positive_int, default=512)
  srv.add_argument("--max-new-tokens", type=_positive_int, default=256)
  srv.add_argument(
    "--stream-chunk",
    type=_positive_int,
    default=8,
    help="tokens decoded between two sends of a streamed answer",
  )
  add_distributed(srv)
  return parser, {
    "tour": tour,
    "generate": gen,
    "sae-features": feats,
    "info": info,
    "serve": srv,
    "trace": trace,
  }
