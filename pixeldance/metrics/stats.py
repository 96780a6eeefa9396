"""Feature statistics of a set of videos (mean, covariance, count) and their `.npz` cache.

The real side of FVD and FID is computed once per (protocol, network, real set) and stored as an
`.npz` (read with ``allow_pickle=False``: arrays only). The file records what it was computed
with: the protocol name, the feature network's sha256 (`pixeldance/models/weights.py`), the metric
and a fingerprint of the real set, so statistics computed under other choices are never compared.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np


class StatsError(ValueError):
    """A missing, damaged or mismatched statistics file; the message is one line."""


class Accumulator:
    """Streaming float64 sums of features [B, features], so a set of any size needs O(features^2) memory."""

    def __init__(self):
        self.count, self._sum, self._outer = 0, None, None

    def add(self, features) -> "Accumulator":
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [B, features]; got {x.shape}")
        if self._sum is None:
            self._sum, self._outer = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x
        self.count += len(x)
        return self

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean [features], unbiased covariance [features, features]) as numpy's np.cov(x, rowvar=False) gives them."""
        if self.count < 2:
            raise ValueError(f"statistics need at least 2 samples; got {self.count}")
        mean = self._sum / self.count
        cov = (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, (cov + cov.T) / 2


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """mean: float64 [features]; cov: float64 [features, features]; count: samples (videos or frames) they summarise."""
    mean: np.ndarray
    cov: np.ndarray
    count: int
    metric: str        # 'fvd' | 'fid'
    protocol: str      # a name of pixeldance.metrics.protocols.PROTOCOLS
    network: str       # sha256 of the feature network's params.safetensors
    source: str = ""   # what the set is: a folder and a fingerprint of its files

    @classmethod
    def from_accumulator(cls, acc: Accumulator, **meta) -> "FeatureStats":
        mean, cov = acc.moments()
        return cls(mean, cov, acc.count, **meta)

    @classmethod
    def from_features(cls, features, **meta) -> "FeatureStats":
        return cls.from_accumulator(Accumulator().add(features), **meta)

    def save(self, path: str):
        """Writes the .npz atomically (a temporary name, then a rename)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, mean=self.mean, cov=self.cov, count=np.int64(self.count),
                 metric=np.str_(self.metric), protocol=np.str_(self.protocol),
                 network=np.str_(self.network), source=np.str_(self.source))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        try:
            with np.load(path, allow_pickle=False) as f:
                stats = cls(mean=f["mean"].astype(np.float64), cov=f["cov"].astype(np.float64),
                            count=int(f["count"]), metric=str(f["metric"]),
                            protocol=str(f["protocol"]), network=str(f["network"]),
                            source=str(f["source"]))
        except FileNotFoundError:
            raise StatsError(f"statistics file not found: {path}") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # not an npz, pickled objects, missing arrays
            raise StatsError(f"{path}: not a statistics .npz ({str(e).splitlines()[0]})") from None
        Z = stats.mean.shape[0] if stats.mean.ndim == 1 else -1
        if Z < 1 or stats.cov.shape != (Z, Z) or stats.count < 2 or not (
                np.isfinite(stats.mean).all() and np.isfinite(stats.cov).all()):
            raise StatsError(f"{path}: damaged statistics (mean {stats.mean.shape}, cov "
                             f"{stats.cov.shape}, count {stats.count}, finite "
                             f"{bool(np.isfinite(stats.mean).all() and np.isfinite(stats.cov).all())})")
        return stats

    def check_matches(self, other: "FeatureStats", where: str):
        """StatsError unless both were computed for the same metric, protocol and network."""
        for field in ("metric", "protocol", "network"):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                raise StatsError(f"{where}: {field} differs ({a[:16]!r} vs {b[:16]!r}): statistics "
                                 f"computed under other choices are not comparable")
