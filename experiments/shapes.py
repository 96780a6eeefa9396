r"""The main job: train the VAE, then the DiT, on the synthetic shapes world; sample and evaluate.

  python -m pixeldance.main --config=experiments/shapes.py --workdir=workdirs/shapes

Smoke test (under a minute): `--config=experiments/shapes.py:runlocal`.
Writes to the workdir: vae/ and dit/ checkpoints, cache/ (latent shards), metrics.jsonl and
TensorBoard events, samples/*.mp4 and grid.gif, faithfulness.json.
"""
from pixeldance import configs

base = configs.import_sibling(__file__, "base")


def get_config(arg=None):
    return base.get_config(arg)
