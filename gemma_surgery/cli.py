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

import contextlib
import io
import pathlib
import sys
import time

import numpy as np

from gemma_surgery import errors
from gemma_surgery.circuits.trace import trace_prompt
from gemma_surgery.cli_parser import build_parser, synopsis
from gemma_surgery.config_gemma4 import describe_layers
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

__all__ = ["in_cli_terms", "main", "synopsis"]


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
      f"{lm.path} has no tokenizer.model or tokenizer.json; pass --tokenizer PATH."
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
  print(f"{'tokenizer':>24}: {lm.tokenizer!r}")
  # Heads and MLP widths vary by layer on Gemma 4: one row per kind of layer.
  print("per layer:")
  for layers, spec in describe_layers(lm.config):
    print(f"  {layers}: {spec}")
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
  args = build_parser().parse_args(argv)
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
