"""Time GMIM's per-sample masking work at ROI 128: gmim_hub.masking vs a straightforward reference of the original.

Per sample, ours = select_grid + cell_mask_ratios + sample_stage_masks (all four insertion points applied,
extra_mask_prob=1, so the work is deterministic). The reference does what the original GridMaskLayer does, on the
CPU in numpy: chained buffer-reuse cells for grids (4, 8, 16), np.unique + scipy.stats.entropy per cell, the
std/mean score, rank -> ratio (a dict lookup, cheaper than the original's list search), and a per-cell
np.random.permutation masking loop for every call. The original additionally paid a GPU->host copy per cell, which
this reference leaves out, so the ratio here is conservative.

Input: nilearn's MNI152 2009a T1 (1 mm), centre-cropped to 128^3 and z-scored over non-zero voxels as the MRI
pipeline does; the 4-channel case stacks T1 and the GM, WM and CSF (brain mask - GM - WM) maps, each normalised.
Falls back to a quantised smooth random field if nilearn is not installed (recorded in the JSON).

Runs single-threaded (as a data-loader worker does), warm-up first, then ours and the reference alternate; medians
of wall time (the headline ratio) and of process CPU time (steadier when the machine is shared).
Share of a pre-training step: the engine runs grid choice, ratios and `sample_stage_masks` in the data-loader
workers (`GridChoiced`, `MaskSeedd`, `MaskingCollate`); what stays in the training step is moving the masks to the
device and `voxel_loss_mask`. The script times that in-step part for a batch of `--batch` at ROI 128 and the
worker-side part per batch, and relates both to `--step-ms`, the step time they are compared with (default 110 ms:
the base model, ROI 128, batch 2, bf16 on an H200, measured with this engine in an earlier session; pass your own).
Masking stays off the critical path while worker_ms_per_batch < num_workers * step_ms.
Usage: python benchmarks/bench_masking.py [--repeats 5] [--batch 2] [--step-ms 110] [--num-workers 2].
Writes benchmarks/results/masking.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import entropy as scipy_entropy

from gmim_hub.config import MaskingConfig
from gmim_hub.masking import cell_mask_ratios, sample_stage_masks, select_grid, token_grids, voxel_loss_mask

ROI = 128
GRIDS = (4, 8, 16)
RESULTS = Path(__file__).resolve().parent / "results" / "masking.json"


def _zscore_nonzero(a: np.ndarray) -> np.ndarray:
    nz = a != 0
    out = np.zeros_like(a, dtype=np.float32)
    out[nz] = (a[nz] - a[nz].mean()) / a[nz].std()
    return out


def load_volume(channels: int) -> tuple[np.ndarray, str]:
    """(C, 128, 128, 128) float32 and a description of where it came from."""
    try:
        from nilearn import datasets
    except ImportError:
        rng = np.random.default_rng(0)
        coarse = rng.standard_normal((channels, 16, 16, 16)).repeat(8, 1).repeat(8, 2).repeat(8, 3)
        field = coarse + 0.2 * rng.standard_normal(coarse.shape)
        vol = np.round((field - field.min()) / np.ptp(field) * 255).astype(np.float32)
        return vol, "synthetic smooth random field quantised to 256 levels (nilearn not installed)"
    maps = [np.asarray(f(resolution=1).dataobj, dtype=np.float32) for f in (
        datasets.load_mni152_template, datasets.load_mni152_gm_template, datasets.load_mni152_wm_template)]
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj, dtype=np.float32)
    maps.append(np.clip(mask - maps[1] - maps[2], 0, 1))
    start = [(s - ROI) // 2 for s in maps[0].shape]
    crop = tuple(slice(s, s + ROI) for s in start)
    vol = np.stack([_zscore_nonzero(m[crop]) for m in maps[:channels]])
    return vol, "nilearn MNI152 2009a 1 mm, centre crop 128^3, z-score over non-zero voxels; channels " + \
        ", ".join(["T1", "GM", "WM", "CSF"][:channels])


# ---- reference: the original's approach, per-cell loops ----------------------------------------------------


def ref_select_grid(vol: np.ndarray) -> tuple[int, np.ndarray]:
    c, d, h, w = vol.shape
    image, scores, ents = vol, [], []
    for g in GRIDS:  # chained buffer reuse, as the original
        v = image.reshape(c, g, d // g, g, h // g, g, w // g).transpose(0, 1, 3, 5, 2, 4, 6)
        v = np.ascontiguousarray(v.reshape(c, g**3, -1).transpose(1, 0, 2))
        ent = np.array([scipy_entropy(np.unique(cell, return_counts=True)[1], base=2) for cell in v.reshape(g**3, -1)])
        image = v.reshape(c, d, h, w)
        with np.errstate(divide="ignore", invalid="ignore"):
            scores.append(g**-0.1 * ent.std() / ent.mean())
        ents.append(ent)
    best = int(np.argmax(scores))
    return GRIDS[best], ents[best]


def ref_ratios(ent: np.ndarray, r0: float = 0.5, scale: float = 0.3) -> np.ndarray:
    distinct = sorted(set(ent.tolist()))
    levels = np.linspace(1 - scale, 1 + scale, len(distinct))
    rank = {v: i for i, v in enumerate(distinct)}
    return np.array([r0 * levels[rank[v]] for v in ent])


def ref_token_mask(n: int, g: int, ratios: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    t, s = (n // g) ** 3, n // g
    m = np.ones((g**3, t), dtype=np.float32)
    for k, r in enumerate(ratios):  # one shuffle per cell, as mask_token
        m[k, rng.permutation(t)[: int(t * min(r, 1.0))]] = 0
    return m.reshape(g, g, g, s, s, s).transpose(0, 3, 1, 4, 2, 5).reshape(n, n, n)


def reference(vol: np.ndarray, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    g, ent = ref_select_grid(vol)
    ratios = ref_ratios(ent)
    for t, n in enumerate((ROI // 2, ROI // 2, ROI // 4, ROI // 8)):
        ref_token_mask(n, g, ratios * 0.5**t, rng)
    return g, ratios


def ours(vol: np.ndarray, cfg: MaskingConfig, gen: torch.Generator) -> tuple[int, torch.Tensor]:
    choice = select_grid(vol, cfg)
    ratios = cell_mask_ratios(choice.entropy, cfg)
    sample_stage_masks([choice.grid], [ratios], token_grids((ROI,) * 3), cfg, gen)
    return choice.grid, ratios


# ---- timing ------------------------------------------------------------------------------------------------


def _clock(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _clock2(fn) -> tuple[float, float]:
    """(wall, CPU) seconds: on a shared machine the process CPU time is the steadier measure of the work."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def components(vol: np.ndarray, cfg: MaskingConfig, gen: torch.Generator, repeats: int) -> dict[str, float]:
    """Median ms of each step of ours."""
    choice = select_grid(vol, cfg)
    ratios = cell_mask_ratios(choice.entropy, cfg)
    tg = token_grids((ROI,) * 3)
    steps = {
        "select_grid_ms": lambda: select_grid(vol, cfg),
        "cell_mask_ratios_ms": lambda: cell_mask_ratios(choice.entropy, cfg),
        "sample_stage_masks_ms": lambda: sample_stage_masks([choice.grid], [ratios], tg, cfg, gen),
    }
    return {k: 1e3 * statistics.median(_clock(f) for _ in range(repeats)) for k, f in steps.items()}


def bench(channels: int, repeats: int) -> dict:
    vol, source = load_volume(channels)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    cfg = MaskingConfig(grids=GRIDS, extra_mask_prob=1.0, entropy_estimator="unique")  # like for like
    legacy = MaskingConfig(grids=GRIDS, extra_mask_prob=1.0, legacy_chained_cells=True, entropy_estimator="unique")
    g_ref, r_ref = reference(vol, rng)  # warm-up, and the equality check
    g_leg, r_leg = ours(vol, legacy, gen)
    g_ours, _ = ours(vol, cfg, gen)
    same = g_leg == g_ref and np.array_equal(r_leg.numpy(), r_ref.astype(np.float32))
    runs = {"ours": lambda: ours(vol, cfg, gen), "reference": lambda: reference(vol, rng),
            "ours_legacy": lambda: ours(vol, legacy, gen)}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # alternate, so drifting machine load hits both alike
        for k, fn in runs.items():
            w, c = _clock2(fn)
            wall[k].append(1e3 * w)
            cpu[k].append(1e3 * c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "channels": channels, "source": source, "repeats": repeats,
        "grid_ours_spatial": g_ours, "grid_reference_chained": g_ref, "grid_ours_legacy": g_leg,
        "legacy_equals_reference": bool(same),
        "ours_ms": med["ours"], "ours_legacy_ms": med["ours_legacy"], "reference_ms": med["reference"],
        "speedup": med["reference"] / med["ours"], "speedup_legacy": med["reference"] / med["ours_legacy"],
        "cpu_ms": med_cpu, "speedup_cpu": med_cpu["reference"] / med_cpu["ours"],
        "all_wall_ms": wall, "all_cpu_ms": cpu,
        "components_ours_wall_ms": components(vol, cfg, gen, repeats),
    }


def step_share(batch: int, repeats: int, step_ms: float, num_workers: int, per_sample_ms: float) -> dict:
    """In-step masking time (masks to device + voxel_loss_mask) for one batch at ROI 128, and the shares."""
    vol, _ = load_volume(1)
    cfg = MaskingConfig(grids=GRIDS, extra_mask_prob=1.0, entropy_estimator="unique")  # like for like
    gen = torch.Generator().manual_seed(0)
    choice = select_grid(vol, cfg)
    ratios = cell_mask_ratios(choice.entropy, cfg)
    masks = sample_stage_masks([choice.grid] * batch, [ratios] * batch, token_grids((ROI,) * 3), cfg, gen)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def in_step() -> None:
        on_dev = [m.to(dev, non_blocking=True) if m is not None else None for m in masks]
        voxel_loss_mask(on_dev, 2, cfg.loss_mask)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    in_step()
    in_step_ms = 1e3 * statistics.median(_clock(in_step) for _ in range(max(repeats, 5)))
    worker_ms = per_sample_ms * batch
    return {"batch": batch, "device": dev.type, "in_step_ms": in_step_ms, "step_ms": step_ms,
            # only meaningful when the in-step part ran on the device the step time was measured on
            "in_step_fraction": in_step_ms / step_ms if dev.type == "cuda" else None,
            "worker_ms_per_batch": worker_ms, "num_workers": num_workers,
            "worker_load": worker_ms / (num_workers * step_ms),
            "all_masking_fraction_if_not_overlapped": (worker_ms + in_step_ms) / step_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=110.0, help="training step time to compare with (ms)")
    parser.add_argument("--num-workers", type=int, default=2, help="loader workers per process (the engine: 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"roi": ROI, "grids": GRIDS, "threads": 1, "cpu_count": os.cpu_count(), "machine": platform.machine(),
               "processor": platform.processor(), "numpy": np.__version__, "torch": torch.__version__,
               "runs": [bench(c, args.repeats) for c in (1, 4)]}
    results["step_share"] = step_share(args.batch, args.repeats, args.step_ms, args.num_workers,
                                       results["runs"][0]["ours_ms"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for r in results["runs"]:
        comp = ", ".join(f"{k} {v:.1f}" for k, v in r["components_ours_wall_ms"].items())
        print(f"C={r['channels']}: ours {r['ours_ms']:.1f} ms (legacy cells {r['ours_legacy_ms']:.1f} ms), reference "
              f"{r['reference_ms']:.1f} ms per sample (wall); CPU ours {r['cpu_ms']['ours']:.1f} / reference "
              f"{r['cpu_ms']['reference']:.1f} ms; grid ours/ref {r['grid_ours_spatial']}/"
              f"{r['grid_reference_chained']}; legacy == reference: {r['legacy_equals_reference']}; {comp}")
    sh = results["step_share"]
    share = (f"= {sh['in_step_fraction']:.2%} of the {sh['step_ms']:.0f} ms step" if sh["in_step_fraction"] is not None
             else "on the CPU (on a GPU it is a device-side upsample of the token mask; no GPU here to time it)")
    print(f"left in the training step: {sh['in_step_ms']:.2f} ms per batch of {sh['batch']} {share}; in the loader "
          f"workers: {sh['worker_ms_per_batch']:.0f} ms per batch = {sh['worker_load']:.0%} of {sh['num_workers']} "
          f"workers' time at one {sh['step_ms']:.0f} ms step per batch (if it all ran in the step instead: "
          f"{sh['all_masking_fraction_if_not_overlapped']:.0%} of it)")
    c1, c4 = results["runs"]
    print(f"P3-masking ratio={c1['speedup']:.1f} c1_ours_ms={c1['ours_ms']:.1f} c1_ref_ms={c1['reference_ms']:.1f} "
          f"c4_ratio={c4['speedup']:.1f} c4_ours_ms={c4['ours_ms']:.1f} c4_ref_ms={c4['reference_ms']:.1f} "
          f"cpu_ratio_c1={c1['speedup_cpu']:.1f} cpu_ratio_c4={c4['speedup_cpu']:.1f} "
          f"legacy_exact={c1['legacy_equals_reference'] and c4['legacy_equals_reference']} "
          f"in_step_ms={sh['in_step_ms']:.2f} worker_load={sh['worker_load']:.2f}")


if __name__ == "__main__":
    main()
