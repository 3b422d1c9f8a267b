"""The ``gemma-surgery`` command (also ``python -m gemma_surgery``).

Verbs:
  tour [--model M] [--sae S] [--out DIR]   every analysis → one HTML report
  generate SOURCE --prompt TEXT            a continuation (optionally steered)
  sae-features SOURCE --sae S --prompt T   the top SAE features of every token
  trace SOURCE --prompt T [--out DIR]      attribution graph → JSON + HTML
  info SOURCE                              the model's architecture

Every verb also runs on several processes (hosts), the same command on each:
``--coordinator HOST:PORT --num-processes N --process-id I [--mesh
data=2,model=4]`` (or the ``JAX_*`` variables of `gemma_surgery.parallel.distributed`;
nothing on Cloud TPU pods). Only process 0 prints results and writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import sys
import time

import numpy as np

from gemma_surgery import errors
from gemma_surgery.circuits.trace import trace_prompt
from gemma_surgery.generation.api import generate
from gemma_surgery.generation.inputs import named_tokens
from gemma_surgery.host import to_numpy
from gemma_surgery.loading.api import load
from gemma_surgery.parallel import distributed
from gemma_surgery.sae import (
  load_clt,
  load_sae,
  load_transcoders,
  shard_sae,
  splice_sae,
)
from gemma_surgery.sae.splice import check_fits
from gemma_surgery.surgery import steer
from gemma_surgery.surgery.run import jit_forward
from gemma_surgery.tour import check_out, run_tour

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


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument("--tokenizer", default=None, help="tokenizer.model path")

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


def _start(args):
  """Joins the multi-process run (if any) and builds the mesh (or None)."""
  info = distributed.initialize(
    args.coordinator,
    args.num_processes,
    args.process_id,
    timeout_s=args.init_timeout,
  )
  if args.mesh is not None:
    return distributed.make_mesh(args.mesh)
  if info.process_count > 1:
    return distributed.make_mesh()
  return None


def _load(args):
  dtype = args.dtype or ("float32" if args.source == "tiny" else "bfloat16")
  start = time.perf_counter()
  lm = load(
    args.source,
    dtype=dtype,
    variant=args.variant,
    tokenizer=args.tokenizer,
    mesh=args.mesh_,
    strict_sharding=args.mesh is not None,
  )
  print(f"loaded {lm.path} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
  return lm


def _load_sae(args, lm):
  enc = load_sae(args.sae, args.sae_path)
  if args.mesh_ is not None:
    enc = shard_sae(enc, args.mesh_)
  print(f"SAE: {enc.info}", file=sys.stderr)
  return enc


def _need_tokenizer(lm) -> None:
  if lm.tokenizer is None:
    raise errors.TokenizerError(
      f"{lm.path} has no tokenizer.model; pass --tokenizer PATH."
    )


def _steering_vector(args) -> np.ndarray | None:
  """Checks the steering flags and reads ``--vector``, before the model loads."""
  if args.feature is not None and args.sae is None:
    raise errors.InputError("--feature needs --sae.")
  if args.vector is None:
    return None
  if args.layer is None:
    raise errors.InputError("--vector needs --layer (and optionally --site).")
  return _read_vector(args.vector)


def _read_vector(path: str) -> np.ndarray:
  """The ``{embedding}`` steering vector saved at ``path`` (``np.save``).

  Raises:
    InputError: Missing or unreadable file, pickled data (never loaded), or
      not one numeric vector; the message says what is expected.
  """
  expected = (
    "expected a .npy file holding one float vector of d_model values, e.g."
    " np.save(path, vector.astype(np.float32))"
  )
  file = pathlib.Path(path)
  if not file.is_file():
    raise errors.InputError(f"--vector {path}: no such file; {expected}.")
  with file.open("rb") as f:
    magic = f.read(6)
  if magic.startswith(b"PK\x03\x04"):
    raise errors.InputError(f"--vector {path} is an .npz archive; {expected}.")
  if magic != b"\x93NUMPY":  # np.load would try to unpickle it
    what = "a pickle (never loaded)" if magic[:1] == b"\x80" else "not a .npy file"
    raise errors.InputError(f"--vector {path} is {what}; {expected}.")
  try:
    vector = np.load(path, allow_pickle=False)
  except ValueError as e:
    if "pickle" not in str(e).lower():
      raise errors.InputError(f"--vector {path}: unreadable ({e}); {expected}.") from e
    raise errors.InputError(
      f"--vector {path} holds pickled (object) data, which is never loaded (it"
      f" can run arbitrary code); {expected}."
    ) from e
  except (OSError, EOFError) as e:
    raise errors.InputError(f"--vector {path}: unreadable ({e}); {expected}.") from e
  if vector.dtype.kind not in "fiu" or vector.ndim != 1:
    raise errors.InputError(
      f"--vector {path} holds a {vector.dtype} array of shape {vector.shape};"
      f" {expected}."
    )
  return vector


def _steered(args, lm, vector: np.ndarray | None):
  """The model with the requested steering (or unchanged)."""
  import jax.numpy as jnp
  from penzai import pz

  if args.feature is not None:
    enc = _load_sae(args, lm)
    check_fits(lm.model, enc)
    width = enc.info.width
    if not 0 <= args.feature < width:
      raise errors.SAEError(f"--feature {args.feature} is outside 0..{width - 1}.")
    row = enc.w_dec.value[{"latents": args.feature}].astype(jnp.float32)
    return steer(lm.model, enc.info.site, enc.info.layer, row, args.scale)
  if vector is not None:
    d_model = lm.config.embedding_dim
    if vector.shape != (d_model,):
      raise errors.InputError(
        f"--vector {args.vector} has {vector.size} values, but the model's"
        f" d_model is {d_model}; expected shape ({d_model},)."
      )
    named = pz.nx.wrap(jnp.asarray(vector, jnp.float32)).tag("embedding")
    return steer(lm.model, args.site, args.layer, named, args.scale)
  return lm.model


def _generate(args) -> int:
  vector = _steering_vector(args)
  lm = _load(args)
  _need_tokenizer(lm)
  model = _steered(args, lm, vector)
  out = generate(
    model,
    [args.prompt],
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    seed=args.seed,
    eos_id=lm.config.eos_id,
    tokenizer=lm.tokenizer,
    mesh=args.mesh_,
  )
  print(args.prompt + out.text[0])
  return 0


def _sae_features(args) -> int:
  lm = _load(args)
  _need_tokenizer(lm)
  enc = _load_sae(args, lm)
  if args.k > enc.info.width:
    raise errors.InputError(
      f"--k {args.k} is out of range: the SAE has {enc.info.width} latents;"
      f" valid: 1..{enc.info.width}."
    )
  spliced, feats = splice_sae(lm.model, enc, use_error_term=True, capture_features=True)
  ids = lm.tokenizer.encode(args.prompt, add_bos=True)
  jit_forward(spliced)(named_tokens(np.asarray([ids])))
  acts = to_numpy(feats.value().unwrap("batch", "seq", "latents"))[0]
  k = args.k
  for piece, row in zip(lm.tokenizer.pieces(ids), acts, strict=True):
    top = np.argsort(-row, kind="stable")[:k]
    listed = "  ".join(f"{int(i)}:{row[i]:.2f}" for i in top if row[i] > 0)
    print(f"{piece!r:>16}  {listed or '-'}")
  return 0


def _tour(args) -> int:
  check_out(args.out)  # before the model loads
  lm = _load(args)
  enc = _load_sae(args, lm) if args.sae else None
  path = run_tour(lm, args.out, prompt=args.prompt, sae=enc)
  print(f"wrote {path}")
  return 0


def _trace(args) -> int:
  for name in ("node_threshold", "edge_threshold"):
    if not 0.0 <= getattr(args, name) <= 1.0:
      flag = "--" + name.replace("_", "-")
      raise errors.InputError(f"{flag} {getattr(args, name)} must be in [0, 1].")
  check_out(args.out)
  lm = _load(args)
  _need_tokenizer(lm)
  if args.clt:
    dictionary = load_clt(args.transcoders, args.transcoders_path)
  else:
    dictionary = load_transcoders(
      args.transcoders, args.transcoders_path, num_layers=lm.config.num_layers
    )
  graph, json_path, html_path = trace_prompt(
    lm,
    dictionary,
    args.prompt,
    args.out,
    node_threshold=args.node_threshold,
    edge_threshold=args.edge_threshold,
    max_n_logits=args.max_logits,
  )
  print(f"{graph.n_features} active features, {graph.size} nodes")
  print(f"wrote {json_path}\nwrote {html_path}")
  return 0


def _info(args) -> int:
  lm = _load(args)
  for key, value in lm.config.to_dict().items():
    print(f"{key:>24}: {value}")
  print(f"{'parameters':>24}: {lm.config.num_parameters():,}")
  return 0


def _serve(args) -> int:
  # The serve wing needs the optional FastAPI/uvicorn dependencies: imported
  # here so that the other verbs work without them.
  try:
    from gemma_surgery import serve
  except ImportError as e:
    raise errors.InputError(
      f"serve needs the 'serve' extra ({e}): pip install gemma-surgery[serve]."
    ) from e
  lm = _load(args)
  _need_tokenizer(lm)
  saes = [_load_sae(args, lm)] if args.sae is not None else []
  limits = serve.Limits(args.max_prompt_tokens, args.max_new_tokens)
  engine = serve.Engine(
    lm.model,
    lm.tokenizer,
    saes,
    eos_id=lm.config.eos_id,
    limits=limits,
    max_batch=args.max_batch,
    mesh=args.mesh_,
    stream_chunk=args.stream_chunk,
  )
  if not distributed.is_primary():
    engine.follow()  # run what process 0 announces, until it stops
    return 0
  print(f"steering sources: {engine.sources}", file=sys.stderr)
  try:
    serve.serve(
      engine,
      host=args.host,
      port=args.port,
      name=args.source,
      window_s=args.window_ms / 1000,
      max_queue=args.max_queue,
    )
  finally:
    engine.stop_followers()
  return 0


_VERBS = {
  "tour": _tour,
  "generate": _generate,
  "sae-features": _sae_features,
  "trace": _trace,
  "info": _info,
  "serve": _serve,
}


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  where = ""
  try:
    args.mesh_ = _start(args)
    import jax

    if jax.process_count() > 1:
      where = f"process {jax.process_index()}: "
    if jax.process_index() == 0:
      return _VERBS[args.verb](args)
    # Other processes compute the same thing; only process 0 reports it.
    with contextlib.redirect_stdout(io.StringIO()):
      with contextlib.redirect_stderr(io.StringIO()):
        return _VERBS[args.verb](args)
  except errors.GemmaSurgeryError as e:
    print(f"{where}error: {in_cli_terms(str(e))}", file=sys.stderr)
    return 2


# Hints that library errors give in Python terms, and the same in CLI flags.
_CLI_TERMS = (
  (
    "load_sae(repo_id, 'layer_20/width_16k/average_l0_71')",
    "--sae REPO_ID --sae-path layer_20/width_16k/average_l0_71",
  ),
  ("gemma_surgery.load(...)", "the command (SOURCE, or --model for tour)"),
)


def in_cli_terms(message: str) -> str:
  """A library error message with its Python-call hints as CLI flags."""
  for python, cli in _CLI_TERMS:
    message = message.replace(python, cli)
  return message


if __name__ == "__main__":
  sys.exit(main())
