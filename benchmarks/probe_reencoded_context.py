r"""Probe (issue 20): latent continuation whose K context latents are the previous clip decoded and
encoded again whole, instead of the DiT's own latents for it.

  python benchmarks/probe_reencoded_context.py --workdir=W --networks=none --num_videos=8 \
      --num_clips=64 --continuation=latent --ceiling_videos=0 --ceiling_long_frames=0 \
      --keyframe_videos=0 --output=benchmarks/results/long_video_continue_reencoded_context_probe.json

`benchmarks/long_video.py` with `Pipeline._carried_latents` replaced for the run: clip k is sampled
and its new frames stream through the causal decoder as usual, but the K latents clip k + 1
continues from are clip k decoded alone (uint8, 17 frames), encoded by the VAE and normalised,
its last K. If the DiT's own latents were off the encoder's manifold and that made continued
objects change size, this would score like re-encoding; it does not
(`results/issue20_turn_windows.json`). Arguments: long_video.py's.
"""
import os
import runpy
import sys

import numpy as np

from pixeldance import sample


def _reencoded_latents(self, z, K: int) -> np.ndarray:
    video = np.asarray(self.vae.decode(self.stats.denormalise(z)))  # the clip decoded alone
    z_again = np.asarray(self.stats.normalise(self.vae.encode(video)))  # and encoded again
    return z_again[:, z.shape[1] - K:]


if __name__ == "__main__":
    sample.Pipeline._carried_latents = _reencoded_latents
    sys.argv = [os.path.join(os.path.dirname(__file__), "long_video.py")] + sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
