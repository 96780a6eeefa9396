"""The sampling CLI run in-process on a stand-in pipeline, for tests (`sample.main` with the
workdir's pipeline replaced; the workdir holds the stand-in's config.json only, since main checks
the flags against it before it loads anything)."""
import numpy as np
from absl import flags

from pixeldance import sample
from pixeldance import workdir as workdir_lib


def in_process_cli(monkeypatch, tmp_path_factory, pipe):
    """Generator for a fixture: yields run(capsys, *flags) -> (exit status, stdout, stderr)."""
    if "num_clips" not in flags.FLAGS:
        sample.define_flags()
    monkeypatch.setattr(sample, "load_pipeline", lambda workdir: pipe)
    workdir = tmp_path_factory.mktemp("standin_workdir")
    workdir_lib.write_config(str(workdir), pipe.config)

    def run(capsys, *argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["sample", f"--workdir={workdir}", *argv])
        try:
            sample.main([])
            status = 0
        except SystemExit as e:
            status = e.code
        out = capsys.readouterr()
        return status, out.out, out.err

    yield run
    flags.FLAGS.unparse_flags()


def record_latents(pipe):
    """Makes `pipe` record every `_sample_batch` result (numpy) in `pipe.latents`; returns pipe."""
    pipe.latents = []
    sample_batch = pipe._sample_batch

    def recording(*args, **kwargs):
        z = sample_batch(*args, **kwargs)
        pipe.latents.append(np.asarray(z))
        return z
    pipe._sample_batch = recording
    return pipe
