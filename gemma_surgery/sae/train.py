"""Training JumpReLU SAEs with the Gemma Scope recipe.

Model (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope)::

  f(x)  = JumpReLU_θ(x·W_enc + b_enc),   JumpReLU_θ(z) = z · H(z − θ)
  x̂(x)  = f(x)·W_dec + b_dec
  L(x)  = ‖x − x̂(x)‖² + λ · Σ_i H(z_i − θ_i)          (L0 sparsity penalty)

H has no useful gradient, so θ learns through straight-through
pseudo-derivatives with a rectangle kernel K(u) = 1[|u| < ½] of bandwidth ε:

  ∂/∂θ JumpReLU_θ(z) := −(θ/ε) · K((z − θ)/ε)
  ∂/∂θ H(z − θ)      := −(1/ε) · K((z − θ)/ε)

(gradients w.r.t. z pass through ``z·H`` with H held fixed; the L0 term
gives z none). Training details: inputs are scaled by a constant so that
E‖x‖² = d (folded back into the weights at the end, so the returned SAE
reads raw activations); θ is kept ≥ 1e-6; W_enc starts as
W_dectᵀ with unit-norm decoder rows, b_dec at the data mean, θ at
``init_threshold``; the decoder rows are renormalised to unit norm after every
step; λ ramps up linearly over the first ``sparsity_warmup`` of the steps;
Adam (β = 0.9, 0.999) with a linear learning-rate warm-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto as tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.sae.layers import AutoEncoder, SAEInfo


@jax.custom_vjp
def _jumprelu(z: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
  return z * (z > theta)


def _jumprelu_fwd(z, theta, eps):
  return _jumprelu(z, theta, eps), (z, theta, eps)


def _jumprelu_bwd(res, g):
  z, theta, eps = res
  kernel = (jnp.abs((z - theta) / eps) < 0.5).astype(z.dtype)
  d_theta = -(theta / eps) * kernel * g
  return g * (z > theta), d_theta.sum(0), None


_jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def _step(z: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
  return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, eps):
  return _step(z, theta, eps), (z, theta, eps)


def _step_bwd(res, g):
  z, theta, eps = res
  kernel = (jnp.abs((z - theta) / eps) < 0.5).astype(z.dtype)
  return jnp.zeros_like(z), (-(1.0 / eps) * kernel * g).sum(0), None


_step.defvjp(_step_fwd, _step_bwd)


def _loss(params: dict, x: jax.Array, lam: jax.Array, eps: float) -> tuple:
  theta = params["threshold"]
  pre = x @ params["w_enc"] + params["b_enc"]
  f = _jumprelu(pre, theta, eps)
  x_hat = f @ params["w_dec"] + params["b_dec"]
  mse = jnp.sum((x - x_hat) ** 2, axis=-1).mean()
  l0 = _step(pre, theta, eps).sum(-1).mean()
  return mse + lam * l0, (mse, l0)


@dataclasses.dataclass
class SAETraining:
  """The result of `train_jumprelu_sae`.

  Attributes:
    sae: The trained `AutoEncoder` (reads raw, unscaled activations).
    history: Per logged step: ``step``, ``loss``, ``mse`` (in the scaled
      units), ``l0``, ``lambda``.
    scale: The input scale used during training (E‖scale·x‖² = d).
  """

  sae: AutoEncoder
  history: list[dict[str, float]]
  scale: float


def _as_rows(x: Any) -> np.ndarray:
  if isinstance(x, pz.nx.NamedArray | pz.nx.NamedArrayView):
    if "embedding" not in x.named_shape:
      raise errors.SAEError(f"Activations need an embedding axis; got {x.named_shape}.")
    others = [a for a in x.named_axes if a != "embedding"]
    x = x.unwrap(*others, "embedding")
  x = np.asarray(x, np.float32)
  if x.ndim < 2 or x.shape[0] == 0:
    raise errors.SAEError(f"Activations must be [n, d] with n >= 1; got {x.shape}.")
  return x.reshape(-1, x.shape[-1])


def _batches(
  data: Any, batch_size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
  if isinstance(data, np.ndarray):
    while True:
      yield data[rng.integers(0, len(data), batch_size)]
  for item in data:
    yield _as_rows(item)


def train_jumprelu_sae(
  activations: Any,
  *,
  width: int,
  steps: int,
  l0_coefficient: float = 0.3,
  batch_size: int = 4096,
  learning_rate: float = 1e-2,
  bandwidth: float = 0.1,
  init_threshold: float = 1e-3,
  sparsity_warmup: float = 0.1,
  lr_warmup: float = 0.05,
  seed: int = 0,
  site: str = "resid_post",
  layer: int = 0,
  family: str = "res",
  name: str = "trained",
  mesh: Mesh | None = None,
  progress: bool = True,
  log_every: int = 50,
) -> SAETraining:
  """Trains a JumpReLU SAE on activations (see the module docstring).

  Args:
    activations: ``[n, d]`` array (or a NamedArray with an ``embedding`` axis,
      e.g. a `gemma_surgery.capture` of ``resid_post``): batches are sampled
      from it; or an iterable yielding one ``[b, d]`` batch per step.
    width: Number of latents.
    steps: Optimisation steps.
    l0_coefficient: λ of the L0 penalty, in units of the scaled squared error
      (inputs scaled to E‖x‖² = d, so λ = 0.3 trades one active latent for
      1% of the mean squared norm of a 30-dimensional input).
    batch_size: Rows per step when sampling from an array.
    learning_rate: Peak Adam learning rate.
    bandwidth: ε of the straight-through rectangle kernel (scaled units). A
      tiny ε starves θ of gradient (the estimator then never sees a sample
      near the threshold): the SAE stays dense.
    init_threshold: Initial θ.
    sparsity_warmup: Fraction of steps over which λ ramps up from 0.
    lr_warmup: Fraction of steps of linear learning-rate warm-up.
    seed: PRNG seed (initialisation and batch sampling).
    site, layer, family, name: Metadata of the returned SAE (`SAEInfo`).
    mesh: Optional mesh: encoder/decoder weights are sharded along
      ``latents`` over its ``model`` axis, batches along ``data``.
    progress: Show a progress bar.
    log_every: Steps between history entries.

  Returns:
    A `SAETraining`.

  Raises:
    SAEError: Bad shapes or hyperparameters.
  """
  if not isinstance(width, int) or width < 1 or not isinstance(steps, int) or steps < 1:
    raise errors.SAEError(f"width={width!r} and steps={steps!r} must be positive ints.")
  rng = np.random.default_rng(seed)
  data = _as_rows(activations) if not _is_stream(activations) else activations
  if isinstance(data, np.ndarray):
    sample = data[rng.integers(0, len(data), min(len(data), 16384))]
  else:
    data = iter(data)
    first = _as_rows(next(data))
    sample = first
    data = _chain(first, data)
  d = sample.shape[-1]
  scale = float(np.sqrt(d / np.mean(np.sum(sample.astype(np.float64) ** 2, -1))))
  key = jax.random.key(seed)
  w_dec = jax.random.normal(key, (width, d), jnp.float32)
  w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
  params = {
    "w_enc": w_dec.T,
    "b_enc": jnp.zeros((width,), jnp.float32),
    "w_dec": w_dec,
    "b_dec": jnp.asarray(sample.mean(0) * scale, jnp.float32),
    "threshold": jnp.full((width,), init_threshold, jnp.float32),
  }
  params = _place(params, mesh)
  opt = jax.tree_util.tree_map(jnp.zeros_like, params)
  moments = (opt, jax.tree_util.tree_map(jnp.zeros_like, params))

  @jax.jit
  def update(params, moments, x, t, lam, lr):
    (loss, (mse, l0)), grads = jax.value_and_grad(_loss, has_aux=True)(
      params, x, lam, bandwidth
    )
    m, v = moments
    m = jax.tree_util.tree_map(lambda a, g: 0.9 * a + 0.1 * g, m, grads)
    v = jax.tree_util.tree_map(lambda a, g: 0.999 * a + 0.001 * g * g, v, grads)
    c1, c2 = 1 - 0.9**t, 1 - 0.999**t
    params = jax.tree_util.tree_map(
      lambda p, a, b: p - lr * (a / c1) / (jnp.sqrt(b / c2) + 1e-8), params, m, v
    )
    norms = jnp.linalg.norm(params["w_dec"], axis=-1, keepdims=True)
    params = dict(
      params,
      w_dec=params["w_dec"] / jnp.maximum(norms, 1e-8),
      threshold=jnp.maximum(params["threshold"], 1e-6),
    )
    return params, (m, v), loss, mse, l0

  history = []
  batches = _batches(data, batch_size, rng)
  for t in tqdm.trange(steps, desc="training SAE", disable=not progress):
    x = jnp.asarray(next(batches) * scale, jnp.float32)
    if mesh is not None:
      x = _on_data(x, mesh)
    lam = l0_coefficient * min(1.0, (t + 1) / max(1.0, sparsity_warmup * steps))
    lr = learning_rate * min(1.0, (t + 1) / max(1.0, lr_warmup * steps))
    params, moments, loss, mse, l0 = update(params, moments, x, t + 1.0, lam, lr)
    if t % log_every == 0 or t == steps - 1:
      history.append(
        {
          "step": t,
          "loss": float(loss),
          "mse": float(mse),
          "l0": float(l0),
          "lambda": lam,
        }
      )
  arrays = {
    "w_enc": np.asarray(params["w_enc"]) * scale,
    "b_enc": np.asarray(params["b_enc"]),
    "w_dec": np.asarray(params["w_dec"]) / scale,
    "b_dec": np.asarray(params["b_dec"]) / scale,
    "threshold": np.asarray(params["threshold"]),
  }
  info = SAEInfo(
    family=family, layer=layer, site=site, d_in=d, width=width, source=name
  )
  return SAETraining(
    sae=AutoEncoder.from_arrays(arrays, info), history=history, scale=scale
  )


def _is_stream(x: Any) -> bool:
  return isinstance(x, Iterable) and not isinstance(
    x, np.ndarray | jax.Array | pz.nx.NamedArray | pz.nx.NamedArrayView | list
  )


def _chain(first: np.ndarray, rest: Iterator) -> Iterator[np.ndarray]:
  yield first
  yield from rest


def _place(params: dict, mesh: Mesh | None) -> dict:
  if mesh is None:
    return params
  model = "model" if "model" in mesh.axis_names else None
  specs = {
    "w_enc": PartitionSpec(None, model),
    "b_enc": PartitionSpec(model),
    "w_dec": PartitionSpec(model, None),
    "b_dec": PartitionSpec(),
    "threshold": PartitionSpec(model),
  }
  return {
    k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()
  }


def _on_data(x: jax.Array, mesh: Mesh) -> jax.Array:
  axis = (
    "data"
    if "data" in mesh.axis_names and x.shape[0] % mesh.shape["data"] == 0
    else None
  )
  return jax.device_put(x, NamedSharding(mesh, PartitionSpec(axis, None)))
