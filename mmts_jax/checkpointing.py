"""Checkpoints with orbax: async save every N steps and on preemption, keep the last K, restore
everything a bit-exact resume needs (parameters, optimizer state, step, RNG, BatchNorm statistics
and the input position).

Crash safety comes from orbax's commit protocol: a step is written into a temporary directory and
renamed into place only once complete, so a crash mid-save leaves the previous checkpoints intact
and `latest_step()` never returns a partial one (leftover temporaries are removed at start-up). On
an object store (`gs://...`), which has no atomic directory rename, orbax instead marks a finished
step with a `commit_success.txt` object written last, and `latest_step()` ignores steps without it.
The directory is an `etils.epath` path (local paths are made absolute, `gs://` URIs are kept as they
are); arrays go through tensorstore's own GCS driver.

Preemption: `PreemptionWatcher` turns SIGTERM into a flag the training loop polls once per step;
the loop then saves a checkpoint at the current step and exits. In multi-process runs JAX's
coordination service receives the signal and `reached_preemption_sync_point` makes every process
stop at the same step.

Example:
  >>> import tempfile, numpy as np
  >>> ckpt = Checkpointer(tempfile.mkdtemp(), every_steps=1, keep=2)
  >>> ckpt.save(3, {"w": np.ones(2, np.float32)}, {"input_position": 3}, force=True)
  True
  >>> ckpt.wait()
  >>> tree, meta = ckpt.restore(3, {"w": np.zeros(2, np.float32)})
  >>> meta["input_position"], tree["w"].tolist()
  (3, [1.0, 1.0])
  >>> ckpt.close()
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from mmts_jax import atomic_io

__all__ = ["Checkpointer", "PreemptionWatcher"]


class Checkpointer:
  """A thin wrapper over `orbax.checkpoint.CheckpointManager` with two items: the array tree
  (`state`) and a JSON dict (`meta`: input position, shift-table fingerprint, ...)."""

  def __init__(self, directory, *, every_steps: int, keep: int, async_save: bool = True):
    if int(every_steps) <= 0:
      raise ValueError(f"checkpoint every_steps must be > 0, got {every_steps}")
    if int(keep) <= 0:
      raise ValueError(f"checkpoint keep must be > 0, got {keep}")
    self.directory = atomic_io.as_path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep), save_interval_steps=int(every_steps),
        enable_async_checkpointing=bool(async_save), create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, tree: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
    """Starts an (async) save when `step` is due or `force`; returns whether one started."""
    return self.manager.save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                           meta=ocp.args.JsonSave(dict(meta))), force=force)

  def restore(self, step: int, target: Any = None) -> tuple[Any, dict]:
    """Restores `step` into the structure, dtypes and shardings of `target` (arrays or
    `jax.ShapeDtypeStruct`s with `.sharding`); without a target, as saved (nested dicts and
    lists of arrays), e.g. for inspection."""
    abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = self.manager.restore(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                           meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def wait(self) -> None:
    """Blocks until every pending async save is committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionWatcher:
  """SIGTERM -> a flag polled by the loop (single process), or JAX's preemption sync point
  (multi-process, where the coordination service owns the signal). Use as a context manager:
  the previous handler is restored on exit."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._event = threading.Event()
    self._previous: dict = {}
    self._multiprocess = jax.process_count() > 1

  def __enter__(self) -> "PreemptionWatcher":
    # Signal handlers can only be installed from the main thread; elsewhere (a notebook worker
    # thread) preemption is simply not watched.
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    self._event.set()

  def requested(self, step: int) -> bool:
    """Whether the run should checkpoint and stop after `step` (all processes agree)."""
    if self._multiprocess:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    return self._event.is_set()
