"""Datalists: turn a dataset description into a list of `{"image": ..., "label": ...}` dicts of absolute paths.

Three sources are understood (the format is detected, not configured):

(a) a Medical Segmentation Decathlon `dataset.json`: `{"training": [{"image": ..., "label": ...}], "test": [...],
    "modality": {"0": "FLAIR", ...}}`. MSD has no validation split; pass `fold=` to cut one (k-fold, see below).
(b) a folder of NIfTI files (`*.nii`, `*.nii.gz`, not recursive, hidden files skipped, sorted by name):
    unlabelled images for pre-training.
(c) a JSON list file in the original GMIM format: `"training"` entries that carry an integer `"fold"` (entries with
    `fold == k` are the validation set of fold k, the rest train), or explicit `"training"` / `"validation"` keys
    (MONAI's Swin UNETR jsons). A top-level JSON list is read as `"training"` entries.

Paths are relative to `base_dir` (default: the json's folder, or the folder itself for (b)), never to the current
directory (which the original used). Every referenced file is checked to exist and to have a readable NIfTI header
*before* training starts, so a typo fails in a second instead of after an hour in a DataLoader worker.

Multi-channel images (e.g. BraTS modalities) are a list of files per entry: the list order is the channel order, kept
exactly as written (never sorted: the original's `sorted()` silently reordered BraTS to [flair, t1, t1ce, t2]).
A single 4-D NIfTI with channels last is accepted as well.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib

from gmim_hub.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

Split = Literal["training", "validation", "all"]
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_datalist(
    source: str | Path,
    *,
    base_dir: str | Path | None = None,
    split: Split = "training",
    fold: int | None = None,
    num_folds: int = 5,
    fraction: float = 1.0,
    seed: int = 0,
    channel_names: Sequence[str] | None = None,
    require_labels: bool = False,
) -> list[dict[str, Any]]:
    """Read a datalist and return the entries of `split`, with absolute, checked paths.

    Splits: `"all"` is every training (+ validation) entry, never the MSD `"test"` images. `"training"` /
    `"validation"` come from (1) the entries' `"fold"` ints when present (`fold` required), else (2) explicit
    `"validation"` entries, else (3) a seeded k-fold cut into `num_folds` parts when `fold` is given (an MSD json or a
    folder). Without a validation split, `split="training"` returns everything and `"validation"` is an error.

    `fraction` < 1 keeps `ceil(fraction * N)` training entries drawn with `random.Random(seed)` (label-efficient
    runs; the original used `random.seed(12)`), in their original order; validation is never subsampled.

    `channel_names` (the model's `DataConfig.channel_names`) checks every image has that many channels, and for an
    MSD json that its `"modality"` names are the same, in the same order.
    """
    _check_args(split, fold, num_folds, fraction)
    src = Path(source).expanduser()
    if not src.exists():
        raise InputError(f"datalist source {src} does not exist; pass a dataset.json, a JSON datalist or a folder "
                         "of NIfTI files")
    if src.is_dir():
        base = Path(base_dir).expanduser() if base_dir is not None else src
        groups = {"training": _scan_folder(src), "validation": []}
        meta: dict[str, Any] = {}
    else:
        base = Path(base_dir).expanduser() if base_dir is not None else src.parent
        groups, meta = _read_json(src)
    entries = _select(groups, split, fold, num_folds, src)
    if split == "training" and fraction < 1.0:
        entries = _subsample(entries, fraction, seed)
    out = [_resolve(e, base, src) for e in entries]
    if not out:
        raise InputError(f"{src} has no {split!r} entries (fold={fold}); check the datalist and the split")
    for entry in out:
        _check_entry(entry, src, channel_names, require_labels)
    if channel_names is not None and meta.get("modality"):
        _check_modality_order(meta["modality"], channel_names, src)
    logger.info("datalist %s: %d %s entries (fold=%s, fraction=%s)", src, len(out), split, fold, fraction)
    return out


@dataclass(frozen=True)
class DatasetTask:
    """What a dataset.json says about its task; empty where it says nothing.

    label_names: from "labels" ({"0": "background", "1": "liver"}), in index order, one per output class;
    channel_names: from "modality" ({"0": "T1"}, MSD) or "channel_names" (nnU-Net), one per input channel."""

    label_names: tuple[str, ...] = ()
    channel_names: tuple[str, ...] = ()


def read_task(source: str | Path) -> DatasetTask:
    """The classes and channels a dataset.json declares (a folder or a plain datalist declares none).
    `InputError` when "labels" / "modality" are there but are not maps of indices 0..N-1 to names."""
    src = Path(source).expanduser()
    if src.is_dir() or not src.exists():
        return DatasetTask()
    _, meta = _read_json(src)
    labels = _index_map(meta.get("labels"), "labels", '{"0": "background", "1": "tumour"}', src)
    channels = meta.get("modality", meta.get("channel_names"))
    return DatasetTask(labels, _index_map(channels, "modality", '{"0": "T1"}', src))


def _index_map(value: Any, key: str, example: str, src: Path) -> tuple[str, ...]:
    """{"0": a, "1": b} -> (a, b); None -> (); anything else (gaps, non-integer keys, a list) -> InputError."""
    if value is None:
        return ()
    keys = sorted(value, key=lambda k: int(k) if str(k).isdigit() else -1) if isinstance(value, dict) else None
    if not keys or [str(k) for k in keys] != [str(i) for i in range(len(keys))]:
        raise InputError(f"{src}: {key!r} must map every index from 0 up to a name, e.g. {example}, got {value!r}")
    return tuple(str(value[k]) for k in keys)


def _check_args(split: str, fold: int | None, num_folds: int, fraction: float) -> None:
    if split not in ("training", "validation", "all"):
        raise ConfigError(f"split must be 'training', 'validation' or 'all', got {split!r}")
    if not (isinstance(num_folds, int) and num_folds >= 2):
        raise ConfigError(f"num_folds must be an int >= 2, got {num_folds!r}")
    if fold is not None and not (isinstance(fold, int) and fold >= 0):
        raise ConfigError(f"fold must be None or an int >= 0, got {fold!r}")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")


def _scan_folder(folder: Path) -> list[dict[str, Any]]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise InputError(f"folder {folder} holds no *.nii or *.nii.gz files; point to the folder with the images "
                         "(subfolders are not searched)")
    return [{"image": str(p)} for p in files]


def _read_json(path: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Read (a) or (c): returns {"training": [...], "validation": [...]} of raw entries, and the other keys."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); fix the file or regenerate the datalist") from e
    if isinstance(data, list):
        data = {"training": data}
    if not isinstance(data, dict) or not isinstance(data.get("training"), list):
        raise InputError(f"{path} must be a JSON object with a 'training' list (MSD dataset.json or a GMIM "
                         "datalist), or a JSON list of entries")
    val = data.get("validation", [])
    if not isinstance(val, list):
        raise InputError(f"{path}: 'validation' must be a list of entries, got {type(val).__name__}")
    groups = {"training": [_as_entry(e, path, "training") for e in data["training"]],
              "validation": [_as_entry(e, path, "validation") for e in val]}
    meta = {k: v for k, v in data.items() if k not in ("training", "validation")}
    return groups, meta


def _as_entry(raw: Any, path: Path, key: str) -> dict[str, Any]:
    if isinstance(raw, (str, list)):
        raw = {"image": raw}
    if not isinstance(raw, dict) or "image" not in raw:
        raise InputError(f"{path}: every {key!r} entry needs an 'image' (a path or a list of paths), got {raw!r}")
    if "fold" in raw and not (isinstance(raw["fold"], int) and not isinstance(raw["fold"], bool)):
        raise InputError(f"{path}: 'fold' must be an int, got {raw['fold']!r} in {raw!r}")
    return raw


def _select(groups: dict[str, list[dict[str, Any]]], split: str, fold: int | None, num_folds: int,
            src: Path) -> list[dict[str, Any]]:
    train, val = groups["training"], groups["validation"]
    if split == "all":
        return train + val
    has_folds = any("fold" in e for e in train)
    if has_folds:
        if val:
            raise InputError(f"{src} has both 'fold' ints and a 'validation' list; keep one way of splitting")
        if fold is None:
            folds = sorted({int(e["fold"]) for e in train if "fold" in e})
            raise ConfigError(f"{src} splits by 'fold'; pass fold= (one of {folds})")
        return [e for e in train if (e.get("fold") == fold) == (split == "validation")]
    if val:
        if fold is not None:
            raise ConfigError(f"{src} has an explicit 'validation' list; fold={fold} cannot apply, pass fold=None")
        return train if split == "training" else val
    if fold is None:
        if split == "validation":
            raise ConfigError(f"{src} has no validation split; pass fold= (0..{num_folds - 1}) for a seeded "
                              f"{num_folds}-fold cut")
        return train
    if fold >= num_folds:
        raise ConfigError(f"fold must be < num_folds={num_folds}, got {fold}")
    return _kfold(train, fold, num_folds, split == "validation")


def _kfold(entries: list[dict[str, Any]], fold: int, num_folds: int, validation: bool) -> list[dict[str, Any]]:
    """Fixed-seed (0) shuffle, then fold k = every num_folds-th entry from k: the cut never depends on `seed`,
    so the validation set cannot drift when only the training seed changes."""
    order = list(range(len(entries)))
    random.Random(0).shuffle(order)
    in_val = {i for rank, i in enumerate(order) if rank % num_folds == fold}
    return [e for i, e in enumerate(entries) if (i in in_val) == validation]


def _subsample(entries: list[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    n = math.ceil(fraction * len(entries))
    keep = set(random.Random(seed).sample(range(len(entries)), n))
    return [e for i, e in enumerate(entries) if i in keep]


def _resolve(entry: dict[str, Any], base: Path, src: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("image", "label"):
        if key not in entry:
            continue
        value = entry[key]
        if isinstance(value, list):
            if not value or not all(isinstance(v, str) for v in value):
                raise InputError(f"{src}: {key!r} must be a path or a non-empty list of paths, got {value!r}")
            out[key] = [_abspath(v, base) for v in value]
        elif isinstance(value, str):
            out[key] = _abspath(value, base)
        else:
            raise InputError(f"{src}: {key!r} must be a path or a list of paths, got {value!r}")
    return out


def _abspath(p: str, base: Path) -> str:
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _check_entry(entry: dict[str, Any], src: Path, channel_names: Sequence[str] | None, require_labels: bool) -> None:
    if require_labels and "label" not in entry:
        raise InputError(f"{src}: entry {entry['image']} has no 'label'; a segmentation task needs one per image")
    images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
    shapes = [_header_shape(p, src) for p in images]
    if len(images) > 1 and len({s[:3] for s in shapes}) > 1:
        raise InputError(f"{src}: the channel files of one image differ in shape {[s[:3] for s in shapes]} "
                         f"({images}); resample them to one grid")
    n_channels = len(images) if len(images) > 1 else (shapes[0][3] if len(shapes[0]) == 4 else 1)
    if channel_names is not None and n_channels != len(channel_names):
        raise InputError(f"{src}: {images} has {n_channels} channel(s) but the model expects {len(channel_names)} "
                         f"({', '.join(channel_names)}); list one file per channel, in that order")
    if "label" in entry:
        label_shape = _header_shape(entry["label"], src)
        if label_shape[:3] != shapes[0][:3]:
            raise InputError(f"{src}: label {entry['label']} has shape {label_shape[:3]} but its image has "
                             f"{shapes[0][:3]}; they must share one voxel grid")


def _header_shape(path: str, src: Path) -> tuple[int, ...]:
    """Open the NIfTI header only (cheap, no voxel data), and for uncompressed files check the size on disk."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path} (listed in {src}) does not exist; fix the path, or pass --base-dir (base_dir= in "
                         "Python; relative paths are resolved against the datalist's folder)")
    try:
        img: Any = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:  # nibabel raises several types (ImageFileError, OSError, EOFError, gzip errors)
        raise InputError(f"{path} (listed in {src}) is not a readable NIfTI file ({type(e).__name__}: {e}); "
                         "re-export it as .nii/.nii.gz or remove it from the datalist") from e
    if len(shape) not in (3, 4):
        raise InputError(f"{path} has shape {shape}; expected a 3-D volume or 4-D (x, y, z, channels)")
    if p.name.endswith(".nii") and isinstance(img, nib.Nifti1Image):
        # the proxy's offset: nibabel sets the header's vox_offset to 0 after reading a single-file NIfTI
        need = int(getattr(img.dataobj, "offset", 352)) + math.prod(shape) * img.get_data_dtype().itemsize
        if p.stat().st_size < need:
            raise InputError(f"{path} is truncated ({p.stat().st_size} bytes, the header needs {need}); "
                             "re-copy or re-export it")
    return shape


def _check_modality_order(modality: Any, channel_names: Sequence[str], src: Path) -> None:
    if not isinstance(modality, dict) or not all(str(k).isdigit() for k in modality):
        raise InputError(f"{src}: 'modality' must map channel indices to names, e.g. {{\"0\": \"T1\"}}, "
                         f"got {modality!r}")
    names = [str(modality[k]) for k in sorted(modality, key=int)]
    if [n.lower() for n in names] != [c.lower() for c in channel_names]:
        raise InputError(f"{src} lists modalities {names} but the model expects channels {list(channel_names)}; "
                         "the order must match (set data.channel_names accordingly)")
