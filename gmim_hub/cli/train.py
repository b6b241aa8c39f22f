"""`gmim train` (fine-tuning) and `gmim evaluate` (Dice / HD95 per class)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from gmim_hub.cli import options as opt
from gmim_hub.cli._common import console
from gmim_hub.config import GMIMConfig

if TYPE_CHECKING:
    from gmim_hub.engine.evaluate import EvalReport


class FinetuneProgress(opt.StepProgress):
    """`FinetuneCallback` drawing a rich progress bar: step, loss, lr, last and best validation Dice, ETA."""

    def __init__(self, label: str = "train") -> None:
        super().__init__(label)
        self.val = ""

    def describe(self, values: Mapping[str, float]) -> str:
        return super().describe(values) + self.val

    def on_validation(self, step: int, mean_dice: float, best_dice: float) -> None:
        self.val = f" val Dice {mean_dice:.3f} (best {best_dice:.3f})"


def _fmt(v: float, digits: int) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


def report_table(report: EvalReport, title: str = "evaluation") -> Table:
    """Per-class mean Dice and HD95 over the cases, and their mean (background excluded)."""
    table = Table(title=f"{title}: {len(report.cases)} case(s), split {report.split}")
    table.add_column("class")
    table.add_column("Dice", justify="right")
    table.add_column("HD95 (mm)", justify="right")
    for name in report.class_names:
        table.add_row(name, _fmt(report.dice[name], 4), _fmt(report.hd95[name], 2))
    table.add_row("[bold]mean", f"[bold]{_fmt(report.mean_dice, 4)}", f"[bold]{_fmt(report.mean_hd95, 2)}")
    return table


def _train_config(config: Path | None, preset: str | None, demo: bool, data: Path | None) -> GMIMConfig | None:
    """--config file, or --preset (a softmax preset takes out_channels / label names from the dataset.json's
    "labels"; a multi-label one such as brats21 keeps its regions, built from the label codes), or the
    demo config with --demo-data; None lets --init bring the config (a segmentation model's own, or one derived from
    a pre-training model and the dataset.json, see `_derived_config`)."""
    cfg = opt.config_from_options(config, preset)
    if cfg is not None and preset is not None:  # a preset takes its classes from the dataset.json
        from gmim_hub.engine.finetune_setup import preset_for_task  # torch and MONAI: not for `gmim train --help`

        cfg = preset_for_task(cfg, data)
    if cfg is not None:
        return cfg
    if demo:
        from gmim_hub.data.demo import demo_config

        return demo_config()
    return None


def _derived_config(init: str, revision: str | None, data: Path, show: bool = True) -> GMIMConfig | None:
    """For a pre-training --init without --config: its architecture with the dataset.json's classes and channels,
    shown in one table. None for any other --init (scratch needs a config; a segmentation model has its own)."""
    from gmim_hub.engine.finetune_setup import init_kind, task_config

    if init == "scratch" or init_kind(init, revision) != "pretraining":
        return None
    cfg, origin = task_config(init, data, revision)
    table = Table(title=f"task config: {init} + {data.name} (pass --config to change any of it)")
    for column in ("setting", "value", "from"):
        table.add_column(column)
    for name, source in origin.items():
        value: Any = cfg
        for part in name.split("."):
            value = getattr(value, part)
        text = ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        table.add_row(name, text, source)
    if show:
        console.print(table)
    return cfg


def train_command(
    data: Annotated[Path | None, typer.Option("--data", help="MSD dataset.json or JSON datalist (labelled).")] = None,
    output: opt.Output = Path("runs/train"),
    demo_data: Annotated[bool, typer.Option("--demo-data", help="Fine-tune on the embedded MNI152 tissue task "
                                                                "(written to OUTPUT/data).")] = False,
    init: Annotated[str, typer.Option(help="scratch | a pre-training folder/repo (its encoder) | a segmentation "
                                           "folder/repo.")] = "scratch",
    revision: Annotated[str | None, typer.Option(help="Hub revision of --init.")] = None,
    preset: Annotated[str | None, typer.Option(help="Model preset: tiny | base | brats21 | ct_abdomen (classes from "
                                                    "dataset.json, except brats21's TC/WT/ET).")] = None,
    config: opt.ConfigFile = None,
    base_dir: opt.BaseDir = None,
    fold: opt.Fold = None,
    fraction: Annotated[float, typer.Option(help="Fraction of the training volumes to use.")] = 1.0,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (or --epochs; default 1000, 200 with "
                                                   "--demo-data).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training volumes (or --steps).")] = None,
    batch_size: Annotated[int, typer.Option(help="Volumes per step.")] = 1,
    num_samples: Annotated[int, typer.Option(help="ROI crops per volume per step.")] = 2,
    lr: opt.Lr = 1e-4,
    weight_decay: opt.WeightDecay = 1e-5,
    warmup: opt.Warmup = 0,
    grad_clip: opt.GradClip = 1.0,
    loss: Annotated[str, typer.Option(help="dicece | dice.")] = "dicece",
    precision: opt.Precision = "auto",
    device: opt.Device = "auto",
    num_workers: opt.NumWorkers = 0,
    cache: opt.Cache = "none",
    no_cache: opt.NoCache = False,
    cache_dir: opt.CacheDir = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, data order and augmentation.")] = 0,
    val_every: Annotated[int, typer.Option(help="Steps between validations (0: only at the end).")] = 100,
    sw_batch_size: Annotated[int, typer.Option(help="Sliding-window batch size.")] = 1,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap.")] = 0.5,
    log_every: opt.LogEvery = 10,
    ckpt_every: opt.CkptEvery = 100,
    resume: opt.Resume = "auto",
    freeze_encoder: Annotated[bool, typer.Option(help="Train the decoder only.")] = False,
) -> None:
    """Fine-tune a Swin UNETR segmenter (from scratch, a GMIM pre-trained encoder, or a segmentation model)."""
    from gmim_hub.engine.finetune import FinetuneArgs, finetune

    opt.check_data_choice(data, demo_data)
    opt.check_output_folder(output)
    cache = opt.cache_choice(cache, no_cache)
    if demo_data and cache == "none" and not no_cache:
        cache = "memory"  # the demo volumes are small
    if steps is None and epochs is None:
        steps = 200 if demo_data else 1000
    args = FinetuneArgs(  # validated before anything is written
        data=str(data or output / "data" / "dataset.json"), output_dir=output, base_dir=base_dir, fold=fold,
        fraction=fraction, init=init, revision=revision, steps=steps, epochs=epochs, batch_size=batch_size,
        num_samples=num_samples, lr=lr, weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip, loss=loss,
        precision=precision, device=device, num_workers=num_workers, cache=cache, cache_dir=cache_dir, seed=seed,
        val_every=val_every, sw_batch_size=sw_batch_size, overlap=overlap, log_every=log_every,
        ckpt_every=ckpt_every, resume=resume, freeze_encoder=freeze_encoder,
    )
    if demo_data:
        from gmim_hub.data.demo import build_demo_dataset

        args = dataclasses.replace(args, data=str(build_demo_dataset(output / "data").dataset_json))
    cfg = _train_config(config, preset, demo_data, Path(args.data))
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 prints
    if cfg is None:
        cfg = _derived_config(init, revision, Path(args.data), show=main_rank)
    bar = FinetuneProgress() if main_rank else None
    try:
        result = finetune(args, cfg, callback=bar)
    finally:
        if bar is not None:
            bar.close()
    if not main_rank:
        return
    if result.report is not None:
        console.print(report_table(result.report, f"validation of the best weights (step {result.best_step})"))
    console.print(f"[green]done[/] at step {result.final_step}: model in {result.model_dir}, validation report in "
                  f"{output / 'validation.json'}, metrics in {output / 'metrics.jsonl'}, checkpoints in "
                  f"{output / 'checkpoints'}, TensorBoard logs in {output / 'tensorboard'}")


def evaluate_command(
    model: Annotated[str, typer.Argument(help="Segmentation model: a folder from save_pretrained or a Hub repo.")],
    data: Annotated[Path | None, typer.Option("--data", help="MSD dataset.json or JSON datalist.")] = None,
    demo_data: Annotated[bool, typer.Option("--demo-data", help="Evaluate on the embedded MNI152 tissue task "
                                                                "(written next to --output, in data/).")] = False,
    split: Annotated[str, typer.Option(help="validation | training | all.")] = "validation",
    fold: Annotated[int | None, typer.Option(help="Validation fold of the datalist.")] = None,
    base_dir: Annotated[Path | None, typer.Option(help="Base folder for relative datalist paths.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of MODEL.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON report path.")] = Path("evaluation.json"),
    sw_batch_size: Annotated[int, typer.Option(help="Sliding-window batch size.")] = 1,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap.")] = 0.5,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | a torch device such as cuda:1.")] = "auto",
) -> None:
    """Dice and HD95 (mm) per class of a segmentation model on a datalist; a table here, JSON on disk."""
    from gmim_hub.engine.evaluate import evaluate

    opt.check_data_choice(data, demo_data)
    if demo_data:
        from gmim_hub.data.demo import build_demo_dataset

        data = build_demo_dataset(output.parent / "data").dataset_json
    assert data is not None
    with console.status("evaluating"):
        report = evaluate(model, data, base_dir=base_dir, split=split, fold=fold, sw_batch_size=sw_batch_size,
                          overlap=overlap, output_json=output, revision=revision, device=device)
    console.print(report_table(report, f"{model}"))
    console.print(f"[green]report written to[/] {output}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
