"""Is the data loader or the model the bottleneck? Volumes/s of the real pre-training loader (load, orient,
resample, normalise, two-view crops, grid choice, mask draws) for each cache mode and worker count, against the time
of one optimizer step of the model on the same batch size.

    python benchmarks/bench_loader.py [--quick] [--workers 0 1 2] [--batch-size 2]

Data: the MNI152 demo volumes (nilearn), the demo config (tiny preset, 2 mm). Each (cache, workers) cell iterates
fresh loaders, epoch after epoch, until `--batches` batches came out (the first batch, where the workers start, is
not timed). Cache build time (memory: at dataset creation; disk: the first, cold pass) is reported apart from the
steady state. If the loader delivers fewer volumes/s than a step consumes (batch / step time), the GPU or CPU waits
for data: raise --num-workers or turn a cache on. On a shared machine both numbers move with the load average,
which the result file records; compare the cells of one run with each other, not across machines.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import base_parser, set_threads, write_result


def _pipeline(cfg: Any, data: list[dict[str, Any]], mode: str, cache_dir: Path) -> tuple[Any, float]:
    from gmim_hub.data import make_dataset, pretrain_transforms
    from gmim_hub.engine.pretrain_setup import _mask_transforms

    t0 = time.perf_counter()
    ds = make_dataset(data, pretrain_transforms(cfg, train=True, extra=_mask_transforms(cfg)), cache=mode,
                      cache_dir=cache_dir)
    return ds, time.perf_counter() - t0


def _volumes_per_s(ds: Any, cfg: Any, workers: int, batch: int, batches: int) -> float:
    from gmim_hub.data import make_loader
    from gmim_hub.masking import MaskingCollate, token_grids

    collate = MaskingCollate(cfg.masking, token_grids(cfg.roi_size, cfg.patch_size))
    seen, t0, epoch = 0, None, 0
    while seen < batches + 1:
        dl = make_loader(ds, batch_size=batch, shuffle=True, num_workers=workers, seed=0, epoch=epoch,
                         collate_fn=collate)
        for _ in dl:
            seen += 1
            if seen == 1:
                t0 = time.perf_counter()  # after the first batch: worker start-up is not steady state
            if seen == batches + 1:
                break
        epoch += 1
    assert t0 is not None
    return batches * batch / (time.perf_counter() - t0)


def _step_seconds(cfg: Any, ds: Any, batch: int, repeats: int) -> float:
    """Median seconds of one optimizer step (masks, forward, GMIM loss, backward, AdamW) on a real batch."""
    import torch

    from gmim_hub.data import make_loader
    from gmim_hub.engine.pretrain import PretrainArgs
    from gmim_hub.engine.pretrain_setup import Run
    from gmim_hub.engine.pretrain_step import forward_step, update_step  # the step the engine runs
    from gmim_hub.engine.schedule import warmup_cosine_scheduler
    from gmim_hub.masking import MaskingCollate, token_grids
    from gmim_hub.models.hub_models import GMIMForPretraining

    args = PretrainArgs(data=".", output_dir=".", steps=10, warmup=1, batch_size=batch, precision="fp32",
                        device="cpu")
    dl = make_loader(ds, batch_size=batch, shuffle=False, num_workers=0, seed=0,
                     collate_fn=MaskingCollate(cfg.masking, token_grids(cfg.roi_size, cfg.patch_size)))
    batch_data = next(iter(dl))
    model = GMIMForPretraining(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    run = Run(config=cfg, model=model, optimizer=opt, scheduler=warmup_cosine_scheduler(opt, 1, 10), scaler=None,
              device=torch.device("cpu"), precision="fp32", train_loader=lambda e: None, val_loader=None,
              val_data=None, train_args={})
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        update_step(run, forward_step(run, batch_data), args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--caches", nargs="+", default=["none", "memory", "disk"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--batches", type=int, default=None, help="timed batches per cell (default 6, 3 with --quick)")
    a = p.parse_args()
    set_threads(a.threads)
    from gmim_hub.data import build_demo_dataset, demo_config, load_datalist

    batches = a.batches or (3 if a.quick else 6)
    root = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        paths = build_demo_dataset(root / "data")
        data = load_datalist(paths.pretrain_dir)
        cfg = demo_config()
        rows = []
        step_s = None
        for mode in a.caches:
            cache_dir = root / f"cache-{mode}"
            ds, build_s = _pipeline(cfg, data, mode, cache_dir)
            if mode == "disk":  # the cold pass writes the entries
                t0 = time.perf_counter()
                for i in range(len(ds)):
                    ds[i]
                build_s += time.perf_counter() - t0
            if step_s is None:
                step_s = _step_seconds(cfg, ds, a.batch_size, 2 if a.quick else 3)
            for w in a.workers:
                vps = _volumes_per_s(ds, cfg, w, a.batch_size, batches)
                rows.append({"cache": mode, "workers": w, "volumes_per_s": round(vps, 3),
                             "cache_build_s": round(build_s, 2), "load_avg": list(os.getloadavg())})
                print(f"cache {mode:6s} workers {w}: {vps:6.2f} volumes/s (cache build {build_s:.1f} s)", flush=True)
        assert step_s is not None
        need = a.batch_size / step_s
        print(f"model step (batch {a.batch_size}): {step_s:.2f} s -> consumes {need:.2f} volumes/s")
        for r in rows:
            r["bottleneck"] = "data" if r["volumes_per_s"] < need else "model"
        write_result("loader", {"batch_size": a.batch_size, "timed_batches": batches, "step_s": round(step_s, 3),
                                "model_volumes_per_s": round(need, 3), "volumes": len(data), "rows": rows,
                                "note": "shared 2-core machine; compare cells of one run only"},
                     enabled=not a.no_write)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
