"""Checkpoints: Orbax manager holding the train state and the data iterator position.

Saves are atomic (Orbax writes to a temporary folder and renames it when complete), so a crash
or kill mid-save leaves the previous checkpoint intact and `latest_step` never sees a partial one;
the trainer's next run deletes such leftovers. Saves are asynchronous: `save` returns once the
arrays are copied off the devices, and the write overlaps the next training steps. Restore
takes an abstract state whose leaves carry shardings, so a checkpoint written on one mesh
restores onto another.

Integrity: once a save has finished, `MANIFEST` is written into its folder (atomically, last):
the size and SHA-256 of every file in it. Restores use the newest checkpoint that verifies
against its manifest (`usable_step`); each newer one passed over is named in one log line with
the reason (a file changed, missing or truncated; no manifest; not a checkpoint at all). A
checkpoint without a manifest is trusted only in a folder where none has one (written before
manifests existed). The trainer (the one writer, `cleanup_tmp=True`) also renames the rejected
ones to `<step>.rejected` so that Orbax, which orders saves by the numbered folders, neither
skips new saves below a junk `99/` nor deletes good ones to keep it; nothing is deleted.
"""
from __future__ import annotations

import contextlib
import gc
import glob
import json
import logging as std_logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from pixeldance import checksums

MANIFEST = "pixeldance_manifest.json"
_VERIFIED: dict = {}  # (step folder, manifest mtime_ns) -> reason or None: each is hashed once per process


class CheckpointWriteError(OSError):
    """A save failed (disk full, read-only or vanished folder, ...): one line naming the step,
    the folder and the cause. The half-written folder is already removed."""


class _HeldErrors(std_logging.Filter):
    """What a failed write prints from Orbax's and TensorStore's threads while saves are in flight,
    above the CheckpointWriteError line that names the cause: ERROR records with a traceback
    through Orbax (its own, and asyncio's 'Task exception was never retrieved' of its write
    tasks), and hundreds of 'Event loop is closed' tracebacks of write callbacks that outlive the
    failed save's event loop (sys.unraisablehook). Held back until the save's outcome is known:
    then printed if it succeeded, dropped if it failed (not held at all with --verbosity=1)."""

    _ORBAX = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__))) + os.sep
    LOGGERS = ("absl", "asyncio")  # Orbax logs through absl

    def __init__(self):
        super().__init__()
        self.records: list[std_logging.LogRecord] = []
        self.unraisable: list = []
        self.hook = sys.unraisablehook
        self.failed = False  # then dropped, not held

    def _from_orbax(self, record: std_logging.LogRecord) -> bool:
        if os.path.abspath(record.pathname).startswith(self._ORBAX):
            return True
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(self._ORBAX):
                return True
            tb = tb.tb_next
        return False

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.ERROR and self._from_orbax(record):
            if not self.failed:
                self.records.append(record)
            return False
        return True

    def unraisable_hook(self, args):
        if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed":
            if not self.failed:
                self.unraisable.append(args)
        else:
            self.hook(args)

    def install(self):
        for name in self.LOGGERS:
            std_logging.getLogger(name).addFilter(self)
        self.hook, sys.unraisablehook = sys.unraisablehook, self.unraisable_hook

    def remove(self, *, replay: bool):
        """Ends holding back; after a failed save, write callbacks may still run into the closed
        loop after Orbax has closed (TensorStore's own threads): those stay silent."""
        if self.failed:  # the failed save's unreferenced write tasks log their errors when collected: now
            gc.collect()
        for name in self.LOGGERS:
            std_logging.getLogger(name).removeFilter(self)
        if sys.unraisablehook == self.unraisable_hook and not self.failed:
            sys.unraisablehook = self.hook
        if replay:
            for record in self.records:
                std_logging.getLogger(record.name).handle(record)
            for args in self.unraisable:
                self.hook(args)
        self.records, self.unraisable = [], []


def _cause(error: BaseException) -> str:
    """The useful line of an Orbax / TensorStore write error (its last line: the OS error)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[-1] if lines else type(error).__name__
    return line[line.rindex("Failed writing: "):] if "Failed writing: " in line else line


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC (or EDQUOT, a quota), as Python's OSError or as TensorStore's text."""
    text = str(error)
    return (isinstance(error, OSError) and error.errno in (28, 122)) or "os_error_code='28'" in text \
        or "os_error_code='122'" in text or "No space left on device" in text


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def _files(step_dir: str) -> list[str]:
    """Paths of every file under `step_dir` relative to it (the manifest left out), sorted."""
    out = []
    for root, _, names in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(p for p in out if p != MANIFEST and not p.endswith(MANIFEST + ".tmp"))


def _digests(step_dir: str, rels: list[str]) -> list[tuple[int, str]]:
    return checksums.digests([os.path.join(step_dir, r) for r in rels])


def write_manifest(step_dir: str) -> dict:
    """Hashes a finished checkpoint folder and writes its MANIFEST (tmp file, fsync, rename)."""
    rels = _files(step_dir)
    files = {r: [size, digest] for r, (size, digest) in zip(rels, _digests(step_dir, rels))}
    manifest = dict(version=1, algorithm="sha256", bytes=sum(v[0] for v in files.values()), files=files)
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))
    return manifest


def verify(step_dir: str) -> str | None:
    """None if every file listed in the folder's MANIFEST is there with its size and SHA-256,
    else the first reason it is not (one line). A folder without a manifest gets 'no manifest'."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return "no manifest"
    key = (os.path.abspath(step_dir), os.stat(path).st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = _check_manifest(step_dir, path)
    return _VERIFIED[key]


def _check_manifest(step_dir: str, path: str) -> str | None:
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        rels = sorted(files)
        expected = [(int(files[r][0]), str(files[r][1])) for r in rels]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    present = [r for r in rels if os.path.isfile(os.path.join(step_dir, r))]
    if len(present) < len(rels):
        return f"missing file {sorted(set(rels) - set(present))[0]}"
    for r, (size, _) in zip(rels, expected):  # sizes first: a truncated file costs no hashing
        actual = os.path.getsize(os.path.join(step_dir, r))
        if actual != size:
            return f"{r} has {actual} bytes, its manifest {size}"
    for r, (_, digest), (_, actual) in zip(rels, expected, _digests(step_dir, rels)):
        if actual != digest:
            return f"{r} does not match its checksum"
    return None


def _numbered(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted((int(d) for d in os.listdir(directory)
                   if d.isdigit() and os.path.isdir(os.path.join(directory, d))), reverse=True)


def _is_legacy(step_dir: str) -> bool:
    """An Orbax checkpoint written before manifests existed (Orbax's own metadata file is there)."""
    return os.path.isfile(os.path.join(step_dir, "_CHECKPOINT_METADATA"))


def scan(directory: str) -> tuple[int | None, list[tuple[int, str]]]:
    """(newest usable step or None, [(step, reason)] for each newer one passed over), newest
    first; stops at the first usable one, so older checkpoints are not read."""
    steps = _numbered(directory)
    sealed = any(os.path.isfile(os.path.join(directory, str(s), MANIFEST)) for s in steps)
    rejected = []
    for step in steps:
        step_dir = os.path.join(directory, str(step))
        reason = verify(step_dir)
        if reason == "no manifest" and not sealed and _is_legacy(step_dir):
            logging.warning("checkpoint %s has no manifest (written before manifests): used unverified", step_dir)
            return step, rejected
        if reason == "no manifest":
            reason = ("no manifest (a run that ended before sealing it)" if _is_legacy(step_dir)
                      else "not a checkpoint (no Orbax metadata, no manifest)")
        if reason is None:
            return step, rejected
        rejected.append((step, reason))
    return None, rejected


def usable_step(directory: str, *, log: bool = True) -> int | None:
    """The newest checkpoint step in `directory` that verifies (see `scan`); None if none."""
    step, rejected = scan(directory)
    if log:
        for bad, reason in rejected:
            logging.warning("skipping checkpoint %s: %s", os.path.join(directory, str(bad)), reason)
    return step


def no_usable_message(directory: str) -> str:
    """One line: why `directory` has no usable checkpoint (none at all, or each one's reason)."""
    _, rejected = scan(directory)
    if not rejected:
        return f"no checkpoint in {directory}"
    return f"no usable checkpoint in {directory}: " + "; ".join(f"step {s}: {r}" for s, r in rejected)


def _set_aside(directory: str, step: int) -> str:
    """Renames `<step>` to `<step>.rejected` (or .rejected.N): kept for inspection, out of Orbax's way."""
    target = os.path.join(directory, f"{step}.rejected")
    n = 1
    while os.path.exists(target):
        target, n = os.path.join(directory, f"{step}.rejected.{n}"), n + 1
    os.rename(os.path.join(directory, str(step)), target)
    return target


_ONE_WRITER_REGISTERED = False


def _write_replicated_arrays_from_one_device() -> None:
    """In one process, Orbax writes a replicated array from one device, not in a slice per replica.

    Its default on CPU and TPU splits a replicated array into one slice per replica so that
    several hosts share the writing; within one process that shares nothing and costs a small
    jitted slice per array and device (88 compiles per save of the runlocal DiT on 8 CPU devices,
    about 3.5 s of a 20 s run). The files written are the same. Several processes keep the default.
    """
    global _ONE_WRITER_REGISTERED
    if _ONE_WRITER_REGISTERED or jax.process_count() > 1:
        return
    absl_logger = std_logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(std_logging.ERROR)  # Orbax warns of every override: nothing for a user to act on
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    finally:
        absl_logger.setLevel(level)
    _ONE_WRITER_REGISTERED = True


class Checkpointer:
    """Keep-N Orbax checkpoints of {'state': pytree, 'data': JSON, 'metrics': JSON} in `directory`.

    'data' is the data iterator position; 'metrics' the per-step metrics not yet written to the
    log when the checkpoint was taken (a preemption between logging steps), so a resumed run
    logs the same means as an uninterrupted one.
    """

    def __init__(self, directory: str, *, keep: int = 2, use_async: bool = True, cleanup_tmp: bool = False):
        """cleanup_tmp: delete the unfinished saves of a killed run. Only for the one process
        (group) that writes `directory`: a reader would delete the saves in flight of a trainer."""
        self.directory = os.path.abspath(directory)
        self._async = use_async
        self._unsealed: list[int] = []
        self._usable = None  # (step,) once scanned: the folders only change through this object
        self._bytes = 0  # size of the newest save's arrays, for the disk-full message
        self._failed = False
        self._held: _HeldErrors | None = None  # what the saves in flight print if they fail
        if cleanup_tmp and jax.process_index() == 0:
            step, rejected = scan(self.directory)
            for bad, reason in rejected:
                logging.warning("checkpoint %s failed verification (%s): renamed to %s",
                                os.path.join(self.directory, str(bad)), reason, _set_aside(self.directory, bad))
            self._usable = (step,)
        if cleanup_tmp and jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("pixeldance_checkpoint_scan")
        _write_replicated_arrays_from_one_device()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=use_async,
                                                 cleanup_tmp_directories=cleanup_tmp),
        )

    def latest_step(self) -> int | None:
        """The newest checkpoint that verifies (see the module docstring); None if none does."""
        if self._unsealed:  # this object's own saves: finish and seal them first
            self.wait()
        if self._usable is None:
            self._usable = (usable_step(self.directory),)
        return self._usable[0]

    def all_steps(self) -> list[int]:
        """Every checkpoint folder Orbax sees, verified or not."""
        return list(self._manager.all_steps())

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """Turns a failed write (raised by Orbax at the save or at the wait after it) into one
        CheckpointWriteError, after removing the unfinished `*.orbax-checkpoint-tmp*` folders."""
        try:
            yield
        except Exception as e:  # Orbax and TensorStore raise ValueError, OSError, RuntimeError, ...
            self._failed = True
            if self._held is not None:  # the error below says it: dropped from now on
                self._held.records, self._held.unraisable, self._held.failed = [], [], True
            self._remove_unfinished()
            which = f"step {step}" if step is not None else f"step {self._unsealed[-1]}" if self._unsealed else "a step"
            if _is_disk_full(e):
                free = shutil.disk_usage(self.directory).free if os.path.isdir(self.directory) else 0
                cause = (f"disk full ({_size(free)} free, the checkpoint needs about {_size(self._bytes)}; "
                         f"{_cause(e)})")
            else:
                cause = _cause(e)
            raise CheckpointWriteError(f"checkpoint {which} could not be written to {self.directory}: {cause}") from None

    def _remove_unfinished(self, settle: float = 0.0):
        """Deletes the `*.orbax-checkpoint-tmp*` folders of failed saves (process 0 only).

        settle > 0: keep deleting until none has been seen for 0.1 s, for at most `settle`
        seconds: a writer still finishing (TensorStore's I/O can outlive Orbax's threads) can
        add files while a folder is being removed, which makes the removal give up on it, or
        make the folder again (a leftover `6.orbax-checkpoint-tmp` seen in CI)."""
        if jax.process_index() != 0:
            return
        pattern = os.path.join(self.directory, "*.orbax-checkpoint-tmp*")
        deadline, quiet = time.monotonic() + settle, 0
        while True:
            found = glob.glob(pattern)
            for tmp in found:
                shutil.rmtree(tmp, ignore_errors=True)
            quiet = 0 if found else quiet + 1
            if quiet >= 3 or time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def poll(self):
        """Seals this object's saves that have finished since the last call, without waiting for
        one in flight: the training loop calls it after each step, so a kill -9 soon after a
        save finds it sealed (the time a checkpoint is complete but not yet trusted is short)."""
        if self._unsealed and not self._manager.is_saving_in_progress():
            with self._writing(None):
                self._manager.wait_until_finished()  # returns at once; surfaces a failed write's error
            self._seal()

    def _hold_errors(self):
        """Holds back what a failed write prints (`_HeldErrors`) until the save about to start
        has finished."""
        if self._held is None and logging.get_verbosity() < logging.DEBUG:
            self._held = _HeldErrors()
            self._held.install()

    def _release_errors(self):
        """Prints what was held (no save is in flight: it was not about a failed write)."""
        if self._held is not None:
            held, self._held = self._held, None
            held.remove(replay=True)

    def _seal(self):
        """Writes the manifests of this object's finished saves (Orbax's retention may have
        deleted some already). Called once no save is in flight."""
        self._release_errors()
        for step in self._unsealed:
            step_dir = os.path.join(self.directory, str(step))
            if jax.process_index() == 0 and os.path.isdir(step_dir):
                write_manifest(step_dir)
        if self._unsealed:
            self._usable = (self._unsealed[-1],)
        self._unsealed = []

    def save(self, step: int, state: Any, data_state: dict | None = None, *,
             metrics: list[dict] | None = None, force: bool = False) -> bool:
        """Starts an async save; metrics: host scalars of the steps since the last log line."""
        pending = [{k: float(v) for k, v in m.items()} for m in metrics or []]
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}),
                                  metrics=ocp.args.JsonSave({"pending": pending}))
        with self._writing(None):
            self._manager.wait_until_finished()  # Orbax waits for the previous save anyway; then seal it
        self._seal()
        self._bytes = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
        self._hold_errors()
        with self._writing(int(step)):
            saved = self._manager.save(int(step), args=args, force=force)
        if saved:
            self._unsealed.append(int(step))
            if not self._async:
                self._seal()
        return saved

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` (see `abstract_like`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(no_usable_message(self.directory))
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], dict(out["data"] or {})

    def restore_part(self, abstract_part: dict, step: int | None = None) -> dict:
        """Some top-level fields of the saved state only, e.g. {'ema_params': abstract params}
        of a TrainState: nothing else is read, so loading a model's weights for sampling costs
        their own memory, not the optimizer's. abstract_part: pytrees of jax.ShapeDtypeStruct
        with `.sharding` (each leaf is read straight into its shards)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(no_usable_message(self.directory))
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_part)
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract_part, restore_args=restore_args, partial_restore=True)))
        return dict(out["state"])

    def restore_metrics(self, step: int | None = None) -> list[dict]:
        """The pending per-step metrics saved with a checkpoint ([] for checkpoints without them)."""
        step = self.latest_step() if step is None else step
        if step is None or "metrics" not in self._manager.item_metadata(step):
            return []
        out = self._manager.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))
        # float32 like the step's own outputs, so means over restored and new steps round alike.
        return [{k: np.float32(v) for k, v in m.items()} for m in out["metrics"]["pending"]]

    def wait(self):
        with self._writing(None):
            self._manager.wait_until_finished()
        self._seal()

    def close(self):
        """Waits for the save in flight and seals it; after a failed save, only releases Orbax
        (the error was raised already: a second one would hide it)."""
        if self._failed:
            with contextlib.suppress(Exception):
                self._manager.close()
            # Again, now that Orbax's threads have ended: one still writing when the error
            # surfaced can have made its temporary folder after the first removal (seen in CI).
            self._remove_unfinished(settle=3.0)
            if self._held is not None:  # Orbax's threads have ended (TensorStore's callbacks may not)
                self._held.remove(replay=False)
                self._held = None
            return
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):
                self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract arrays) placed with `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
