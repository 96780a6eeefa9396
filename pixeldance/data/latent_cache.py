"""A latent cache: a dataset's VAE latents in ArrayRecord shards, written once, read at random.

Layout of a cache folder (by default `<workdir>/cache`):

    latents-00000-of-00002.array_record    records [0, n/2) of the source, in order
    latents-00001-of-00002.array_record    records [n/2, n)
    meta.json                              what the cache holds (see `build`)

Shard s of S holds records [s n // S, (s + 1) n // S), so the shards read in order give the
source's items 0..n-1. ArrayRecord files are written with group_size 1 (one record per chunk,
which is what random access wants) and without compression.

Record format (no pickle): a little-endian uint32 header length L, L bytes of UTF-8 JSON
`{"caption": str, "arrays": [[name, dtype, shape, offset], ...]}`, then the arrays' raw
C-order bytes at their offsets (relative to the end of the header). A cache record holds
  z       float32 [T, h, w, C]  the video's latents (posterior means, unnormalised)
  z_last  float32 [J, h, w, C]  the last J frames, each encoded as an image, latest first
  z_frames float32 [T, h, w, C] optional (keyframes anywhere, config.cond.keyframe_sets): pixel
                                frames 0, 4, ..., 4(T - 1), each encoded as an image; caches
                                without it read as before
  z_shift float32 [T, h, w, C]  optional (the keyframe set 'continue'): latents 1..T of the same
                                item read tf (the VAE's temporal factor) frames longer, so the
                                window starts at a 4-frame group latent
  shift_context int32 [1]       optional (config.cond.continue_turns): the clean context latents
                                n the z_shift window was drawn for (a turning window changes
                                direction where they end)
  tokens  int32 [S]             the tokenised caption (the DiT's own trained text encoder), or
  text_states bfloat16 [S, D]   a frozen pretrained encoder's last hidden states (CLIP / T5 /
  text_mask   bool [S]          umT5, config.text.encoder) and their padding mask, instead
  caption str
With frozen states the cache also holds `null_text.record`: the encoder's states and mask for the
empty prompt ([1, S, D], [1, S]; the null of classifier-free guidance), stored once, same format.
bfloat16 arrays are stored as their 2-byte patterns with dtype name "bfloat16" (ml_dtypes).

Writing (`build`) is atomic and resumable: shards are written into `<output>.partial/` (each
shard to a temporary name, renamed when complete, with a small sidecar JSON of its record count,
size and latent moments); a restarted build keeps the complete shards of the same plan and
writes the rest; when all are there, `meta.json` is written and the folder replaces `<output>`
by renames. Multi-host: process p writes shards p, p + P, p + 2P, ... (P processes), so no
shard is encoded twice; process 0 prepares the partial folder and publishes the cache, with a
barrier (`sync`) between the steps. The output folder must be on storage all processes share.

An image cache (`image_cache_dir`, `<workdir>/cache_images`: images of config.train.image_source
for the DiT's image batches) has the same format, with T = J = 1: z float32 [1, h, w, C] and
z_last the same single latent frame.

A bucketed cache (config.data.buckets, see `pixeldance.trainers.cache`) is a folder of such
caches, one per bucket that holds items, `<path>/bucket-FxHxW/` (each built and kept on its own,
so each is atomic and resumable), and an index `<path>/buckets.json` written last: the buckets
in config order with their record counts (`write_bucket_index`, `open_bucket_caches`). Record i
of bucket b's cache is the i-th source item assigned to b, read at b's shape: z float32
[1 + (F - 1) / 4, H / 8, W / 8, C] for the causal VAE, z_last [min(J, F), ...] (one-frame buckets:
z_last = z).

Reading: `LatentCacheSource(path)`, a grain random-access source over the shards via
array_record's `ArrayRecordDataSource` (batched by `pipeline.make_batches`).

The folder is a boundary (pixeldance/data/paths.py): every file meta.json names (shards, the
empty-prompt record) and every bucket folder buckets.json names must resolve inside the cache
folder after following symlinks; one that does not is refused before it is opened, with one line
naming the entry (`meta.json shards[0]: '../x.array_record' resolves outside the latent cache
folder ...`), unless allow_outside_root=True (config.data.allow_outside_root).
"""
from __future__ import annotations

import bisect
import json
import os
import shutil
import struct
from typing import Any, Callable, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

from pixeldance import checksums
from pixeldance.data.buckets import shape_name
from pixeldance.data.paths import OutsideRootError, resolve_inside

FORMAT = "pixeldance.latent_cache"
VERSION = 1
META = "meta.json"
TOKEN_FIELDS = ("z", "z_last", "tokens")
STATE_FIELDS = ("z", "z_last", "text_states", "text_mask")
NULL_TEXT = "null_text.record"


OPTIONAL_FIELDS = ("z_frames", "z_shift", "shift_context")


def record_fields(record: dict) -> tuple[str, ...]:
    """The fields a record stores: TOKEN_FIELDS, or STATE_FIELDS where it holds frozen text states,
    then those of OPTIONAL_FIELDS it has."""
    fields = STATE_FIELDS if "text_states" in record else TOKEN_FIELDS
    return fields + tuple(k for k in OPTIONAL_FIELDS if k in record)


def _dtype_name(a: np.ndarray) -> str:
    # numpy has no bfloat16 of its own: ml_dtypes' has no stable dtype.str ('<V2'), so it is named.
    return "bfloat16" if a.dtype == ml_dtypes.bfloat16 else a.dtype.str


def _dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
# One record per chunk for random access; uncompressed: latents hardly compress (zstd:3, array_record's
# default, saved 8 %) and reading a 33 KB record took 24 us against 62 us with zstd (measured).
_WRITER_OPTIONS = "group_size:1,uncompressed"
_HEADER = struct.Struct("<I")


class CacheError(ValueError):
    """A latent cache that is missing, incomplete or corrupt (the message names the path)."""


def _cache_file(path: str, name: str, where: str, allow_outside_root: bool = False) -> str:
    """`path`/`name` for a file name read from the cache's own metadata (`where`: 'meta.json
    shards[0]'), checked to resolve inside the cache folder `path` (OutsideRootError, one line,
    unless allow_outside_root); nothing is opened."""
    if not isinstance(name, str):
        raise CacheError(f"latent cache {path}: {where} is {name!r}, not a file name")
    resolve_inside(path, name, where=where, allow_outside=allow_outside_root, root_name="latent cache folder")
    return os.path.join(path, name)


def _meta_files(path: str, meta: dict, allow_outside_root: bool = False) -> list[tuple[dict, str]]:
    """[(entry, full path)] of the shards and the empty-prompt record named in `meta`, each
    checked by `_cache_file` (OutsideRootError for one outside the folder)."""
    out = [(s, _cache_file(path, s["file"], f"{META} shards[{k}]", allow_outside_root))
           for k, s in enumerate(meta["shards"])]
    if "null_text" in meta:
        out.append((meta["null_text"], _cache_file(path, meta["null_text"]["file"], f"{META} null_text",
                                                   allow_outside_root)))
    return out


# ---------------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------------

def encode_record(arrays: dict[str, np.ndarray], caption: str = "") -> bytes:
    """dict of numpy arrays (+ caption) -> bytes: uint32 header length, JSON header, raw arrays."""
    entries, chunks, offset = [], [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.hasobject:
            raise TypeError(f"record field {name!r}: object arrays cannot be stored")
        entries.append([name, _dtype_name(a), list(a.shape), offset])
        chunks.append(a.tobytes())
        offset += a.nbytes
    header = json.dumps({"caption": caption, "arrays": entries}, separators=(",", ":")).encode("utf-8")
    return b"".join([_HEADER.pack(len(header)), header, *chunks])


def decode_record(data: bytes) -> dict[str, Any]:
    """bytes from `encode_record` -> dict of read-only numpy arrays plus 'caption' (str).

    Raises ValueError on anything malformed (short data, a bad header, arrays out of bounds)."""
    if len(data) < _HEADER.size:
        raise ValueError(f"record of {len(data)} bytes is too short")
    (n,) = _HEADER.unpack_from(data)
    start = _HEADER.size + n
    if start > len(data):
        raise ValueError(f"record header of {n} bytes overruns the record ({len(data)} bytes)")
    try:
        header = json.loads(data[_HEADER.size:start])
        out = {"caption": header["caption"]}
        for name, dtype, shape, offset in header["arrays"]:
            dt = _dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            if start + offset + count * dt.itemsize > len(data):
                raise ValueError(f"array {name!r} overruns the record")
            out[name] = np.frombuffer(data, dt, count, start + offset).reshape(shape)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:  # np.dtype: TypeError
        raise ValueError(f"bad record header ({type(e).__name__}: {e})") from None
    return out


# ---------------------------------------------------------------------------------------------
# Shards and metadata.
# ---------------------------------------------------------------------------------------------

def cache_dir(config, workdir: str) -> str:
    """The latent cache folder of an experiment: config.cache.path, or `<workdir>/cache`."""
    return config.cache.get("path", "") or os.path.join(workdir, "cache")


def image_cache_dir(config, workdir: str) -> str:
    """The image latent cache folder (written when config.train.image_source names a source):
    config.cache.image_path, or `<workdir>/cache_images`."""
    return config.cache.get("image_path", "") or os.path.join(workdir, "cache_images")


def shard_name(index: int, num_shards: int) -> str:
    return f"latents-{index:05d}-of-{num_shards:05d}.array_record"


def shard_ranges(count: int, num_shards: int) -> list[tuple[int, int]]:
    """[start, end) of each shard: shard s holds records [s n // S, (s + 1) n // S)."""
    return [(s * count // num_shards, (s + 1) * count // num_shards) for s in range(num_shards)]


def num_shards_for(count: int, num_shards: int = 0, records_per_shard: int = 1024) -> int:
    """The number of shards: `num_shards` if > 0, else ceil(count / records_per_shard); at most
    `count` (no empty shards) and at least 1."""
    if num_shards <= 0:
        if records_per_shard <= 0:
            raise ValueError(f"records_per_shard must be > 0 when num_shards is 0, got {records_per_shard}")
        num_shards = -(-count // records_per_shard)
    return max(1, min(num_shards, count))


def _read_tagged_json(path: str, fmt: str, version: int | None = None) -> dict | None:
    """A JSON object written with `format` (and `version`) tags, or None if the file is missing,
    unreadable or tagged otherwise."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != fmt:
        return None
    return data if version is None or data.get("version") == version else None


def read_meta(path: str) -> dict | None:
    """The cache's meta.json, or None if there is none or it is unreadable or of another format."""
    return _read_tagged_json(os.path.join(path, META), FORMAT, VERSION)


def is_complete(path: str, meta: dict | None = None, allow_outside_root: bool = False) -> bool:
    """True if `path` holds a published cache whose shards (and empty-prompt states, if any) all
    exist with their recorded sizes (and inside `path`, unless allow_outside_root)."""
    meta = read_meta(path) if meta is None else meta
    if meta is None:
        return False
    try:
        return all(os.path.getsize(f) == s["bytes"] for s, f in _meta_files(path, meta, allow_outside_root))
    except (OSError, KeyError, TypeError, ValueError):  # ValueError: OutsideRootError, CacheError
        return False


def verify(path: str, meta: dict, allow_outside_root: bool = False) -> list[tuple[str, str]]:
    """[(file, reason)] for each shard (and the empty-prompt record) of the published cache in
    `path` that does not match the size and SHA-256 in its meta.json, or (unless
    allow_outside_root) whose name resolves outside `path` (not opened); [] if all do. Entries of
    a cache written before checksums are checked by size only."""
    entries = meta["shards"] + ([meta["null_text"]] if "null_text" in meta else [])
    bad, hashed = [], []
    for k, e in enumerate(entries):
        where = f"{META} shards[{k}]" if k < len(meta["shards"]) else f"{META} null_text"
        try:
            f = _cache_file(path, e["file"], where, allow_outside_root)
        except OutsideRootError as err:
            bad.append((e["file"], str(err)))
            continue
        if not os.path.isfile(f):
            bad.append((e["file"], "missing"))
        elif os.path.getsize(f) != e["bytes"]:
            bad.append((e["file"], f"{os.path.getsize(f)} bytes, {META} says {e['bytes']}"))
        elif e.get("sha256"):
            hashed.append(e)
    for e, (_, digest) in zip(hashed, checksums.digests([os.path.join(path, e["file"]) for e in hashed])):
        if digest != e["sha256"]:
            bad.append((e["file"], "does not match its checksum"))
    return sorted(bad)


def salvage(path: str, meta: dict, plan_info: dict, bad: Sequence[str], allow_outside_root: bool = False) -> int:
    """Prepares `build` to rewrite only the shards named in `bad`: `<path>.partial/` gets the
    plan of `meta` (its count, shards and `plan_info`) and hard links (copies where links fail)
    of every other shard with its sidecar, so `build` resumes with the bad ones left to write.
    Returns how many shards it kept; 0 (nothing prepared) for a cache written before per-shard
    checksums and moments were stored, or with a bad empty-prompt record (rebuilt whole). A shard
    whose name resolves outside `path` is never kept (unless allow_outside_root)."""
    shards = meta["shards"]
    if NULL_TEXT in bad or not all(s.get("sha256") and s.get("moments") for s in shards):
        return 0
    partial = os.path.normpath(path) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    kept = 0
    for k, s in enumerate(shards):
        if s["file"] in bad:
            continue
        try:
            src = _cache_file(path, s["file"], f"{META} shards[{k}]", allow_outside_root)
        except OutsideRootError:
            continue  # rewritten under its own name by `build`
        name = shard_name(k, len(shards))  # the name `build` looks for
        dst = os.path.join(partial, name)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        _write_json(_sidecar(partial, name), dict(num_records=s["num_records"], bytes=s["bytes"],
                                                  sha256=s["sha256"], moments=s["moments"]))
        kept += 1
    _write_json(os.path.join(partial, "plan.json"), dict(format=FORMAT, version=VERSION, count=meta["count"],
                                                         num_shards=len(shards), info=dict(plan_info)))
    return kept


class Moments:
    """Per-channel count, mean and sum of squared deviations (float64), mergeable (Chan et al.),
    for the latent statistics of a cache written in pieces. update(x): x [..., C]."""

    def __init__(self, count: int = 0, mean=None, m2=None):
        self.count = int(count)
        self.mean = None if mean is None else np.asarray(mean, np.float64)
        self.m2 = None if m2 is None else np.asarray(m2, np.float64)

    def update(self, x: np.ndarray):
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        mean = x.mean(0)
        self.merge(Moments(len(x), mean, np.square(x - mean).sum(0)))

    def merge(self, other: "Moments"):
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (numpy's default, ddof 0)."""
        return np.sqrt(self.m2 / self.count)

    def to_json(self) -> dict:
        return dict(count=self.count, mean=self.mean.tolist(), m2=self.m2.tolist())

    @classmethod
    def from_json(cls, d: dict) -> "Moments":
        return cls(d["count"], d["mean"], d["m2"])


# ---------------------------------------------------------------------------------------------
# Bucketed caches: one cache per bucket (config.data.buckets), and an index.
# ---------------------------------------------------------------------------------------------

BUCKET_INDEX = "buckets.json"
BUCKET_FORMAT = "pixeldance.bucket_caches"


def bucket_dir(path: str, shape) -> str:
    """The cache folder of bucket (F, H, W) inside a bucketed cache: `<path>/bucket-FxHxW`."""
    return os.path.join(path, "bucket-" + shape_name(shape))


def write_bucket_index(path: str, buckets: Sequence[dict], **facts):
    """Writes `<path>/buckets.json` (atomically): format, buckets [{shape [F, H, W], dir, count}]
    in config.data.buckets' order (count 0: no item landed there, no folder), and `facts`."""
    os.makedirs(path, exist_ok=True)
    _write_json(os.path.join(path, BUCKET_INDEX), dict(format=BUCKET_FORMAT, version=VERSION,
                                                        buckets=list(buckets), **facts))


def read_bucket_index(path: str) -> dict | None:
    """The index of a bucketed cache folder, or None if it has none (or an unreadable one)."""
    return _read_tagged_json(os.path.join(path, BUCKET_INDEX), BUCKET_FORMAT)


def drop_single_cache(path: str):
    """Removes a one-shape cache's meta.json and shards from `path` (a bucketed cache is being
    written there instead); the bucket folders and the index are left alone."""
    if read_meta(path) is None:
        return
    os.remove(os.path.join(path, META))
    for name in os.listdir(path):
        if name.startswith("latents-") and name.endswith(".array_record"):
            os.remove(os.path.join(path, name))


def open_bucket_caches(path: str, shapes, field: str = "config.data.buckets", *,
                       allow_outside_root: bool = False, verify_checksums: bool = False) -> list:
    """One `LatentCacheSource` per bucket of `shapes` ((F, H, W) triples, in order) from the bucketed
    cache in `path`; `[]` for a bucket no item landed in. A missing index, or one written for
    other buckets, is a one-line error naming `field` (rerun the cache stage); a bucket folder
    the index names outside `path` one naming the entry (unless allow_outside_root)."""
    index = read_bucket_index(path)
    if index is None:
        hint = " (it holds a one-shape cache)" if read_meta(path) is not None else ""
        raise CacheError(f"bucketed latent cache not found: {os.path.join(path, BUCKET_INDEX)}{hint}; "
                         f"{field} is set: run the 'cache' stage with it")
    listed = [tuple(b["shape"]) for b in index["buckets"]]
    want = [tuple(int(x) for x in s) for s in shapes]
    if listed != want:
        name = lambda ss: ",".join(shape_name(s) for s in ss)
        raise CacheError(f"bucketed latent cache {path} was written for buckets {name(listed)}, but "
                         f"{field}={name(want)!r}: run the 'cache' stage again")
    out = []
    for k, b in enumerate(index["buckets"]):
        if not b["count"]:
            out.append([])
            continue
        try:
            folder = _cache_file(path, b["dir"], f"{BUCKET_INDEX} buckets[{k}].dir", allow_outside_root)
        except OutsideRootError as e:
            raise CacheError(str(e)) from None
        out.append(LatentCacheSource(folder, allow_outside_root=allow_outside_root,
                                     verify_checksums=verify_checksums))
    return out


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------

def _write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _sidecar(folder: str, name: str) -> str:
    return os.path.join(folder, name + ".json")


def _shard_done(folder: str, name: str, expected_records: int) -> bool:
    try:
        with open(_sidecar(folder, name)) as f:
            side = json.load(f)
        return (side["num_records"] == expected_records
                and os.path.getsize(os.path.join(folder, name)) == side["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_shard(path: str, records: Iterable[dict[str, Any]]) -> dict:
    """Writes one shard atomically (to `path + '.tmp'`, renamed when closed) and a sidecar
    `path + '.json'` (num_records, bytes, moments of 'z'). records: dicts with the arrays of
    `record_fields` and 'caption'. Returns the sidecar dict."""
    from array_record.python import array_record_module  # only where shards are read or written
    tmp = path + ".tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    moments, count = Moments(), 0
    try:
        for rec in records:
            writer.write(encode_record({k: rec[k] for k in record_fields(rec)}, str(rec.get("caption", ""))))
            moments.update(rec["z"])
            count += 1
    finally:
        writer.close()
    size, digest = checksums.file_digest(tmp)
    side = dict(num_records=count, bytes=size, sha256=digest, moments=moments.to_json())
    folder, name = os.path.split(path)
    _write_json(_sidecar(folder, name) + ".pending", side)
    os.replace(tmp, path)
    os.replace(_sidecar(folder, name) + ".pending", _sidecar(folder, name))
    return side


def _single_process_sync(_: str):
    pass


def build(output: str, *, count: int, num_shards: int,
          encode_range: Callable[[int, int], Iterator[Sequence[dict[str, Any]]]],
          info: dict | None = None, null_text: dict[str, np.ndarray] | None = None,
          process_index: int = 0, process_count: int = 1,
          sync: Callable[[str], None] = _single_process_sync, log: Callable[[str], None] = print) -> dict:
    """Writes a cache of `count` records in `num_shards` shards to the folder `output`.

    encode_range(start, end) yields lists of records (dicts: z, z_last, tokens arrays, caption)
    for source items start..end-1 in order. info: JSON-able facts about where the records came
    from (VAE step, tokenizer, source, ...), stored in meta.json; a partial build of another
    plan (count, shards or info) is discarded. This process writes the shards s with
    s % process_count == process_index; sync(name) must be a barrier across the processes.
    `output` (a folder holding only the cache) is replaced as a whole. null_text: with frozen
    text states, the empty prompt's dict(text_states [1, S, D], text_mask [1, S]), written to
    NULL_TEXT by process 0. Returns the meta dict: format, version, count, fields {name: {dtype,
    shape}}, shards [{file, start, num_records, bytes}], latent_moments (of z over the whole
    cache), null_text {file, bytes} (with frozen states) and info's keys.
    """
    if count < 1 or not 1 <= num_shards <= count:
        raise ValueError(f"a latent cache needs count >= 1 and 1 <= num_shards <= count, got {count}, {num_shards}")
    output = os.path.normpath(output)
    partial = output + ".partial"
    info = dict(info or {})
    plan = dict(format=FORMAT, version=VERSION, count=count, num_shards=num_shards, info=info)
    ranges = shard_ranges(count, num_shards)
    if process_index == 0:
        try:
            with open(os.path.join(partial, "plan.json")) as f:
                same = json.load(f) == json.loads(json.dumps(plan))
        except (OSError, ValueError):
            same = False
        if not same:
            if os.path.exists(partial):
                log(f"latent cache: discarding the partial build in {partial} (another plan)")
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
            _write_json(os.path.join(partial, "plan.json"), plan)
    sync("latent_cache_prepared")

    mine = [s for s in range(num_shards) if s % process_count == process_index]
    todo = [s for s in mine if not _shard_done(partial, shard_name(s, num_shards), ranges[s][1] - ranges[s][0])]
    if len(todo) < len(mine):
        log(f"latent cache: resuming, {len(mine) - len(todo)} of this process's {len(mine)} shards are done")
    for s in todo:
        start, end = ranges[s]
        records = (rec for batch in encode_range(start, end) for rec in batch)
        side = write_shard(os.path.join(partial, shard_name(s, num_shards)), records)
        if side["num_records"] != end - start:
            raise RuntimeError(f"shard {s}: encode_range({start}, {end}) gave {side['num_records']} records")
    sync("latent_cache_shards_written")

    meta = None
    if process_index == 0:
        shards, moments = [], Moments()
        for s, (start, end) in enumerate(ranges):
            name = shard_name(s, num_shards)
            if not _shard_done(partial, name, end - start):
                raise CacheError(f"latent cache shard missing or incomplete after writing: {os.path.join(partial, name)}")
            with open(_sidecar(partial, name)) as f:
                side = json.load(f)
            moments.merge(Moments.from_json(side["moments"]))
            shards.append(dict(file=name, start=start, num_records=end - start, bytes=side["bytes"],
                               sha256=side.get("sha256"), moments=side["moments"]))
        first = _read_one(os.path.join(partial, shards[0]["file"]))
        fields = {k: dict(dtype=_dtype_name(first[k]), shape=list(first[k].shape)) for k in record_fields(first)}
        meta = dict(format=FORMAT, version=VERSION, count=count, fields=fields, shards=shards,
                    latent_moments=moments.to_json(), **info)
        keep = {s["file"] for s in shards}
        if "text_states" in fields:
            if null_text is None:
                raise ValueError("a cache of frozen text states needs the empty prompt's states (null_text)")
            with open(os.path.join(partial, NULL_TEXT), "wb") as f:
                f.write(encode_record({k: null_text[k] for k in ("text_states", "text_mask")}))
            size, digest = checksums.file_digest(os.path.join(partial, NULL_TEXT))
            meta["null_text"] = dict(file=NULL_TEXT, bytes=size, sha256=digest)
            keep.add(NULL_TEXT)
        for name in os.listdir(partial):  # sidecars and the plan (their facts are in meta.json now), leftovers
            if name not in keep:
                os.remove(os.path.join(partial, name))
        _write_json(os.path.join(partial, META), meta)
        _publish(partial, output)
    sync("latent_cache_published")
    return meta if meta is not None else read_meta(output)


def _publish(partial: str, output: str):
    """Replaces `output` by `partial` with renames (the old folder goes to `output + '.old'`)."""
    old = output + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(output):
        os.replace(output, old)
    os.replace(partial, output)
    shutil.rmtree(old, ignore_errors=True)


def _read_one(path: str) -> dict:
    from array_record.python import array_record_module  # only where shards are read or written
    reader = array_record_module.ArrayRecordReader(path)
    try:
        return decode_record(reader.read([0])[0])
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------

class LatentCacheSource:
    """Random access over a latent cache folder written by `build` (`pixeldance.trainers.cache`).

    Each element: z float32 [T, h, w, C] (the video's latents, unnormalised), z_last float32
    [J, h, w, C] (the last J frames each encoded as an image, latest first), tokens int32 [S] or
    text_states bfloat16 [S, D] and text_mask bool [S] (`fields`); with captions=True also
    caption (str). `null_text()`: the empty prompt's states, for a cache of frozen states. A
    missing, incomplete or corrupt cache raises CacheError (a ValueError) with one line naming
    the path; so does a meta.json naming a file outside `path` (before it is opened), unless
    allow_outside_root (config.data.allow_outside_root). verify_checksums=True also checks every file
    against the size and SHA-256 in meta.json before anything is read (`verify`; about 0.8 s per
    GB on two CPU cores): a damaged shard is named up front instead of at its first bad record.
    """

    def __init__(self, path: str, captions: bool = False, *, allow_outside_root: bool = False,
                 verify_checksums: bool = False):
        from array_record.python import array_record_data_source  # only where shards are read
        self.path, self._captions = path, captions
        self.allow_outside_root = bool(allow_outside_root)
        if not os.path.isdir(path):
            hint = " (a cache of the old format)" if path.endswith(".npz") else ""
            raise FileNotFoundError(f"latent cache not found: {path}{hint} (run the 'cache' stage first)")
        meta = read_meta(path)
        if meta is None:
            raise CacheError(f"latent cache {path} has no readable {META} (incomplete or old format: "
                             f"run the 'cache' stage again)")
        self.meta = meta
        files = []
        for k, s in enumerate(meta["shards"]):
            try:
                f = _cache_file(path, s["file"], f"{META} shards[{k}]", self.allow_outside_root)
            except OutsideRootError as e:
                raise CacheError(str(e)) from None
            if not os.path.exists(f):
                raise CacheError(f"latent cache shard missing: {f}")
            if os.path.getsize(f) != s["bytes"]:
                raise CacheError(f"latent cache shard corrupt: {f} has {os.path.getsize(f)} bytes, "
                                 f"{META} says {s['bytes']}")
            files.append(f)
        # (after the checks above: what `verify` finds now is a checksum mismatch or a bad
        # empty-prompt record)
        bad = verify(path, meta, self.allow_outside_root) if verify_checksums else []
        if bad:
            named = "; ".join(f"{os.path.join(path, f)}: {reason}" for f, reason in bad)
            raise CacheError(f"latent cache damaged: {named} (run the 'cache' stage: it rewrites only "
                             f"the damaged shards)")
        try:
            self._data = array_record_data_source.ArrayRecordDataSource(files)
        except Exception as e:  # the reader's own errors (riegeli) are of several types
            raise CacheError(f"latent cache shard unreadable: {_find_unreadable(files) or path}: "
                             f"{_one_line(e)}") from None
        if len(self._data) != meta["count"]:
            raise CacheError(f"latent cache {path}: the shards hold {len(self._data)} records, "
                             f"{META} says {meta['count']}")
        self._shapes = {k: tuple(v["shape"]) for k, v in meta["fields"].items()}
        self.fields = tuple(meta["fields"])

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        try:
            rec = decode_record(self._data[i])
        except Exception as e:
            raise CacheError(f"latent cache shard corrupt: {self._shard_of(i)}: record {i} unreadable "
                             f"({_one_line(e)})") from None
        out = {k: rec[k] for k in self.fields}
        if self._captions:
            out["caption"] = rec["caption"]
        return out

    def null_text(self) -> dict[str, np.ndarray]:
        """The empty prompt's dict(text_states bfloat16 [1, S, D], text_mask bool [1, S]) of a cache
        of frozen text states (checked against meta.json's size)."""
        entry = self.meta.get("null_text")
        if entry is None:
            raise CacheError(f"latent cache {self.path} holds no frozen text states (it was made with "
                             f"tokens: rerun the 'cache' stage with config.text.encoder)")
        try:
            f = _cache_file(self.path, entry["file"], f"{META} null_text", self.allow_outside_root)
        except OutsideRootError as e:
            raise CacheError(str(e)) from None
        try:
            with open(f, "rb") as fh:
                data = fh.read()
            if len(data) != entry["bytes"]:
                raise ValueError(f"{len(data)} bytes, {META} says {entry['bytes']}")
            rec = decode_record(data)
            return {k: rec[k] for k in ("text_states", "text_mask")}
        except (OSError, ValueError, KeyError) as e:
            raise CacheError(f"latent cache file unreadable: {f}: {_one_line(e)}") from None

    def _shard_of(self, i: int) -> str:
        """The path of the shard holding record i."""
        shards = self.meta["shards"]
        s = bisect.bisect_right([sh["start"] for sh in shards], i) - 1
        return os.path.join(self.path, shards[max(s, 0)]["file"])

    def __repr__(self) -> str:
        # grain compares reprs when restoring an iterator: no path here, so a copied workdir resumes.
        return f"LatentCacheSource(n={len(self)}, z={self._shapes['z']})"

    def read_all(self) -> dict[str, np.ndarray]:
        """Every record stacked: z [N, T, h, w, C], z_last [N, J, h, w, C], tokens [N, S], captions
        (str array [N]). For tests and small caches."""
        recs = [decode_record(self._data[i]) for i in range(len(self))]
        out = {k: np.stack([r[k] for r in recs]) for k in self.fields}
        out["captions"] = np.asarray([r["caption"] for r in recs])
        return out


def _find_unreadable(files: Sequence[str]) -> str | None:
    """The first of `files` that array_record cannot open, if any."""
    from array_record.python import array_record_module  # only where shards are read or written
    for f in files:
        try:
            array_record_module.ArrayRecordReader(f).close()
        except Exception:
            return f
    return None


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text.splitlines()[0] if text.strip() else type(e).__name__


def write_arrays(output: str, z: np.ndarray, z_last: np.ndarray, tokens, captions: Sequence[str], *,
                 num_shards: int = 1, info: dict | None = None, null_text: dict | None = None) -> dict:
    """A cache from arrays already in memory (z [N, T, h, w, C], z_last [N, J, h, w, C], tokens
    [N, S] or frozen states dict(text_states [N, S, D], text_mask [N, S]) with their `null_text`,
    N captions), one process. For tests and converters."""
    text = tokens if isinstance(tokens, dict) else dict(tokens=tokens)

    def encode_range(start, end):
        yield [dict(z=z[i], z_last=z_last[i], caption=captions[i], **{k: v[i] for k, v in text.items()})
               for i in range(start, end)]
    return build(output, count=len(z), num_shards=num_shards, encode_range=encode_range, info=info,
                 null_text=null_text, log=lambda _: None)
