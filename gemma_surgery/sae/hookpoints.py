"""Where a Gemma Scope SAE reads (and writes): family, layer and site.

Gemma Scope 1 (Gemma 2; repos ``google/gemma-scope-{2b,9b,27b}-{pt,it}-
{res,mlp,att,transcoders}``, files ``layer_L/width_W/average_l0_M/params.npz``):

===========  ===================  ==========================================
family       reads                writes
===========  ===================  ==========================================
res          ``resid_post``       (same site)
mlp          ``mlp.out``          (same site)
att          ``attn.z``           (same site; heads flattened head-major)
transcoder   ``mlp.in_unscaled``  ``mlp.out``
===========  ===================  ==========================================

Gemma Scope 1 transcoders read the pre-MLP RMSNorm output *without* its gain
(the paper folds the gain into the MLP weights).

Gemma Scope 2 (Gemma 3; ``google/gemma-scope-2-<size>-{pt,it}``, folders
``<family>/layer_L_width_W_l0_{small,medium,big}[_affine]/``): the site comes
from ``config.json``'s ``hf_hook_point_in``/``hf_hook_point_out``, else from the
family folder (``resid_post[_all]``, ``attn_out[_all]``, ``mlp_out[_all]``,
``transcoder[_all]``):

=========================================  ==============
Hugging Face hook point (layer L)          site
=========================================  ==============
``model.layers.L.output``                  ``resid_post``
``model.layers.L.self_attn.o_proj.input``  ``attn.z``
``model.layers.L.post_feedforward_...``    ``mlp.out``
``model.layers.L.pre_feedforward_...``     ``mlp.in`` (with its gain)
=========================================  ==============
"""

from __future__ import annotations

import dataclasses
import re

from gemma_surgery.errors import SAEError
from gemma_surgery.sae.autoencoders import FAMILIES

GS1 = "gemma-scope"
GS2 = "gemma-scope-2"

_GS1_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)\b")
_GS1_PATH = re.compile(r"layer_(\d+)/width_([0-9.]+[km]?)/average_l0_(\d+)")
_GS2_FOLDER = re.compile(
  r"^layer_(\d+)_width_([0-9.]+[km]?)_l0_([a-z0-9]+?)(_affine)?$"
)
_GS2_FAMILIES = {
  "resid_post": "res",
  "attn_out": "att",
  "mlp_out": "mlp",
  "transcoder": "transcoder",
}
_HF_HOOK = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
# Our site -> the Hugging Face module hook (under ``model.layers.L.``); the
# one table both directions are read from.
SITE_HF_HOOKS = {
  "resid_post": "output",
  "attn.z": "self_attn.o_proj.input",
  "mlp.out": "post_feedforward_layernorm.output",
  "mlp.in": "pre_feedforward_layernorm.output",
}
HF_HOOK_SITES = {hook: site for site, hook in SITE_HF_HOOKS.items()}
_SITE_FAMILY = {"resid_post": "res", "attn.z": "att", "mlp.out": "mlp"}
GS1_SITES = {
  "res": ("resid_post", None),
  "mlp": ("mlp.out", None),
  "att": ("attn.z", None),
  "transcoder": ("mlp.in_unscaled", "mlp.out"),
}
GS2_SITES = {**GS1_SITES, "transcoder": ("mlp.in", "mlp.out")}
_NEURONPEDIA_MODELS = {"2b": "gemma-2-2b", "9b": "gemma-2-9b", "27b": "gemma-2-27b"}


@dataclasses.dataclass(frozen=True)
class Location:
  """What the file names and config say about an SAE (see `SAEInfo`)."""

  family: str
  layer: int
  site: str
  out_site: str | None
  release: str | None
  l0: str | None = None
  width_label: str | None = None
  neuronpedia: str | None = None
  hook_in: str | None = None
  hook_out: str | None = None
  affine: bool | None = None


def _check_family(family: str | None, where: str) -> str:
  if family == "transcoders":
    family = "transcoder"
  if family not in FAMILIES:
    raise SAEError(
      f"{where}: unknown SAE family {family!r}; pass family= one of {FAMILIES}."
    )
  return family


def _no_family(where: str, why: str) -> SAEError:
  return SAEError(
    f"{where}: cannot tell which site this SAE reads ({why}); pass family="
    f" one of {FAMILIES} (and layer= if the path has no layer_L part)."
  )


def locate_gs1(
  text: str, where: str, *, family: str | None = None, layer: int | None = None
) -> Location:
  """Location of a Gemma Scope 1 SAE from its repo id and path.

  Args:
    text: Repo id and path joined with ``/`` (a local path works too when a
      folder in it is named after the repo, as in the Hugging Face cache).
    where: Names the SAE in error messages.
    family: Overrides the family from the repo name.
    layer: Overrides the layer from the path.
  """
  if re.search(r"(^|/)embedding/width_", text):
    raise SAEError(f"{where}: Gemma Scope embedding SAEs are not supported.")
  repo = _GS1_REPO.search(text)
  path = _GS1_PATH.search(text)
  if family is None:
    if repo is None:
      raise _no_family(where, "no gemma-scope-<size>-<pt|it>-<family> repo name")
    family = repo.group(3)
  family = _check_family(family, where)
  if layer is None:
    if path is None:
      raise _no_family(where, "no layer_L/width_W/average_l0_M path")
    layer = int(path.group(1))
  site, out_site = GS1_SITES[family]
  neuronpedia = None
  if repo is not None and path is not None and repo.group(1) in _NEURONPEDIA_MODELS:
    model = _NEURONPEDIA_MODELS[repo.group(1)] + (
      "-it" if repo.group(2) == "it" else ""
    )
    neuronpedia = f"{model}/{layer}-gemmascope-{family}-{path.group(2)}"
  return Location(
    family=family,
    layer=layer,
    site=site,
    out_site=out_site,
    release=GS1,
    l0=None if path is None else path.group(3),
    width_label=None if path is None else path.group(2),
    neuronpedia=neuronpedia,
  )


def hf_hook(site: str, layer: int) -> str:
  """The Hugging Face hook point of ``site`` at ``layer``.

  E.g. ``hf_hook("resid_post", 3) == "model.layers.3.output"``.

  Raises:
    SAEError: For a site with no Hugging Face hook point.
  """
  if site not in SITE_HF_HOOKS:
    raise SAEError(
      f"Site {site!r} has no Hugging Face hook point; sites with one:"
      f" {', '.join(SITE_HF_HOOKS)}."
    )
  return f"model.layers.{layer}.{SITE_HF_HOOKS[site]}"


def parse_hook(hook: str, where: str) -> tuple[int, str]:
  """``model.layers.L.<module>.<output|input>`` to ``(L, site)``."""
  match = _HF_HOOK.search(hook)
  if match is None or match.group(2) not in HF_HOOK_SITES:
    known = ", ".join(f"model.layers.L.{k}" for k in HF_HOOK_SITES)
    raise SAEError(f"{where}: unsupported hook point {hook!r}; supported: {known}.")
  return int(match.group(1)), HF_HOOK_SITES[match.group(2)]


def locate_gs2(
  folder: str,
  family_dir: str,
  config: dict | None,
  where: str,
  *,
  family: str | None = None,
  layer: int | None = None,
) -> Location:
  """Location of a Gemma Scope 2 SAE from its folder names and config.json.

  Args:
    folder: The SAE folder name, ``layer_L_width_W_l0_X[_affine]``.
    family_dir: Its parent folder name (``resid_post_all``…).
    config: The parsed ``config.json``, or None when it is missing.
    where: Names the SAE in error messages.
    family: Overrides the family.
    layer: Overrides the layer.
  """
  config = config or {}
  architecture = str(config.get("architecture", "jump_relu"))
  if "jump" not in architecture.replace("_", "").lower():
    raise SAEError(
      f"{where}: architecture {architecture!r} is not supported (JumpReLU only)."
    )
  if family_dir.startswith("clt") or "crosscoder" in family_dir:
    raise SAEError(f"{where}: cross-layer transcoders/crosscoders are not supported.")
  match = _GS2_FOLDER.match(folder)
  hook_in, hook_out = config.get("hf_hook_point_in"), config.get("hf_hook_point_out")
  if family is None and hook_in:
    parsed_layer, site = parse_hook(hook_in, where)
    out_site = None
    if hook_out and hook_out != hook_in:
      out_layer, out_site = parse_hook(hook_out, where)
      if out_layer != parsed_layer:
        raise SAEError(
          f"{where}: reads layer {parsed_layer} but writes layer {out_layer};"
          " cross-layer transcoders are not supported."
        )
    family = "transcoder" if out_site else _SITE_FAMILY.get(site)
    if family is None:
      raise SAEError(
        f"{where}: hook point {hook_in!r} reads {site!r}, not an SAE site."
      )
  else:
    if family is None:
      base = family_dir.removesuffix("_all")
      if base not in _GS2_FAMILIES:
        raise _no_family(where, f"no config.json hook point; folder {family_dir!r}")
      family = _GS2_FAMILIES[base]
    family = _check_family(family, where)
    site, out_site = GS2_SITES[family]
    parsed_layer = None if match is None else int(match.group(1))
  layer = parsed_layer if layer is None else layer
  if layer is None:
    raise _no_family(where, f"folder {folder!r} has no layer_L_ prefix")
  if hook_in is None:
    hook_in = hf_hook(site, layer)
    hook_out = None if out_site is None else hf_hook(out_site, layer)
  affine = config.get("affine_connection")
  if affine is None and match is not None:
    affine = bool(match.group(4))
  l0 = config.get("l0", None if match is None else match.group(3))
  return Location(
    family=family,
    layer=layer,
    site=site,
    out_site=out_site,
    release=GS2,
    l0=None if l0 is None else str(l0),
    width_label=None if match is None else match.group(2),
    hook_in=hook_in,
    hook_out=hook_out,
    affine=affine,
  )
