"""Request bodies of the steering server, checked into `Job` s.

Three shapes are accepted (JSON objects):

* OpenAI ``/v1/completions``: ``prompt`` (a string), ``max_tokens``,
  ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``.
* OpenAI ``/v1/chat/completions``: ``messages`` (``system``/``user``/
  ``assistant`` turns, rendered with Gemma's chat template: Gemma 4's
  ``<|turn>`` markers where the tokenizer has them) and the same controls.
* Neuronpedia's steer request at ``/v1/steer``: ``prompt``, ``features``,
  ``strength_multiplier``, ``n_tokens``, ``temperature``, ``seed``.

Both OpenAI shapes take a steering extension in the body (with the official
client: ``extra_body={"steering": {...}}``)::

    "steering": {"features": [{"source": "2-res", "index": 212, "strength": 40}],
                 "vectors": [{"site": "resid_post", "layer": 2,
                              "vector": [0.1, ...], "strength": 4.0}],
                 "strength_multiplier": 1.0}

Each feature adds ``strength * strength_multiplier * W_dec[index]`` of the
SAE named ``source`` (Neuronpedia's ``layer`` field is accepted as a synonym)
at that SAE's site and layer, on every position (Neuronpedia's simple
additive steering). Each raw vector (``vectors``, also accepted at
``/v1/steer``) adds ``strength * strength_multiplier * vector`` (``strength``
defaults to 1) at ``site`` and ``layer``: ``vector`` is a list of the
model's width of finite numbers and ``site`` one of `STEER_SITES`. Every
problem raises `RequestError` with an HTTP status and a message naming the
field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from gemma_surgery.tokenizer.chat import GEMMA_CHAT, ChatFormat

__all__ = [
  "Feature",
  "Job",
  "Limits",
  "RequestError",
  "STEER_SITES",
  "Steerable",
  "Vector",
  "parse_json",
]

# Sites a raw steering vector may be added at: per-layer ``{embedding}`` sites.
STEER_SITES = (
  "resid_pre",
  "attn.out",
  "resid_mid",
  "mlp.in",
  "mlp.out",
  "resid_post",
)


class RequestError(Exception):
  """A bad request: ``status`` (4xx), ``message`` and the offending ``param``."""

  def __init__(self, message: str, *, status: int = 400, param: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param = status, message, param


@dataclasses.dataclass(frozen=True)
class Limits:
  """Bounds on what one request may ask for.

  Attributes:
    max_prompt_tokens: Longest prompt, in tokens (BOS included).
    max_new_tokens: Most tokens one request may generate.
  """

  max_prompt_tokens: int = 512
  max_new_tokens: int = 256


@dataclasses.dataclass(frozen=True)
class Feature:
  """One steering feature: SAE ``source``, latent ``index``, total ``strength``."""

  source: str
  index: int
  strength: float


@dataclasses.dataclass(frozen=True)
class Vector:
  """One raw steering vector: ``values`` (``[embedding]`` float32, strength
  included) added at ``site`` and ``layer``."""

  site: str
  layer: int
  values: np.ndarray = dataclasses.field(compare=False)


@dataclasses.dataclass(frozen=True)
class Steerable:
  """What requests may steer: SAE ``sources`` (name -> number of latents),
  and raw vectors of ``dim`` numbers at `STEER_SITES` of ``layers`` layers."""

  sources: dict[str, int]
  dim: int
  layers: int


@dataclasses.dataclass(frozen=True)
class Job:
  """A checked request before tokenization.

  Attributes:
    kind: ``"completion"``, ``"chat"`` or ``"steer"``.
    prompt: The prompt text (chat: rendered with the chat template).
    max_new_tokens: Tokens to generate.
    temperature: 0 = greedy.
    top_p: Nucleus sampling threshold, or None.
    seed: Sampling seed.
    stop: Strings that end the text (the text stops before them).
    stream: Answer as server-sent events.
    features: Steering features (empty: unsteered).
    vectors: Raw steering vectors.
    model: The ``model`` field echoed back.
  """

  kind: str
  prompt: str
  max_new_tokens: int
  temperature: float = 0.0
  top_p: float | None = None
  seed: int = 0
  stop: tuple[str, ...] = ()
  stream: bool = False
  features: tuple[Feature, ...] = ()
  vectors: tuple[Vector, ...] = ()
  model: str = ""


def parse_json(raw: bytes) -> dict[str, Any]:
  """The body as a JSON object (NaN/Infinity literals are parsed, then refused
  by the number checks)."""
  try:
    body = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise RequestError(f"Malformed JSON body: {e}.") from None
  if not isinstance(body, dict):
    raise RequestError(f"The body must be a JSON object, got {type(body).__name__}.")
  return body


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
  value = body.get(key, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise RequestError(f"{key} must be a number, got {value!r}.", param=key)
  if not math.isfinite(value) or not low <= value <= high:
    raise RequestError(
      f"{key}={value} is out of range; valid: {low}..{high}.", param=key
    )
  return float(value)


def _int(body: dict, key: str, default: int, low: int, high: int) -> int:
  value = body.get(key, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(f"{key} must be an integer, got {value!r}.", param=key)
  if not low <= value <= high:
    raise RequestError(
      f"{key}={value} is out of range; valid: {low}..{high}.", param=key
    )
  return value


def _features(items: Any, multiplier: float, sources: dict[str, int], where: str):
  if items is None:
    return ()
  if not isinstance(items, list):
    raise RequestError(f"{where}features must be a list.", param="features")
  out = []
  for i, item in enumerate(items):
    name = f"{where}features[{i}]"
    if not isinstance(item, dict):
      raise RequestError(f"{name} must be an object.", param="features")
    source = item.get("source", item.get("layer"))
    if source not in sources:
      raise RequestError(
        f"{name}: unknown SAE source/layer {source!r}; this server steers"
        f" {sorted(sources) or 'nothing (started without --sae)'}.",
        param="features",
      )
    index = item.get("index")
    width = sources[source]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < width:
      raise RequestError(
        f"{name}: index {index!r} is not a feature of {source!r} (valid:"
        f" 0..{width - 1}).",
        param="features",
      )
    strength = item.get("strength")
    if isinstance(strength, bool) or not isinstance(strength, int | float):
      raise RequestError(f"{name}: strength must be a number.", param="features")
    total = float(strength) * multiplier
    if not math.isfinite(total):
      raise RequestError(
        f"{name}: strength {strength} (x strength_multiplier {multiplier}) is"
        " not a finite number.",
        param="features",
      )
    out.append(Feature(source, index, total))
  return tuple(out)


def _vectors(items: Any, multiplier: float, space: Steerable, where: str):
  if items is None:
    return ()
  if not isinstance(items, list):
    raise RequestError(f"{where}vectors must be a list.", param="vectors")
  out = []
  for i, item in enumerate(items):
    name = f"{where}vectors[{i}]"
    if not isinstance(item, dict):
      raise RequestError(f"{name} must be an object.", param="vectors")
    site, layer = item.get("site", "resid_post"), item.get("layer")
    if site not in STEER_SITES:
      raise RequestError(
        f"{name}: site {site!r} can't be steered; valid: {', '.join(STEER_SITES)}.",
        param="vectors",
      )
    if isinstance(layer, bool) or not isinstance(layer, int):
      raise RequestError(f"{name}: layer must be an integer.", param="vectors")
    if not 0 <= layer < space.layers:
      raise RequestError(
        f"{name}: layer {layer} is out of range; valid: 0..{space.layers - 1}.",
        param="vectors",
      )
    values = item.get("vector")
    if not isinstance(values, list) or len(values) != space.dim:
      size = len(values) if isinstance(values, list) else type(values).__name__
      raise RequestError(
        f"{name}: vector must be a list of {space.dim} numbers (the model's"
        f" width), got {size}.",
        param="vectors",
      )
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
      raise RequestError(f"{name}: vector must hold numbers only.", param="vectors")
    strength = item.get("strength", 1.0)
    if isinstance(strength, bool) or not isinstance(strength, int | float):
      raise RequestError(f"{name}: strength must be a number.", param="vectors")
    scaled = np.asarray(values, np.float64) * (float(strength) * multiplier)
    if not np.isfinite(scaled).all():
      raise RequestError(
        f"{name}: vector x strength {strength} x strength_multiplier"
        f" {multiplier} has entries that are not finite numbers (NaN/Infinity"
        " or overflow).",
        param="vectors",
      )
    out.append(Vector(site, layer, scaled.astype(np.float32)))
  return tuple(out)


def _steering(body: dict, space: Steerable):
  steering = body.get("steering")
  if steering is None:
    return {}
  if not isinstance(steering, dict):
    raise RequestError("steering must be an object.", param="steering")
  multiplier = _number(steering, "strength_multiplier", 1.0, -1e6, 1e6)
  return {
    "features": _features(
      steering.get("features"), multiplier, space.sources, "steering."
    ),
    "vectors": _vectors(steering.get("vectors"), multiplier, space, "steering."),
  }


def _stop(body: dict) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    raise RequestError("stop must be a string or a list of strings.", param="stop")
  return tuple(stop)


def _controls(body: dict, limits: Limits, tokens_key: str, default_tokens: int):
  if body.get("n", 1) != 1:
    raise RequestError("Only n=1 is supported.", param="n")
  return {
    "max_new_tokens": _int(body, tokens_key, default_tokens, 1, limits.max_new_tokens),
    "temperature": _number(body, "temperature", 0.0, 0.0, 100.0),
    "top_p": None
    if body.get("top_p") in (None, 1, 1.0)
    else _number(body, "top_p", 1.0, 1e-9, 1.0),
    "seed": _int(body, "seed", 0, 0, 2**31 - 1),
  }


def _text(value: Any, key: str) -> str:
  if not isinstance(value, str) or not value:
    raise RequestError(f"{key} must be a non-empty string.", param=key)
  return value


def completion_job(body: dict, limits: Limits, space: Steerable) -> Job:
  """An OpenAI completions body (``prompt`` a string)."""
  return Job(
    kind="completion",
    prompt=_text(body.get("prompt"), "prompt"),
    stop=_stop(body),
    stream=bool(body.get("stream", False)),
    **_steering(body, space),
    model=str(body.get("model", "")),
    **_controls(body, limits, "max_tokens", 16),
  )


def chat_template(messages: Any, chat: ChatFormat = GEMMA_CHAT) -> str:
  """Gemma's chat template in ``chat``'s markers; a system message becomes a
  system turn (Gemma 4) or is prepended to the next user turn (Gemma 1-3)."""
  if not isinstance(messages, list) or not messages:
    raise RequestError("messages must be a non-empty list.", param="messages")
  system, turns = "", []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise RequestError(f"messages[{i}] must be an object.", param="messages")
    role, content = message.get("role"), message.get("content")
    if not isinstance(content, str):
      raise RequestError(f"messages[{i}].content must be a string.", param="messages")
    if role == "system" and chat.system_turn:
      turns.append(chat.turn("system", content))
    elif role == "system":
      system += content + "\n\n"
    elif role in ("user", "assistant"):
      turn = "user" if role == "user" else "model"
      if turn == "user" and system:
        content, system = system + content, ""
      turns.append(chat.turn(turn, content))
    else:
      raise RequestError(
        f"messages[{i}].role {role!r}; valid: system, user, assistant.",
        param="messages",
      )
  return "".join(turns) + chat.generation_prompt


def chat_job(
  body: dict, limits: Limits, space: Steerable, chat: ChatFormat = GEMMA_CHAT
) -> Job:
  """An OpenAI chat completions body (turns written in ``chat``'s markers)."""
  tokens_key = (
    "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
  )
  return Job(
    kind="chat",
    prompt=chat_template(body.get("messages"), chat),
    stop=_stop(body),
    stream=bool(body.get("stream", False)),
    **_steering(body, space),
    model=str(body.get("model", "")),
    **_controls(body, limits, tokens_key, 16),
  )


def steer_job(body: dict, limits: Limits, space: Steerable) -> Job:
  """Neuronpedia's steer request (its completion form)."""
  method = body.get("steer_method", "SIMPLE_ADDITIVE")
  if method != "SIMPLE_ADDITIVE":
    raise RequestError(
      f"steer_method {method!r}: only SIMPLE_ADDITIVE is supported.",
      param="steer_method",
    )
  if body.get("freq_penalty", 0) not in (0, 0.0, None):
    raise RequestError("freq_penalty is not supported (use 0).", param="freq_penalty")
  multiplier = _number(body, "strength_multiplier", 1.0, -1e6, 1e6)
  features = _features(body.get("features"), multiplier, space.sources, "")
  vectors = _vectors(body.get("vectors"), multiplier, space, "")
  if not features and not vectors:
    raise RequestError(
      "features (or vectors) must list at least one feature.", param="features"
    )
  controls = _controls(body, limits, "n_tokens", 16)
  return Job(
    kind="steer",
    prompt=_text(body.get("prompt"), "prompt"),
    features=features,
    vectors=vectors,
    model=str(body.get("modelId", "")),
    **controls,
  )
