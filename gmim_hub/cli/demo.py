"""`gmim demo`: the whole story (data, pre-training, fine-tuning, evaluation, previews, export, serving) in one
command. The steps are `gmim_hub.demo.DEMO_STEPS`; this module only draws them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from gmim_hub.cli._common import console
from gmim_hub.cli.pretrain import RichProgress
from gmim_hub.cli.train import FinetuneProgress, report_table


def demo_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("demo_output"),
    quick: Annotated[bool, typer.Option("--quick", help="A much shorter run (~1-2 minutes), for CI.")] = False,
) -> None:
    """The main job, end to end on real MRI (nilearn's MNI152 template) in minutes on a CPU. Steps:

    1. data: build the labelled MNI152 tissue dataset (background, CSF, GM, WM; 2 mm).

    2. pretrain: GMIM pre-training of the tiny preset on the unlabelled T1 volumes.

    3. finetune: fine-tune a Swin UNETR from the pre-trained encoder on the posterior part.

    4. evaluate: Dice and HD95 (mm) per class on the held-out anterior part.

    5. previews: PNGs of the validation prediction and the pre-training reconstructions.

    6. export: ONNX export of the fine-tuned model, checked against PyTorch.

    7. serve: a Triton model repository, a local Triton server (CPU, loopback) and one gmim infer request, checked
    against local ONNX Runtime prediction.

    Re-running with the same --output resumes: finished pre-training, fine-tuning and export are not redone (the
    summary says which), the dataset is rebuilt only if its files changed, and evaluation, previews and the serving
    check run again."""
    from gmim_hub.demo import run_demo  # torch and MONAI: only when the demo runs, not for `gmim demo --help`

    pre, fine = RichProgress(), FinetuneProgress("finetune")

    def on_step(step: Any, phase: str, seconds: float) -> None:
        if phase == "start":
            console.rule(f"[bold]{step.title}")
        else:
            console.print(f"[dim]{step.name} took {seconds:.1f} s")

    try:
        ctx = run_demo(output, quick=quick, pretrain_callback=pre, finetune_callback=fine, on_step=on_step)
    finally:
        pre.close()
        fine.close()
    if ctx.report is not None:
        console.print(report_table(ctx.report, "validation (held-out part of the template)"))
    where = Table(title="where things went", show_header=False)
    for label, path in ctx.artifacts.items():
        where.add_row(label, str(path))
    console.print(where)
    summary = Table(title=f"summary ({'quick' if quick else 'full'} demo, {ctx.timings['total']:.0f} s)",
                    show_header=False)
    for label, value in ctx.summary.items():
        summary.add_row(label, value)
    summary.add_row("time per step", ", ".join(f"{k} {v:.0f} s" for k, v in ctx.timings.items() if k != "total"))
    console.print(summary)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
