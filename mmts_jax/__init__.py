"""mmts_jax: MM-TS temperature and margin schedules for contrastive learning, in JAX/Flax.

The light modules (`schedules`, `shifts`, `losses`) import only jax/optax/numpy, so other Flax
projects can use them without the preprocessing or data stacks. Submodules are imported on first
use (PEP 562), so `import mmts_jax.config_defaults` (what every config file does) imports no JAX.

Example:
  >>> import mmts_jax
  >>> mmts_jax.shifts.__name__
  'mmts_jax.shifts'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what a type checker sees; at run time __getattr__ imports them on first use
  from mmts_jax import losses, schedules, shifts

__all__ = ["losses", "schedules", "shifts"]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in __all__:
    return importlib.import_module(f"mmts_jax.{name}")
  raise AttributeError(f"module 'mmts_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
