"""Video generation metrics: FVD, FID, IS and CLIPSIM under pinned protocols.

  scores.py     the metrics as pure functions of features (float64): Frechet distance, IS, CLIPSIM
  stats.py      feature statistics (mean, covariance, count) and their .npz cache
  protocols.py  the named protocols: every choice that changes a number
  videos.py     a folder of videos as a protocol's clips
  networks.py   the feature networks (I3D, InceptionV3, C3D, CLIP) from converted folders,
                jitted and batch-sharded at "highest" precision
  suite.py      all of it for two folders: `evaluate_folders(protocol, generated=, real=, ...)`

The networks themselves are in `pixeldance/models/` (i3d, inception, c3d, clip), their converters
in `pixeldance/convert/`; the command lines are `python -m pixeldance.tools.metrics` (two folders)
and `python -m pixeldance.evaluate` (a trained workdir).
"""
