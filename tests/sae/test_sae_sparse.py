"""Exact sparse decoding (`gemma_surgery.sae.sparse`) vs the dense equations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from gemma_surgery.errors import SAEError
from gemma_surgery.sae import AutoEncoder, SAEInfo, Transcoder, sparse

D, WIDTH = 16, 512


def _arrays(
  seed: int = 0, threshold: float = 6.0, shift: float = 0.0
) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "w_enc": rng.normal(size=(D, WIDTH)).astype(np.float32) / 3,
    "w_dec": rng.normal(size=(WIDTH, D)).astype(np.float32),
    "b_enc": rng.normal(size=WIDTH).astype(np.float32) * 0.1 + shift,
    "b_dec": rng.normal(size=D).astype(np.float32),
    "threshold": np.full(WIDTH, threshold, np.float32),
  }


def _info(family: str = "res") -> SAEInfo:
  return SAEInfo(family=family, layer=0, site="resid_post", d_in=D, width=WIDTH)


def _x(seed: int = 1, tokens: int = 7) -> np.ndarray:
  shape = (3, tokens, D)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2


def _named(x: np.ndarray) -> pz.nx.NamedArray:
  return pz.nx.wrap(jnp.asarray(x)).tag("batch", "seq", "embedding")


def _numpy_sae(x: np.ndarray, a: dict) -> tuple[np.ndarray, np.ndarray]:
  pre = x @ a["w_enc"] + a["b_enc"]
  f = np.where(pre > a["threshold"], pre, 0.0)
  out = f @ a["w_dec"] + a["b_dec"]
  if "w_skip" in a:
    out = out + x @ a["w_skip"]
  return f, out


@pytest.mark.parametrize(
  "threshold, shift, path",
  [(6.0, 0.0, "sparse"), (-4.0, -10.0, "sparse"), (0.5, 0.0, "dense")],
  ids=["sparse", "negative-features", "dense-fallback"],
)
def test_reconstruct_equals_the_published_equations(threshold, shift, path):
  # θ < 0 (with a negative bias) makes negative features: the compaction must
  # keep them; a low θ fires so many latents that the dense decoder is used.
  a = _arrays(threshold=threshold, shift=shift)
  sae = AutoEncoder.from_arrays(a, _info())
  x = _x(tokens=1)  # 3 tokens: few enough rows to gather for the sparse path
  features, out = sparse.reconstruct(sae, _named(x))
  f_ref, out_ref = _numpy_sae(x, a)
  slots = sparse.active_slots((f_ref != 0).sum(-1).max(), WIDTH)
  assert sparse.decodes_sparsely(3, slots, WIDTH) == (path == "sparse")
  assert (f_ref < 0).any() == (threshold < 0)
  np.testing.assert_allclose(
    features.unwrap("batch", "seq", "latents"), f_ref, atol=1e-5
  )
  np.testing.assert_allclose(
    out.unwrap("batch", "seq", "embedding"), out_ref, atol=1e-4
  )
  dense = sae(_named(x)).unwrap("batch", "seq", "embedding")
  np.testing.assert_allclose(out.unwrap("batch", "seq", "embedding"), dense, atol=1e-4)


def test_reconstruct_adds_a_transcoders_skip_term():
  a = _arrays()
  a["w_skip"] = np.random.default_rng(3).normal(size=(D, D)).astype(np.float32)
  tc = Transcoder.from_arrays(a, _info("transcoder"))
  x = _x(tokens=1)
  _, out = sparse.reconstruct(tc, _named(x))
  np.testing.assert_allclose(
    out.unwrap("batch", "seq", "embedding"), _numpy_sae(x, a)[1], atol=1e-4
  )


def test_too_few_slots_are_reported_and_change_the_result():
  a = _arrays(threshold=2.0)
  sae = AutoEncoder.from_arrays(a, _info())
  x = _x()
  f_ref, out_ref = _numpy_sae(x, a)
  l0 = (f_ref != 0).sum(-1)
  slots = int(np.median(l0))
  compact = sparse.sparsify(sae.encode(_named(x)), slots)
  assert int(compact.overflow) == int((l0 > slots).sum()) > 0
  assert compact.values.named_shape == {"batch": 3, "seq": 7, "active": slots}
  out = sparse.sparse_decode(sae, compact).unwrap("batch", "seq", "embedding")
  assert np.abs(out - out_ref).max() > 1e-2  # latents were dropped (control)
  full = sparse.sparsify(sae.encode(_named(x)), int(l0.max()))
  assert int(full.overflow) == 0
  out = sparse.sparse_decode(sae, full).unwrap("batch", "seq", "embedding")
  np.testing.assert_allclose(out, out_ref, atol=1e-4)


@pytest.mark.parametrize("tile", [16, 256])
def test_many_tokens_decode_in_tiles(monkeypatch, tile):
  """The tiled loop (used past GATHER_ROWS) against numpy, with a partial
  last tile (3 × 40 = 120 tokens) and negative features."""
  monkeypatch.setattr(sparse, "GATHER_ROWS", 0)
  monkeypatch.setattr(sparse, "TILE", tile)
  a = _arrays(threshold=-3.0, shift=-10.0, seed=tile)
  sae = AutoEncoder.from_arrays(a, _info())
  x = _x(tokens=40)
  f_ref, out_ref = _numpy_sae(x, a)
  assert (f_ref < 0).any()
  slots = sparse.active_slots((f_ref != 0).sum(-1).max(), WIDTH)
  assert sparse.decodes_sparsely(120, slots, WIDTH)
  assert not sparse.decodes_sparsely(120, 64, WIDTH)  # dense past 1/16 of the width
  tiled = sparse.sparse_decode(sae, sparse.sparsify(sae.encode(_named(x)), slots))
  _, out = sparse.reconstruct(sae, _named(x))
  for result in (tiled, out):
    got = result.unwrap("batch", "seq", "embedding")
    np.testing.assert_allclose(got, out_ref, atol=1e-4)
  # Negative control: one slot per token drops latents.
  few = sparse.sparse_decode(sae, sparse.sparsify(sae.encode(_named(x)), 1))
  assert np.abs(few.unwrap("batch", "seq", "embedding") - out_ref).max() > 1e-2


def test_compaction_keeps_the_first_nonzero_latents_in_order():
  a = _arrays(threshold=2.0)
  sae = AutoEncoder.from_arrays(a, _info())
  features = sae.encode(_named(_x()))
  f = np.asarray(features.unwrap("batch", "seq", "latents")).reshape(-1, WIDTH)
  for slots in (4, 16, 64):
    compact = sparse.sparsify(features, slots)
    values = np.asarray(compact.values.unwrap("batch", "seq", "active"))
    indices = np.asarray(compact.indices.unwrap("batch", "seq", "active"))
    for row, v, i in zip(
      f, values.reshape(-1, slots), indices.reshape(-1, slots), strict=True
    ):
      ids = np.flatnonzero(row)[:slots]
      expected = np.zeros(slots, np.int64)
      expected[: len(ids)] = ids
      np.testing.assert_array_equal(i, expected)
      np.testing.assert_array_equal(
        v, np.where(np.arange(slots) < len(ids), row[expected], 0)
      )


def test_slot_buckets():
  assert sparse.active_slots(0, WIDTH) == sparse.MIN_ACTIVE
  assert sparse.active_slots(9, WIDTH) == 16
  assert sparse.active_slots(16, WIDTH) == 16
  assert sparse.active_slots(900, WIDTH) == WIDTH


def test_bad_input_is_rejected():
  sae = AutoEncoder.from_arrays(_arrays(), _info())
  wrong = pz.nx.wrap(jnp.zeros((2, D + 1))).tag("seq", "embedding")
  with pytest.raises(SAEError, match="embedding=17"):
    sparse.reconstruct(sae, wrong)
  features = sae.encode(_named(_x()))
  for bad in (0, WIDTH + 1):
    with pytest.raises(SAEError, match="active"):
      sparse.sparsify(features, bad)
