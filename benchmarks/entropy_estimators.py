"""Cell-entropy estimators on real volumes, native and resampled: which grid GMIM picks and what the entropies span.

The original ranks cells by the Shannon entropy of their *distinct* voxel values ("unique"). That measures content
on a native integer grid; after bilinear resampling (the default pre-processing) nearly every voxel value is
distinct, so it measures interpolation instead. "histogram" counts fixed bins over the intensity range the
normalisation produces. This script measures both on two real volumes that ship in packages:

* MNI152 2009a T1, 1 mm, uint8 (the `nilearn` wheel), z-scored over non-zero voxels as `DataConfig(intensity=
  "zscore_nonzero")` does; resampled = bilinear to 1.25 mm (its native grid is already 1 mm);
* a real head CT (Debian `invesalius-examples`, Cranium.inv3: int16 HU, 0.957 x 0.957 x 1.5 mm), windowed
  [-1000, 1000] HU -> [0, 1] as `intensity="ct_window"` does; resampled = bilinear to 1 mm, the default spacing.

For each, the same 24 random 96^3 crops (seeded), grids (4, 8, 16): the distribution of the chosen grid, the range
of the g=4 cell entropies over all crops, and the distinct values per crop. Prints a table; the last line sums it
up. Run: `python benchmarks/entropy_estimators.py [--crops N] [--cranium PATH]`.
"""

from __future__ import annotations

import argparse
import json
import plistlib
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

from gmim_hub.config import INTENSITY_RANGES, DataConfig, MaskingConfig
from gmim_hub.data.transforms import intensity_transform
from gmim_hub.masking import cell_entropies, select_grid

CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
ROI, GRIDS = 96, (4, 8, 16)
ESTIMATORS = {"unique": {"entropy_estimator": "unique"},
              "histogram-64": {"entropy_estimator": "histogram", "histogram_bins": 64},
              "histogram-256": {"entropy_estimator": "histogram", "histogram_bins": 256}}


def load_cranium(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The InVesalius project: a gzip'd tar with main.plist (shape, dtype, spacing) and the raw matrix.dat."""
    with tarfile.open(path) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        meta = plistlib.load(tar.extractfile(members["main.plist"]))
        raw = tar.extractfile(members[meta["matrix"]["filename"]]).read()
    shape = tuple(meta["matrix"]["shape"])  # (slices, rows, columns)
    vol = np.frombuffer(raw, dtype=meta["matrix"]["dtype"]).reshape(shape).transpose(2, 1, 0)  # -> (x, y, z)
    sx, sy, sz = (float(s) for s in meta["spacing"])
    return np.ascontiguousarray(vol), (sx, sy, sz)


def load_mni() -> tuple[np.ndarray, tuple[float, float, float]]:
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=1)
    return np.asarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])


def prepare(vol: np.ndarray, spacing: tuple[float, float, float], intensity: str,
            resample_to: float | None) -> np.ndarray:
    """(C=1, X, Y, Z) float32: optional bilinear resampling (MONAI Spacing), then the package's normalisation."""
    t = MetaTensor(torch.from_numpy(vol.astype(np.float32))[None], affine=torch.diag(torch.tensor([*spacing, 1.0])))
    if resample_to is not None:
        t = Spacing(pixdim=(resample_to,) * 3, mode="bilinear")(t)
    out = intensity_transform(DataConfig(intensity=intensity), ["image"])({"image": t})["image"]
    return np.asarray(out.as_tensor() if isinstance(out, MetaTensor) else out, dtype=np.float32)


def crops(vol: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    hi = [s - ROI for s in vol.shape[1:]]
    starts = [[int(rng.integers(0, h + 1)) for h in hi] for _ in range(n)]
    return [vol[:, x:x + ROI, y:y + ROI, z:z + ROI] for x, y, z in starts]


def measure(samples: list[np.ndarray], value_range: tuple[float, float]) -> dict[str, dict]:
    out = {}
    for name, kw in ESTIMATORS.items():
        cfg = MaskingConfig(grids=GRIDS, **kw)
        picks, g4 = Counter(), []
        for c in samples:
            picks[select_grid(c, cfg, value_range).grid] += 1
            g4.append(cell_entropies(c, (4,), estimator=cfg.entropy_estimator, bins=cfg.histogram_bins,
                                     value_range=value_range)[0])
        h = np.concatenate(g4)
        out[name] = {"grids": {g: picks.get(g, 0) for g in GRIDS}, "g4_entropy_bits": [float(h.min()), float(h.max())]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crops", type=int, default=24)
    ap.add_argument("--cranium", type=Path, default=CRANIUM)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "entropy_estimators.json")
    args = ap.parse_args()
    volumes = {"MNI152 T1 (uint8)": (*load_mni(), "zscore_nonzero", 1.25),
               "head CT (int16 HU)": (*load_cranium(args.cranium), "ct_window", 1.0)}
    results = {}
    print(f"{'volume':20} {'grid':17} {'estimator':14} {'picks g=4/8/16':>15} {'g=4 H range (bits)':>19} "
          f"{'distinct/crop':>13}")
    for vname, (vol, spacing, intensity, resample_to) in volumes.items():
        for label, target in (("native", None), (f"resampled {resample_to} mm", resample_to)):
            samples = crops(prepare(vol, spacing, intensity, target), args.crops, seed=0)
            distinct = int(np.median([np.unique(c).size for c in samples]))
            res = measure(samples, INTENSITY_RANGES[intensity])
            results[f"{vname}, {label}"] = {"distinct_median": distinct, **res}
            for est, r in res.items():
                lo, hi = r["g4_entropy_bits"]
                picks = "/".join(str(r["grids"][g]) for g in GRIDS)
                print(f"{vname:20} {label:17} {est:14} {picks:>15} {lo:8.2f} .. {hi:6.2f} {distinct:>13}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")

    def flips(est: str) -> int:  # crops-weighted change of the grid distribution between native and resampled
        keys = list(results)
        return sum(sum(abs(results[a][est]["grids"][g] - results[b][est]["grids"][g]) for g in GRIDS) // 2
                   for a, b in zip(keys[::2], keys[1::2], strict=True))
    print("ENTROPY " + " ".join(f"{est}: grid-distribution shift native->resampled {flips(est)} of "
                                 f"{2 * args.crops} crops;" for est in ESTIMATORS))


if __name__ == "__main__":
    main()
