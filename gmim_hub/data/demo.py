"""The embedded real demo dataset: the MNI152 ICBM 2009a (nonlinear, symmetric) T1 template with its grey- and
white-matter probability maps, as shipped inside the nilearn wheel (`pip install 'gmim-hub[demo]'`), offline.

Be clear about what this is: ONE template subject (an average of 152 brains, registered and symmetrised), enough to
run every code path on real anatomy with a real affine, not a benchmark. Numbers from it say that the pipeline
works, not how well GMIM generalises.

Tissue task (labels 0 background, 1 CSF, 2 GM, 3 WM), the rule:
  brain  = nilearn's MNI152 brain mask (T1 template > 0.2 of its maximum; it covers the ventricles);
  GM/WM  = inside the brain, the argmax of the GM and WM probability maps where that maximum is >= 0.5 (the tissue
           is the majority at the voxel; ties go to GM);
  CSF    = the rest of the brain (ventricles, sulci, and partial-volume voxels where neither tissue reaches 0.5);
  0      = outside the brain.
No CSF map ships with nilearn, hence the derived class.

Split (no voxel is in both parts; each part is cut out with nibabel's slicer, so its affine keeps world coordinates
true; the plane's own voxels go to the upper part):
  * `split="coronal"` (default): the vertical plane through the anterior commissure (y = 0 mm in MNI space):
    posterior (y < 0) for training, anterior (y >= 0) for validation.
  * `split="sagittal"`: the mid-sagittal plane (x = 0 mm): left hemisphere (x < 0) for training, right for
    validation. Caveat: the 2009a *symmetric* template is an exact mirror image (measured: max |T1 - flip(T1)| = 0),
    so the right hemisphere is the flipped left one; with x-flip augmentation it is effectively a training sample.
    Use it to check mirror handling, not generalisation; that is why it is not the default.

Pre-training images (unlabelled): the whole-head T1 plus its left and right hemispheres (cut at x = 0). These are
three deterministic views of the same subject, not three subjects; they include the validation region's voxels
(never its labels), as self-supervised pre-training on all available images usually does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from gmim_hub.atomic import atomic_write, sha256_file
from gmim_hub.config import PRESETS, DataConfig, GMIMConfig
from gmim_hub.errors import ConfigError, GMIMError

logger = logging.getLogger(__name__)

LABEL_NAMES = ("background", "CSF", "GM", "WM")
TISSUE_THRESHOLD = 0.5
_FORMAT = 1
DemoSplit = Literal["coronal", "sagittal"]
_SPLITS: dict[str, tuple[int, str, str]] = {"coronal": (1, "posterior", "anterior"), "sagittal": (0, "left", "right")}


@dataclass(frozen=True)
class DemoPaths:
    """Where `build_demo_dataset` put everything. `dataset_json` is an MSD-style datalist (with an explicit
    `"validation"` list) that `load_datalist` reads; `pretrain_dir` is a folder datalist of unlabelled T1s."""

    root: Path
    dataset_json: Path
    pretrain_dir: Path
    pretrain_images: tuple[Path, ...]
    train_image: Path
    train_label: Path
    val_image: Path
    val_label: Path
    manifest: Path


def demo_config(resolution: int = 2) -> GMIMConfig:
    """The tiny preset set up for the tissue task: 1 T1 channel, 4 classes, z-scored MRI at `resolution` mm, RAS."""
    _check_resolution(resolution)
    data = DataConfig(modality="MRI", channel_names=("T1",), intensity="zscore_nonzero",
                      spacing=(float(resolution),) * 3, orientation="RAS", label_names=LABEL_NAMES)
    return dataclasses.replace(PRESETS["tiny"], in_channels=1, out_channels=len(LABEL_NAMES), data=data)


def tissue_labels(brain: np.ndarray, gm: np.ndarray, wm: np.ndarray,
                  threshold: float = TISSUE_THRESHOLD) -> np.ndarray:
    """Label map (uint8, same shape) from a boolean brain mask and GM / WM probabilities in [0, 1] (rule above)."""
    if not (brain.shape == gm.shape == wm.shape):
        raise ConfigError(f"brain, gm and wm must have one shape, got {brain.shape}, {gm.shape}, {wm.shape}")
    labels = np.where(brain, 1, 0).astype(np.uint8)
    tissue = brain & (np.maximum(gm, wm) >= threshold)
    labels[tissue & (gm >= wm)] = 2
    labels[tissue & (wm > gm)] = 3
    return labels


def build_demo_dataset(out_dir: str | Path, *, resolution: int = 2, split: DemoSplit = "coronal") -> DemoPaths:
    """Write the demo NIfTI files and `dataset.json` under `out_dir` and return their paths.

    Idempotent: `manifest.json` records the build parameters and each file's SHA-256; when they all match, nothing
    is rewritten. Output bytes are deterministic (nibabel writes gzip with mtime 0), so rebuilding gives the same
    checksums. Resolution 2 (99x117x95 voxels, the default; ~5 s on 2 cores) or 1 (197x233x189; ~3 s, no
    resampling).
    """
    _check_resolution(resolution)
    if split not in _SPLITS:
        raise ConfigError(f"split must be 'coronal' or 'sagittal', got {split!r}")
    root = Path(out_dir).expanduser().resolve()
    paths = _layout(root, split)
    params = _params(resolution, split)
    if _is_current(paths, params):
        logger.info("demo dataset in %s is up to date", root)
        return paths
    t1, brain, gm, wm = _load_templates(resolution)
    labels = nib.Nifti1Image(tissue_labels(brain, gm, wm), t1.affine)
    labels.set_data_dtype(np.uint8)
    axis = _SPLITS[split][0]
    (train_img, val_img), (train_lab, val_lab) = _cut(t1, axis), _cut(labels, axis)
    left, right = _cut(t1, 0)
    outputs = {paths.train_image: train_img, paths.train_label: train_lab, paths.val_image: val_img,
               paths.val_label: val_lab, paths.pretrain_images[0]: t1, paths.pretrain_images[1]: left,
               paths.pretrain_images[2]: right}
    for path, img in outputs.items():
        _atomic(path, functools.partial(nib.save, img))
    _write_dataset_json(paths, split)
    files = sorted(outputs) + [paths.dataset_json]
    manifest = {"params": params, "files": {str(p.relative_to(root)): sha256_file(p) for p in files}}
    _atomic(paths.manifest, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))  # last: the seal
    logger.info("wrote the demo dataset (%s mm, %s split) to %s", resolution, split, root)
    return paths


def _check_resolution(resolution: int) -> None:
    if resolution not in (1, 2) or isinstance(resolution, bool):
        raise ConfigError(f"resolution must be 1 or 2 (mm, the grids nilearn ships), got {resolution!r}")


def _layout(root: Path, split: str) -> DemoPaths:
    _, train_part, val_part = _SPLITS[split]
    return DemoPaths(
        root=root,
        dataset_json=root / "dataset.json",
        pretrain_dir=root / "pretrain",
        pretrain_images=tuple(root / "pretrain" / f"mni152_t1_{v}.nii.gz" for v in ("whole", "left", "right")),
        train_image=root / "imagesTr" / f"mni152_{train_part}.nii.gz",
        train_label=root / "labelsTr" / f"mni152_{train_part}.nii.gz",
        val_image=root / "imagesTr" / f"mni152_{val_part}.nii.gz",
        val_label=root / "labelsTr" / f"mni152_{val_part}.nii.gz",
        manifest=root / "manifest.json",
    )


def _params(resolution: int, split: str) -> dict[str, Any]:
    import nilearn

    return {"format": _FORMAT, "resolution": resolution, "split": split, "tissue_threshold": TISSUE_THRESHOLD,
            "nilearn": nilearn.__version__}


def _is_current(paths: DemoPaths, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads(paths.manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("params") != params:
        return False
    files = manifest.get("files", {})
    expected = [paths.dataset_json, paths.train_image, paths.train_label, paths.val_image, paths.val_label,
                *paths.pretrain_images]
    names = {str(p.relative_to(paths.root)) for p in expected}
    if set(files) != names:
        return False
    return all((paths.root / n).is_file() and sha256_file(paths.root / n) == files[n] for n in names)


def _load_templates(resolution: int) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, np.ndarray]:
    """T1 (float32 in [0, 1], as nilearn rescales it), brain mask (bool), GM and WM probabilities, one grid."""
    try:
        from nilearn import datasets
    except ImportError as e:
        raise GMIMError("the demo data needs nilearn: pip install 'gmim-hub[demo]'") from e
    t1 = datasets.load_mni152_template(resolution=resolution)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).dataobj) > 0
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).dataobj, dtype=np.float32)
    data = np.asarray(t1.dataobj, dtype=np.float32)
    data[data < 1e-6] = 0.0  # resampling leaves denormal specks (~1e-40) outside the head; keep background exactly 0
    img = nib.Nifti1Image(data, t1.affine)
    img.set_data_dtype(np.float32)
    return img, brain, gm, wm


def _cut(img: nib.Nifti1Image, axis: int) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Split at world coordinate 0 along `axis`: (voxels with coordinate < 0, voxels >= 0). The affine must be
    axis-aligned with a positive step on `axis` (the MNI templates are RAS); nibabel's slicer shifts the origin."""
    aff = img.affine
    off_diag = np.delete(aff[axis, :3], axis)
    if aff[axis, axis] <= 0 or np.any(np.abs(off_diag) > 1e-6):
        raise GMIMError(f"cannot cut at world 0 along axis {axis}: affine is not axis-aligned RAS ({aff.tolist()})")
    coords = aff[axis, axis] * np.arange(img.shape[axis]) + aff[axis, 3]
    cut = int(np.sum(coords < 0))
    if not 0 < cut < img.shape[axis]:
        raise GMIMError(f"world 0 along axis {axis} is outside the volume (coords {coords[0]}..{coords[-1]})")
    lower = [slice(None)] * 3
    upper = [slice(None)] * 3
    lower[axis], upper[axis] = slice(0, cut), slice(cut, None)
    return img.slicer[tuple(lower)], img.slicer[tuple(upper)]


def _write_dataset_json(paths: DemoPaths, split: str) -> None:
    _, train_part, val_part = _SPLITS[split]

    def rel(p: Path) -> str:
        return "./" + str(p.relative_to(paths.root))

    info = {
        "name": "MNI152Tissue",
        "description": f"GM/WM/CSF tissue labels on the MNI152 ICBM 2009a symmetric T1 template (one template "
                       f"subject); {train_part} part for training, {val_part} part for validation (split={split})",
        "reference": "Fonov et al., NeuroImage 2011 (ICBM 2009a); files from the nilearn package",
        "licence": "see the ICBM 2009a copyright notice distributed with nilearn",
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": {str(i): n for i, n in enumerate(LABEL_NAMES)},
        "numTraining": 1,
        "numTest": 0,
        "training": [{"image": rel(paths.train_image), "label": rel(paths.train_label)}],
        "validation": [{"image": rel(paths.val_image), "label": rel(paths.val_label)}],
        "test": [],
    }
    _atomic(paths.dataset_json, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write via a temporary file in the same folder, then `os.replace`: a concurrent reader (another rank
    building the same folder) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:  # the temporary name keeps the suffix, which tells nibabel the format
        write(tmp)


def cut_training_slabs(paths: DemoPaths, out_dir: str | Path, slabs: int) -> Path:
    """Cut the labelled training part into `slabs` axial slabs (nibabel's slicer: each keeps true world
    coordinates) and write a dataset.json listing them as training volumes, with the demo's validation part as
    validation. Label-fraction experiments (`fraction=`) then subsample slabs. Returns the dataset.json path."""
    if not (isinstance(slabs, int) and slabs >= 1):
        raise ConfigError(f"slabs must be an int >= 1, got {slabs!r}")
    root = Path(out_dir).expanduser().resolve()
    image, label = nib.load(paths.train_image), nib.load(paths.train_label)
    depth = image.shape[2]
    if slabs > depth:
        raise ConfigError(f"cannot cut {depth} axial planes into {slabs} slabs; use at most {depth}")
    edges = np.linspace(0, depth, slabs + 1).round().astype(int)
    training = []
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        entry = {}
        for key, img in (("image", image), ("label", label)):
            path = root / f"slab{k}_{key}.nii.gz"
            _atomic(path, functools.partial(nib.save, img.slicer[:, :, int(lo):int(hi)]))
            entry[key] = "./" + path.name
        training.append(entry)
    info = json.loads(paths.dataset_json.read_text())
    info.update(name=f"{info['name']}Slabs", numTraining=slabs, training=training, validation=[
        {k: str(paths.root / Path(v)) for k, v in e.items()} for e in info["validation"]],
        description=f"{info['description']}; the training part cut into {slabs} axial slabs")
    _atomic(root / "dataset.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    return root / "dataset.json"
