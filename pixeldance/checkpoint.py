"""Checkpoints: Orbax manager holding the train state and the data iterator position.

Saves are atomic (Orbax writes to a temporary folder and renames it when complete), so a crash
or kill mid-save leaves the previous checkpoint intact and `latest_step` never sees a partial one;
the trainer's next run deletes such leftovers. Saves are asynchronous: `save` returns once the
arrays are copied off the devices, and the write overlaps the next training steps. Restore
takes an abstract state whose leaves carry shardings, so a checkpoint written on one mesh
restores onto another.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


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
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=use_async,
                                                 cleanup_tmp_directories=cleanup_tmp),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None, *,
             metrics: list[dict] | None = None, force: bool = False) -> bool:
        """Starts an async save; metrics: host scalars of the steps since the last log line."""
        pending = [{k: float(v) for k, v in m.items()} for m in metrics or []]
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}),
                                  metrics=ocp.args.JsonSave({"pending": pending}))
        return self._manager.save(int(step), args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` (see `abstract_like`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
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
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
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
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract arrays) placed with `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
