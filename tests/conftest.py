"""Test-session fixtures. The environment (the 8-device simulated CPU mesh, XLA's flags, offline
Hugging Face) is set by the repository root's conftest.py, which pytest loads first for every
path under the root, before any test imports jax."""

import os
import pathlib
import subprocess
import sys

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  if not SHARED.is_dir():
    raise FileNotFoundError(f"../shared not found at {SHARED}; the reference data is required")
  return SHARED


@pytest.fixture
def default_codegen(request) -> bool:
  """True where this process compiles with XLA's default CPU code generation. Elsewhere (the
  suite's XLA_FLAGS lower the optimisation level, conftest.py) it runs this test again in a
  child pytest with only the device-count flag, asserts that it passed, and returns False: the
  test then returns, its assertions having run in the child."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
    return True
  device_flags = [f for f in flags if f.startswith("--xla_force_host_platform_device_count")]
  child = subprocess.run(
    # -v cancels the -q of pyproject's addopts: the summary line then says "1 passed".
    [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", request.node.nodeid],
    env=dict(os.environ, XLA_FLAGS=" ".join(device_flags)),
    cwd=request.config.rootpath,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert child.returncode == 0 and " 1 passed" in child.stdout, child.stdout[-4000:]
  return False


@pytest.fixture
def interpreted():
  """The fused Pallas loss tiles through the Pallas interpreter (any backend) for one test, then
  the default dispatch and tile configurations again."""
  import jax.numpy as jnp

  from mmts_jax.losses import _pallas_tiles as pt

  pt.set_fused_tiles("interpret")
  yield
  pt.set_fused_tiles(None)
  for kind in ("fwd", "bwd"):
    for dt in (jnp.float32, jnp.bfloat16):
      pt.set_tile_config(kind, dt, None)


# ----------------------------------------------------------------------------- GCS emulator

# Environment that points every GCS client the project uses at the emulator:
#   STORAGE_EMULATOR_HOST            gcsfs (epath's gs:// backend without TensorFlow),
#                                    google-cloud-storage
#   TENSORSTORE_GCS_HTTP_URL         tensorstore's gcs kvstore (orbax's array writes)
#   GOOGLE_AUTH_TOKEN_FOR_TESTING    tensorstore: a fixed bearer token instead of credentials
#   CLOUD_STORAGE_EMULATOR_ENDPOINT  array_record's native gs:// reader
#   GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
#                                    gcsfs would ask the Storage Control API (which the emulator
#                                    does not serve) for every bucket's type and log a warning
EMULATOR_ENV = (
  "STORAGE_EMULATOR_HOST",
  "TENSORSTORE_GCS_HTTP_URL",
  "CLOUD_STORAGE_EMULATOR_ENDPOINT",
)


class GcsEmulator:
  """A running `gcp-storage-emulator` (in memory, loopback only) with one bucket."""

  def __init__(self, url: str, bucket: str, process):
    self.url, self.bucket, self.process = url, bucket, process
    self._count = 0

  def fresh(self, name: str = "t") -> str:
    """A new, empty `gs://bucket/NAME-i` prefix (tests share the bucket, not prefixes)."""
    self._count += 1
    return f"gs://{self.bucket}/{name}-{self._count}"

  def env(self) -> dict[str, str]:
    out = {k: self.url for k in EMULATOR_ENV}
    out.update(GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    return out


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
  """Starts `gcp-storage-emulator` (through tests/gcs_emulator.py, which adds the object
  generations tensorstore needs) on 127.0.0.1 (a free port, in memory, bucket `mmts-test`),
  points the clients at it for the rest of the session, and stops it at the end."""
  import subprocess
  import sys
  import time
  import urllib.request

  port, bucket = _free_port(), "mmts-test"
  proc = subprocess.Popen(
    [
      sys.executable,
      str(pathlib.Path(__file__).with_name("gcs_emulator.py")),
      "--port",
      str(port),
      "--bucket",
      bucket,
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(url + "/", timeout=1).read()
      break
    except OSError:
      if proc.poll() is not None:
        raise RuntimeError(
          f"gcp-storage-emulator exited with {proc.returncode} (pip install gcp-storage-emulator)"
        ) from None
      if time.time() > deadline:
        proc.kill()
        raise RuntimeError(f"gcp-storage-emulator did not answer on {url} within 30 s") from None
      time.sleep(0.1)
  emulator = GcsEmulator(url, bucket, proc)
  saved = {k: os.environ.get(k) for k in emulator.env()}
  os.environ.update(emulator.env())
  try:
    yield emulator
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
