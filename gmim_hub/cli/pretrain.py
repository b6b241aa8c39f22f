"""`gmim pretrain`: GMIM self-supervised pre-training on a datalist or the embedded MNI152 demo data.

Data-parallel: `torchrun --nproc-per-node N -m gmim_hub.cli.main pretrain ...` (gloo on the CPU, NCCL on GPUs).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer

from gmim_hub.cli import options as opt
from gmim_hub.cli._common import console
from gmim_hub.config import GMIMConfig, get_preset


class RichProgress(opt.StepProgress):
    """`PretrainCallback` drawing a rich progress bar: step, loss components, lr, elapsed and ETA."""

    def __init__(self) -> None:
        super().__init__("pretrain")

    def describe(self, values: Mapping[str, float]) -> str:
        return f"loss {values['loss']:.4f} cc {values['cc']:.3g} rec {values['rec']:.4f} lr {values['lr']:.2e}"


def _config(config: Path | None, preset: str | None, demo: bool) -> GMIMConfig:
    cfg = opt.config_from_options(config, preset)
    if cfg is not None:
        return cfg
    if demo:
        from gmim_hub.data.demo import demo_config

        return demo_config()
    return get_preset("base")


def pretrain_command(
    data: Annotated[str | None, typer.Option("--data", help="Folder of NIfTI files, MSD dataset.json or JSON "
                                                            "datalist.")] = None,
    output: opt.Output = Path("runs/pretrain"),
    base_dir: opt.BaseDir = None,
    fold: opt.Fold = None,
    demo_data: Annotated[bool, typer.Option("--demo-data", help="Pre-train on the embedded MNI152 T1 (written to "
                                                                "OUTPUT/data).")] = False,
    preset: Annotated[str | None, typer.Option(help="Model preset: tiny | base | brats21 | ct_abdomen (default: base; "
                                                    "tiny-based demo config with --demo-data).")] = None,
    config: opt.ConfigFile = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 4000,
    batch_size: Annotated[int, typer.Option(help="Volumes per step (per process).")] = 2,
    lr: opt.Lr = 4e-4,
    weight_decay: opt.WeightDecay = 1e-5,
    warmup: opt.Warmup = 500,
    grad_clip: opt.GradClip = 1.0,
    precision: opt.Precision = "auto",
    device: opt.Device = "auto",
    num_workers: opt.NumWorkers = 2,
    cache: opt.Cache = "none",
    no_cache: opt.NoCache = False,
    cache_dir: opt.CacheDir = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, data order, augmentation and masks.")] = 0,
    resume: opt.Resume = "auto",
    log_every: opt.LogEvery = 10,
    eval_every: Annotated[int, typer.Option(help="Steps between validations (0: never).")] = 200,
    ckpt_every: opt.CkptEvery = 100,
    preview_every: Annotated[int, typer.Option(help="Steps between PNG previews (0: never).")] = 200,
) -> None:
    """Pre-train a GMIM model (the paper's defaults: AdamW 4e-4, warmup 500 + cosine, 4000 steps, batch 2)."""
    from gmim_hub.engine.pretrain import PretrainArgs, pretrain

    opt.check_data_choice(data, demo_data)
    opt.check_output_folder(output)
    cfg = _config(config, preset, demo_data)
    args = PretrainArgs(  # validated before anything is written
        data=str(data or output / "data"), output_dir=output, base_dir=base_dir, fold=fold, steps=steps, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip, precision=precision, device=device,
        num_workers=num_workers, cache=opt.cache_choice(cache, no_cache), cache_dir=cache_dir, seed=seed,
        resume=resume, log_every=log_every, eval_every=eval_every, ckpt_every=ckpt_every, preview_every=preview_every,
    )
    if demo_data:
        from gmim_hub.data.demo import build_demo_dataset

        args = dataclasses.replace(args, data=str(build_demo_dataset(output / "data").pretrain_dir))
    main_rank = int(os.environ.get("RANK", "0")) == 0
    bar = RichProgress() if main_rank else None
    try:
        result = pretrain(args, cfg, callback=bar)
    finally:
        if bar is not None:
            bar.close()
    if main_rank:
        console.print(f"[green]done[/] at step {result.final_step}: model in {result.model_dir}, "
                      f"metrics in {output / 'metrics.jsonl'}, checkpoints in {output / 'checkpoints'}, "
                      f"previews in {output / 'previews'}, TensorBoard logs in {output / 'tensorboard'}")


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
