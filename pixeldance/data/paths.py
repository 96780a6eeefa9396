"""Data roots are boundaries: a path read from a captions file, a manifest or a cache's metadata
must resolve inside the folder it belongs to (after following symlinks), or it is refused.

A folder source's captions file (pixeldance/data/folder.py), the files a TFDS build reads from a
manual folder (tfds_datasets.py) and the shards a latent cache's meta.json names
(latent_cache.py) are all checked with `resolve_inside` before any of those files is opened: a
row like `../outside/secret.png`, an absolute path, or a symlink in the folder that points out
of it would otherwise read a file the data root never held. config.data.allow_outside_root=True
(or `tfds_build --allow_outside_root`) lets such paths through, for data spread over several
disks on purpose.
"""
from __future__ import annotations

import os

CONFIG_HINT = "set config.data.allow_outside_root=True to allow it"
BUILD_HINT = "pass --allow_outside_root to tfds_build to allow it"


class OutsideRootError(ValueError):
    """A path that resolves outside its root; the message is one line:
    `WHERE: 'PATH' resolves outside the data root ROOT (HINT)`. Attributes: where (the row,
    e.g. 'captions.csv:3'), path (as written), root, resolved (the real path it leads to)."""

    def __init__(self, where: str, path: str, root: str, resolved: str, *, root_name: str = "data root",
                 hint: str = CONFIG_HINT):
        self.where, self.path, self.root, self.resolved = where, path, root, resolved
        super().__init__(f"{where}: {path!r} resolves outside the {root_name} {root} ({hint})")

    @property
    def row(self) -> str:
        """The row and the path as written: `captions.csv:3: '../outside/secret.png'`."""
        return f"{self.where}: {self.path!r}"


def is_inside(root: str, path: str) -> bool:
    """Whether `path` (absolute, real) is `root` (absolute, real) or lies under it."""
    return os.path.commonpath([root, path]) == root


def resolve_inside(root: str, rel: str, *, where: str, allow_outside: bool = False,
                   root_name: str = "data root", hint: str = CONFIG_HINT) -> str:
    """The real path of `rel` (relative to `root`, or absolute), checked to lie inside `root`.

    Both sides are resolved with os.path.realpath (symlinks followed, `..` collapsed); nothing is
    opened. A path outside raises OutsideRootError naming `where` (the row: 'captions.csv:3'),
    the path as written and the root, unless allow_outside. A path that does not exist is
    resolved as far as it goes (its absence is found when it is read)."""
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(os.path.join(real_root, rel))
    if not allow_outside and not is_inside(real_root, resolved):
        raise OutsideRootError(where, rel, os.path.abspath(root), resolved, root_name=root_name, hint=hint)
    return resolved
