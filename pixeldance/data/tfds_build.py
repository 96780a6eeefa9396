r"""Builds the UCF-101 or MSR-VTT TFDS dataset (array_record, no TensorFlow) from the official
archives in a manual folder; see pixeldance/data/tfds_datasets.py for the layouts.

  python -m pixeldance.data.tfds_build --dataset=ucf101 --manual_dir=MANUAL --data_dir=DATA \
      [--ucf101_split=1]
  python -m pixeldance.data.tfds_build --dataset=msrvtt --manual_dir=MANUAL --data_dir=DATA

Then train with --config.data.root=DATA (experiments/ucf101.py, experiments/msrvtt.py). A dataset
already built in DATA is left as it is. Videos missing from the archives, empty or unreadable are
skipped and counted (--on_error=raise stops at the first); the counts and the records per split
are printed at the end. Reads nothing from the network.

Files the split lists or annotations select from a folder of the manual folder (UCF-101/, or for
MSR-VTT the manual folder itself) must resolve inside it after following symlinks; one that
points elsewhere is refused before it is opened, counted as outside_root (or stops the build with
--on_error=raise), unless --allow_outside_root.
"""
from __future__ import annotations

from absl import flags

from pixeldance import cli

_DATASET = flags.DEFINE_enum("dataset", None, ["ucf101", "msrvtt"], "Dataset to build.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder holding the official archives.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir to write (config.data.root).")
_UCF101_SPLIT = flags.DEFINE_integer("ucf101_split", 1, "UCF-101: official train/test list 1, 2 or 3.")
_ON_ERROR = flags.DEFINE_enum("on_error", "skip", ["skip", "raise"],
                              "Videos missing from the archives, empty or unreadable: skip (counted) or raise.")
_ALLOW_OUTSIDE = flags.DEFINE_boolean(
    "allow_outside_root", False,
    "Read files of the manual folders that resolve outside them (symlinks to elsewhere); refused by default.")


def main(argv):
    del argv
    from pixeldance.data import tfds_datasets  # tensorflow_datasets after flag parsing: --help stays fast
    b = tfds_datasets.build(_DATASET.value, _MANUAL_DIR.value, _DATA_DIR.value, ucf101_split=_UCF101_SPLIT.value,
                            on_error=_ON_ERROR.value, allow_outside_root=_ALLOW_OUTSIDE.value)
    counts = ", ".join(f"{s} {info.num_examples}" for s, info in sorted(b.info.splits.items()))
    print(f"{b.name}/{b.builder_config.name if b.builder_config else ''} in {b.data_path}: {counts}")
    print(f"{b.name}: already built, left as it is" if b.already_built else b.skips.line(b.name))


if __name__ == "__main__":
    flags.mark_flags_as_required(["dataset", "manual_dir", "data_dir"])
    cli.run(main)
