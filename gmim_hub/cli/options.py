"""Options and helpers that commands share, defined once so that their names, help and checks cannot drift apart:
`gmim pretrain` / `gmim train` (training), and `gmim predict` / `gmim infer` (volumes in, label maps out). Defaults
stay at each command (they differ: e.g. the output folder and warmup). Nothing here imports torch or MONAI."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gmim_hub.cli._common import console
from gmim_hub.config import GMIMConfig, get_preset
from gmim_hub.errors import ConfigError

Output = Annotated[Path, typer.Option("--output", "-o", help="Output folder.")]
BaseDir = Annotated[Path | None, typer.Option(help="Base folder for relative datalist paths.")]
Fold = Annotated[int | None, typer.Option(help="Held-out validation fold of the datalist.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="A config.json instead of a preset.")]
Lr = Annotated[float, typer.Option(help="Peak learning rate (AdamW).")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
Warmup = Annotated[int, typer.Option(help="Linear warmup steps before the cosine decay.")]
GradClip = Annotated[float, typer.Option(help="Max gradient norm (0 disables).")]
Precision = Annotated[str, typer.Option(help="fp32 | bf16 | fp16 | auto.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda.")]
NumWorkers = Annotated[int, typer.Option(help="Data-loader workers per process.")]
Cache = Annotated[str, typer.Option(  # a bare --cache is --cache memory (`_common.OPTIONAL_VALUES`)
    "--cache", metavar="[none|memory|disk]",
    help="Keep the deterministic preprocessing (load, orient, resample, normalise): none; memory (per process); "
         "disk (in --cache-dir, reused across runs and ranks). A bare --cache means memory.")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Same as --cache none (kept for older scripts).")]
CacheDir = Annotated[Path | None, typer.Option(help="Folder of the --cache disk entries (default OUTPUT/cache).")]
Resume = Annotated[str, typer.Option(help="auto (newest good checkpoint) | never | a checkpoint path.")]
LogEvery = Annotated[int, typer.Option(help="Steps between metrics records.")]
CkptEvery = Annotated[int, typer.Option(help="Steps between checkpoints (0: only at the end).")]

# gmim predict and gmim infer
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs (never an input).")]
MaxMemoryGb = Annotated[float | None, typer.Option(
    help="Refuse volumes that would need more memory than this (GB, estimated from the header). Default: "
         "$GMIM_MAX_MEMORY_GB, else 80% of the machine's memory.")]
StrictInput = Annotated[bool, typer.Option("--strict-input", help="Refuse (exit 2) an input whose intensities are far "
                                           "outside the model's training data, instead of warning.")]
Series = Annotated[str | None, typer.Option(help="SeriesInstanceUID to read when a DICOM folder holds several.")]
OutFormat = Annotated[str | None, typer.Option("--format", help="nifti, nrrd, mha or dicom-seg (default: from "
                                               "OUTPUT's name; nifti for folders).")]


def check_data_choice(data: Any, demo_data: bool) -> None:
    """Exactly one of --data and --demo-data."""
    if (data is None) == (not demo_data):
        raise ConfigError("pass exactly one of --data PATH or --demo-data")


def check_output_folder(output: Path) -> None:
    """The run folder (created when missing) must not be an existing file, or any ancestor of it: checked before
    data or models are read."""
    for path in (output, *output.parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"--output {output}: {path} is a file; pass a folder for the run (it is created "
                                  "when missing)")
            return


def config_from_options(config: Path | None, preset: str | None) -> GMIMConfig | None:
    """The config a --config file or a --preset names (not both), or None when neither is given."""
    if config is not None and preset is not None:
        raise ConfigError("pass either --config or --preset, not both")
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"--config {config}: no such file; pass a config.json (e.g. from save_pretrained)")
        return GMIMConfig.from_json_file(config)
    return get_preset(preset) if preset is not None else None


class StepProgress:
    """A training callback drawing a rich progress bar (step, the `describe`d values, elapsed time and ETA)."""

    def __init__(self, label: str) -> None:
        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
        )
        self.task: Any = None

    def describe(self, values: Mapping[str, float]) -> str:
        return f"loss {values['loss']:.4f} lr {values['lr']:.2e}"

    def on_start(self, start_step: int, total_steps: int) -> None:
        self.progress.start()
        if start_step:
            console.print(f"resuming at step {start_step} of {total_steps}")
        self.task = self.progress.add_task("run", total=total_steps, completed=start_step, info="")

    def on_step(self, step: int, values: Mapping[str, float]) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=step, info=self.describe(values))

    def on_end(self, step: int) -> None:
        self.close()

    def close(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


def cache_choice(cache: str, no_cache: bool) -> str:
    """--cache VALUE (checked), or 'none' with --no-cache."""
    from gmim_hub.data.cache import cache_mode

    if no_cache:
        if cache != "none":
            raise ConfigError(f"--no-cache contradicts --cache {cache}; pass one of them")
        return "none"
    return cache_mode(cache)
