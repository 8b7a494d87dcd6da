"""Environment of every pytest run from the repository root, the docstring examples included.

`pytest` collects `tests/` and, with `--doctest-modules`, the `>>>` examples of `mmts_jax/`
(pyproject.toml). tests/conftest.py only applies under `tests/`, so the same environment is set
here, before anything imports jax (XLA reads its flags once, when the backend starts): the
examples then run on the same 8-device simulated CPU mesh, offline, whichever paths are given.
The examples that read `configs/` or `../shared/` use paths relative to the repository root,
where pytest runs.
"""

import os

# The 8-device mesh, and XLA's CPU backend told not to optimise the machine code it emits: the
# tests' programs are tiny, so compiling them is most of the suite's time. On the 2-core CI host
# (tests/test_speed_options.py, test_train_output.py, test_losses_reference.py,
# test_add_layer_norm.py, test_checkpointing.py, run one after another): 195 s without the flags,
# 184 s at level 1, 144 s at level 0. The HLO passes (fusion, layout) run as usual. Level 0
# changes XLA's float32 tanh near saturation by up to 2e-5: the tests that hold XLA's own GELU to
# 1e-5 take the `default_codegen` fixture (tests/conftest.py), which runs them in a process
# with XLA's default flags. `--xla_cpu_use_fusion_emitters=false`: XLA emits its CPU fusions
# with the LLVM IR emitters instead of the MLIR fusion emitters, which halves the compile time
# here (four ViT mu/8 inits and gradients: 10.4 s of XLA compilation -> 5.7 s; a tiny-config
# `mmts train`, its step, init and checkpoint slices: 6.8 s -> 3.4 s) with every tolerance held.
TEST_XLA_FLAGS = (
  "--xla_force_host_platform_device_count=8"
  " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  " --xla_cpu_use_fusion_emitters=false"
)
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
