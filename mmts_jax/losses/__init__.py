"""Contrastive losses with per-anchor temperature (InfoNCE, sigmoid) or margin (max-margin).

Pure, differentiable in the embeddings and `jit`/`grad`/`vmap`-safe. This package imports only
jax and numpy: no TensorFlow, TFDS, transformers or scikit-learn.

Layout (each module imports only those below it; no module imports this package):

* `api`: `infonce`, `max_margin`, `sigmoid`, one public function per loss;
* `dispatch`: `route` (the one place that picks dense / blockwise / gather / ring), `get` (a loss
  from a config's name and impl) and `make_sharded_loss` (a loss over a mesh);
* `dense`, `blockwise`, `blockwise_sigmoid`, `gathered`, `ring`: the forms; `_traversal` the
  tile loops they share, `_pallas_tiles` the fused GPU kernels, `_sigmoid_pairs` the sigmoid
  loss's per-pair terms (shared by its XLA and fused tiles);
* `checked`: `checkify` checks of traced values for library users;
* `sharding`, `_checks`: mesh helpers and input checks. `cosine_normalize` lives in
  `mmts_jax.normalize` (the models use it too) and is re-exported here.
"""

from __future__ import annotations

from mmts_jax.losses.api import infonce, max_margin, sigmoid
from mmts_jax.losses.blockwise import infonce_blockwise, max_margin_blockwise
from mmts_jax.losses.blockwise_sigmoid import sigmoid_blockwise
from mmts_jax.losses.checked import check_values, checked
from mmts_jax.losses.dense import infonce_dense, max_margin_dense, sigmoid_dense
from mmts_jax.losses.dispatch import AUTO_DENSE_MAX, AUTO_GATHER_MAX, get, make_sharded_loss
from mmts_jax.losses.nonlinear import nonlinear_mmcl
from mmts_jax.normalize import cosine_normalize

__all__ = [
  "AUTO_DENSE_MAX",
  "AUTO_GATHER_MAX",
  "check_values",
  "checked",
  "cosine_normalize",
  "get",
  "infonce",
  "infonce_blockwise",
  "infonce_dense",
  "make_sharded_loss",
  "max_margin",
  "max_margin_blockwise",
  "max_margin_dense",
  "nonlinear_mmcl",
  "sigmoid",
  "sigmoid_blockwise",
  "sigmoid_dense",
]
