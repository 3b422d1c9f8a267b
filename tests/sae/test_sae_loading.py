"""SAE layers and loaders: Gemma Scope 1/2 files vs the published equations.

Tiny random SAEs are written with the released key names and layouts
(`sae_writers`), loaded, and compared with a float64 numpy implementation of
JumpReLU encode/decode (and the affine skip of transcoders).
"""

from __future__ import annotations

import pickle

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import sae_writers as W
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.sae import AutoEncoder, JumpReLU, Transcoder, load_sae

TOL = 1e-5
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _x(seed: int = 0, d: int = W.D) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(2, 7, d)).astype(np.float32)


def _named(x: np.ndarray) -> pz.nx.NamedArray:
  return pz.nx.wrap(jnp.asarray(x)).tag("batch", "seq", "embedding")


def _np(value: pz.nx.NamedArray, last: str) -> np.ndarray:
  return np.asarray(value.unwrap("batch", "seq", last), np.float64)


def _check_equations(sae: AutoEncoder, arrays: dict) -> None:
  x = _x()
  f_ref = W.np_encode(x, arrays)
  f = _np(sae.encode(_named(x)), "latents")
  np.testing.assert_allclose(f, f_ref, atol=TOL, rtol=0)
  assert 0.1 <= (f_ref > 0).mean() <= 0.3, "thresholds should fire 10-30%"
  recon = _np(sae.decode(sae.encode(_named(x))), "embedding")
  np.testing.assert_allclose(recon, W.np_decode(f_ref, arrays), atol=TOL, rtol=0)
  out = _np(sae(_named(x)), "embedding")
  np.testing.assert_allclose(out, W.np_forward(x, arrays), atol=TOL, rtol=0)


# --- Gemma Scope 1 -------------------------------------------------------------


@pytest.mark.parametrize(
  "kind,family,site,out_site",
  [
    ("res", "res", "resid_post", None),
    ("mlp", "mlp", "mlp.out", None),
    ("att", "att", "attn.z", None),
    ("transcoders", "transcoder", "mlp.in_unscaled", "mlp.out"),
  ],
)
def test_gs1_npz_matches_equations(tmp_path, kind, family, site, out_site):
  arrays = W.random_sae(1)
  folder = W.write_gs1(
    tmp_path, f"gemma-scope-2b-pt-{kind}", 3, arrays, lowercase=kind == "transcoders"
  )
  sae = load_sae(folder)
  assert isinstance(sae, Transcoder) == (family == "transcoder")
  info = sae.info
  assert (info.family, info.layer, info.site, info.out_site) == (
    family,
    3,
    site,
    out_site,
  )
  assert (info.d_in, info.width, info.l0, info.release) == (
    64,
    128,
    "71",
    "gemma-scope",
  )
  assert info.neuronpedia == f"gemma-2-2b/3-gemmascope-{family}-16k"
  _check_equations(sae, arrays)
  # The file itself works too.
  assert load_sae(folder / "params.npz").info == info


def test_gs1_it_neuronpedia_and_family_override(tmp_path):
  folder = W.write_gs1(tmp_path, "gemma-scope-9b-it-res", 20, W.random_sae(2))
  assert load_sae(folder).info.neuronpedia == "gemma-2-9b-it/20-gemmascope-res-16k"
  plain = W.write_gs1(tmp_path / "x", "my_saes", 5, W.random_sae(2))
  with pytest.raises(errors.SAEError, match="family="):
    load_sae(plain)
  sae = load_sae(plain, family="mlp", layer=2)
  assert (sae.info.site, sae.info.layer, sae.info.neuronpedia) == ("mlp.out", 2, None)


# --- Gemma Scope 2 -------------------------------------------------------------


@pytest.mark.parametrize("config", [True, False])
@pytest.mark.parametrize(
  "family,site,out_site,hook",
  [
    ("resid_post", "resid_post", None, "model.layers.2.output"),
    ("attn_out", "attn.z", None, "model.layers.2.self_attn.o_proj.input"),
    ("mlp_out", "mlp.out", None, "model.layers.2.post_feedforward_layernorm.output"),
    (
      "transcoder",
      "mlp.in",
      "mlp.out",
      "model.layers.2.pre_feedforward_layernorm.output",
    ),
  ],
)
def test_gs2_safetensors_matches_equations(
  tmp_path, config, family, site, out_site, hook
):
  arrays = W.random_sae(3, affine=family == "transcoder")
  folder = W.write_gs2(tmp_path, family, 2, arrays, config=config, all_layers=True)
  sae = load_sae(folder)
  info = sae.info
  assert (info.site, info.out_site, info.layer, info.hook_in) == (
    site,
    out_site,
    2,
    hook,
  )
  assert (info.release, info.l0, info.width) == ("gemma-scope-2", "small", 128)
  assert isinstance(sae, Transcoder) == (family == "transcoder")
  _check_equations(sae, arrays)


def test_affine_transcoder_skip_term(tmp_path):
  arrays = W.random_sae(4, affine=True)
  sae = load_sae(W.write_gs2(tmp_path, "transcoder", 1, arrays))
  x = _x(1)
  skip = _np(sae.skip(_named(x)), "embedding")
  np.testing.assert_allclose(skip, x @ arrays["w_skip"].astype(np.float64), atol=TOL)
  without = dict(arrays)
  del without["w_skip"]
  plain = load_sae(W.write_gs2(tmp_path / "b", "transcoder", 1, without))
  assert plain.w_skip is None and plain.skip(_named(x)) is None
  np.testing.assert_allclose(
    _np(plain(_named(x)), "embedding"), W.np_forward(x, without), atol=TOL
  )


def test_bfloat16_weights_keep_a_float32_threshold(tmp_path):
  arrays = W.random_sae(5)
  sae = load_sae(
    W.write_gs1(tmp_path, "gemma-scope-2b-pt-res", 0, arrays), dtype="bfloat16"
  )
  assert sae.w_enc.value.dtype == jnp.bfloat16
  assert sae.activation.threshold.value.dtype == jnp.float32
  assert sae.encode(_named(_x())).dtype == jnp.float32
  np.testing.assert_array_equal(
    np.asarray(sae.activation.threshold.value.unwrap("latents")), arrays["threshold"]
  )


@pytest.mark.parametrize(
  "alias,expected",
  [
    ("fp32", jnp.float32),
    ("F32", jnp.float32),
    ("bf16", jnp.bfloat16),
    ("fp16", jnp.float16),
    (np.float16, jnp.float16),
  ],
)
def test_dtype_aliases(tmp_path, alias, expected):
  arrays = W.random_sae(5)
  sae = load_sae(W.write_gs1(tmp_path, "gemma-scope-2b-pt-res", 0, arrays), dtype=alias)
  assert sae.w_enc.value.dtype == expected
  w_enc = np.asarray(sae.w_enc.value.unwrap("embedding", "latents"), np.float32)
  np.testing.assert_array_equal(w_enc, arrays["w_enc"].astype(expected))


@pytest.mark.parametrize("dtype", ["int8", np.int32, "uint8", "bool", "fp64", "f32x"])
def test_non_float_dtypes_are_refused(tmp_path, dtype):
  arrays = W.random_sae(5)
  folder = W.write_gs1(tmp_path, "gemma-scope-2b-pt-res", 0, arrays)
  with pytest.raises(errors.SAEError, match=r"dtype .* not supported; valid: float32"):
    load_sae(folder, dtype=dtype)
  info = load_sae(folder).info
  with pytest.raises(errors.SAEError, match=r"valid: float32 \(fp32/f32\), bfloat16"):
    AutoEncoder.from_arrays(arrays, info, dtype=dtype)


def test_jumprelu_is_z_times_step():
  theta = np.array([-1.0, 0.0, 0.5, 2.0], np.float32)
  z = np.array([[-0.5, 0.0, 0.5, 3.0], [-2.0, 1.0, 0.6, 1.9]], np.float32)
  layer = JumpReLU(pz.Parameter(value=pz.nx.wrap(theta).tag("latents"), label="t"))
  out = layer(pz.nx.wrap(z).tag("seq", "latents")).unwrap("seq", "latents")
  np.testing.assert_array_equal(np.asarray(out), z * (z > theta))


def test_labels_and_axes(tmp_path):
  sae = load_sae(W.write_gs1(tmp_path, "gemma-scope-2b-pt-res", 0, W.random_sae(6)))
  labels = sorted(p.label for p in pz.unbind_params(sae)[1])
  assert all(label.startswith("sae/") for label in labels)
  assert [label.rsplit("/", 1)[1] for label in labels] == sorted(
    ["w_enc", "b_enc", "w_dec", "b_dec", "threshold"]
  )
  assert dict(sae.w_enc.value.named_shape) == {"embedding": 64, "latents": 128}
  assert dict(sae.w_dec.value.named_shape) == {"latents": 128, "embedding": 64}


def test_symlinked_file_keeps_its_path(tmp_path):
  """Hugging Face cache files are symlinks to content-addressed blobs."""
  folder = W.write_gs1(tmp_path / "snap", "gemma-scope-2b-pt-mlp", 4, W.random_sae(6))
  blob = tmp_path / "blobs" / "0123abcd"
  blob.parent.mkdir()
  (folder / "params.npz").rename(blob)
  (folder / "params.npz").symlink_to(blob)
  info = load_sae(folder / "params.npz").info
  assert (info.family, info.layer, info.site) == ("mlp", 4, "mlp.out")


# --- Hugging Face cache (offline) ----------------------------------------------


def _hf_snapshot(hf_home, repo: str):
  folder = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
  (folder / "refs").mkdir(parents=True)
  (folder / "refs" / "main").write_text(COMMIT)
  snapshot = folder / "snapshots" / COMMIT
  snapshot.mkdir(parents=True)
  return snapshot


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
  """An empty HF cache in offline mode, undone after the test.

  huggingface_hub reads HF_HUB_OFFLINE once, at import: import it first and
  patch its constant too, so other tests don't inherit offline mode.
  """
  from huggingface_hub import constants

  for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return tmp_path / "hf_home"


def test_hf_repo_and_path_from_the_cache(offline_hf):
  repo = "google/gemma-scope-2b-pt-res"
  arrays = W.random_sae(7)
  snapshot = _hf_snapshot(offline_hf, repo)
  W.write_gs1(snapshot, ".", 1, arrays)
  sae = load_sae(repo, "layer_1/width_16k/average_l0_71")
  assert sae.info.source == f"{repo}:layer_1/width_16k/average_l0_71"
  assert sae.info.neuronpedia == "gemma-2-2b/1-gemmascope-res-16k"
  _check_equations(sae, arrays)
  by_file = load_sae(repo, "layer_1/width_16k/average_l0_71/params.npz")
  assert by_file.info == sae.info
  with pytest.raises(errors.GemmaSurgeryError):
    load_sae(repo, "layer_2/width_16k/average_l0_71")


def test_hf_gemma_scope_2_from_the_cache(offline_hf):
  repo = "google/gemma-scope-2-1b-pt"
  arrays = W.random_sae(8, affine=True)
  W.write_gs2(_hf_snapshot(offline_hf, repo), "transcoder", 3, arrays)
  sae = load_sae(repo, "transcoder/layer_3_width_16k_l0_small_affine")
  assert (sae.info.site, sae.info.out_site, sae.info.layer) == ("mlp.in", "mlp.out", 3)
  _check_equations(sae, arrays)


def test_hf_offline_without_cache_is_a_hub_error(offline_hf):
  with pytest.raises(errors.HubError, match="HF_HUB_OFFLINE"):
    load_sae("google/gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_71")


# --- Bad inputs ----------------------------------------------------------------


def _gs1(tmp_path, arrays, **kwargs):
  return W.write_gs1(tmp_path, "gemma-scope-2b-pt-res", 0, arrays, **kwargs)


def test_missing_and_unknown_keys_are_listed(tmp_path):
  arrays = W.random_sae(9)
  del arrays["threshold"]
  arrays["extra"] = np.zeros(3, np.float32)
  with pytest.raises(errors.SAEError) as info:
    load_sae(_gs1(tmp_path, arrays))
  message = str(info.value)
  assert "Missing: ['threshold']" in message and "'extra'" in message
  assert "Found ['W_dec', 'W_enc', 'b_dec', 'b_enc', 'extra']" in message


def test_duplicate_spellings_are_rejected(tmp_path):
  folder = tmp_path / "gemma-scope-2b-pt-res/layer_0/width_16k/average_l0_1"
  folder.mkdir(parents=True)
  arrays = W.random_sae(9)
  np.savez(folder / "params.npz", W_enc=arrays["w_enc"], **arrays)
  with pytest.raises(errors.SAEError, match="two arrays map to 'w_enc'"):
    load_sae(folder)


@pytest.mark.parametrize(
  "key,bad,match",
  [
    ("b_enc", np.zeros(127, np.float32), r"b_enc.*\(127,\)"),
    ("threshold", np.zeros(64, np.float32), r"threshold.*\(64,\)"),
    ("w_dec", np.zeros((64, 128), np.float32), r"w_dec.*\(64, 128\)"),
    ("b_dec", np.zeros((64, 1), np.float32), "expected rank 1"),
    ("w_enc", np.zeros(64, np.float32), "expected rank 2"),
    ("b_enc", np.zeros(128, np.int32), "must be floats"),
  ],
)
def test_inconsistent_shapes_are_named(tmp_path, key, bad, match):
  arrays = W.random_sae(10)
  arrays[key] = bad
  with pytest.raises(errors.SAEError, match=match):
    load_sae(_gs1(tmp_path, arrays))


def test_pickled_npz_is_never_loaded(tmp_path):
  folder = _gs1(tmp_path, W.random_sae(11))
  arrays = dict(np.load(folder / "params.npz"))
  arrays["threshold"] = np.array([{"evil": 1}], dtype=object)
  np.savez(folder / "params.npz", **arrays)
  with pytest.raises(errors.SAEError, match="pickled"):
    load_sae(folder)
  (folder / "params.npz").write_bytes(pickle.dumps({"W_enc": [1.0]}))
  with pytest.raises(errors.SAEError, match="a pickle. Pickles are never loaded"):
    load_sae(folder)
  (folder / "params.npz").write_bytes(b"not a zip file")
  with pytest.raises(errors.SAEError, match="not an npz"):
    load_sae(folder)


def test_missing_files_and_folders(tmp_path):
  with pytest.raises(errors.SAEError, match="not a local file or folder"):
    load_sae(tmp_path / "nope")
  empty = tmp_path / "gemma-scope-2b-pt-res/layer_0/width_16k/average_l0_1"
  empty.mkdir(parents=True)
  (empty / "README.md").write_text("x")
  with pytest.raises(errors.SAEError, match=r"found \['README.md'\]"):
    load_sae(empty)


def test_gs2_metadata_errors(tmp_path):
  arrays = W.random_sae(12)
  folder = W.write_gs2(tmp_path, "resid_post", 1, arrays)
  (folder / "config.json").write_text(
    '{"width": 64, "hf_hook_point_in": "model.layers.1.output"}'
  )
  with pytest.raises(errors.SAEError, match="width 64 but the arrays have 128"):
    load_sae(folder)
  (folder / "config.json").write_text(
    '{"hf_hook_point_in": "model.layers.1.mlp.act_fn"}'
  )
  with pytest.raises(errors.SAEError, match="unsupported hook point"):
    load_sae(folder)
  (folder / "config.json").write_text('{"architecture": "topk"}')
  with pytest.raises(errors.SAEError, match="JumpReLU only"):
    load_sae(folder)
  (folder / "config.json").write_text("{not json")
  with pytest.raises(errors.SAEError, match="unreadable config.json"):
    load_sae(folder)
  marked = W.write_gs2(tmp_path / "b", "transcoder", 1, arrays)
  (marked / "config.json").write_text('{"affine_connection": true}')
  with pytest.raises(errors.SAEError, match="marked affine"):
    load_sae(marked)
  skip = W.write_gs2(tmp_path / "c", "resid_post", 1, W.random_sae(12, affine=True))
  with pytest.raises(errors.SAEError, match="skip connection"):
    load_sae(skip)
  clt = W.write_gs2(tmp_path / "d", "clt", 1, arrays, config=False)
  with pytest.raises(errors.SAEError, match="not supported"):
    load_sae(clt)
  unknown = W.write_gs2(tmp_path / "e", "other", 1, arrays, config=False)
  with pytest.raises(errors.SAEError, match="family="):
    load_sae(unknown)
  assert load_sae(unknown, family="res").info.site == "resid_post"


def test_gs1_embedding_saes_are_refused(tmp_path):
  folder = tmp_path / "gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6"
  folder.mkdir(parents=True)
  np.savez(folder / "params.npz", **W.random_sae(13))
  with pytest.raises(errors.SAEError, match="embedding SAEs"):
    load_sae(folder)


# --- On a mesh ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["resid_post", "transcoder"])
def test_mesh_loading_reads_only_each_devices_slices(tmp_path, monkeypatch, family):
  from gemma_surgery.parallel import sharding
  from gemma_surgery.sae import files

  arrays = W.random_sae(5, affine=family == "transcoder")
  folder = W.write_gs2(tmp_path, family, 2, arrays)
  reads: list[tuple[str, tuple]] = []
  real = files._read_slice

  def counting(tensor, index, path, name):
    reads.append((name, index))
    return real(tensor, index, path, name)

  monkeypatch.setattr(files, "_read_slice", counting)
  mesh = sharding.make_mesh({"data": 2, "model": 4})
  sae = load_sae(folder, mesh=mesh)
  _check_equations(sae, arrays)  # the same numbers as the equations
  w_enc = sae.w_enc.value.data_array
  assert tuple(w_enc.sharding.spec) == (None, "model")
  assert w_enc.addressable_shards[0].data.shape == (W.D, W.WIDTH // 4)
  assert sae.activation.threshold.value.dtype == jnp.float32
  # Each latent slice of W_enc is read once (the data replicas share it) and
  # holds a quarter of the latents; nothing is read whole.
  enc_reads = [index for name, index in reads if name == "w_enc"]
  assert len(enc_reads) == 4
  assert sorted(index[1].start for index in enc_reads) == [0, 32, 64, 96]
  assert all(index[1].stop - index[1].start == W.WIDTH // 4 for index in enc_reads)
  # Control: without a mesh nothing goes through the sliced reader.
  reads.clear()
  load_sae(folder)
  assert reads == []
