"""The steering engine: many requests' rows in one fused generation.

`Engine.rows` turns a checked `Job` into batch rows (a Neuronpedia steer job
gives two: steered and default); `Engine.run` generates a list of rows with
the same sampling settings in ONE `gs.generate` call. Per-row steering is a
``{batch, embedding}`` steering vector at every (site, layer) some row steers
(rows that don't steer there add zeros, which changes nothing), so the rows
of different requests never see each other's edits. Every SAE's point is
steered in every batch (zeros where no row asks for it), so steered and
unsteered batches share one structure.

Raw steering vectors of a request (`protocol.Vector`) are added to its row's
vector at their (site, layer); a (site, layer) no SAE writes joins the
batch's points only when some row of that batch steers there (a new set of
points compiles once).

A batch holding a streamed request runs the chunked loop
(`gemma_surgery.generation.generate_stream`, ``stream_chunk`` tokens per
chunk): `Engine.run` reports each chunk as it is decoded. Other batches run
the fused `generate`; both give the same tokens.

Shapes are bucketed so that a stream of requests reuses few compilations:
the batch is padded to a power of two (with unsteered copies of row 0), the
prompt width to a multiple of 16 (left padding), and the number of new
tokens to a power of two, at least 8 (each row keeps its own first
``max_new_tokens``; generation is causal, so a longer run starts with the
same tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.generation.api import generate
from gemma_surgery.generation.streams import StreamChunk, generate_stream
from gemma_surgery.host import to_numpy
from gemma_surgery.parallel import distributed
from gemma_surgery.sae import AutoEncoder
from gemma_surgery.sae.splice import check_fits
from gemma_surgery.serve import relay
from gemma_surgery.serve.protocol import Job, Limits, RequestError, Steerable
from gemma_surgery.serve.streaming import cut_at_end
from gemma_surgery.surgery import steer
from gemma_surgery.surgery.sites import num_layers

__all__ = ["Engine", "Output", "Row", "source_name"]

_WIDTH_STEP = 16
_MIN_NEW = 8


def source_name(sae: AutoEncoder) -> str:
  """The name requests use for an SAE: Neuronpedia's source id when known
  (``20-gemmascope-res-16k``), else ``LAYER-FAMILY`` (``2-res``)."""
  if sae.info.neuronpedia:
    return sae.info.neuronpedia.split("/", 1)[-1]
  return f"{sae.info.layer}-{sae.info.family}"


@dataclasses.dataclass(frozen=True)
class Row:
  """One batch row: prompt ids, steering vectors by (site, layer), controls."""

  ids: tuple[int, ...]
  max_new_tokens: int
  vectors: tuple[tuple[tuple[str, int], np.ndarray], ...] = ()
  sampling: tuple = (0.0, None, 0)  # temperature, top_p, seed
  end_ids: tuple[int, ...] = ()  # ids ending the row (EOS; chat: the turn end)


@dataclasses.dataclass(frozen=True)
class Output:
  """A row's result: new tokens (EOS excluded), text and why it stopped."""

  tokens: list[int]
  text: str
  finish_reason: str


def _turn_end_id(tokenizer: Any) -> int | None:
  """The id of the tokenizer's end-of-turn piece (``<end_of_turn>`` or
  Gemma 4's ``<turn|>``), or None when its vocabulary lacks one."""
  end = tokenizer.chat_format.end
  if not tokenizer.has_piece(end):
    return None
  ids = tokenizer.encode(end, add_bos=False)
  return int(ids[0]) if len(ids) == 1 else None


def _pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


class Engine:
  """A model, its tokenizer and the SAEs requests may steer with.

  Args:
    model: A Penzai Gemma LM.
    tokenizer: Its tokenizer (encodes prompts with BOS).
    saes: SAEs whose decoder rows are steering directions (resid/MLP SAEs
      and transcoders: they write ``{embedding}`` sites).
    eos_id: End-of-sequence id (None: never stop early).
    limits: Prompt and generation bounds.
    max_batch: Most rows in one generation.
    mesh: Device mesh of the model (several processes: every process builds
      the same `Engine`; process 0 serves, the others `follow`).
    stream_chunk: Tokens decoded between two reports of a streamed batch.

  Raises:
    SAEError: An SAE that doesn't fit the model or writes ``attn.z``.
  """

  def __init__(
    self,
    model: Any,
    tokenizer: Any,
    saes: Sequence[AutoEncoder] = (),
    *,
    eos_id: int | None,
    limits: Limits = Limits(),  # noqa: B008 - frozen dataclass
    max_batch: int = 32,
    mesh: Any = None,
    stream_chunk: int = 8,
  ):
    if isinstance(stream_chunk, bool) or not isinstance(stream_chunk, int):
      raise errors.InputError(f"stream_chunk must be an int, got {stream_chunk!r}.")
    if stream_chunk < 1:
      raise errors.InputError(f"stream_chunk must be >= 1, got {stream_chunk}.")
    self.stream_chunk = stream_chunk
    self.model, self.tokenizer, self.eos_id = model, tokenizer, eos_id
    self.turn_end_id = _turn_end_id(tokenizer)
    self.mesh, self._stopped = mesh, False
    self.limits, self.max_batch = limits, max_batch
    self._saes: dict[str, tuple[tuple[str, int], np.ndarray]] = {}
    for sae in saes:
      check_fits(model, sae)
      if sae.info.site == "attn.z":
        raise errors.SAEError(
          f"{sae.info.source}: attn.z SAEs can't steer through the server"
          " (their decoder writes heads x projection); use a resid/MLP SAE."
        )
      point = (sae.info.out_site or sae.info.site, sae.info.layer)
      rows = to_numpy(sae.w_dec.value.unwrap("latents", "embedding"), np.float32)
      self._saes[source_name(sae)] = (point, np.asarray(rows, np.float32))
    self.dim = model.metadata.embedding_dim
    self._layers = num_layers(model)

  @property
  def sources(self) -> dict[str, int]:
    """SAE name -> number of latents, for request checks."""
    return {name: rows.shape[0] for name, (_, rows) in self._saes.items()}

  @property
  def steerable(self) -> Steerable:
    """What requests may steer (for request checks)."""
    return Steerable(self.sources, self.dim, self._layers)

  def vectors(self, job: Job) -> tuple[tuple[tuple[str, int], np.ndarray], ...]:
    """The job's summed feature directions and raw vectors by (site, layer)."""
    out: dict[tuple[str, int], np.ndarray] = {}
    for feature in job.features:
      point, rows = self._saes[feature.source]
      vector = out.setdefault(point, np.zeros(self.dim, np.float32))
      vector += np.float32(feature.strength) * rows[feature.index]
    for raw in job.vectors:
      vector = out.setdefault((raw.site, raw.layer), np.zeros(self.dim, np.float32))
      vector += raw.values
    return tuple(sorted(out.items(), key=lambda kv: kv[0]))

  def rows(self, job: Job) -> list[Row]:
    """The batch rows of a job (tokenized and checked against the limits).

    Raises:
      RequestError: The prompt is longer than ``limits.max_prompt_tokens``.
    """
    ids = tuple(int(i) for i in self.tokenizer.encode(job.prompt))
    if len(ids) > self.limits.max_prompt_tokens:
      raise RequestError(
        f"The prompt has {len(ids)} tokens; this server accepts at most"
        f" {self.limits.max_prompt_tokens}.",
        param="prompt",
      )
    sampling = (job.temperature, job.top_p, job.seed)
    ends = () if self.eos_id is None else (self.eos_id,)
    if job.kind == "chat" and self.turn_end_id is not None:
      ends += (self.turn_end_id,)  # the model's turn ends the answer
    steered = Row(ids, job.max_new_tokens, self.vectors(job), sampling, ends)
    if job.kind == "steer":
      return [steered, Row(ids, job.max_new_tokens, (), sampling, ends)]
    return [steered]

  def run(
    self,
    rows: Sequence[Row],
    progress: Callable[[StreamChunk], None] | None = None,
  ) -> list[Output]:
    """Generates every row in one batched call (rows share their sampling).

    On several processes (process 0 serving), the batch is first announced
    to the other processes (see `gemma_surgery.serve.relay`), which run the
    same generation.

    Args:
      rows: The rows.
      progress: Called (in this thread) with each `StreamChunk` as it is
        decoded (its rows beyond ``len(rows)`` are padding); None: one
        fused generation, nothing reported.

    Raises:
      ValueError: No rows, more than ``max_batch`` rows, or mixed sampling.
    """
    plan = self.plan(rows, self.stream_chunk if progress is not None else 0)
    if jax.process_count() > 1:
      plan = relay.announce(plan)
    tokens, lengths = self.execute(plan, progress)
    results = []
    for i, r in enumerate(rows):
      row = [int(t) for t in tokens[i, : min(lengths[i], r.max_new_tokens)]]
      row, stopped = cut_at_end(row, r.end_ids)
      text = self.tokenizer.decode(row) if row else ""
      results.append(Output(row, text, "stop" if stopped else "length"))
    return results

  @property
  def points(self) -> list[tuple[str, int]]:
    """Every SAE's (site, layer): all are steered in every batch (zeros where
    no row asks), so steered and unsteered batches share one structure."""
    return sorted({point for point, _ in self._saes.values()})

  def plan(self, rows: Sequence[Row], chunk: int = 0) -> relay.Plan:
    """The padded arrays of one generation (see the module doc); ``chunk``:
    tokens per streamed chunk (0: one fused generation)."""
    if not rows or len(rows) > self.max_batch:
      raise ValueError(f"run takes 1..{self.max_batch} rows, got {len(rows)}.")
    if len({r.sampling for r in rows}) != 1:
      raise ValueError("Rows of one run share their sampling settings.")
    batch = min(_pow2(len(rows)), self.max_batch)
    width = -(-max(len(r.ids) for r in rows) // _WIDTH_STEP) * _WIDTH_STEP
    new = max(_MIN_NEW, _pow2(max(r.max_new_tokens for r in rows)))
    new = min(new, self.limits.max_new_tokens)
    new = max(new, max(r.max_new_tokens for r in rows))
    ids = np.zeros((batch, width), np.int32)  # 0 = left padding
    for i in range(batch):
      row = rows[i] if i < len(rows) else rows[0]
      ids[i, width - len(row.ids) :] = row.ids
    points = sorted({*self.points, *(p for r in rows for p, _ in r.vectors)})
    vectors = np.zeros((len(points), batch, self.dim), np.float32)
    for i, r in enumerate(rows):
      for point, v in r.vectors:
        vectors[points.index(point), i] = v
    return relay.Plan(ids, vectors, new, *rows[0].sampling, tuple(points), chunk)

  def execute(
    self, plan: relay.Plan, progress: Callable[[StreamChunk], None] | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Runs one planned generation (on every process of a multi-process run).

    Returns:
      ``tokens`` ``[batch, new]`` and ``lengths`` ``[batch]`` (as
      `generate`'s), also when the plan streams.
    """
    model = self.model
    for (site, layer), vectors in zip(plan.points, plan.vectors, strict=True):
      named = pz.nx.wrap(jnp.asarray(vectors)).tag("batch", "embedding")
      model = steer(model, site, layer, named, 1.0)
    kwargs = dict(
      max_new_tokens=plan.new,
      temperature=plan.temperature,
      top_p=plan.top_p,
      seed=plan.seed,
      eos_id=self.eos_id,
      pad_id=0,
      mesh=self.mesh,
    )
    if not plan.chunk:
      out = generate(model, plan.ids, **kwargs)
      return out.tokens, out.lengths
    tokens = np.zeros((plan.ids.shape[0], plan.new), np.int32)
    for chunk in generate_stream(model, plan.ids, chunk_tokens=plan.chunk, **kwargs):
      tokens[:, chunk.start : chunk.start + chunk.tokens.shape[1]] = chunk.tokens
      lengths = chunk.lengths
      if progress is not None:
        progress(chunk)
    return tokens, lengths

  def follow(self) -> None:
    """On processes other than 0: run every generation process 0 announces,
    until it announces the end (`stop_followers`); then leave the run."""
    while (plan := relay.receive(self.dim)) is not None:
      self.execute(plan)
    distributed.shutdown()

  def stop_followers(self) -> None:
    """On process 0 of a multi-process run: ends the other processes' `follow`
    and leaves the run with them (once; call it when no generation runs any
    more). The process may then exit however it likes (uvicorn re-raises
    the SIGTERM it handled) without the others seeing a dead peer."""
    if jax.process_count() > 1 and not self._stopped:
      self._stopped = True
      relay.stop()
      distributed.shutdown()
