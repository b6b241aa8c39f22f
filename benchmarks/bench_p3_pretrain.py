"""P3: GMIM pre-training steps per second, gmim-hub's engine against a re-creation of the original approach.

Both sides train the same network (same initial weights, same AdamW, same loss, same precision, same batches of
two 3-D views cropped from the MNI152 1 mm template), alternating step by step in one process:

- gmim: the per-sample grid choice, cell ratios and the batch's token masks (`select_grid` + `cell_mask_ratios` +
  `sample_stage_masks`, what `GridChoiced` and `MaskingCollate` do in the loader workers; counted here inside the
  step, as if no worker overlapped it), then the engine's own `forward_step` + `update_step` (the masks go into
  the model; only the voxel loss mask is computed in the step);
- baseline: `benchmarks/original_masking.py`: a stateful mask layer inside the encoder's forward that computes
  per-cell `np.unique` entropies on the batch (chained cells) and per-cell shuffled masks, then the same loss,
  backward and optimizer step.

The masking share of a step is timed inside each side (grid choice + mask sampling + loss mask).

    python benchmarks/bench_p3_pretrain.py [--quick] [--feature-size 12] [--roi 64] [--batch 2] [--device cpu]
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from benchmarks.common import alternate, base_parser, final_line, set_threads, summary, write_result
from benchmarks.original_masking import STATEFUL, OriginalMaskedEncoder


class Clock:
    """Accumulates seconds spent in wrapped functions (the masking share of a step)."""

    def __init__(self, sync) -> None:
        self.total, self.sync = 0.0, sync

    def wrap(self, fn):
        def timed(*a, **kw):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.sync()
            self.total += time.perf_counter() - t0
            return out
        return timed


def make_config(args):
    from gmim_hub.config import PRESETS, MaskingConfig

    roi = (args.roi,) * 3
    grids = (4, 8, 16) if args.roi >= 128 else (2, 4, 8)  # the original needs every token grid divisible by g
    return dataclasses.replace(PRESETS["base"], feature_size=args.feature_size, roi_size=roi,
                               masking=MaskingConfig(grids=grids, entropy_estimator="unique"))  # as measured


def mni_views(roi: int, batch: int, n_batches: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n_batches` pairs (x, y), each (batch, 1, roi, roi, roi): overlapping crops of the z-scored MNI152 T1,
    y with a random contrast change (the target view's intensity augmentation)."""
    from nilearn.datasets import load_mni152_template

    vol = torch.from_numpy(load_mni152_template(resolution=1).get_fdata()).float()
    vol = torch.nn.functional.pad(vol, [max(0, roi - s) for s in reversed(vol.shape) for _ in (0, 1)])
    brain = vol[vol > 0]
    vol = (vol - brain.mean()) / brain.std()
    g = torch.Generator().manual_seed(seed)

    def crop() -> tuple[torch.Tensor, torch.Tensor]:
        start = [int(torch.randint(0, s - roi + 1, (1,), generator=g)) for s in vol.shape]
        shift = [min(max(st + int(torch.randint(-16, 17, (1,), generator=g)), 0), s - roi)
                 for st, s in zip(start, vol.shape, strict=True)]
        x = vol[tuple(slice(s, s + roi) for s in start)]
        y = vol[tuple(slice(s, s + roi) for s in shift)] * (0.8 + 0.4 * torch.rand(1, generator=g))
        return x[None], y[None]

    out = []
    for _ in range(n_batches):
        pairs = [crop() for _ in range(batch)]
        out.append((torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])))
    return out


def gmim_side(cfg, model, device, precision, sync):
    """A zero-argument step of gmim's engine on the next batch; returns (step_fn, mask_clock, in_step_clock).

    What the engine's loader workers do (grid choice, ratios, `sample_stage_masks` via `MaskingCollate`) runs here
    inside the timed step, as if no worker overlapped it, on `mask_clock`; `in_step_clock` times the masking work
    left in the training step itself (`voxel_loss_mask` and moving the masks to the device)."""
    from gmim_hub import method
    from gmim_hub.engine import pretrain_step as ps
    from gmim_hub.engine.pretrain_setup import Run
    from gmim_hub.engine.schedule import warmup_cosine_scheduler
    from gmim_hub.masking import (
        GRID_KEY,
        MASKS_KEY,
        RATIOS_KEY,
        cell_mask_ratios,
        sample_stage_masks,
        select_grid,
        token_grids,
    )

    clock, in_step = Clock(sync), Clock(sync)
    method.voxel_loss_mask = in_step.wrap(method.voxel_loss_mask)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=1e-5)
    grids = token_grids(cfg.roi_size, cfg.patch_size)
    run = Run(config=cfg, model=model, optimizer=opt, scheduler=warmup_cosine_scheduler(opt, 500, 4000),
              scaler=None, device=device, precision=precision,
              train_loader=None, val_loader=None, val_data=None, train_args={})
    train_args = SimpleNamespace(grad_clip=1.0)
    generator = torch.Generator().manual_seed(2)

    @clock.wrap
    def worker_masking(x: torch.Tensor) -> dict:
        choices = [select_grid(x[b].numpy(), cfg.masking) for b in range(x.shape[0])]
        g, r = [c.grid for c in choices], [cell_mask_ratios(c.entropy, cfg.masking) for c in choices]
        return {GRID_KEY: g, RATIOS_KEY: r, MASKS_KEY: sample_stage_masks(g, r, grids, cfg.masking, generator)}

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        batch = {"image": x, "target": y, **worker_masking(x)}
        result = ps.forward_step(run, batch)
        ps.update_step(run, result, train_args)
        return result.components["loss"]
    return step, clock, in_step


def baseline_side(cfg, model, device, precision, sync):
    """The original approach on a copy of the same network: the stateful in-forward mask layer."""
    from gmim_hub.engine.precision import autocast_context, optimizer_step
    from gmim_hub.losses import gmim_loss

    encoder = OriginalMaskedEncoder(cfg).to(device)
    encoder.load_state_dict(model.swinViT.state_dict())
    model.swinViT = encoder
    clock = Clock(sync)
    layer = encoder.mask_layer
    layer.initial = clock.wrap(layer.initial)
    layer._mask_token = clock.wrap(layer._mask_token)
    layer.voxel_loss_mask = clock.wrap(layer.voxel_loss_mask)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=1e-5)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.to(device), y.to(device)
        with autocast_context(device, precision):
            out = model(x, y, STATEFUL)
            vmask = layer.voxel_loss_mask(cfg.patch_size).to(device)
            losses = gmim_loss(out.z_x, out.z_y, out.reconstruction, x, vmask, cfg.loss)
        optimizer_step(losses.total, opt, model.parameters(), None, 1.0)
        return float(losses.total.detach())
    return step, clock


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--feature-size", type=int, default=12, help="Swin UNETR width (the paper: 48)")
    p.add_argument("--roi", type=int, default=64,
                   help="crop size; 64 (grids 2/4/8) fits 24 GB, the paper's 128 (grids 4/8/16) needs ~16 GB per "
                        "side on the CPU (use it with --device cuda)")
    p.add_argument("--batch", type=int, default=2, help="volumes per step (the paper: 2)")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | auto (the engine's default), both sides")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    set_threads(args.threads)
    from gmim_hub.engine.precision import resolve_precision
    from gmim_hub.models.pretraining import PretrainingNetwork

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    precision = resolve_precision(args.precision, device)
    cfg = make_config(args)
    torch.manual_seed(0)
    model = PretrainingNetwork(cfg).to(device).train()
    repeats = args.repeats or (1 if args.quick else 4)
    batches = mni_views(args.roi, args.batch, repeats + args.warmup)
    gmim_step, gmim_clock, in_step_clock = gmim_side(cfg, model, device, precision, sync)
    base_step, base_clock = baseline_side(cfg, copy.deepcopy(model), device, precision, sync)
    cursor = {"gmim": 0, "baseline": 0}
    losses: dict[str, list[float]] = {"gmim": [], "baseline": []}

    def runner(name, fn):
        def go() -> float:
            x, y = batches[cursor[name] % len(batches)]
            cursor[name] += 1
            sync()
            t0 = time.perf_counter()
            losses[name].append(fn(x, y))
            sync()
            return time.perf_counter() - t0
        return go

    clocks = {"gmim": gmim_clock, "baseline": base_clock, "gmim-in-step": in_step_clock}

    def reset() -> None:
        for c in clocks.values():
            c.total = 0.0

    times = alternate({"gmim": runner("gmim", gmim_step), "baseline": runner("baseline", base_step)},
                      repeats=repeats, warmup=args.warmup, after_warmup=reset)
    print("losses (both sides train the same weights on the same batches):",
          {n: [round(v, 4) for v in vals] for n, vals in losses.items()})
    report(args, cfg, precision, times, clocks)


def report(args, cfg, precision, times, clocks) -> None:
    """Print per-side rows, write the JSON and the final line. Masking fraction = masking seconds / step seconds,
    both summed over the timed steps."""
    rows = {}
    for name, t in times.items():
        rows[name] = {**summary(t), "steps_per_s": 1.0 / summary(t)["median"],
                      "masking_s_per_step": clocks[name].total / len(t),
                      "masking_fraction": clocks[name].total / sum(t)}
        print(f"{name:9s} median step {rows[name]['median']:.3f} s ({rows[name]['steps_per_s']:.3f} steps/s), "
              f"masking {rows[name]['masking_s_per_step']:.3f} s/step = {rows[name]['masking_fraction']:.1%}")
    t = times["gmim"]
    rows["gmim"]["in_step_masking_s_per_step"] = clocks["gmim-in-step"].total / len(t)
    rows["gmim"]["in_step_masking_fraction"] = clocks["gmim-in-step"].total / sum(t)
    print(f"gmim masking left in the training step (voxel loss mask; the rest runs in loader workers): "
          f"{rows['gmim']['in_step_masking_s_per_step'] * 1e3:.2f} ms/step = "
          f"{rows['gmim']['in_step_masking_fraction']:.3%}")
    ratio = rows["gmim"]["steps_per_s"] / rows["baseline"]["steps_per_s"]
    write_result("p3_pretrain", {
        "measure": "pre-training steps/s", "config": {"feature_size": cfg.feature_size, "roi": cfg.roi_size,
                                                      "grids": cfg.masking.grids, "batch": args.batch,
                                                      "precision": precision, "device": args.device},
        "note": "masking time includes grid choice and mask sampling on both sides, counted inside the step for gmim "
                "although the engine runs them in loader workers; in_step_* is what stays in gmim's step",
        "quick": args.quick, "ratio": ratio, "sides": rows,
        "target": {"ratio": 3.0, "masking_fraction": 0.05}}, enabled=not args.no_write)
    print(final_line("P3", ratio, None, masking_fraction=rows["gmim"]["masking_fraction"],
                     in_step_masking_fraction=rows["gmim"]["in_step_masking_fraction"],
                     baseline_masking_fraction=rows["baseline"]["masking_fraction"],
                     gmim_step_s=rows["gmim"]["median"], baseline_step_s=rows["baseline"]["median"]))


if __name__ == "__main__":
    main()
