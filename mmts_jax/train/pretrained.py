"""Initial parameters from an orbax checkpoint (`config.init.checkpoint`).

The directory holds one orbax (`StandardCheckpointer`) tree `{"params": {...}}` with the model's
parameter names, e.g. converted CLIP weights. Every parameter in it must exist in the model with
the same shape; model parameters it lacks (e.g. the learnable temperature) keep their fresh
initial values and are listed in the returned report.

Example:
  >>> import tempfile, numpy as np, orbax.checkpoint as ocp
  >>> path = tempfile.mkdtemp() + "/init"
  >>> with ocp.StandardCheckpointer() as writer:   # saves asynchronously; closing waits
  ...   writer.save(path, {"params": {"w": np.ones(2, np.float32)}})
  >>> params, missing = load_params(path, {"w": np.zeros(2, np.float32), "b": np.zeros(1)})
  >>> params["w"].tolist(), missing
  ([1.0, 1.0], ['b'])
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

__all__ = ["load_params"]


def _flat(tree) -> dict[str, Any]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)] = leaf
  return out


def load_params(path: str | os.PathLike, params: Any) -> tuple[Any, list[str]]:
  """`params` with every leaf found in the checkpoint at `path` replaced by the saved one.

  Returns `(params, missing)`: the merged tree (host numpy arrays in the checkpoint's place,
  the model's own elsewhere, dtypes of the model) and the names the checkpoint did not have.

  Raises:
    FileNotFoundError: `path` is not a directory.
    ValueError: the checkpoint has no "params", a parameter the model lacks, or another shape.
  """
  import orbax.checkpoint as ocp
  from etils import epath

  # orbax restores only absolute paths; a relative one is relative to the working directory.
  directory = epath.Path(os.path.abspath(os.fspath(path)))
  if not directory.is_dir():
    raise FileNotFoundError(f"init.checkpoint {str(path)!r} is not a directory")
  try:
    restored = ocp.StandardCheckpointer().restore(directory)
  except Exception as e:  # orbax raises several types for a directory that is no checkpoint
    raise ValueError(f"init.checkpoint {str(path)!r} is not an orbax checkpoint: {e}") from None
  if not isinstance(restored, dict) or "params" not in restored:
    keys = sorted(restored) if isinstance(restored, dict) else type(restored).__name__
    raise ValueError(f"init.checkpoint {str(path)!r} must hold {{'params': ...}}, has {keys}")
  saved, model = _flat(restored["params"]), _flat(params)
  unknown = sorted(set(saved) - set(model))
  if unknown:
    raise ValueError(
      f"init.checkpoint {str(path)!r} has parameters the model lacks: "
      f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
    )
  for name, value in saved.items():
    if np.shape(value) != np.shape(model[name]):
      raise ValueError(
        f"init.checkpoint {str(path)!r}: {name} has shape {np.shape(value)}, "
        f"the model's is {np.shape(model[name])}"
      )
  missing = sorted(set(model) - set(saved))

  def merge(path, leaf):
    name = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    if name not in saved:
      return leaf
    return np.asarray(saved[name], dtype=leaf.dtype)

  return jax.tree_util.tree_map_with_path(merge, params), missing
