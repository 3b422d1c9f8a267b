"""Fused generation: vs Penzai's Python loop, vs the bandwidth floor, bf16,
sampling at a 256k vocabulary, surgery overhead and compile time.

Float32 unless said, a 16-token prompt, greedy. Configs: ``tiny`` (the Gemma 2
test fixture ``tests/fixtures/hf/gemma2``: 4 layers, d_model 64, vocab 512)
and ``mid`` (`configs.MID`: a random Gemma 2 with 8 layers, d_model 512, 8
query / 4 KV heads, head_dim 64, MLP 2048, vocab 32 000, window 256
alternating with global, soft caps 50/30). Everything compared is measured
side by side (interleaved repeats, medians, after a warm-up call):

1. ``gs.generate`` (64 new tokens) on a model with a steering layer after the
   middle block vs Penzai's ``temperature_sample_pyloop`` (body jitted with
   ``penzai.toolshed.jit_wrapper.Jitted``, temperature 1e-6) on the same
   patched model; the pyloop's KV-cache conversion happens before its timer.
2. Loop efficiency: that call vs ``prefill + 64 × one decode step``, each a
   separately jitted call on the same converted model.
3. Surgery overhead: steering plus a capture of ``resid_post`` at every layer
   vs the unpatched model.
4. Decode step vs the memory-bandwidth floor: the step time is ``(t(64 new)
   − t(16 new)) / 48``; the floor is the bytes a step reads (every parameter,
   the tied embedding once as the unembedding, the KV caches) over the
   bandwidth a jitted float32 matrix-vector product reaches on this machine
   (measured in the same run). Batch 1, 4 and 16, float32 and bf16 weights
   (float32 activations), bf16 weights with a bf16 KV cache
   (``kv_cache_dtype``), with bf16's max logit difference from float32.
5. Sampling (temperature 0.7, top-p 0.9) vs greedy on the mid config with a
   256 000-token vocabulary.
6. Compile time of the fused loop (mid, steered): trace, lower, compile.

Run: ``python bench/generation.py`` (``--runs N``; ``--json F`` for
`run_all.py`; ``--quick`` skips the batch-16 and 256k-vocabulary parts;
``--parts`` picks among pyloop, compile, floors, sampling).
"""

from __future__ import annotations

import os

# Compile-time figures must not be persistent-cache hits.
os.environ.setdefault("GEMMA_SURGERY_COMPILATION_CACHE", "0")
import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import record
from configs import MID, TINY_FIXTURE
from penzai import pz
from penzai.models.transformer import sampling_mode, simple_decoding_loop
from penzai.toolshed import jit_wrapper

import gemma_surgery as gs
from gemma_surgery.generation import decoding, inputs, sampling

PROMPT, NEW = 16, 64
FIXTURE = TINY_FIXTURE


def median_time(fn, runs: int) -> float:
  """Median wall time of ``fn()`` (which must block) over ``runs`` calls."""
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@functools.partial(jax.jit, static_argnames=("structure", "state_index"))
def _one_call(structure, leaves, state_index, state, tokens):
  """One KV-cached model call (prefill or one decode step) + argmax."""
  unbound, values = jax.tree_util.tree_unflatten(structure.treedef, leaves)
  values = list(values)
  for i, value in zip(state_index, state, strict=True):
    values[i] = value.unfreeze_as_copy()
  logits = pz.bind_variables(unbound, values)(pz.nx.wrap(tokens).tag("batch", "seq"))
  nxt = logits[{"seq": -1}].unwrap("batch", "vocabulary").argmax(-1)
  return nxt[:, None].astype(jnp.int32), [values[i].freeze() for i in state_index]


def step_reference(model, prompt: np.ndarray):
  """A function running prefill + ``NEW`` decode steps as separate jitted calls.

  Each call blocks before the next one starts, so the total is ``prefill +
  NEW × one decode step`` measured directly.
  """
  prepared, leaves = decoding.prepare(model, 1, PROMPT + NEW, None, None)
  _, values = jax.tree_util.tree_unflatten(prepared.structure.treedef, leaves)
  index = tuple(i for i, v in enumerate(values) if isinstance(v, pz.StateVariableValue))
  state0 = [values[i] for i in index]
  call = functools.partial(_one_call, prepared.structure, leaves, index)
  times = {"prefill": [], "step": []}

  def run():
    start = time.perf_counter()
    token, state = jax.block_until_ready(call(state0, prompt))
    times["prefill"].append(time.perf_counter() - start)
    for _ in range(NEW):
      start = time.perf_counter()
      token, state = jax.block_until_ready(call(state, token))
      times["step"].append(time.perf_counter() - start)
    return token

  return run, times


def pyloop(model, prompt: np.ndarray):
  """Penzai's Python sampling loop: ``(setup, run)``, conversion in setup."""
  named = pz.nx.wrap(jnp.asarray(prompt)).tag("batch", "seq")
  box = {}

  def setup():
    cached = sampling_mode.KVCachingTransformerLM.from_uncached(
      model, cache_len=PROMPT + NEW, batch_axes={"batch": 1}, pad_id=-1
    )
    box["sampler"] = pz.select(cached).at(lambda c: c.body).apply(jit_wrapper.Jitted)

  def run():
    out = simple_decoding_loop.temperature_sample_pyloop(
      box["sampler"],
      prompt=named,
      rng=jax.random.key(0),
      temperature=1e-6,
      max_sampling_steps=NEW,
    )
    return np.asarray(out.unwrap("batch", "seq"))

  return setup, run


def interleaved(timed: dict, runs: int, setups: dict | None = None) -> dict:
  """Median seconds per function over ``runs`` interleaved rounds.

  Each function runs once first (compile); ``setups[key]`` (untimed) runs
  before each timed call of ``key``.
  """
  setups = setups or {}
  for key, fn in timed.items():
    setups.get(key, lambda: None)()
    fn()
  times = {key: [] for key in timed}
  for _ in range(runs):
    for key, fn in timed.items():
      setups.get(key, lambda: None)()
      start = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - start)
  return {key: statistics.median(v) for key, v in times.items()}


def prompt_for(model, batch: int = 1) -> np.ndarray:
  vocab = model.metadata.vocab_size
  prompt = np.random.default_rng(0).integers(3, vocab, (batch, PROMPT))
  prompt[:, 0] = 2
  return prompt.astype(np.int32)


def steered_model(model):
  layers = gs.sites.num_layers(model)
  rng = np.random.default_rng(0)
  direction = rng.standard_normal(model.metadata.embedding_dim).astype(np.float32)
  vector = pz.nx.wrap(jnp.asarray(direction)).tag("embedding")
  return gs.steer(model, "resid_post", layers // 2, vector, 0.5)


def fused(model, prompt, new=NEW, **kwargs):
  return lambda: gs.generate(model, prompt, max_new_tokens=new, **kwargs).tokens


def versus_pyloop(rec, name: str, model, runs: int) -> None:
  """Parts 1-3 on one config."""
  prompt = prompt_for(model)
  steered = steered_model(model)
  full, _ = gs.capture(steered, "resid_post")
  reference, parts = step_reference(steered, prompt)
  py_setup, py_run = pyloop(steered, prompt)
  timed = {
    "steered": fused(steered, prompt),
    "plain": fused(model, prompt),
    "full": fused(full, prompt),
    "reference": reference,
    "pyloop": py_run,
  }
  reference()  # compile before the part timers are cleared
  parts["prefill"].clear()
  parts["step"].clear()
  t = interleaved(timed, runs, {"pyloop": py_setup})
  py_setup()
  same = bool((fused(steered, prompt)() == py_run()).all())
  ratio = t["pyloop"] / t["steered"]
  efficiency = t["steered"] / t["reference"]
  overhead = (t["full"] / t["plain"] - 1) * 100
  print(f"\n== {name}")
  print(f"fused {t['steered'] * 1e3:.1f} ms, pyloop {t['pyloop'] * 1e3:.1f} ms,")
  print(f"  speed-up {ratio:.2f}x, same tokens {same}")
  print(f"loop efficiency {efficiency:.3f}; surgery overhead {overhead:.1f} %")
  goal = ">= 6x" if name == "mid" else ">= 30x"
  rec.figure(
    f"{name}_fused_ms",
    f"{name}: fused `gs.generate`, steered, {NEW} tokens",
    t["steered"] * 1e3,
    "ms",
  )
  rec.figure(
    f"{name}_pyloop_ms",
    f"{name}: Penzai `temperature_sample_pyloop`",
    t["pyloop"] * 1e3,
    "ms",
  )
  rec.figure(f"{name}_ratio", f"{name}: speed-up fused / pyloop", ratio, "x", goal=goal)
  rec.figure(f"{name}_same", f"{name}: same tokens as the pyloop", same)
  rec.figure(
    f"{name}_efficiency",
    f"{name}: loop efficiency fused / (prefill + {NEW} steps)",
    efficiency,
    goal="<= 1.05",
  )
  rec.figure(
    f"{name}_overhead",
    f"{name}: steer + capture every layer, overhead",
    overhead,
    "%",
    goal="<= 10 %",
  )


def bandwidth(runs: int) -> float:
  """Bytes/s of a jitted float32 matrix-vector product over 256 MiB."""
  w = jnp.ones((8192, 8192), jnp.float32)
  x = jnp.ones((8192,), jnp.float32)
  matvec = jax.jit(lambda w, x: w @ x)
  t = interleaved({"mv": lambda: jax.block_until_ready(matvec(w, x))}, runs * 3)
  return w.nbytes / t["mv"]


def step_bytes(model, batch: int, cache_len: int, kv_bytes: int = 4) -> int:
  """Bytes one decode step reads: parameters plus the KV caches."""
  params = sum(
    x.nbytes
    for p in pz.unbind_params(model)[1]
    for x in jax.tree_util.tree_leaves(p.value)
  )
  kv = 2 * MID.num_layers * MID.num_kv_heads * MID.head_dim * cache_len
  return params + kv * batch * kv_bytes


def step_time(model, prompt, runs: int, **kwargs) -> float:
  t = interleaved(
    {
      "long": fused(model, prompt, NEW, **kwargs),
      "short": fused(model, prompt, 16, **kwargs),
    },
    runs,
  )
  return (t["long"] - t["short"]) / (NEW - 16)


def rounded(model):
  """``model`` with bf16 weights (the same values rounded), float32 activations.

  Built with its own config, then given ``model``'s weights: drawing random
  weights in bf16 directly would give other weights, not rounded ones.
  """
  half = gs.build_model(
    MID.replace(parameter_dtype="bfloat16", activation_dtype="float32"),
    jax.random.key(0),
  )
  full = {p.label: p.value for p in pz.unbind_params(model)[1]}
  for param in pz.unbind_params(half)[1]:
    param.value = jax.tree_util.tree_map(
      lambda x: x.astype(jnp.bfloat16), full[param.label]
    )
  return half


def floors(rec, runs: int, quick: bool) -> None:
  """Part 4: decode steps vs the bandwidth floor, float32 and bf16."""
  bw = bandwidth(runs)
  rec.figure(
    "bandwidth", "matrix-vector bandwidth (float32, 256 MiB)", bw / 1e9, "GB/s"
  )
  models = {"float32": gs.build_model(MID, jax.random.key(0))}
  models["bf16"] = rounded(models["float32"])
  # bf16 weights and a bf16 KV cache (float32 activations throughout).
  variants = [
    ("float32", models["float32"], None),
    ("bf16", models["bf16"], None),
    ("bf16_kv16", models["bf16"], "bfloat16"),
  ]
  for dtype, model, kv_dtype in variants:
    kv_bytes = 2 if kv_dtype else 4
    for batch in (1, 4) if quick else (1, 4, 16):
      prompt = prompt_for(model, batch)
      step = step_time(model, prompt, runs, kv_cache_dtype=kv_dtype)
      floor = step_bytes(model, batch, PROMPT + NEW, kv_bytes) / bw
      print(
        f"{dtype} batch {batch}: step {step * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms"
      )
      key = f"{dtype}_b{batch}"
      rec.figure(
        f"{key}_step",
        f"mid {dtype} weights{' + bf16 KV cache' if kv_dtype else ''}, batch"
        f" {batch}: decode step",
        step * 1e3,
        "ms",
        note=f"{batch / step:.0f} tok/s",
      )
      rec.figure(
        f"{key}_floor",
        f"mid {dtype} weights{' + bf16 KV cache' if kv_dtype else ''}, batch"
        f" {batch}: floor / step",
        floor / step,
        goal=">= 0.9" if dtype == "float32" else None,
      )
  prompt = prompt_for(models["float32"], 4)
  a = gs.generate(models["float32"], prompt, max_new_tokens=NEW, return_logits=True)
  b = gs.generate(models["bf16"], prompt, max_new_tokens=NEW, return_logits=True)
  la = np.asarray(a.logits.unwrap("batch", "seq", "vocabulary"))
  lb = np.asarray(b.logits.unwrap("batch", "seq", "vocabulary"))
  worst, agree = 0.0, 0
  for row in range(4):
    differs = np.flatnonzero(a.tokens[row] != b.tokens[row])
    end = int(differs[0]) if differs.size else NEW
    agree += end
    worst = max(worst, float(np.abs(la[row, : end + 1] - lb[row, : end + 1]).max()))
  rec.figure(
    "bf16_logit_diff",
    "mid bf16 weights: max abs logit difference from float32 (same context)",
    worst,
    note=f"logits up to {np.abs(la).max():.0f}",
  )
  rec.figure(
    "bf16_agree",
    "mid bf16 weights: greedy tokens equal to float32 before the first difference",
    agree,
    note=f"of {4 * NEW}, 4 rows",
  )


def sampling_cost(rec, runs: int) -> None:
  """Part 5: top-p sampling vs greedy at a 256k vocabulary."""
  model = gs.build_model(MID.replace(vocab_size=256_000), jax.random.key(0))
  prompt = prompt_for(model)
  t = interleaved(
    {
      "greedy": fused(model, prompt),
      "sampled": fused(model, prompt, temperature=0.7, top_p=0.9),
    },
    runs,
  )
  slower = (t["sampled"] / t["greedy"] - 1) * 100
  print(
    f"256k vocabulary: greedy {t['greedy'] * 1e3:.0f} ms,"
    f" sampled {t['sampled'] * 1e3:.0f} ms"
  )
  rec.figure(
    "vocab256k_greedy", "mid, 256k vocabulary: greedy", t["greedy"] * 1e3, "ms"
  )
  rec.figure(
    "vocab256k_sampled_overhead",
    "mid, 256k vocabulary: T 0.7, top-p 0.9 vs greedy",
    slower,
    "%",
    goal="<= 15 %",
  )


def greedy_controls(vocab: int) -> dict:
  """The fused loop's control inputs for greedy decoding, no EOS."""
  return {
    "eos": np.int32(-1),
    "pad": np.int32(0),
    "temperature": np.float32(1.0),
    "top_k": np.int32(vocab),
    "top_p": np.float32(2.0),
  }


def fused_loop_phases(model) -> tuple[float, float, float]:
  """Seconds to trace, lower and XLA-compile the fused loop (mid, steered)."""
  steered = steered_model(model)
  prompt = prompt_for(model)
  prepared, leaves = decoding.prepare(steered, 1, PROMPT + NEW, None, None)
  controls = greedy_controls(model.metadata.vocab_size)
  lengths = (prompt != inputs.PAD_MARK).sum(axis=1).astype(np.int32)
  args = (prepared.structure, leaves, prompt, lengths, controls, jax.random.key(0))
  kwargs = {
    "max_new_tokens": NEW,
    "mode": sampling.SamplingMode(greedy=True),
  }
  start = time.perf_counter()
  traced = decoding.decode.trace(*args, **kwargs)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  lowered.compile()
  t3 = time.perf_counter()
  return t1 - start, t2 - t1, t3 - t2


def compile_time(rec, model) -> None:
  """Part 6: trace, lower and compile the fused loop (mid, steered)."""
  trace, lower, compile_ = fused_loop_phases(model)
  print(f"compile: trace {trace:.2f} s, lower {lower:.2f} s, compile {compile_:.2f} s")
  rec.figure("trace_s", "fused loop, mid: trace", trace, "s")
  rec.figure("lower_s", "fused loop, mid: lower", lower, "s")
  rec.figure("compile_s", "fused loop, mid: XLA compile", compile_, "s")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--quick", action="store_true")
  parts = ["pyloop", "compile", "floors", "sampling"]
  parser.add_argument("--parts", nargs="*", choices=parts, default=parts)
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("generation", args)
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; prompt {PROMPT}")
  mid = gs.build_model(MID, jax.random.key(0))
  if "pyloop" in args.parts:
    tiny = gs.load(FIXTURE, dtype="float32", progress=False).model
    versus_pyloop(rec, "tiny", tiny, args.runs)
    versus_pyloop(rec, "mid", mid, args.runs)
  if "compile" in args.parts:
    compile_time(rec, mid)
  if "floors" in args.parts:
    floors(rec, args.runs, args.quick)
  if "sampling" in args.parts and not args.quick:
    sampling_cost(rec, args.runs)
  rec.save()


if __name__ == "__main__":
  main()
