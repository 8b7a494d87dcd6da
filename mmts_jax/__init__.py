"""mmts_jax: MM-TS temperature and margin schedules for contrastive learning, in JAX/Flax.

The light modules (`schedules`, `shifts`, `losses`) import only jax/optax/numpy, so other Flax
projects can use them without the preprocessing or data stacks.
"""
from mmts_jax import losses, schedules, shifts

__all__ = ["losses", "schedules", "shifts"]
__version__ = "0.1.0"
