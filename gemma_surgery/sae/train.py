"""`train_jumprelu_sae`: JumpReLU SAEs trained with Gemma Scope's recipe.

The recipe of Rajamanoharan et al. 2024 ("Jumping Ahead", arXiv 2407.14435),
as used for Gemma Scope (arXiv 2408.05147). For a ``{batch, embedding}``
activation ``x``, normalized by one fixed scalar ``s`` so that
``E‖s·x‖² = 1``::

  z      = s·x · W_enc + b_enc                           {batch, latents}
  f      = JumpReLU_θ(z) = z · H(z − θ)                   H = Heaviside step
  x̂      = f · W_dec + b_dec
  L      = E_batch [ ‖s·x − x̂‖² + λ(t) · Σ_i H(z_i − θ_i) ]

``H`` has zero derivative almost everywhere, so θ is trained through
straight-through *pseudo-derivatives* with a kernel ``K`` of bandwidth ε
(here the rectangle ``K(u) = 1[|u| < ½]``)::

  ∂/∂θ JumpReLU_θ(z) := −(θ/ε) · K((z − θ)/ε)
  ∂/∂θ H(z − θ)      := −(1/ε) · K((z − θ)/ε)

while ``∂/∂z JumpReLU_θ(z) = H(z − θ)`` and ``∂/∂z H(z − θ) = 0``: the L0
penalty acts through the thresholds only. θ is stored as ``log θ``.

Other details, following the papers: ``W_dec`` rows (one per latent) are
kept at unit norm (the gradient component along each row is removed before
the update, and rows are renormalized after it); ``W_enc = W_decᵀ`` at
initialization, ``b_enc = 0``, θ = ``initial_threshold``, ``b_dec`` = 0 or the
(normalized) data mean; Adam with β1 = 0, β2 = 0.999; the learning rate warms
up linearly and the sparsity coefficient λ(t) grows linearly from 0 to λ over
``sparsity_warmup_steps``. At the end ``s`` is folded into the weights
(``W_enc·s``, ``W_dec/s``, ``b_dec/s``), so the returned `AutoEncoder` reads
raw activations and its features and θ are those of training.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from penzai import pz
from tqdm.auto import tqdm

from gemma_surgery import errors
from gemma_surgery.host import to_numpy
from gemma_surgery.parallel import sharding
from gemma_surgery.sae import hookpoints
from gemma_surgery.sae.autoencoders import AutoEncoder, SAEInfo

_SITE_FAMILY = {"resid_post": "res", "mlp.out": "mlp", "attn.z": "att"}
_ARRAYS = np.ndarray | jax.Array | pz.nx.NamedArray | pz.nx.NamedArrayView


def _rectangle(u: jax.Array) -> jax.Array:
  return (jnp.abs(u) < 0.5).astype(u.dtype)


@jax.custom_vjp
def jumprelu(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
  """``z · H(z − θ)`` with the straight-through θ pseudo-derivative."""
  return z * (z > theta)


def _jumprelu_fwd(z, theta, bandwidth):
  return jumprelu(z, theta, bandwidth), (z, theta, bandwidth)


def _jumprelu_bwd(res, g):
  z, theta, bandwidth = res
  dtheta = -(theta / bandwidth) * _rectangle((z - theta) / bandwidth) * g
  dtheta = jnp.sum(dtheta.reshape(-1, theta.shape[-1]), axis=0)
  return g * (z > theta), dtheta, jnp.zeros_like(bandwidth)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
  """``H(z − θ)`` with the straight-through θ pseudo-derivative."""
  return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, bandwidth):
  return step(z, theta, bandwidth), (z, theta, bandwidth)


def _step_bwd(res, g):
  z, theta, bandwidth = res
  dtheta = -(1.0 / bandwidth) * _rectangle((z - theta) / bandwidth) * g
  dtheta = jnp.sum(dtheta.reshape(-1, theta.shape[-1]), axis=0)
  return jnp.zeros_like(z), dtheta, jnp.zeros_like(bandwidth)


step.defvjp(_step_fwd, _step_bwd)


def _as_rows(batch: Any, where: str) -> np.ndarray:
  """``[tokens, d]`` float32 from an array or an ``{..., embedding}`` NamedArray.

  Raises:
    InputError: No feature axis, or NaN/infinite values (naming the first).
  """
  axes = None
  if isinstance(batch, pz.nx.NamedArray | pz.nx.NamedArrayView):
    if "embedding" not in batch.named_shape:
      raise errors.InputError(
        f"Activations need an 'embedding' axis; got {dict(batch.named_shape)}."
      )
    axes = (*[a for a in batch.named_shape if a != "embedding"], "embedding")
    batch = batch.unwrap(*axes)
  rows = to_numpy(batch, np.float32)
  if rows.ndim < 2:
    raise errors.InputError(f"Activations need a feature axis; got shape {rows.shape}.")
  bad = ~np.isfinite(rows)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    row = dict(zip(axes[:-1], first[:-1], strict=True)) if axes else first[:-1]
    count = int(bad.any(-1).sum())
    raise errors.InputError(
      f"{where}: NaN or infinite values (as float32) in {count} of"
      f" {bad[..., 0].size} rows; the first in row {row} (embedding"
      f" {first[-1]}: {rows[first]}). An SAE trained on them would be NaN;"
      " drop or fix those rows."
    )
  return rows.reshape(-1, rows.shape[-1])


def _batches(data: Any, batch_size: int, rng: np.random.Generator) -> Iterator:
  """Endless ``[batch_size, d]`` batches: shuffled epochs of ``[rows, d]``
  numpy rows, or an iterator's own batches (each checked by `_as_rows`)."""
  if isinstance(data, np.ndarray):
    rows = data
    if len(rows) < batch_size:
      raise errors.InputError(
        f"{len(rows)} activation rows are fewer than batch_size={batch_size}."
      )
    while True:
      order = rng.permutation(len(rows))
      for i in range(0, len(rows) - batch_size + 1, batch_size):
        yield rows[order[i : i + batch_size]]
  else:
    for i, batch in enumerate(data):
      yield _as_rows(batch, f"Activation batch {i} (0-based) of the iterator")


def _init(key: jax.Array, d: int, width: int, threshold: float, b_dec: np.ndarray):
  w_dec = jax.random.normal(key, (width, d), jnp.float32)
  w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
  return dict(
    w_enc=w_dec.T,
    b_enc=jnp.zeros((width,), jnp.float32),
    w_dec=w_dec,
    b_dec=jnp.asarray(b_dec, jnp.float32),
    log_threshold=jnp.full((width,), np.log(threshold), jnp.float32),
  )


def _normalize_rows(w_dec: jax.Array) -> jax.Array:
  return w_dec / jnp.maximum(jnp.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-8)


def train_jumprelu_sae(
  activations: Any,
  *,
  width: int,
  steps: int,
  batch_size: int = 4096,
  sparsity_coefficient: float = 1e-3,
  sparsity_warmup_steps: int | None = None,
  learning_rate: float = 7e-5,
  lr_warmup_steps: int = 1000,
  bandwidth: float = 1e-3,
  initial_threshold: float = 1e-3,
  init_b_dec_to_mean: bool = False,
  learn_threshold: bool = True,
  site: str = "resid_post",
  layer: int = 0,
  source: str = "trained",
  seed: int = 0,
  mesh: Mesh | None = None,
  sharding_rules: sharding.Rules | None = None,
  progress: bool = True,
  on_log: Callable[[dict], None] | None = None,
  log_every: int = 100,
) -> AutoEncoder:
  """Trains a JumpReLU SAE on activations (Gemma Scope recipe; see module doc).

  Args:
    activations: Either all activations at once, as an ``[..., d]`` array or
      a NamedArray with an ``embedding`` axis (e.g. a ``{batch, seq,
      embedding}`` capture from `gemma_surgery.capture`), sampled in shuffled
      epochs; or an iterable of such batches (one per step; its first batch
      sets the normalization scalar).
    width: Number of latents (axis ``latents``).
    steps: Optimizer steps.
    batch_size: Rows per step when ``activations`` is an array.
    sparsity_coefficient: λ, in units of the normalized data (E‖x‖² = 1).
    sparsity_warmup_steps: λ ramps up linearly over these steps (default:
      ``steps // 10``).
    learning_rate: Adam learning rate (β1 = 0, β2 = 0.999).
    lr_warmup_steps: Linear learning-rate warmup.
    bandwidth: ε of the rectangle kernel of the pseudo-derivatives.
    initial_threshold: θ at initialization (normalized units).
    init_b_dec_to_mean: Start ``b_dec`` at the data mean instead of 0.
    learn_threshold: False freezes θ (an ablation: the L0 penalty then has no
      gradient at all, so nothing makes the SAE sparse).
    site: Site the activations come from (`gemma_surgery.surgery.sites`): sets the
      returned SAE's family (``resid_post`` → res, ``mlp.out`` → mlp,
      ``attn.z`` → att, flattened head-major) and where `splice_sae` puts it.
    layer: Layer the activations come from.
    source: Stored in ``info.source`` and the parameter labels.
    seed: Seeds the initialization and the shuffling.
    mesh: Optional mesh: parameters are sharded by axis name (``latents`` over
      ``model`` under the default rules) and batches over ``data``.
    sharding_rules: Axis-name rules for ``mesh`` (default
      `gemma_surgery.parallel.sharding.DEFAULT_RULES`).
    progress: Show a tqdm progress bar.
    on_log: Called every ``log_every`` steps with ``{"step", "loss", "mse",
      "l0", "sparsity_coefficient"}`` (normalized units).
    log_every: Logging period in steps.

  Returns:
    An `AutoEncoder` reading raw activations at ``site``/``layer`` (float32),
    with its `SAEInfo` set.

  Raises:
    InputError: Bad activations (e.g. NaN, naming the first row or batch) or
      settings. SAEError: Unknown site; or training diverged: the loss or a
      parameter became NaN/infinite (tracked on the device every step, checked
      every ``log_every`` steps and at the end; names the first such step).
    ShardingError: The mesh lacks a mesh axis the rules name.
  """
  if site not in _SITE_FAMILY:
    raise errors.SAEError(f"site={site!r}; SAEs read one of {sorted(_SITE_FAMILY)}.")
  if width <= 0 or steps <= 0 or batch_size <= 0 or bandwidth <= 0:
    raise errors.InputError("width, steps, batch_size and bandwidth must be > 0.")
  try:
    import optax  # The "train" extra; not a core dependency.
  except ImportError as e:
    raise errors.SAEError(
      "train_jumprelu_sae needs optax: pip install 'gemma-surgery[train]'."
    ) from e
  rng = np.random.default_rng(seed)
  arrays = isinstance(activations, _ARRAYS)
  data = _as_rows(activations, "Activations") if arrays else activations
  batches = _batches(data, batch_size, rng)
  first = next(batches, None)
  if first is None:
    raise errors.InputError("The activation iterator yielded no batch.")
  batches = itertools.chain([first], batches)
  d = first.shape[-1]
  reference = data if arrays else first
  scale = float(1.0 / np.sqrt(np.mean(np.sum(reference.astype(np.float64) ** 2, -1))))
  mean = reference.mean(0) * scale if init_b_dec_to_mean else np.zeros(d, np.float32)
  params = _init(jax.random.key(seed), d, width, initial_threshold, mean)
  put_params, put_batch = _placement(mesh, sharding_rules, d, width)
  params = put_params(params)
  warm = steps // 10 if sparsity_warmup_steps is None else sparsity_warmup_steps
  lr = optax.linear_schedule(0.0, learning_rate, max(lr_warmup_steps, 1))
  opt = optax.adam(lr, b1=0.0, b2=0.999)
  state = opt.init(params)

  def loss_fn(p, x, lam):
    theta = jnp.exp(p["log_threshold"])
    if not learn_threshold:
      theta = jax.lax.stop_gradient(theta)
    z = x @ p["w_enc"] + p["b_enc"]
    f = jumprelu(z, theta, bandwidth)
    x_hat = f @ p["w_dec"] + p["b_dec"]
    mse = jnp.mean(jnp.sum((x - x_hat) ** 2, -1))
    l0 = jnp.mean(jnp.sum(step(z, theta, bandwidth), -1))
    return mse + lam * l0, (mse, l0)

  @jax.jit
  def update(p, state, x, lam, step_no, first_bad):
    (loss, (mse, l0)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, lam)
    # Remove the gradient component along each unit-norm decoder row.
    rows = p["w_dec"]
    g["w_dec"] = g["w_dec"] - jnp.sum(g["w_dec"] * rows, -1, keepdims=True) * rows
    updates, state = opt.update(g, state, p)
    p = optax.apply_updates(p, updates)
    p["w_dec"] = _normalize_rows(p["w_dec"])
    finite = [jnp.isfinite(loss)] + [jnp.isfinite(v).all() for v in p.values()]
    ok = jnp.stack(finite).all()
    first_bad = jnp.where((first_bad == 0) & ~ok, step_no, first_bad)
    return p, state, jnp.stack([loss, mse, l0]), first_bad

  def check_finite(first_bad: jax.Array, done: int) -> None:
    bad = int(to_numpy(first_bad))
    if bad:
      raise errors.SAEError(
        f"Training diverged: the loss or a parameter became NaN or infinite at"
        f" step {bad} (stopped after step {done} of {steps}); e.g. lower"
        f" learning_rate={learning_rate} or check the activations' scale."
      )

  first_bad = jnp.zeros((), jnp.int32)  # first non-finite step (1-based), 0: none
  with tqdm(total=steps, desc="Training JumpReLU SAE", disable=not progress) as bar:
    for i in range(steps):
      x = next(batches, None)
      if x is None:
        raise errors.InputError(f"The activation iterator ran out after {i} steps.")
      lam = sparsity_coefficient * min(1.0, (i + 1) / max(warm, 1))
      params, state, stats, first_bad = update(
        params, state, put_batch(x * scale), lam, i + 1, first_bad
      )
      bar.update()
      if (i + 1) % log_every == 0 or i + 1 == steps:
        check_finite(first_bad, i + 1)
        loss, mse, l0 = (float(v) for v in stats)
        bar.set_postfix(loss=f"{loss:.4f}", l0=f"{l0:.1f}")
        if on_log is not None:
          on_log(dict(step=i + 1, loss=loss, mse=mse, l0=l0, sparsity_coefficient=lam))
  return _to_autoencoder(params, scale, site, layer, source)


def _placement(mesh, rules, d: int, width: int) -> tuple[Callable, Callable]:
  """Functions placing the parameters and a batch on ``mesh`` (or as is)."""
  if mesh is None:
    return (lambda p: p), jnp.asarray
  shapes = {
    "w_enc": {"embedding": d, "latents": width},
    "w_dec": {"latents": width, "embedding": d},
    "b_enc": {"latents": width},
    "log_threshold": {"latents": width},
    "b_dec": {"embedding": d},
  }
  specs = {k: sharding.partition_spec(v, 0, mesh, rules) for k, v in shapes.items()}

  def put_params(p):
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in p.items()}

  def put_batch(x):
    spec = sharding.partition_spec(
      {"batch": x.shape[0], "embedding": d}, 0, mesh, rules
    )
    return jax.device_put(x, NamedSharding(mesh, spec))

  return put_params, put_batch


def _to_autoencoder(
  params, scale: float, site: str, layer: int, source: str
) -> AutoEncoder:
  """Folds the normalization scalar in and builds the `AutoEncoder`."""
  p = {k: to_numpy(v, np.float32) for k, v in params.items()}
  arrays = dict(
    w_enc=p["w_enc"] * scale,
    b_enc=p["b_enc"],
    w_dec=p["w_dec"] / scale,
    b_dec=p["b_dec"] / scale,
    threshold=np.exp(p["log_threshold"]),
  )
  width, d = p["w_dec"].shape
  info = SAEInfo(
    family=_SITE_FAMILY[site],
    layer=layer,
    site=site,
    d_in=d,
    width=width,
    d_out=d,
    source=source,
    hook_in=hookpoints.hf_hook(site, layer),
  )
  return AutoEncoder.from_arrays(arrays, info, name=source)
