r"""Probe (issue 20): latent continuation whose K context latents are the previous clip decoded and
encoded again whole, instead of the DiT's own latents for it.

  python benchmarks/probe_reencoded_context.py --workdir=W --networks=none --num_videos=8 \
      --num_clips=64 --continuation=latent --ceiling_videos=0 --ceiling_long_frames=0 \
      --keyframe_videos=0 --output=benchmarks/results/long_video_continue_reencoded_context_probe.json

`benchmarks/long_video.py` with `Pipeline._latent_clips` replaced for the run: clip k is sampled
as usual and its new frames stream through the causal decoder as usual, but the K latents clip
k + 1 continues from are clip k decoded alone (uint8, 17 frames), encoded by the VAE and
normalised, its last K. If the DiT's own latents were off the encoder's manifold and that made
continued objects change size, this would score like re-encoding; it does not
(`results/issue20_turn_windows.json`). Arguments: long_video.py's.
"""
import os
import runpy
import sys

import jax
import numpy as np

from pixeldance import sample


def _latent_clips(self, prompts, first_frame, last_frames, seed, settings, keyframes, K):
    # sample.Pipeline._latent_clips but for the two lines marked: the same keys, the same stream.
    key = jax.random.key(seed)
    T, h, w, C = self.vae.latent_shape(settings["num_frames"], settings["height"], settings["width"])
    decoder = self.vae.stream_decoder()
    z_context, context = np.zeros((1, T, h, w, C), np.float32), np.zeros((1, T), bool)
    for k, (prompt, last, kf) in enumerate(zip(prompts, last_frames, keyframes)):
        clip_key = key if k == 0 else jax.random.fold_in(jax.random.fold_in(key, 2), k)
        z = self._sample_batch([prompt], [first_frame if k == 0 else None], [last], clip_key, keyframes=[kf],
                               context=(z_context, context), **settings)
        frames = decoder.push(self.stats.denormalise(z if k == 0 else z[:, K:]))
        video = np.asarray(self.vae.decode(self.stats.denormalise(z)))  # changed: the clip decoded alone
        z_again = np.asarray(self.stats.normalise(self.vae.encode(video)))  # changed: and encoded again
        z_context = np.zeros(z.shape, np.float32)
        z_context[:, :K] = z_again[:, T - K:]
        context = np.arange(T)[None] < K
        yield np.asarray(frames[0])


if __name__ == "__main__":
    sample.Pipeline._latent_clips = _latent_clips
    sys.argv = [os.path.join(os.path.dirname(__file__), "long_video.py")] + sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
