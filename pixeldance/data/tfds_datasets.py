"""TFDS builders for UCF-101 and MSR-VTT that read the official archives from a manual folder.

They store each video's original file bytes (UCF-101 .avi, MSR-VTT .mp4) in array_record files,
with its class or captions and the official splits. Everything works without TensorFlow: the
features are plain tensors, text and class labels, which tensorflow-datasets encodes and decodes
with numpy. Build with

    python -m pixeldance.data.tfds_build --dataset=ucf101 --manual_dir=MANUAL --data_dir=DATA

and read clips with `pixeldance.data.tfds_source.TfdsVideoSource` (config.data.name='ucf101' or
'msrvtt', config.data.root=DATA). The builders are registered under their own names,
`pixeldance_ucf101` and `pixeldance_msrvtt` (TFDS' own `ucf101` stores decoded frames and needs
TensorFlow), and write to DATA/<name>/<config>/<version>/.

UCF-101 (MANUAL holds the archives under their official names):
    UCF101.rar                                 UCF-101/<Class>/v_<Class>_gXX_cYY.avi; read with the
                                               optional `rarfile` package and an unrar tool, which
                                               extract it once into DATA/downloads/extracted/
      or UCF-101/                              the same, extracted
      or UCF101.zip                            the same, zipped
    UCF101TrainTestSplits-RecognitionTask.zip  ucfTrainTestlist/classInd.txt, trainlist0N.txt,
      or ucfTrainTestlist/                     testlist0N.txt (N = 1, 2, 3: configs split1..split3)
  Splits train (9537 videos in split 1) and test (3783). Example: video (bytes), label
  (ClassLabel, names from classInd.txt), path ('<Class>/v_....avi').

MSR-VTT (MANUAL holds any of):
    MSRVTT.zip (or its extracted MSRVTT/)      MSRVTT/videos/all/video0.mp4 .. video9999.mp4 and
                                               MSRVTT/annotation/MSR_VTT.json
    train_val_videodatainfo.json + test_videodatainfo.json (the official annotations; or
        videodatainfo_2017.json), loose or inside any .zip in MANUAL; preferred over MSR_VTT.json
    the videos videoN.mp4 anywhere under MANUAL or inside any .zip in it (e.g. the official
        TrainValVideo/ and TestVideo/ folders)
  Annotations: {"videos": [{"video_id": "video0", "split": "train" | "validate" | "test",
  "category": int}], "sentences" (or "annotations"): [{"video_id" (or "image_id"), "caption"}]};
  without "split" the official ranges by number: video0-6512 train, 6513-7009 validation,
  7010-9999 test. Splits train (6513), validation (497), test (2990). Example: video (bytes),
  video_id ('video0'), captions (all of the video's captions, 20 in the official data), category
  (0-19, -1 where unknown).

Boundaries (pixeldance/data/paths.py): the archives and folders the builders look for by name in
the manual folder (UCF101.zip, UCF-101/, ucfTrainTestlist/, the .zip files, ...) are opened
wherever they link to, but every file then read from a folder (the videos the split lists or
annotations select, the lists and annotation files found in it) must resolve inside that folder
(UCF-101/, ucfTrainTestlist/, the extracted UCF101.rar, or for MSR-VTT the manual folder itself)
after following symlinks. A video that does not is refused before it is opened with one line
naming its row ('trainlist01.txt:4: 'YoYo/v_YoYo_g08_c01.avi' resolves outside the manual folder
...'; skipped and counted as 'outside_root', or raised with on_error='raise'); an annotation or
list file that does not stops the build. allow_outside_root=True (tfds_build
--allow_outside_root) reads them anyway. Members of a .zip are read from the archive, not from
the file system, and need no check.

Bad input: a missing manual folder, archive or annotation file stops the build with one line
naming it. A video listed in the annotations but absent from the archives, empty, or unreadable
from its archive is skipped, counted and logged (on_error='skip', the default; the counts are
printed at the end of the build) or stops the build (on_error='raise'). Corrupt video content is
found when clips are read (see tfds_source).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import zipfile

import numpy as np
from absl import logging

from pixeldance.data.paths import BUILD_HINT, OutsideRootError, resolve_inside

# tensorflow-datasets without TensorFlow: only numpy-backed features are used.
import tensorflow_datasets as tfds

DATASETS = ("ucf101", "msrvtt")
UCF_VIDEOS = ("UCF-101", "UCF101.zip", "UCF101.rar")  # in the order they are looked for
UCF_SPLITS = ("UCF101TrainTestSplits-RecognitionTask.zip", "ucfTrainTestlist")
MSRVTT_SPLITS = ("train", "validation", "test")  # 6513, 497, 2990 videos in the official release
_EXAMPLES = 5


class ManualDataError(FileNotFoundError):
    """A manual folder, archive or annotation file that is missing or unusable (one line)."""


# ---------------------------------------------------------------------------------------------
# Files of a folder or an archive.
# ---------------------------------------------------------------------------------------------

class FileTree:
    """Read access to the files of a folder or a .zip: `names()` (posix paths relative to it)
    and `read(name)` -> bytes. Use as a context manager (closes the zip).

    A folder is a boundary: `read(name, where)` refuses a name that resolves outside it (symlinks
    followed) with OutsideRootError naming `where` (the row that selected it) before opening
    anything, unless allow_outside_root."""

    def __init__(self, path: str, allow_outside_root: bool = False):
        self.path, self.allow_outside_root = path, allow_outside_root
        self._zip = None
        if os.path.isdir(path):
            return
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ManualDataError(f"not a readable zip archive: {path} ({type(e).__name__}: {e})") from None

    def names(self) -> list[str]:
        if self._zip is not None:
            return [i.filename for i in self._zip.infolist() if not i.is_dir()]
        out = []
        for folder, dirs, files in os.walk(self.path, followlinks=True):
            dirs.sort()
            rel = os.path.relpath(folder, self.path)
            out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in sorted(files)]
        return out

    def read(self, name: str, where: str | None = None) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        resolve_inside(self.path, name, where=where or self.path, allow_outside=self.allow_outside_root,
                       root_name="manual folder", hint=BUILD_HINT)
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def close(self):
        if self._zip is not None:
            self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _require_manual_dir(manual_dir: str) -> str:
    manual_dir = os.fspath(manual_dir)
    if not os.path.isdir(manual_dir):
        raise ManualDataError(f"manual folder not found: {manual_dir}")
    return manual_dir


class _SkipCounter:
    """Build-time skips: counts and first paths per reason; raises instead with on_error='raise'."""

    def __init__(self, on_error: str):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.on_error = on_error
        self.counts = collections.Counter()
        self.examples = collections.defaultdict(list)

    def refuse(self, error: OutsideRootError):
        """A video whose file resolves outside its folder (never opened): counted as
        'outside_root' under its row, or raised with on_error='raise'."""
        if self.on_error == "raise":
            raise error
        self.counts["outside_root"] += 1
        if len(self.examples["outside_root"]) < _EXAMPLES:
            self.examples["outside_root"].append(error.row)
        logging.warning("tfds build: skipping %s", error)

    def skip(self, reason: str, name: str, detail: str = ""):
        msg = f"{reason}: {name}" + (f" ({detail})" if detail else "")
        if self.on_error == "raise":
            raise ValueError(f"cannot store video, {msg}")
        self.counts[reason] += 1
        if len(self.examples[reason]) < _EXAMPLES:
            self.examples[reason].append(name)
        logging.warning("tfds build: skipping %s", msg)

    def line(self, name: str) -> str:
        if not self.counts:
            return f"{name}: nothing skipped"
        return f"{name}: skipped " + ", ".join(f"{r} {c} (e.g. {self.examples[r][0]})"
                                               for r, c in sorted(self.counts.items()))


def _read_member(tree: FileTree, member: str, name: str, skips: _SkipCounter, where: str) -> bytes | None:
    """The bytes of `member`, or None (counted) when it is empty, cannot be read or (not opened)
    resolves outside its folder; `where` names the row that selected it."""
    try:
        data = tree.read(member, where)
    except OutsideRootError as e:
        skips.refuse(e)
        return None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        skips.skip("unreadable", name, f"{type(e).__name__}: {e}".splitlines()[0])
        return None
    if not data:
        skips.skip("empty", name)
        return None
    return data


# ---------------------------------------------------------------------------------------------
# UCF-101.
# ---------------------------------------------------------------------------------------------

def class_caption(name: str) -> str:
    """A UCF-101 class name as lower-case words: 'ApplyEyeMakeup' -> 'apply eye makeup'."""
    return " ".join(w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)) or name


def _extract_rar(path: str, dest: str) -> str:
    """Extracts UCF101.rar once into `dest` (needs the optional rarfile package and unrar)."""
    done = os.path.join(dest, ".complete")
    if not os.path.exists(done):
        try:
            import rarfile
        except ImportError:
            raise ManualDataError(
                f"{path} needs the rarfile package and an unrar tool (pip install rarfile; apt-get "
                f"install unrar), or extract it yourself into {os.path.dirname(path)}/UCF-101/") from None
        os.makedirs(dest, exist_ok=True)
        try:
            with rarfile.RarFile(path) as rar:
                rar.extractall(dest)
        except (rarfile.Error, OSError) as e:
            raise ManualDataError(f"cannot extract {path} ({type(e).__name__}: {e})".splitlines()[0]) from None
        open(done, "w").close()
    return dest


def _ucf_video_tree(manual_dir: str, extract_dir: str, allow_outside_root: bool = False) -> FileTree:
    for name in UCF_VIDEOS:
        path = os.path.join(manual_dir, name)
        if os.path.exists(path):
            if name.endswith(".rar"):
                return FileTree(_extract_rar(path, extract_dir), allow_outside_root)
            return FileTree(path, allow_outside_root)
    raise ManualDataError(f"UCF-101 videos not found in {manual_dir}: expected UCF101.rar, the "
                          f"extracted UCF-101/ folder or UCF101.zip")


def _ucf_split_files(manual_dir: str, split_number: int, allow_outside_root: bool = False) -> dict[str, list[str]]:
    """{'classInd.txt': lines, 'trainlist0N.txt': lines, 'testlist0N.txt': lines}."""
    for name in UCF_SPLITS:
        path = os.path.join(manual_dir, name)
        if os.path.exists(path):
            break
    else:
        raise ManualDataError(f"UCF-101 split lists not found in {manual_dir}: expected "
                              f"{UCF_SPLITS[0]} or its extracted {UCF_SPLITS[1]}/ folder")
    wanted = ("classInd.txt", f"trainlist0{split_number}.txt", f"testlist0{split_number}.txt")
    out = {}
    with FileTree(path, allow_outside_root) as tree:
        members = {n.rsplit("/", 1)[-1]: n for n in tree.names()}
        for w in wanted:
            if w not in members:
                raise ManualDataError(f"{w} not found in {path}")
            text = tree.read(members[w], f"UCF-101 split list {w}").decode("utf-8", errors="replace")
            out[w] = [line.strip() for line in text.splitlines()]
    return out


def read_ucf_lists(manual_dir: str, split_number: int = 1, allow_outside_root: bool = False):
    """The UCF-101 class names (classInd.txt order) and {'train'|'test': [(path, label, row)]}
    of official split `split_number` (1, 2 or 3); path is '<Class>/v_....avi', label 0-based,
    row the list line naming it ('trainlist01.txt:4')."""
    if split_number not in (1, 2, 3):
        raise ValueError(f"UCF-101 split number must be 1, 2 or 3, got {split_number}")
    files = _ucf_split_files(_require_manual_dir(manual_dir), split_number, allow_outside_root)
    names = []
    for line_no, line in enumerate(files["classInd.txt"], 1):
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) != len(names) + 1:
            raise ValueError(f"malformed line classInd.txt:{line_no}: {line!r} (want '<{len(names) + 1}> <ClassName>')")
        names.append(fields[1])
    by_lower = {n.lower(): i for i, n in enumerate(names)}
    splits = {}
    for split, list_name in (("train", f"trainlist0{split_number}.txt"), ("test", f"testlist0{split_number}.txt")):
        rows = []
        for line_no, line in enumerate(files[list_name], 1):
            if not line:
                continue
            fields = line.split()
            path = fields[0].replace("\\", "/")
            cls = path.split("/")[0].lower()
            if len(fields) > 2 or "/" not in path or cls not in by_lower:
                raise ValueError(f"malformed line {list_name}:{line_no}: {line!r} (want '<Class>/<video>.avi [label]' "
                                 f"with a class of classInd.txt)")
            label = by_lower[cls]
            if len(fields) == 2 and fields[1] != str(label + 1):
                raise ValueError(f"malformed line {list_name}:{line_no}: label {fields[1]} is not "
                                 f"class {names[label]} ({label + 1}) of classInd.txt")
            rows.append((path, label, f"{list_name}:{line_no}"))
        splits[split] = rows
    return names, splits


@dataclasses.dataclass
class Ucf101Config(tfds.core.BuilderConfig):
    """split_number: which official train/test list (1, 2 or 3)."""
    split_number: int = 1


class Ucf101(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """UCF-101 action recognition: 13320 videos (.avi bytes) of 101 classes, official splits."""

    name = "pixeldance_ucf101"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Original .avi bytes, class label, path; official splits 1-3."}
    BUILDER_CONFIGS = [Ucf101Config(name=f"split{n}", split_number=n,
                                    description=f"Official train/test list {n}.") for n in (1, 2, 3)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put UCF101.rar (or the extracted UCF-101/ folder, or UCF101.zip) and "
        "UCF101TrainTestSplits-RecognitionTask.zip in the manual folder.")

    def __init__(self, *, on_error: str = "skip", allow_outside_root: bool = False, **kwargs):
        self.skips = _SkipCounter(on_error)
        self.allow_outside_root = allow_outside_root  # files of the manual folders linked from elsewhere
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="UCF-101 videos as their original .avi bytes (decode with PyAV).",
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(), dtype=np.object_, doc="the .avi file's bytes"),
                "label": tfds.features.ClassLabel(doc="class, in classInd.txt order"),
                "path": tfds.features.Text(doc="'<Class>/v_<Class>_gXX_cYY.avi' in UCF-101/"),
            }),
            homepage="https://www.crcv.ucf.edu/data/UCF101.php",
        )

    def _split_generators(self, dl_manager):
        manual_dir = _require_manual_dir(dl_manager.manual_dir)
        names, splits = read_ucf_lists(manual_dir, self.builder_config.split_number, self.allow_outside_root)
        self.info.features["label"].names = names
        # Fail on a missing video archive before any split is generated.
        extract_dir = os.path.join(os.fspath(dl_manager.download_dir), "extracted", "UCF101_rar")
        _ucf_video_tree(manual_dir, extract_dir).close()
        return {split: self._generate_examples(manual_dir, extract_dir, rows) for split, rows in splits.items()}

    def _generate_examples(self, manual_dir, extract_dir, rows):
        with _ucf_video_tree(manual_dir, extract_dir, self.allow_outside_root) as tree:
            # By file name, ignoring case: the lists and folders differ in case for some classes
            # (HandstandPushups/v_HandStandPushups_...).
            members = {}
            for m in tree.names():
                if m.lower().endswith(".avi"):
                    members.setdefault(m.rsplit("/", 1)[-1].lower(), m)
            for path, label, row in rows:
                member = members.get(path.rsplit("/", 1)[-1].lower())
                if member is None:
                    self.skips.skip("missing", path, f"not in {tree.path}")
                    continue
                data = _read_member(tree, member, path, self.skips, row)
                if data is not None:
                    yield path, dict(video=data, label=label, path=path)


# ---------------------------------------------------------------------------------------------
# MSR-VTT.
# ---------------------------------------------------------------------------------------------

_MSRVTT_VIDEO = re.compile(r"^video(\d+)\.mp4$")
_MSRVTT_OFFICIAL = (("train_val_videodatainfo.json", "test_videodatainfo.json"), ("videodatainfo_2017.json",),
                    ("MSR_VTT.json",))


def _manual_trees(manual_dir: str) -> list[str]:
    """The manual folder itself and every .zip directly in it (sorted)."""
    return [manual_dir] + sorted(os.path.join(manual_dir, f) for f in os.listdir(manual_dir)
                                 if f.lower().endswith(".zip") and os.path.isfile(os.path.join(manual_dir, f)))


def _msrvtt_index(manual_dir: str):
    """({video number: (tree path, member)}, {json file name: (tree path, member)}) (nothing read)."""
    videos, jsons = {}, {}
    json_names = {n for group in _MSRVTT_OFFICIAL for n in group}
    for tree_path in _manual_trees(manual_dir):
        with FileTree(tree_path) as tree:
            for member in tree.names():
                base = member.rsplit("/", 1)[-1]
                m = _MSRVTT_VIDEO.match(base)
                if m:
                    videos.setdefault(int(m.group(1)), (tree_path, member))
                elif base in json_names:
                    jsons.setdefault(base, (tree_path, member))
    return videos, jsons


def _official_split(number: int) -> str:
    return "train" if number < 6513 else "validation" if number < 7010 else "test"


def read_msrvtt_annotations(manual_dir: str, jsons: dict | None = None, allow_outside_root: bool = False):
    """{video number: dict(split, captions [str], category int, listed_in: the annotation file
    naming it)} from the annotation files in `manual_dir` (the official pair or
    videodatainfo_2017.json, else MSR_VTT.json); a loose one that resolves outside `manual_dir`
    stops with OutsideRootError (unless allow_outside_root)."""
    manual_dir = _require_manual_dir(manual_dir)
    if jsons is None:
        jsons = _msrvtt_index(manual_dir)[1]
    for group in _MSRVTT_OFFICIAL:
        if all(n in jsons for n in group):
            break
        if group[0] in jsons:
            raise ManualDataError(f"{group[0]} found in {manual_dir} but not {', '.join(group[1:])}")
    else:
        raise ManualDataError(f"MSR-VTT annotations not found in {manual_dir}: expected MSRVTT.zip (with "
                              f"MSRVTT/annotation/MSR_VTT.json) or train_val_videodatainfo.json + "
                              f"test_videodatainfo.json")
    info = {}
    for name in group:
        tree_path, member = jsons[name]
        where = member if tree_path == manual_dir else f"{tree_path}:{member}"
        with FileTree(tree_path, allow_outside_root) as tree:
            try:
                doc = json.loads(tree.read(member, "MSR-VTT annotation file").decode("utf-8"))
            except OutsideRootError:
                raise
            except (ValueError, OSError, zipfile.BadZipFile) as e:
                raise ManualDataError(f"unreadable annotation file {where} ({type(e).__name__}: {e})".splitlines()[0]) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("videos", doc.get("images")), list):
            raise ManualDataError(f"annotation file {where} has no 'videos' list")
        for v in doc.get("videos", doc.get("images")):
            vid = v.get("video_id", v.get("id")) if isinstance(v, dict) else None
            m = re.fullmatch(r"video(\d+)", str(vid)) if isinstance(vid, str) else None
            if m is None:
                raise ManualDataError(f"annotation file {where}: video without a 'video_id' like 'video0': {v!r}"[:300])
            number = int(m.group(1))
            split = {"validate": "validation", "val": "validation"}.get(v.get("split"), v.get("split"))
            if split is None:
                split = _official_split(number)
            if split not in MSRVTT_SPLITS:
                raise ManualDataError(f"annotation file {where}: unknown split {v.get('split')!r} of {vid}")
            category = v.get("category", -1)
            info.setdefault(number, dict(split=split, captions=[], category=int(category if category is not None else -1),
                                         listed_in=where))
        sentences = doc.get("sentences", doc.get("annotations", []))
        for s in sentences:
            vid = s.get("video_id", s.get("image_id")) if isinstance(s, dict) else None
            m = re.fullmatch(r"video(\d+)", str(vid)) if vid is not None else None
            if m is None or not isinstance(s.get("caption"), str):
                raise ManualDataError(f"annotation file {where}: sentence without 'video_id' and 'caption': {s!r}"[:300])
            if int(m.group(1)) in info:
                info[int(m.group(1))]["captions"].append(s["caption"].strip())
    return info


class Msrvtt(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MSR-VTT: 10000 web videos (.mp4 bytes), 20 captions each, official splits."""

    name = "pixeldance_msrvtt"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Original .mp4 bytes, all captions, category; official splits."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put MSRVTT.zip (videos/all/videoN.mp4, annotation/MSR_VTT.json), or the videos and "
        "train_val_videodatainfo.json + test_videodatainfo.json, in the manual folder.")

    def __init__(self, *, on_error: str = "skip", allow_outside_root: bool = False, **kwargs):
        self.skips = _SkipCounter(on_error)
        self.allow_outside_root = allow_outside_root  # files of the manual folder linked from elsewhere
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="MSR-VTT videos as their original .mp4 bytes (decode with PyAV) with all captions.",
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(), dtype=np.object_, doc="the .mp4 file's bytes"),
                "video_id": tfds.features.Text(doc="'video0' .. 'video9999'"),
                "captions": tfds.features.Sequence(tfds.features.Text(), doc="all captions of the video"),
                "category": tfds.features.Scalar(dtype=np.int32, doc="category 0-19, -1 where unknown"),
            }),
            homepage="https://www.microsoft.com/en-us/research/publication/msr-vtt-a-large-video-description-dataset-for-bridging-video-and-language/",
        )

    def _split_generators(self, dl_manager):
        manual_dir = _require_manual_dir(dl_manager.manual_dir)
        videos, jsons = _msrvtt_index(manual_dir)
        info = read_msrvtt_annotations(manual_dir, jsons, self.allow_outside_root)
        if not videos:
            raise ManualDataError(f"no MSR-VTT videos (videoN.mp4) in {manual_dir} or in the .zip files in it")
        by_split = {s: sorted(n for n, v in info.items() if v["split"] == s) for s in MSRVTT_SPLITS}
        return {s: self._generate_examples(videos, info, numbers) for s, numbers in by_split.items() if numbers}

    def _generate_examples(self, videos, info, numbers):
        trees = {}
        try:
            for number in numbers:
                name = f"video{number}.mp4"
                if number not in videos:
                    self.skips.skip("missing", name, "in no folder or .zip of the manual folder")
                    continue
                tree_path, member = videos[number]
                if tree_path not in trees:
                    trees[tree_path] = FileTree(tree_path, self.allow_outside_root)
                data = _read_member(trees[tree_path], member, name, self.skips,
                                    f"{info[number]['listed_in']}[video{number}]")
                if data is None:
                    continue
                v = info[number]
                yield name, dict(video=data, video_id=f"video{number}", captions=v["captions"],
                                 category=v["category"])
        finally:
            for tree in trees.values():
                tree.close()


# ---------------------------------------------------------------------------------------------
# Building.
# ---------------------------------------------------------------------------------------------

BUILDERS = {"ucf101": Ucf101, "msrvtt": Msrvtt}


def config_name(dataset: str, ucf101_split: int = 1) -> str | None:
    """The builder config of `dataset`: 'split1'..'split3' for UCF-101, None for MSR-VTT."""
    if dataset not in BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if dataset == "ucf101":
        if ucf101_split not in (1, 2, 3):
            raise ValueError(f"UCF-101 split number must be 1, 2 or 3, got {ucf101_split}")
        return f"split{ucf101_split}"
    return None


def builder(dataset: str, data_dir: str, ucf101_split: int = 1, on_error: str = "skip",
            allow_outside_root: bool = False):
    """The builder of `dataset` ('ucf101' | 'msrvtt') over `data_dir` (array_record files)."""
    return BUILDERS[dataset](data_dir=os.fspath(data_dir), config=config_name(dataset, ucf101_split),
                             file_format="array_record", on_error=on_error,
                             allow_outside_root=allow_outside_root)


def build(dataset: str, manual_dir: str, data_dir: str, ucf101_split: int = 1, on_error: str = "skip",
          allow_outside_root: bool = False):
    """Builds `dataset` from the archives in `manual_dir` into `data_dir` (a no-op when built).
    allow_outside_root: read files of the manual folders that resolve outside them (refused,
    see the module docstring, by default).

    Returns the builder: `builder.skips.line(...)` summarises the videos skipped, and
    `builder.already_built` says whether the build found the dataset in place."""
    manual_dir = _require_manual_dir(manual_dir)
    if not os.listdir(manual_dir):
        raise ManualDataError(f"manual folder is empty: {manual_dir}")
    b = builder(dataset, data_dir, ucf101_split, on_error, allow_outside_root)
    b.already_built = os.path.exists(os.path.join(b.data_path, "dataset_info.json"))
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return b
