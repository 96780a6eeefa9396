r"""FVD, FID, IS and CLIPSIM of a folder of generated videos against a folder of real ones.

  python -m pixeldance.tools.metrics --real=DIR --generated=DIR --metrics=fvd,fid,is,clipsim \
      [--protocol=fvd2048_16f] [--captions=FILE] [--networks=ROOT] --output=FILE.json

Videos: mp4 or gif (or avi, webm, mov, mkv), one clip each, chosen and resized as the protocol
says (`pixeldance/metrics/protocols.py`; README "Evaluation protocols"). CLIPSIM needs the captions
of the generated videos: a CSV with the header `path,caption` or a JSONL file of {"path", "caption"}
(path relative to --generated, or the file's stem). The feature networks are converted folders
under ROOT (default $PIXELDANCE_NETWORKS or ~/.cache/pixeldance/networks; README "Feature
networks" says where each comes from). The real side of FVD / FID is computed once and cached in
--stats_dir (default $PIXELDANCE_STATS or ~/.cache/pixeldance/stats).

Prints and writes one JSON object: {"fvd", "fid", "is", "is_std", "clipsim"} (those asked for),
the counts, the protocol and the networks' sha256. Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import json
import os

from absl import flags

from pixeldance import cli, logs
from pixeldance.metrics import networks, protocols, suite

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("real", None, "Folder of real videos (FVD, FID).")
    flags.DEFINE_string("generated", None, "Folder of generated videos.", required=True)
    flags.DEFINE_list("metrics", None, "Comma-separated: fvd, fid, is, clipsim (default: the protocol's).")
    flags.DEFINE_string("protocol", "fvd2048_16f", f"One of {', '.join(protocols.PROTOCOLS)}.")
    flags.DEFINE_string("captions", None, "Captions of the generated videos (CLIPSIM).")
    flags.DEFINE_string("networks", None, "Root of the converted feature networks.")
    flags.DEFINE_string("stats_dir", None, "Cache of real-set statistics.")
    flags.DEFINE_integer("batch_size", 8, "Videos per network call (split over the devices).")
    flags.DEFINE_string("output", None, "JSON file to write.", required=True)


def write_json(path: str, result: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


def main(argv):
    del argv
    logs.setup()  # the libraries' INFO lines off unless --verbosity=1
    protocol = protocols.get(FLAGS.protocol)
    if FLAGS.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    for name in ("generated", "real"):  # before the networks are looked for
        folder = getattr(FLAGS, name)
        if folder and not os.path.isdir(folder):
            raise FileNotFoundError(f"--{name} {folder} is not a folder")
    result = suite.evaluate_folders(
        protocol, generated=FLAGS.generated, real=FLAGS.real,
        metrics=FLAGS.metrics or protocol.metrics, root=FLAGS.networks or networks.default_root(),
        captions=FLAGS.captions, stats_dir=FLAGS.stats_dir, batch_size=FLAGS.batch_size)
    write_json(FLAGS.output, result)
    print(json.dumps(result))


def run():
    define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
