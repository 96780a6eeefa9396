r"""What checkpoint integrity costs: sealing (hashing a finished save into its manifest) and
verifying it on restore, in seconds per GB, against the save itself.

  python benchmarks/checkpoint_verify.py --gb=2 --output=benchmarks/results/checkpoint_verify.json

Saves a train-state-like pytree of `--gb` GB of float32 (`--arrays` equal arrays: OCDBT packs
them into few data files, as with a real model) with `Checkpointer` (synchronous), then times
`write_manifest` (what `Checkpointer` runs after each save) and `verify` (what every restore
runs; its per-process memo cleared before each repeat). The files are in the page cache after
the save, as they are for the seal; a restore on a fresh machine also reads them from disk once
(the restore itself then reads them from the cache). SHA-256 over files in parallel threads
(hashlib releases the GIL), so the rate scales with cores up to the disk's read rate.

Prints one JSON object and writes it to --output if given. Run alone: other jobs on the cores
change the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from pixeldance import checkpoint as ckpt_lib


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--arrays", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="Where to write (default: a temporary folder).")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    root = tempfile.mkdtemp(dir=args.dir, prefix="ckpt_verify_")
    try:
        n = int(args.gb * 2**30 / 4 / args.arrays)
        key = jax.random.key(0)
        state = {f"a{i}": jax.random.normal(jax.random.fold_in(key, i), (n,), jnp.float32)
                 for i in range(args.arrays)}
        jax.block_until_ready(state)
        ckpt = ckpt_lib.Checkpointer(root, keep=1, use_async=False)
        t0 = time.perf_counter()
        ckpt._manager.save(1, args=ckpt_lib.ocp.args.Composite(state=ckpt_lib.ocp.args.StandardSave(state)))
        ckpt._manager.wait_until_finished()
        save_s = time.perf_counter() - t0
        ckpt._manager.close()
        step_dir = os.path.join(root, "1")
        seal, check = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            manifest = ckpt_lib.write_manifest(step_dir)
            seal.append(time.perf_counter() - t0)
            ckpt_lib._VERIFIED.clear()
            t0 = time.perf_counter()
            assert ckpt_lib.verify(step_dir) is None
            check.append(time.perf_counter() - t0)
        gb = manifest["bytes"] / 1e9
        result = dict(
            bytes=manifest["bytes"], files=len(manifest["files"]), cpu=_cpu_model(), cores=os.cpu_count(),
            save_s=round(save_s, 3), seal_s=round(float(np.median(seal)), 3),
            verify_s=round(float(np.median(check)), 3),
            seal_s_per_gb=round(float(np.median(seal)) / gb, 3),
            verify_s_per_gb=round(float(np.median(check)) / gb, 3),
            verify_over_save=round(float(np.median(check)) / save_s, 3),
            note="page-cached files; SHA-256 in min(8, cores) threads; medians of --repeats")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
