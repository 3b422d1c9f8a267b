"""Tiny random SAEs written in the released Gemma Scope layouts, and a plain
numpy implementation of the published JumpReLU equations (arXiv 2408.05147).

No gemma_surgery code is used here, so tests compare against an independent
reference.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from safetensors.numpy import save_file

D = 64  # d_model of the tiny HF fixtures.
WIDTH = 128
FIRING = 0.2  # Fraction of (token, latent) pairs above threshold on calibration.


def random_sae(
  seed: int,
  *,
  d_in: int = D,
  width: int = WIDTH,
  d_out: int | None = None,
  affine: bool = False,
  inputs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """Canonical arrays ``w_enc [d_in, F]``, ``w_dec [F, d_out]``, ``b_enc``,
  ``b_dec``, ``threshold`` (+ ``w_skip [d_in, d_out]``), float32.

  Thresholds are each latent's (1 - FIRING) quantile of the pre-activations
  on ``inputs`` ``[n, d_in]`` (default: standard normal samples), so about
  FIRING of the latents fire on such inputs.
  """
  rng = np.random.default_rng(seed)
  d_out = d_in if d_out is None else d_out
  if inputs is None:
    inputs = rng.normal(size=(256, d_in))
  scale = np.sqrt(np.mean(inputs.astype(np.float64) ** 2))
  arrays = {
    "w_enc": rng.normal(size=(d_in, width)) / (np.sqrt(d_in) * scale),
    "w_dec": rng.normal(size=(width, d_out)) * scale / np.sqrt(width),
    "b_enc": rng.normal(size=width) * 0.1,
    "b_dec": rng.normal(size=d_out) * 0.1 * scale,
  }
  pre = inputs.reshape(-1, d_in) @ arrays["w_enc"] + arrays["b_enc"]
  arrays["threshold"] = np.quantile(pre, 1.0 - FIRING, axis=0)
  if affine:
    arrays["w_skip"] = rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)
  return {k: v.astype(np.float32) for k, v in arrays.items()}


# --- Reference equations ------------------------------------------------------


def np_encode(x: np.ndarray, a: dict) -> np.ndarray:
  """f = JumpReLU_θ(x W_enc + b_enc), JumpReLU_θ(z) = z · H(z − θ)."""
  x = x.astype(np.float64)
  pre = x @ a["w_enc"].astype(np.float64) + a["b_enc"]
  return pre * (pre > a["threshold"])


def np_decode(f: np.ndarray, a: dict) -> np.ndarray:
  """x̂ = f W_dec + b_dec (no skip)."""
  return f @ a["w_dec"].astype(np.float64) + a["b_dec"]


def np_forward(x: np.ndarray, a: dict) -> np.ndarray:
  """Reconstruction / transcoder output, with x W_skip when present."""
  out = np_decode(np_encode(x, a), a)
  if "w_skip" in a:
    out = out + x.astype(np.float64) @ a["w_skip"].astype(np.float64)
  return out


# --- Writers ------------------------------------------------------------------


def write_gs1(
  root: pathlib.Path,
  repo: str,
  layer: int,
  arrays: dict,
  *,
  width: str = "16k",
  l0: int = 71,
  lowercase: bool = False,
) -> pathlib.Path:
  """``<root>/<repo>/layer_L/width_W/average_l0_M/params.npz`` (GS1 layout).

  Keys ``W_enc W_dec b_enc b_dec threshold`` (``w_enc w_dec`` with
  ``lowercase``, as in the transcoders repo). Returns the SAE folder.
  """
  folder = root / repo / f"layer_{layer}" / f"width_{width}" / f"average_l0_{l0}"
  folder.mkdir(parents=True)
  names = {"w_enc": "W_enc", "w_dec": "W_dec"} if not lowercase else {}
  np.savez(folder / "params.npz", **{names.get(k, k): v for k, v in arrays.items()})
  return folder


_GS2_HOOKS = {
  "resid_post": "model.layers.{L}.output",
  "attn_out": "model.layers.{L}.self_attn.o_proj.input",
  "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
  "transcoder": "model.layers.{L}.pre_feedforward_layernorm.output",
}


def write_gs2(
  root: pathlib.Path,
  family: str,
  layer: int,
  arrays: dict,
  *,
  width: str = "16k",
  l0: str = "small",
  config: bool = True,
  all_layers: bool = False,
  model_name: str = "google/gemma-3-1b-pt",
) -> pathlib.Path:
  """``<root>/<family>[_all]/layer_L_width_W_l0_X[_affine]/`` (GS2 layout).

  ``params.safetensors`` with lowercase keys (``affine_skip_connection`` for
  the skip) and, unless ``config=False``, a ``config.json`` like the
  released ones. Returns the SAE folder.
  """
  affine = "w_skip" in arrays
  name = f"layer_{layer}_width_{width}_l0_{l0}" + ("_affine" if affine else "")
  folder = root / (family + ("_all" if all_layers else "")) / name
  folder.mkdir(parents=True)
  renamed = {
    ("affine_skip_connection" if k == "w_skip" else k): v for k, v in arrays.items()
  }
  save_file(renamed, str(folder / "params.safetensors"))
  if config:
    base = family.removesuffix("_all")
    cfg = {
      "architecture": "jump_relu",
      "width": int(arrays["w_enc"].shape[1]),
      "l0": l0,
      "model_name": model_name,
      "hf_hook_point_in": _GS2_HOOKS[base].format(L=layer),
      "affine_connection": affine,
    }
    if base == "transcoder":
      cfg["hf_hook_point_out"] = (
        f"model.layers.{layer}.post_feedforward_layernorm.output"
      )
    (folder / "config.json").write_text(json.dumps(cfg))
  return folder
