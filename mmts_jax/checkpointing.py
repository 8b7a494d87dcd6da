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

Faults (docs/reliability.md): a save that fails part-way (a full disk, a quota, a file-size
limit) raises `CheckpointWriteError` naming the step, its path and the previous complete step,
which stays usable (the failed step only ever existed as an orbax temporary). `restore_latest`
restores the newest step that reads back: a step whose files are truncated, garbled or missing
(tensorstore's zstd/OCDBT reads fail on them) is reported with a warning naming the step and why
and the step before it is tried; once one restores, the unreadable ones are renamed
`<step>.unreadable` so that the resumed run can save those steps again.

Example:
  >>> import tempfile, numpy as np
  >>> ckpt = Checkpointer(tempfile.mkdtemp(), every_steps=1, keep=2)
  >>> ckpt.save(3, {"w": np.ones(2, np.float32)}, {"input_position": 3}, force=True)
  True
  >>> ckpt.wait()
  >>> tree, meta = ckpt.restore(3, {"w": np.zeros(2, np.float32)})
  >>> meta["input_position"], tree["w"].tolist()
  (3, [1.0, 1.0])
  >>> ckpt.restore_latest({"w": np.zeros(2, np.float32)})[0]   # the newest step that reads back
  3
  >>> ckpt.close()
"""

from __future__ import annotations

import os
import re
import signal
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from mmts_jax import atomic_io

__all__ = ["Checkpointer", "PreemptionWatcher", "CheckpointWriteError", "CheckpointRestoreError"]


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the previous complete ones are untouched. `mmts train`
  prints it as one line and exits 2 (a problem of the machine, as a full disk elsewhere)."""

  exit_status = 2


class CheckpointRestoreError(ValueError):
  """No checkpoint step of a directory could be restored (each step's reason is listed)."""


def _reason(e: BaseException) -> str:
  """A short reason: the OS error tensorstore reports (`[os_error_code='28']` -> "No space left
  on device"), else the exception's first line."""
  text = str(e)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return os.strerror(int(code.group(1)))
  first = (text.strip().splitlines() or [type(e).__name__])[0]
  return first if len(first) <= 300 else first[:297] + "..."


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
      max_to_keep=int(keep),
      save_interval_steps=int(every_steps),
      enable_async_checkpointing=bool(async_save),
      create=True,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta")
    )
    self._writing: int | None = None  # the step of the save in flight (async)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, tree: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
    """Starts an (async) save when `step` is due or `force`; returns whether one started.

    Raises:
      CheckpointWriteError: this save, or the previous async one (orbax reports a background
        failure at the next call), could not be written.
    """
    try:
      started = self.manager.save(
        int(step),
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(dict(meta))
        ),
        force=force,
      )
    except Exception as e:  # noqa: BLE001 (tensorstore raises ValueError for OS errors)
      failed, self._writing = (self._writing if self._writing is not None else int(step)), None
      raise self._write_error(failed, e) from e
    if started:
      self._writing = int(step)
    return started

  def _write_error(self, step: int, e: BaseException) -> CheckpointWriteError:
    self.manager.reload()  # forget the failed step: only committed steps count
    good = self.manager.latest_step()
    return CheckpointWriteError(
      f"checkpoint step {step} could not be written to {self.directory / str(step)} "
      f"({_reason(e)}); the previous checkpoint is usable: "
      + (f"step {good} in {self.directory}" if good is not None else "none was saved yet")
    )

  def restore_latest(self, target: Any = None) -> tuple[int, Any, dict] | None:
    """(step, tree, meta) of the newest step that restores (see `restore`); None if there is no
    step. A step that cannot be restored is warned about (naming it and why) and the step before
    it is tried. Once an older step restores into the same `target` (so the newer ones failed
    on their files, not on the target's structure), process 0 renames the failed ones
    `<step>.unreadable`: kept for inspection, out of orbax's list, so the run can save those
    steps again. Nothing is renamed when no step restores.

    Raises:
      CheckpointRestoreError: no step restores; each step's reason is listed.
    """
    failures, failed = [], []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        tree, meta = self.restore(step, target)
      except Exception as e:  # noqa: BLE001 (unreadable data: ValueError, OSError, KeyError...)
        failures.append(f"step {step}: {_reason(e)}")
        failed.append(step)
        warnings.warn(
          f"checkpoint step {step} in {self.directory} cannot be restored "
          f"({_reason(e)}); trying the one before it",
          RuntimeWarning,
          stacklevel=2,
        )
        continue
      for bad in failed:
        self._set_aside(bad)
      return step, tree, meta
    if failures:
      raise CheckpointRestoreError(
        f"no checkpoint in {self.directory} can be restored: " + "; ".join(failures)
      )
    return None

  def _set_aside(self, step: int) -> None:
    # Kept for inspection, but out of orbax's step list: a resumed run saves this step again.
    if jax.process_index() == 0:
      bad = self.directory / str(step)
      target = self.directory / f"{step}.unreadable"
      if target.exists():
        target.rmtree()
      bad.rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self.manager.reload()

  def restore(self, step: int, target: Any = None) -> tuple[Any, dict]:
    """Restores `step` into the structure, dtypes and shardings of `target` (arrays or
    `jax.ShapeDtypeStruct`s with `.sharding`); without a target, as saved (nested dicts and
    lists of arrays), e.g. for inspection."""
    abstract = None if target is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = self.manager.restore(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    return out["state"], dict(out["meta"])

  def wait(self) -> None:
    """Blocks until every pending async save is committed; `CheckpointWriteError` if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (as in save)
      failed, self._writing = self._writing, None
      raise self._write_error(-1 if failed is None else failed, e) from e
    self._writing = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
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

  def __enter__(self) -> PreemptionWatcher:
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
