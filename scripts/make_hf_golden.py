"""Generate tiny random-weight Hugging Face Gemma fixtures and golden outputs.

The Hugging Face ``transformers`` implementation is used as the independent
reference for ``gemma_surgery``. For each variant below this script builds a
tiny Gemma text model with *every* parameter randomised (including all RMSNorm
scales, so a missing ``1 + w`` or a skipped norm is detectable), saves it with
``save_pretrained(..., safe_serialization=True)`` exactly as a real Hub repo
is laid out, reloads it from disk, and records golden outputs computed in
float32 with eager attention.

How to re-run
-------------
From the repository root, with the project venv (torch CPU + transformers)::

  python scripts/make_hf_golden.py            # (re)write tests/fixtures/hf/
  python scripts/make_hf_golden.py --check    # regenerate into a temp dir and
                                              # compare sha256s with MANIFEST.json

The output is deterministic: re-running produces byte-identical files
(``golden.npz`` is written with a fixed zip timestamp, computation runs
single-threaded with deterministic torch algorithms). ``--check`` exits
non-zero if any file differs from the hashes recorded in ``MANIFEST.json``.
Hashes are only expected to match with the transformers / torch versions that
are recorded in ``MANIFEST.json``.

Outputs
-------
``tests/fixtures/hf/<name>/`` for ``name`` in ``gemma1_mha``, ``gemma1_mqa``,
``gemma2``, ``gemma3`` contains whatever ``save_pretrained`` writes
(``config.json``, ``generation_config.json``, ``model.safetensors``; the LM
head is tied to ``model.embed_tokens.weight`` so there is no
``lm_head.weight``) plus ``golden.npz`` with plain numeric arrays:

* ``tokens``  int32 [2, 24]: seeded numpy ids in [4, vocab); column 0 = BOS (2).
* ``logits``  float32 [2, 24, vocab]: ``model(tokens).logits`` (no attention
  mask, full unpadded sequences, float32, eager attention).
* ``prompt``  int32 [1, 8]: BOS + 7 seeded random ids in [4, vocab).
* ``greedy``  int32 [1, 40]: the 40 new tokens of ``model.generate(prompt,
  max_new_tokens=40, min_new_tokens=40, do_sample=False)`` with
  ``eos_token_id=None`` in the generation config, so no EOS processor alters
  the argmax and nothing stops early. The script cross-checks this against a
  plain no-cache argmax loop over full forward passes.

Note that greedy paths may contain id 1 (the config's EOS id); consumers must
not stop at EOS when reproducing them.

Randomisation: after construction, ``torch.manual_seed(torch_seed)`` and then
``normal_(0, std)`` on every parameter in sorted-name order: per-layer RMSNorm
scales (incl. Gemma 3 ``q_norm`` / ``k_norm``) std 0.5, final ``model.norm``
std 8.0, projection matrices std 0.2, tied embedding std 0.1. The small
embedding avoids the tied-embedding "predict your own input" fixed point; the
large final norm brings logits to |max| ~20-27. Every variant also runs
"sensitivity probes" (``SENSITIVITY``): plausible config mistakes (wrong
query scale, no sliding window, wrong rope base/scaling, missing softcap, ...)
must each move the logits by at least ``MIN_SENSITIVITY``; the measured
deltas are recorded in the manifest.

``tests/fixtures/hf/MANIFEST.json`` lists every fixture, its seeds, config
values, the library versions and the sha256 of every file.

Old Hub schema config for gemma3
--------------------------------
``tests/fixtures/hf/gemma3_old_schema_config.json`` describes the *same* tiny
gemma3 model (same weights: pair it with ``gemma3/model.safetensors``) in the
older schema used by the real ``google/gemma-3-1b-pt`` / ``gemma-3-4b``
configs (transformers 4.50-era). It is hand-derived (``OLD_SCHEMA_GEMMA3``
below); relative to the transformers 5 ``gemma3/config.json`` it differs as:

* no ``rope_parameters``; instead ``rope_theta: 1000000.0`` (global / full
  attention base), ``rope_local_base_freq: 10000.0`` (sliding base) and
  ``rope_scaling: {"rope_type": "linear", "factor": 8.0}`` (applies to the
  full-attention layers only);
* no ``layer_types``; instead ``sliding_window_pattern: 6`` (layer ``i`` is
  global iff ``(i + 1) % 6 == 0``, i.e. layer 5 here); no private
  ``_sliding_window_pattern`` key;
* ``torch_dtype: "float32"`` instead of ``dtype``, plus
  ``cache_implementation: "hybrid"`` and ``transformers_version:
  "4.50.0.dev0"`` as in the Hub files;
* no ``use_bidirectional_attention`` key.

The script verifies that transformers 5 parses the old-schema file into the
same ``layer_types`` / ``rope_parameters`` and that a model loaded with it
reproduces the golden logits exactly.

Sliding-window convention (HF): a query at position q on a sliding layer
attends to key positions k with ``q - sliding_window < k <= q`` (i.e. the last
``sliding_window`` tokens, itself included).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import zipfile
from typing import Any

import numpy as np
import safetensors
import torch
import transformers
from transformers import (
  Gemma2Config,
  Gemma2ForCausalLM,
  Gemma3ForCausalLM,
  Gemma3TextConfig,
  GemmaConfig,
  GemmaForCausalLM,
  GenerationConfig,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE_ROOT = REPO_ROOT / "tests" / "fixtures" / "hf"

BOS_ID = 2
EOS_ID = 1
PAD_ID = 0
MIN_RANDOM_TOKEN = 4  # Random ids avoid pad/eos/bos/unk (0..3).
BATCH = 2
SEQ_LEN = 24
PROMPT_LEN = 8
NUM_NEW_TOKENS = 40

# Parameter randomisation scales (normal, mean 0). With tied embeddings a
# large embedding table makes every random model predict its own input token
# (e_x . e_x dominates), so the table is kept small relative to the block
# outputs and the final norm scale is made large instead, which brings the
# logits to O(10-30) without the self-prediction fixed point.
NORM_STD = 0.5  # Per-layer RMSNorm scales (HF Gemma applies them as 1 + w).
FINAL_NORM_STD = 8.0  # ``model.norm.weight``.
MATRIX_STD = 0.2  # Attention / MLP projection matrices.
EMBED_STD = 0.1  # Tied embedding / unembedding table.
MIN_GREEDY_MARGIN = 1e-2  # Min top-1 minus top-2 logit along the greedy path.
MIN_SENSITIVITY = 5e-3  # Min max|dlogits| each config probe must cause.

_COMMON = {
  "vocab_size": 512,
  "hidden_size": 64,
  "intermediate_size": 128,
  "num_attention_heads": 4,
  "head_dim": 16,
  "rms_norm_eps": 1e-6,
  "bos_token_id": BOS_ID,
  "eos_token_id": EOS_ID,
  "pad_token_id": PAD_ID,
  "tie_word_embeddings": True,
  "max_position_embeddings": 512,
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One fixture variant.

  Attributes:
    name: Fixture directory name.
    config_cls: Hugging Face config class.
    model_cls: Hugging Face causal-LM class.
    config_kwargs: Keyword arguments for ``config_cls``.
    torch_seed: Seed passed to ``torch.manual_seed`` before randomising.
    numpy_seed: Seed for ``np.random.default_rng`` for tokens and prompt.
      Chosen so the greedy path has a top-1/top-2 logit margin well above
      ``MIN_GREEDY_MARGIN`` (robust to float32 reordering in other
      implementations).
  """

  name: str
  config_cls: type
  model_cls: type
  config_kwargs: dict[str, Any]
  torch_seed: int
  numpy_seed: int


VARIANTS: tuple[Variant, ...] = (
  Variant(
    name="gemma1_mha",
    config_cls=GemmaConfig,
    model_cls=GemmaForCausalLM,
    config_kwargs=dict(
      _COMMON,
      num_hidden_layers=2,
      num_key_value_heads=4,
      hidden_act="gelu_pytorch_tanh",
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    torch_seed=1001,
    numpy_seed=2001,
  ),
  Variant(
    name="gemma1_mqa",
    config_cls=GemmaConfig,
    model_cls=GemmaForCausalLM,
    config_kwargs=dict(
      _COMMON,
      num_hidden_layers=3,
      num_key_value_heads=1,
      hidden_act="gelu_pytorch_tanh",
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    torch_seed=1002,
    numpy_seed=2001,
  ),
  Variant(
    name="gemma2",
    config_cls=Gemma2Config,
    model_cls=Gemma2ForCausalLM,
    config_kwargs=dict(
      _COMMON,
      num_hidden_layers=4,
      num_key_value_heads=2,
      hidden_activation="gelu_pytorch_tanh",
      sliding_window=8,
      layer_types=[
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
      ],
      attn_logit_softcapping=50.0,
      final_logit_softcapping=30.0,
      query_pre_attn_scalar=24,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    torch_seed=1003,
    numpy_seed=2001,
  ),
  Variant(
    name="gemma3",
    config_cls=Gemma3TextConfig,
    model_cls=Gemma3ForCausalLM,
    config_kwargs=dict(
      _COMMON,
      num_hidden_layers=6,
      num_key_value_heads=2,
      hidden_activation="gelu_pytorch_tanh",
      sliding_window=8,
      layer_types=["sliding_attention"] * 5 + ["full_attention"],
      attn_logit_softcapping=None,
      final_logit_softcapping=None,
      query_pre_attn_scalar=24,
      rope_parameters={
        "full_attention": {
          "rope_type": "linear",
          "factor": 8.0,
          "rope_theta": 1_000_000.0,
        },
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
      },
    ),
    torch_seed=1004,
    numpy_seed=2001,
  ),
)

# Hand-derived older-Hub-schema config for the gemma3 variant (see docstring).
OLD_SCHEMA_GEMMA3: dict[str, Any] = {
  "architectures": ["Gemma3ForCausalLM"],
  "attention_bias": False,
  "attention_dropout": 0.0,
  "attn_logit_softcapping": None,
  "bos_token_id": BOS_ID,
  "cache_implementation": "hybrid",
  "eos_token_id": EOS_ID,
  "final_logit_softcapping": None,
  "head_dim": 16,
  "hidden_activation": "gelu_pytorch_tanh",
  "hidden_size": 64,
  "initializer_range": 0.02,
  "intermediate_size": 128,
  "max_position_embeddings": 512,
  "model_type": "gemma3_text",
  "num_attention_heads": 4,
  "num_hidden_layers": 6,
  "num_key_value_heads": 2,
  "pad_token_id": PAD_ID,
  "query_pre_attn_scalar": 24,
  "rms_norm_eps": 1e-06,
  "rope_local_base_freq": 10000.0,
  "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
  "rope_theta": 1000000.0,
  "sliding_window": 8,
  "sliding_window_pattern": 6,
  "tie_word_embeddings": True,
  "torch_dtype": "float32",
  "transformers_version": "4.50.0.dev0",
  "use_cache": True,
  "vocab_size": 512,
}
OLD_SCHEMA_FILENAME = "gemma3_old_schema_config.json"


def _setup_determinism() -> None:
  """Pins torch to single-threaded deterministic CPU execution."""
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)


def _randomise_parameters(model: torch.nn.Module, seed: int) -> None:
  """Overwrites every parameter of ``model`` with seeded normal noise.

  Parameters are visited in sorted name order. Tied parameters (LM head and
  embedding) are visited once. Buffers (rotary tables, embed scale) are left
  untouched.

  Args:
    model: The model to randomise in place.
    seed: Seed for ``torch.manual_seed``.
  """
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
      if name == "model.norm.weight":
        std = FINAL_NORM_STD
      elif name.endswith("norm.weight"):
        std = NORM_STD
      elif name == "model.embed_tokens.weight":
        std = EMBED_STD
      elif param.ndim == 2:
        std = MATRIX_STD
      else:
        raise ValueError(f"Unexpected parameter {name} {tuple(param.shape)}")
      param.normal_(mean=0.0, std=std)


def _write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes an ``.npz`` archive byte-deterministically.

  ``np.savez`` stamps each member with the current time; here every member
  gets a fixed timestamp so re-runs give identical bytes.

  Args:
    path: Output path.
    arrays: Mapping from name to array, written in the given order.
  """
  with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED) as zf:
    for key, arr in arrays.items():
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
      info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_STORED
      info.external_attr = 0o644 << 16
      zf.writestr(info, buf.getvalue())


def _sha256(path: pathlib.Path) -> str:
  """Returns the hex sha256 of a file."""
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _greedy_reference(
  model: torch.nn.Module, prompt: torch.Tensor, num_new: int
) -> tuple[torch.Tensor, float]:
  """Greedy decoding by repeated full (no-cache) forward passes.

  Args:
    model: Causal LM.
    prompt: int64 [1, P] prompt ids.
    num_new: Number of tokens to generate.

  Returns:
    int64 [1, num_new] generated ids, and the smallest top-1 minus top-2
    logit margin seen along the way (how robust the path is to tiny numeric
    differences in another implementation).
  """
  seq = prompt
  margin = float("inf")
  for _ in range(num_new):
    last = model(input_ids=seq, use_cache=False).logits[:, -1, :]
    top2 = torch.topk(last, k=2, dim=-1).values
    margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
    nxt = last.argmax(dim=-1, keepdim=True)
    seq = torch.cat([seq, nxt], dim=1)
  return seq[:, prompt.shape[1] :], margin


def _load(variant: Variant, model_dir: pathlib.Path, config: Any = None):
  """Loads a saved fixture with float32 eager attention."""
  kwargs = {} if config is None else {"config": config}
  model = variant.model_cls.from_pretrained(
    model_dir, attn_implementation="eager", dtype=torch.float32, **kwargs
  )
  model.eval()
  return model


def _make_inputs(variant: Variant, vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws the seeded token batch and generation prompt."""
  rng = np.random.default_rng(variant.numpy_seed)
  tokens = rng.integers(MIN_RANDOM_TOKEN, vocab, size=(BATCH, SEQ_LEN), dtype=np.int64)
  tokens[:, 0] = BOS_ID
  prompt = rng.integers(MIN_RANDOM_TOKEN, vocab, size=(1, PROMPT_LEN), dtype=np.int64)
  prompt[:, 0] = BOS_ID
  return tokens.astype(np.int32), prompt.astype(np.int32)


# Config changes that a correct reimplementation must NOT make; each must move
# the logits noticeably, otherwise the fixture could not catch that bug.
SENSITIVITY: dict[str, dict[str, dict[str, Any]]] = {
  "gemma1_mha": {
    "rope_theta=1e5": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}},
  },
  "gemma1_mqa": {
    "rope_theta=1e5": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}},
  },
  "gemma2": {
    "no_attn_softcap": {"attn_logit_softcapping": None},
    "no_final_softcap": {"final_logit_softcapping": None},
    "query_pre_attn_scalar=head_dim": {"query_pre_attn_scalar": 16},
    "no_sliding_window": {"sliding_window": 4096},
    "layer0_global": {"layer_types": ["full_attention", "sliding_attention"] * 2},
    "exact_gelu": {"hidden_activation": "gelu"},
  },
  "gemma3": {
    "query_pre_attn_scalar=head_dim": {"query_pre_attn_scalar": 16},
    "no_sliding_window": {"sliding_window": 4096},
    "layer0_global": {"layer_types": ["full_attention"] + ["sliding_attention"] * 5},
    "global_rope_no_linear_scaling": {
      "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
      }
    },
    "local_rope_uses_global_base": {
      "rope_parameters": {
        "full_attention": {
          "rope_type": "linear",
          "factor": 8.0,
          "rope_theta": 1_000_000.0,
        },
        "sliding_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
      }
    },
    "global_rope_uses_local_base": {
      "rope_parameters": {
        "full_attention": {
          "rope_type": "linear",
          "factor": 8.0,
          "rope_theta": 10_000.0,
        },
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
      }
    },
    # (No attn-softcap probe: HF Gemma3Attention ignores attn_logit_softcapping.)
    "final_softcap_30": {"final_logit_softcapping": 30.0},
    "exact_gelu": {"hidden_activation": "gelu"},
  },
}


def _sensitivity(
  variant: Variant,
  model_dir: pathlib.Path,
  tokens: np.ndarray,
  logits: np.ndarray,
) -> dict[str, float]:
  """Measures how much each plausible config mistake changes the logits.

  Args:
    variant: The variant.
    model_dir: Saved fixture directory (weights are reused).
    tokens: Golden tokens.
    logits: Golden logits.

  Returns:
    Mapping from perturbation name to max |logits - golden logits|.
  """
  result = {}
  for label, overrides in SENSITIVITY[variant.name].items():
    kwargs = copy.deepcopy(variant.config_kwargs)
    kwargs.update(copy.deepcopy(overrides))
    config = variant.config_cls(**kwargs)
    model = _load(variant, model_dir, config=config)
    with torch.no_grad():
      other = model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    diff = float(np.abs(other - logits).max())
    assert diff >= MIN_SENSITIVITY, f"{variant.name}: {label} only moves logits {diff}"
    result[label] = round(diff, 4)
  return result


def build_variant(variant: Variant, out_dir: pathlib.Path) -> dict[str, Any]:
  """Builds, saves and verifies one fixture.

  Args:
    variant: The variant to build.
    out_dir: Fixture directory (recreated from scratch).

  Returns:
    Manifest entry for this fixture.
  """
  if out_dir.exists():
    shutil.rmtree(out_dir)
  out_dir.mkdir(parents=True)

  config = variant.config_cls(**copy.deepcopy(variant.config_kwargs))
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(variant.torch_seed)
  model = variant.model_cls(config).to(torch.float32).eval()
  _randomise_parameters(model, variant.torch_seed)
  model.save_pretrained(out_dir, safe_serialization=True)

  # Golden values come from the model as reloaded from disk, so the fixture
  # files are exactly what produced them.
  ref = _load(variant, out_dir)
  saved_sd = ref.state_dict()
  for key, val in model.state_dict().items():
    assert torch.equal(saved_sd[key], val), f"{variant.name}: {key} changed on reload"

  vocab = config.vocab_size
  tokens, prompt = _make_inputs(variant, vocab)
  with torch.no_grad():
    logits = ref(input_ids=torch.from_numpy(tokens).long()).logits
    logits = logits.to(torch.float32).numpy()
    gen_config = GenerationConfig(
      max_new_tokens=NUM_NEW_TOKENS,
      min_new_tokens=NUM_NEW_TOKENS,
      do_sample=False,
      num_beams=1,
      bos_token_id=BOS_ID,
      eos_token_id=None,
      pad_token_id=PAD_ID,
    )
    prompt_t = torch.from_numpy(prompt).long()
    # Make sure the saved generation_config.json's EOS cannot be merged back in.
    ref.generation_config.eos_token_id = None
    out = ref.generate(prompt_t, generation_config=gen_config)
    greedy_t = out[:, PROMPT_LEN:]
    assert torch.equal(out[:, :PROMPT_LEN], prompt_t)
    assert greedy_t.shape == (1, NUM_NEW_TOKENS), greedy_t.shape
    manual, margin = _greedy_reference(ref, prompt_t, NUM_NEW_TOKENS)
    assert torch.equal(manual, greedy_t), f"{variant.name}: generate != argmax loop"
    assert margin >= MIN_GREEDY_MARGIN, f"{variant.name}: greedy margin {margin}"
  greedy = greedy_t.numpy().astype(np.int32)

  # Sanity: logits finite, in a useful range; continuation not degenerate.
  assert logits.shape == (BATCH, SEQ_LEN, vocab) and logits.dtype == np.float32
  assert np.isfinite(logits).all()
  absmax = float(np.abs(logits).max())
  assert 1.0 < absmax < 200.0, f"{variant.name}: logits absmax {absmax}"
  n_distinct = len(set(greedy[0].tolist()))
  assert n_distinct >= 5, f"{variant.name}: degenerate greedy ({n_distinct} ids)"

  _write_npz(
    out_dir / "golden.npz",
    {"tokens": tokens, "logits": logits, "prompt": prompt, "greedy": greedy},
  )
  with np.load(out_dir / "golden.npz", allow_pickle=False) as check:
    assert np.array_equal(check["logits"], logits)

  saved_config = json.loads((out_dir / "config.json").read_text())
  _verify_saved_config(variant, saved_config)
  sensitivity = _sensitivity(variant, out_dir, tokens, logits)

  files = sorted(p.name for p in out_dir.iterdir())
  return {
    "name": variant.name,
    "architecture": variant.model_cls.__name__,
    "config_class": variant.config_cls.__name__,
    "torch_seed": variant.torch_seed,
    "numpy_seed": variant.numpy_seed,
    "config_kwargs": variant.config_kwargs,
    "logits_abs_max": round(absmax, 4),
    "logits_std": round(float(logits.std()), 4),
    "greedy_distinct_tokens": n_distinct,
    "greedy_min_top2_margin": round(margin, 4),
    "sensitivity_max_abs_logit_diff": sensitivity,
    "files": {name: _sha256(out_dir / name) for name in files},
  }


def _verify_saved_config(variant: Variant, cfg: dict[str, Any]) -> None:
  """Checks the fields that matter were written as intended."""
  assert cfg["bos_token_id"] == BOS_ID
  assert cfg["eos_token_id"] == EOS_ID
  assert cfg["pad_token_id"] == PAD_ID
  for key in (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
  ):
    assert cfg[key] == variant.config_kwargs[key], key
  if variant.name == "gemma3":
    rp = cfg["rope_parameters"]
    assert rp["full_attention"] == {
      "rope_type": "linear",
      "factor": 8.0,
      "rope_theta": 1_000_000.0,
    }, rp
    assert rp["sliding_attention"] == {
      "rope_type": "default",
      "rope_theta": 10_000.0,
    }, rp
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert cfg["final_logit_softcapping"] is None
    assert cfg["attn_logit_softcapping"] is None
  elif variant.name == "gemma2":
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["layer_types"][0] == "sliding_attention"
    assert cfg["attn_logit_softcapping"] == 50.0
    assert cfg["final_logit_softcapping"] == 30.0
    assert cfg["query_pre_attn_scalar"] == 24
  else:
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["hidden_act"] == "gelu_pytorch_tanh"


def build_old_schema(root: pathlib.Path) -> dict[str, Any]:
  """Writes and verifies the old-Hub-schema gemma3 config.

  Args:
    root: Fixture root (``tests/fixtures/hf``); ``gemma3`` must exist there.

  Returns:
    Manifest entry.
  """
  path = root / OLD_SCHEMA_FILENAME
  path.write_text(json.dumps(OLD_SCHEMA_GEMMA3, indent=2, sort_keys=True) + "\n")

  gemma3 = next(v for v in VARIANTS if v.name == "gemma3")
  new_cfg = Gemma3TextConfig.from_pretrained(root / "gemma3")
  with tempfile.TemporaryDirectory() as tmp:
    tmp_dir = pathlib.Path(tmp)
    shutil.copy(path, tmp_dir / "config.json")
    shutil.copy(root / "gemma3" / "model.safetensors", tmp_dir / "model.safetensors")
    old_cfg = Gemma3TextConfig.from_pretrained(tmp_dir)
    assert old_cfg.layer_types == new_cfg.layer_types, old_cfg.layer_types
    assert old_cfg.rope_parameters == new_cfg.rope_parameters, old_cfg.rope_parameters
    old_model = _load(gemma3, tmp_dir)
    with np.load(root / "gemma3" / "golden.npz", allow_pickle=False) as golden:
      with torch.no_grad():
        logits = old_model(input_ids=torch.from_numpy(golden["tokens"]).long()).logits
      assert np.array_equal(logits.numpy(), golden["logits"]), "old schema mismatch"
  return {
    "file": OLD_SCHEMA_FILENAME,
    "pairs_with": "gemma3/model.safetensors",
    "sha256": _sha256(path),
  }


def build_all(root: pathlib.Path) -> dict[str, Any]:
  """Builds every fixture under ``root`` and writes ``MANIFEST.json``.

  Args:
    root: Output directory.

  Returns:
    The manifest.
  """
  _setup_determinism()
  root.mkdir(parents=True, exist_ok=True)
  fixtures = []
  for variant in VARIANTS:
    entry = build_variant(variant, root / variant.name)
    fixtures.append(entry)
    print(
      f"{variant.name}: logits |max|={entry['logits_abs_max']} "
      f"std={entry['logits_std']} greedy distinct={entry['greedy_distinct_tokens']}"
    )
  old = build_old_schema(root)
  manifest = {
    "generator": "scripts/make_hf_golden.py",
    "versions": {
      "transformers": transformers.__version__,
      "torch": torch.__version__,
      "numpy": np.__version__,
      "safetensors": safetensors.__version__,
      "python": platform.python_version(),
    },
    "randomisation": {
      "norm_std": NORM_STD,
      "final_norm_std": FINAL_NORM_STD,
      "matrix_std": MATRIX_STD,
      "embed_std": EMBED_STD,
      "order": (
        "torch.manual_seed(torch_seed); normal_() per parameter in sorted name order"
      ),
    },
    "inputs": {
      "batch": BATCH,
      "seq_len": SEQ_LEN,
      "prompt_len": PROMPT_LEN,
      "num_new_tokens": NUM_NEW_TOKENS,
      "token_range": [MIN_RANDOM_TOKEN, "vocab_size"],
      "bos_token_id": BOS_ID,
      "rng": "np.random.default_rng(numpy_seed): tokens then prompt, col 0 = bos",
    },
    "reference": "float32, attn_implementation='eager', no attention mask; "
    "greedy via generate(do_sample=False, eos_token_id=None)",
    "fixtures": fixtures,
    "old_schema_config": old,
  }
  (root / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
  return manifest


def check_against(root: pathlib.Path) -> bool:
  """Regenerates into a temp dir and compares hashes with ``root``'s manifest.

  Args:
    root: Directory holding the committed fixtures and ``MANIFEST.json``.

  Returns:
    True if every file hash matches.
  """
  expected = json.loads((root / "MANIFEST.json").read_text())
  with tempfile.TemporaryDirectory() as tmp:
    fresh = build_all(pathlib.Path(tmp))
    ok = fresh == expected
    for entry in expected["fixtures"]:
      for name, digest in entry["files"].items():
        actual = _sha256(pathlib.Path(tmp) / entry["name"] / name)
        committed = _sha256(root / entry["name"] / name)
        if not digest == actual == committed:
          print(f"MISMATCH {entry['name']}/{name}")
          ok = False
  print("check:", "OK" if ok else "FAILED")
  return ok


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=FIXTURE_ROOT,
    help="Output directory (default: tests/fixtures/hf).",
  )
  parser.add_argument(
    "--check",
    action="store_true",
    help="Regenerate in a temp dir and compare with --out.",
  )
  args = parser.parse_args(argv)
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  if args.check:
    return 0 if check_against(args.out) else 1
  build_all(args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
