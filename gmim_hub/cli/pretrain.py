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
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gmim_hub.cli._common import console, handle_errors
from gmim_hub.config import GMIMConfig, get_preset
from gmim_hub.errors import ConfigError


class RichProgress:
    """`PretrainCallback` drawing a rich progress bar: step, loss components, lr, elapsed and ETA."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task: TaskID | None = None

    def on_start(self, start_step: int, total_steps: int) -> None:
        self.progress.start()
        if start_step:
            console.print(f"resuming at step {start_step} of {total_steps}")
        self.task = self.progress.add_task("pretrain", total=total_steps, completed=start_step, info="")

    def on_step(self, step: int, values: Mapping[str, float]) -> None:
        info = (f"loss {values['loss']:.4f} cc {values['cc']:.3g} rec {values['rec']:.4f} "
                f"lr {values['lr']:.2e}")
        if self.task is not None:
            self.progress.update(self.task, completed=step, info=info)

    def on_end(self, step: int) -> None:
        self.progress.stop()

    def close(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


def _config(config: Path | None, preset: str | None, demo: bool) -> GMIMConfig:
    if config is not None and preset is not None:
        raise ConfigError("pass either --config or --preset, not both")
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"--config {config}: no such file; pass a config.json (e.g. from save_pretrained)")
        return GMIMConfig.from_json_file(config)
    if preset is not None:
        return get_preset(preset)
    if demo:
        from gmim_hub.data.demo import demo_config

        return demo_config()
    return get_preset("base")


def pretrain_command(
    data: Annotated[str | None, typer.Option("--data", help="Folder of NIfTI files, MSD dataset.json or JSON "
                                                            "datalist.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("runs/pretrain"),
    base_dir: Annotated[Path | None, typer.Option(help="Base folder for relative datalist paths.")] = None,
    fold: Annotated[int | None, typer.Option(help="Held-out validation fold of the datalist.")] = None,
    demo_data: Annotated[bool, typer.Option("--demo-data", help="Pre-train on the embedded MNI152 T1 (written to "
                                                                "OUTPUT/data).")] = False,
    preset: Annotated[str | None, typer.Option(help="Model preset: tiny | base (default: base; tiny-based demo "
                                                    "config with --demo-data).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A config.json instead of a preset.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 4000,
    batch_size: Annotated[int, typer.Option(help="Volumes per step (per process).")] = 2,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 4e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-5,
    warmup: Annotated[int, typer.Option(help="Linear warmup steps before the cosine decay.")] = 500,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm (0 disables).")] = 1.0,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 | auto.")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    num_workers: Annotated[int, typer.Option(help="Data-loader workers per process.")] = 2,
    cache: Annotated[bool, typer.Option(help="Cache preprocessed volumes in memory.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of weights, data order, augmentation and masks.")] = 0,
    resume: Annotated[str, typer.Option(help="auto (newest good checkpoint) | never | a checkpoint path.")] = "auto",
    log_every: Annotated[int, typer.Option(help="Steps between metrics records.")] = 10,
    eval_every: Annotated[int, typer.Option(help="Steps between validations (0: never).")] = 200,
    ckpt_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: only at the end).")] = 100,
    preview_every: Annotated[int, typer.Option(help="Steps between PNG previews (0: never).")] = 200,
) -> None:
    """Pre-train a GMIM model (spec 4.1 defaults: AdamW 4e-4, warmup 500 + cosine, 4000 steps, batch 2)."""
    from gmim_hub.engine.pretrain import PretrainArgs, pretrain

    if (data is None) == (not demo_data):
        raise ConfigError("pass exactly one of --data PATH or --demo-data")
    cfg = _config(config, preset, demo_data)
    args = PretrainArgs(  # validated before anything is written
        data=str(data or output / "data"), output_dir=output, base_dir=base_dir, fold=fold, steps=steps, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip, precision=precision, device=device,
        num_workers=num_workers, cache=cache, seed=seed, resume=resume, log_every=log_every,
        eval_every=eval_every, ckpt_every=ckpt_every, preview_every=preview_every,
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
    app.command("pretrain")(handle_errors(pretrain_command))
