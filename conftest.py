"""Environment of every pytest run from the repository root, the docstring examples included.

`pytest` collects `tests/` and, with `--doctest-modules`, the `>>>` examples of `mmts_jax/`
(pyproject.toml). tests/conftest.py only applies under `tests/`, so the same environment is set
here, before anything imports jax (XLA reads its flags once, when the backend starts): the
examples then run on the same 8-device simulated CPU mesh, offline, whichever paths are given.
The examples that read `configs/` or `../shared/` use paths relative to the repository root,
where pytest runs.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
