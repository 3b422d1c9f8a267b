"""Cross-layer transcoders and transcoder sets: files in the public layouts,
encode/decode against the published equations in numpy, typed errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from penzai import pz
from safetensors.numpy import save_file

from gemma_surgery.errors import SAEError
from gemma_surgery.sae import clt_files
from gemma_surgery.sae.clt import CrossLayerTranscoder, TranscoderSet

N, D, F = 3, 8, 5


def _write_clt(folder, rng, affine=False):
  """A CLT folder exactly as Gemma Scope 2 publishes one (per-layer files)."""
  folder.mkdir(parents=True)
  layers = []
  for i in range(N):
    layer = {
      "w_enc": rng.normal(size=(D, F)).astype(np.float32),
      "b_enc": rng.normal(size=F).astype(np.float32) * 0.1,
      "threshold": np.abs(rng.normal(size=F)).astype(np.float32) * 0.5,
      "w_dec": rng.normal(size=(F, N, D)).astype(np.float32),
      "b_dec": rng.normal(size=D).astype(np.float32),
    }
    if affine:
      layer["affine_skip_connection"] = rng.normal(size=(D, D)).astype(np.float32)
    save_file(layer, str(folder / f"params_layer_{i}.safetensors"))
    layers.append(layer)
  config = {
    "architecture": "jump_relu",
    "width": F,
    "l0": "medium",
    "affine_connection": affine,
  }
  (folder / "config.json").write_text(json.dumps(config))
  return layers


def _numpy_clt(layers, x):
  """Published CLT equations: f_l = JumpReLU(x_l W_enc + b_enc);
  y_k = sum_{l<=k} f_l W_dec[l, :, k] + b_dec[k] (+ x_k W_skip[k])."""
  feats = []
  for i, p in enumerate(layers):
    pre = x[i] @ p["w_enc"] + p["b_enc"]
    feats.append(np.where(pre > p["threshold"], pre, 0.0))
  outs = []
  for k in range(N):
    y = layers[k]["b_dec"].copy()
    for i in range(k + 1):
      y = y + feats[i] @ layers[i]["w_dec"][:, k, :]
    if "affine_skip_connection" in layers[k]:
      y = y + x[k] @ layers[k]["affine_skip_connection"]
    outs.append(y)
  return np.stack(feats), np.stack(outs)


@pytest.mark.parametrize("affine", [False, True])
def test_clt_matches_published_equations(tmp_path, affine):
  rng = np.random.default_rng(0)
  layers = _write_clt(tmp_path / "clt" / "width_5_l0_medium", rng, affine)
  clt = clt_files.load_clt(tmp_path / "clt" / "width_5_l0_medium")
  assert isinstance(clt, CrossLayerTranscoder)
  assert (clt.info.num_layers, clt.info.d_model, clt.info.width) == (N, D, F)
  x = rng.normal(size=(N, 4, D)).astype(np.float32)
  want_f, want_y = _numpy_clt(layers, x)
  assert (want_f > 0).any() and (want_f == 0).any()  # The threshold bites.
  named = pz.nx.wrap(x).tag("layer", "seq", "embedding")
  got_y = np.asarray(clt(named).unwrap("layer", "seq", "embedding"))
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-4)
  for i in range(N):
    got_f = clt.encode_layer(i, named[{"layer": i}]).unwrap("seq", "latents")
    np.testing.assert_allclose(np.asarray(got_f), want_f[i], rtol=1e-5, atol=1e-5)
  # Decoders to earlier layers exist in the file but are never used.
  assert clt.decoder(2, 1) is None
  # Negative control: using the full (acausal) decoder would differ.
  acausal = sum(want_f[i] @ layers[i]["w_dec"][:, 0, :] for i in range(N))
  assert not np.allclose(acausal + layers[0]["b_dec"], got_y[0], atol=1e-3)


def test_clt_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  _write_clt(tmp_path / "a", rng, affine=True)
  clt = clt_files.load_clt(tmp_path / "a")
  clt_files.save_clt_gemma_scope_2(clt, tmp_path / "b", l0="medium", model_name="m")
  again = clt_files.load_clt(tmp_path / "b")
  for name in ("w_enc", "b_enc", "threshold", "w_dec", "b_dec", "w_skip"):
    a, b = getattr(clt, name).value, getattr(again, name).value
    np.testing.assert_array_equal(
      np.asarray(a.unwrap(*a.named_shape)), np.asarray(b.unwrap(*a.named_shape))
    )
  assert json.loads((tmp_path / "b" / "config.json").read_text())["affine_connection"]


def test_clt_bad_files(tmp_path):
  rng = np.random.default_rng(2)
  folder = tmp_path / "clt"
  _write_clt(folder, rng)
  path = folder / "params_layer_1.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # Truncated.
  with pytest.raises(SAEError, match="params_layer_1"):
    clt_files.load_clt(folder)
  path.write_bytes(pickle.dumps({"w_enc": np.zeros((D, F))}))  # A pickle.
  with pytest.raises(SAEError, match="safetensors"):
    clt_files.load_clt(folder)
  path.unlink()  # A missing layer.
  with pytest.raises(SAEError, match=r"found layers \[0, 2\]"):
    clt_files.load_clt(folder)
  with pytest.raises(SAEError, match="no such CLT folder"):
    clt_files.load_clt(tmp_path / "nothing")


def test_clt_wrong_shapes(tmp_path):
  rng = np.random.default_rng(3)
  folder = tmp_path / "clt"
  layers = _write_clt(folder, rng)
  bad = dict(layers[0], w_dec=layers[0]["w_dec"][:, :2])  # Two target layers.
  save_file(bad, str(folder / "params_layer_0.safetensors"))
  with pytest.raises(SAEError, match="w_dec"):
    clt_files.load_clt(folder)


def _write_transcoder(folder, rng, layer, affine):
  folder.mkdir(parents=True)
  arrays = {
    "w_enc": rng.normal(size=(D, F)).astype(np.float32),
    "b_enc": rng.normal(size=F).astype(np.float32) * 0.1,
    "threshold": np.abs(rng.normal(size=F)).astype(np.float32) * 0.5,
    "w_dec": rng.normal(size=(F, D)).astype(np.float32),
    "b_dec": rng.normal(size=D).astype(np.float32),
  }
  if affine:
    arrays["affine_skip_connection"] = rng.normal(size=(D, D)).astype(np.float32)
  save_file(arrays, str(folder / "params.safetensors"))
  config = {
    "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
    "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
    "width": F,
    "architecture": "jump_relu",
    "affine_connection": affine,
  }
  (folder / "config.json").write_text(json.dumps(config))
  return arrays


@pytest.mark.parametrize("affine", [False, True])
def test_transcoder_set_matches_published_equations(tmp_path, affine):
  rng = np.random.default_rng(4)
  root = tmp_path / "transcoder_all"
  suffix = "_affine" if affine else ""
  arrays = [
    _write_transcoder(root / f"layer_{i}_width_5_l0_small{suffix}", rng, i, affine)
    for i in range(N)
  ]
  tcs = clt_files.load_transcoders(root)
  assert isinstance(tcs, TranscoderSet) and tcs.info.num_layers == N
  x = rng.normal(size=(N, 4, D)).astype(np.float32)
  got = np.asarray(
    tcs(pz.nx.wrap(x).tag("layer", "seq", "embedding")).unwrap(
      "layer", "seq", "embedding"
    )
  )
  for i, p in enumerate(arrays):
    pre = x[i] @ p["w_enc"] + p["b_enc"]
    want = np.where(pre > p["threshold"], pre, 0.0) @ p["w_dec"] + p["b_dec"]
    if affine:
      want = want + x[i] @ p["affine_skip_connection"]
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-4)
  assert tcs.decoder(0, 1) is None and tcs.decoder(1, 1) is not None


def test_transcoder_set_errors(tmp_path):
  rng = np.random.default_rng(5)
  root = tmp_path / "transcoder_all"
  for i in (0, 2):
    _write_transcoder(root / f"layer_{i}_width_5_l0_small", rng, i, False)
  with pytest.raises(SAEError, match=r"found layers \[0, 2\]"):
    clt_files.load_transcoders(root)
  _write_transcoder(root / "layer_1_width_5_l0_big", rng, 1, False)
  with pytest.raises(SAEError, match="variants"):
    clt_files.load_transcoders(root)
  with pytest.raises(SAEError, match="both width= and l0="):
    clt_files.load_transcoders(root, width="5")
  (root / "layer_1_width_5_l0_big" / "params.safetensors").write_bytes(pickle.dumps(1))
  _write_transcoder(root / "layer_1_width_5_l0_small", rng, 1, False)
  assert clt_files.load_transcoders(root, width="5", l0="small").num_layers == 3
