"""`gmim ablate`: GMIM adaptive masking vs uniform random masking vs no pre-training, at several label fractions."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from gmim_hub.cli._common import console
from gmim_hub.errors import ConfigError


def _numbers(text: str, kind: type, name: str) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise ConfigError(f"--{name} must be comma-separated {kind.__name__}s such as "
                          f"{'0.25,0.5,1' if kind is float else '0,1,2'}, got {text!r}") from e


def ablate_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("ablation"),
    quick: Annotated[bool, typer.Option("--quick", help="A few steps per run (CI): checks the protocol, not "
                                                        "the method.")] = False,
    fractions: Annotated[str, typer.Option(help="Label fractions (of the training slabs), comma-separated.")]
    = "0.25,0.5,1",
    seeds: Annotated[str, typer.Option(help="Fine-tuning seeds, comma-separated (>= 2 for an interval).")] = "0,1,2",
    arms: Annotated[str, typer.Option(help="Arms: gmim, uniform, scratch (comma-separated).")] = "gmim,uniform,scratch",
    pretrain_steps: Annotated[int | None, typer.Option(help="Pre-training steps per arm (default 40, 2 with "
                                                            "--quick).")] = None,
    finetune_steps: Annotated[int | None, typer.Option(help="Fine-tuning steps per run (default 60, 2 with "
                                                            "--quick).")] = None,
    pretrain_batch_size: Annotated[int | None, typer.Option(help="Volumes per pre-training step (default 2, 1 "
                                                                 "with --quick).")] = None,
    slabs: Annotated[int, typer.Option(help="Axial slabs the labelled training part is cut into.")] = 4,
    spacing: Annotated[float, typer.Option(help="Isotropic spacing (mm) the demo volumes are resampled to; 4 is "
                                                "~8x cheaper than 2.")] = 2.0,
    window: Annotated[str | None, typer.Option(help="Fine-tuning window D,H,W (multiples of 32; default the "
                                                    "pre-training ROI, 64,64,64).")] = None,
) -> None:
    """Pre-train with (a) GMIM adaptive hierarchical masking and (b) uniform random masking at the same mean ratio,
    take (c) no pre-training, fine-tune each at every label fraction and seed with the same budget on the embedded
    MNI152 demo data, and write the Dice table (mean and 95% interval over seeds) as JSON and markdown plus a PNG
    plot. One template subject: differences within the intervals are noise. Re-running in the same folder resumes."""
    from gmim_hub.engine.ablation import AblationSettings, run_ablation

    default = AblationSettings()
    pre_steps = pretrain_steps or (2 if quick else default.pretrain_steps)
    fine_steps = finetune_steps or (2 if quick else default.finetune_steps)
    settings = AblationSettings(
        fractions=_numbers(fractions, float, "fractions"), seeds=_numbers(seeds, int, "seeds"),
        arms=tuple(a.strip() for a in arms.split(",") if a.strip()), slabs=slabs,
        pretrain_steps=pre_steps, finetune_steps=fine_steps,
        pretrain_warmup=pre_steps // 10, finetune_warmup=fine_steps // 10,  # 10% warmup, as the defaults
        pretrain_batch_size=pretrain_batch_size or (1 if quick else default.pretrain_batch_size),
        ratio_crops=4 if quick else default.ratio_crops,
    )
    from gmim_hub.data.demo import demo_config

    base = demo_config()
    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, spacing=(spacing,) * 3))
    fine = dataclasses.replace(cfg, roi_size=_numbers(window, int, "window")) if window else cfg
    result = run_ablation(output, settings, config=cfg, finetune_config=fine,
                          on_event=lambda text: console.print(f"[bold]{text}"))
    console.print((result.output_dir / "ablation.md").read_text(), markup=False)
    console.print(f"[green]done[/]: table {result.files['json']} and {result.files['markdown']}, plot "
                  f"{result.files['plot']}, runs under {result.output_dir}")


def register(app: typer.Typer) -> None:
    app.command("ablate")(ablate_command)
