"""The loading wing: checkpoints in, Penzai models out (and back out to HF).

* `api`: `load` (embedded ``"tiny"``, local folders, ``hf:`` / ``kaggle:``
  sources) and `LoadedModel`.
* `hf`, `hf_config`: Hugging Face safetensors and ``config.json``.
* `kaggle`, `kaggle_config`, `kaggle_layout`, `kaggle_sharded`: Kaggle/Flax
  orbax checkpoints (flat, nested and stacked layouts; sliced restores);
  `kaggle_gemma4`: the ``gemma`` 4.x library's Gemma 4 tree.
* `hub`: downloads (atomic, with progress) from Kaggle and Hugging Face.
* `params`, `placement`: binding canonical parameters into a model, on one
  device or slice by slice over a mesh.
* `hf_export`: `save_hf`, the model back in the Hugging Face layout.
"""

from gemma_surgery.loading.api import LoadedModel, load
from gemma_surgery.loading.hf_export import save_hf

__all__ = ["LoadedModel", "load", "save_hf"]
