"""Caching the deterministic preprocessing of a pipeline: in memory (`CacheDataset`) or on disk (`PersistentDataset`).

Both run a pipeline's deterministic prefix (everything before its first random transform: load, orient, resample,
normalise) once per volume and keep the result; the random transforms (crops, flips, intensity augmentation, mask
draws) still run on every access, so caching changes no number a run produces.

The disk cache names each entry by a SHA-256 of three things, so a stale entry is never read back:

* the datalist entry (its file paths and keys);
* each referenced file's size and modification time (a file rewritten in place gets a new entry);
* a fingerprint of the cached prefix itself (`transform_fingerprint`): the class and settings of every
  deterministic transform, read from the transform objects, plus the MONAI version. Changing the spacing, the
  orientation, the intensity normalisation or a padding size therefore gives new entries.

Entries are written to a temporary name in the cache folder and renamed into place, so a killed run leaves no
half-written entry; they are read back with `torch.load(weights_only=True)` (tensors, MetaTensors, and the numpy
arrays and MONAI enums of their metadata; nothing else is unpickled). An
unreadable entry is recomputed and replaced. Old entries are never deleted: remove the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import types
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, Randomizable, Transform
from monai.utils import convert_to_tensor

from gmim_hub.atomic import atomic_write
from gmim_hub.errors import ConfigError

logger = logging.getLogger(__name__)

CACHE_MODES = ("none", "memory", "disk")
_FORMAT = "gmim-cache-1"  # bump when the stored form of an entry changes


def cache_mode(value: Any) -> str:
    """'none' | 'memory' | 'disk'; `True` means 'memory' and `False`/`None` 'none' (the old boolean flag)."""
    if value is True:
        return "memory"
    if value is False or value is None:
        return "none"
    if isinstance(value, str) and value.lower() in CACHE_MODES:
        return value.lower()
    raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)}, got {value!r}; use --cache memory for "
                      "datasets that fit in RAM, --cache disk for larger ones")


def cached_prefix(transform: Callable[[Any], Any]) -> list[Any]:
    """The transforms a cache stores the output of: those before the first random one (as MONAI decides)."""
    steps = list(transform.flatten().transforms) if isinstance(transform, Compose) else [transform]
    prefix = []
    for t in steps:
        if isinstance(t, Randomizable) or not isinstance(t, Transform):
            break
        prefix.append(t)
    return prefix


def _describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform's settings: plain values, arrays, and nested transform objects;
    other objects by class name only (never by `repr`, which may hold a memory address)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return np.asarray(value).tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_describe(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if hasattr(value, "value") and type(value).__module__.startswith("monai"):  # MONAI's string enums
        return str(value.value)
    if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, type)):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if depth < 4 and hasattr(value, "__dict__"):
        return {"class": name, **{k: _describe(v, depth + 1) for k, v in sorted(vars(value).items())
                                  if not k.startswith("__")}}
    return name


def transform_fingerprint(transform: Callable[[Any], Any]) -> str:
    """SHA-256 of the cached prefix's transform classes and settings and of the MONAI version."""
    import monai

    desc = [_describe(t) for t in cached_prefix(transform)]
    blob = json.dumps({"format": _FORMAT, "monai": monai.__version__, "prefix": desc}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class EntryKey:
    """`hash_func` of the disk cache: the datalist entry, the stat of every file it names, and the pipeline's
    fingerprint (picklable, so data-loader workers can use it)."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    def __call__(self, item: Any) -> bytes:
        files = {}
        for value in item.values() if isinstance(item, dict) else ():
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
                    st = os.stat(path)
                    files[str(path)] = [st.st_size, st.st_mtime_ns]
        blob = json.dumps({"item": item, "files": files, "pipeline": self.fingerprint}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest().encode()


def _meta_globals() -> list[Any]:
    """What a cached MetaTensor's metadata holds besides tensors (the NIfTI header as numpy arrays, MONAI's key
    enums): allowed for `torch.load(weights_only=True)`, which still refuses any other class or callable."""
    from monai.utils.enums import SpaceKeys, TraceKeys

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    dtypes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSUV"}
    return [_reconstruct, np.ndarray, np.dtype, *dtypes, SpaceKeys, TraceKeys]


class DiskCacheDataset(PersistentDataset):
    """MONAI's `PersistentDataset` with entries written atomically inside the cache folder and kept as
    MetaTensors (their affines are needed for resampling-aware crops and HD95 in mm)."""

    def _cachecheck(self, item_transformed: Any) -> Any:
        path = Path(self.cache_dir) / f"{self.hash_func(item_transformed).decode()}.pt"
        if path.is_file():
            try:
                with torch.serialization.safe_globals(_meta_globals()):
                    return torch.load(path, weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable entry is recomputed and replaced
                logger.warning("cache entry %s is unreadable (%s: %s); recomputing it", path, type(e).__name__,
                               str(e).splitlines()[-1][:200] if str(e) else "")
        out = convert_to_tensor(self._pre_transform(deepcopy(item_transformed)), convert_numeric=False,
                                track_meta=True)
        with atomic_write(path) as tmp:  # ranks writing the same entry at once each replace it with identical bytes
            torch.save(out, tmp)
        return out


def make_dataset(
    data: Sequence[dict[str, Any]],
    transform: Callable[[Any], Any],
    *,
    cache: Any = "none",
    cache_dir: str | Path | None = None,
    cache_workers: int | None = 1,
) -> Dataset:
    """`monai.data.Dataset` (`cache="none"`), `CacheDataset` (`"memory"`: the deterministic prefix of every volume
    is computed now and kept in RAM, per process) or `DiskCacheDataset` (`"disk"`: computed on first use and kept
    in `cache_dir`, shared by processes and runs). Build it once and pass it to `make_loader` every epoch."""
    mode = cache_mode(cache)
    if mode == "memory":
        return CacheDataset(list(data), transform=transform, num_workers=cache_workers, progress=False)
    if mode == "disk":
        if cache_dir is None:
            raise ConfigError("cache='disk' needs cache_dir=, a folder for the preprocessed volumes")
        folder = Path(cache_dir)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"cache folder {folder} is a file; pass --cache-dir with a folder (it is created)")
        folder.mkdir(parents=True, exist_ok=True)
        return DiskCacheDataset(list(data), transform=transform, cache_dir=folder,
                                hash_func=EntryKey(transform_fingerprint(transform)), track_meta=True)
    return Dataset(list(data), transform=transform)
