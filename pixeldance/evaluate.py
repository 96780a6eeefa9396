r"""The paper's metrics for a trained workdir: generate a protocol's videos, then score them.

  python -m pixeldance.evaluate --workdir=DIR [--protocol=NAME] [--networks=ROOT] \
      [--stats_dir=DIR] [--num_generated=N] [--metrics=fvd,fid] [--mode=t2v|i2v|flf2v]

Loads the workdir's pipeline (EMA weights of its newest checkpoints, on every device), generates
the protocol's videos (`pixeldance/evaluators/metrics.py`: prompts and instruction frames from
the held-out clips of the workdir's dataset, in shards written as they come, so an interrupted
evaluation resumes where it stopped) and computes its metrics against the protocol's real clips.

Writes DIR/eval/<protocol>/ (generated/*.mp4, captions.jsonl, real/*.mp4 when the real
statistics were not cached yet, metrics.json), DIR/eval/<protocol>.json (the result: the
metrics, counts, protocol, networks' sha256, the DiT step) and logs the metrics to
metrics.jsonl and TensorBoard under the stage 'eval_<protocol>'. `python -m
pixeldance.tools.paper_tables --workdirs=DIR` prints them beside the paper's tables.

--protocol defaults to the workdir's config.evals.protocol. Bad input: one line, exit code 2.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before JAX is imported: glibc reads it only at start (hugepages.py)
    from pixeldance import hugepages
    hugepages.reexec()

import json
import os

from absl import flags

from pixeldance import cli, logs, sample
from pixeldance import workdir as workdir_lib
from pixeldance.evaluators import common
from pixeldance.evaluators.metrics import ProtocolMetrics
from pixeldance.metrics import protocols

FLAGS = flags.FLAGS
EVAL_DIR = "eval"


def result_path(workdir: str, protocol: str) -> str:
    return os.path.join(workdir, EVAL_DIR, f"{protocol}.json")


def evaluate(workdir: str, protocol: str | None = None, *, root: str | None = None,
             stats_dir: str | None = None, num_generated: int | None = None,
             metrics: tuple[str, ...] | None = None, mode: str | None = None) -> dict:
    """Runs the evaluation of the module docstring; returns the result dict."""
    config = workdir_lib.read_config(workdir)
    evaluator = ProtocolMetrics(config, protocol, root=root, stats_dir=stats_dir,
                                num_generated=num_generated, metrics=metrics, mode=mode)
    name = evaluator.protocol.name
    if mode and mode != protocols.get(name).mode:
        name = f"{name}-{mode}"  # results under another mode are kept apart
    pipe = sample.load_pipeline(workdir)
    out_dir = os.path.join(workdir, EVAL_DIR, name)
    os.makedirs(out_dir, exist_ok=True)
    results = common.run([evaluator], pipe, workdir=workdir, step=int(pipe.step or 0), out_dir=out_dir,
                         stage=f"eval_{name}")
    report = results[evaluator.name].report
    report["name"] = name
    path = result_path(workdir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    return report


def main(argv):
    del argv
    logs.setup()  # the libraries' INFO lines off unless --verbosity=1
    if FLAGS.num_generated is not None and FLAGS.num_generated < 2:
        raise ValueError(f"--num_generated must be >= 2, got {FLAGS.num_generated}")
    report = evaluate(FLAGS.workdir, FLAGS.protocol, root=FLAGS.networks, stats_dir=FLAGS.stats_dir,
                      num_generated=FLAGS.num_generated, metrics=FLAGS.metrics, mode=FLAGS.mode)
    print(json.dumps(report))
    print(f"wrote {result_path(FLAGS.workdir, report['name'])}")


def run():
    flags.DEFINE_string("workdir", None, "Workdir of a trained pipeline.", required=True)
    flags.DEFINE_string("protocol", None, "Protocol name (default: the workdir's config.evals.protocol).")
    flags.DEFINE_string("networks", None, "Root of the converted feature networks.")
    flags.DEFINE_string("stats_dir", None, "Cache of real-set statistics.")
    flags.DEFINE_list("metrics", None, "Comma-separated subset of fvd, fid, is, clipsim (default: the "
                      "protocol's).")
    flags.DEFINE_enum("mode", None, ["t2v", "i2v", "flf2v"], "Generate in this mode instead of the "
                      "protocol's (results in eval/<protocol>-<mode>.json).")
    flags.DEFINE_integer("num_generated", None, "Generate this many videos instead of the protocol's "
                         "count (recorded in the result's warnings).")
    cli.run(main)


if __name__ == "__main__":
    run()
