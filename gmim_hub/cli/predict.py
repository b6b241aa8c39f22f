"""`gmim predict`: a volume (NIfTI, NRRD, MetaImage, DICOM series) or a folder of them in, label maps (and
optionally probabilities) out, on the input's grid."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gmim_hub.cli import options as opt
from gmim_hub.cli._common import console, err_console, print_warning
from gmim_hub.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


def predict(
    input: Annotated[Path, typer.Argument(help="A .nii/.nii.gz/.nrrd/.mha/.mhd volume, a DICOM series folder, or a "
                                               "folder of these.")],
    output: Annotated[Path, typer.Argument(help="Output .nii.gz/.nii/.nrrd/.mha, or .dcm (DICOM SEG, DICOM inputs) "
                                                "for one input (or an existing folder); a folder for a folder input "
                                                "(files <name>_seg.nii.gz, or as --format).")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model folder (save_pretrained) or Hub repo "
                                              "id. With --backend onnx, an export folder also works.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    backend: Annotated[str, typer.Option(help="auto (openvino on the CPU when installed, else fast, or onnx with --onnx; torch on CUDA), fast "
                                         "(CPU: whole network in bf16/fp32, fused attention), openvino "
                                         "(CPU: the model's ONNX export compiled by OpenVINO, cached), torch, or onnx "
                                         "(onnxruntime on an export).")] = "auto",
    onnx: Annotated[Path | None, typer.Option("--onnx", help="ONNX export folder, model.onnx or manifest.json "
                                              "(gmim export onnx); runs on OpenVINO (auto, when installed) or "
                                              "on onnxruntime (--backend onnx).")] = None,
    precision: Annotated[str, typer.Option(help="auto (bf16 for the fast and openvino backends where the CPU has "
                                           "native bf16, else fp32), fp32, or bf16 (fast, openvino or torch "
                                           "backend).")] = "auto",
    sw_batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap in [0, 1).")] = 0.5,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write <name>_prob.nii.gz "
                                                "(X, Y, Z, K) float32.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (torch, onnxruntime and OpenVINO; default: every core).")] = None,
    overwrite: opt.Overwrite = False,
    max_memory_gb: opt.MaxMemoryGb = None,
    strict_input: opt.StrictInput = False,
    series: opt.Series = None,
    out_format: opt.OutFormat = None,
    compute_every_window: Annotated[bool, typer.Option(
        "--compute-every-window", help="Run the network on every window. By default a window holding one value "
        "(e.g. air after the CT window, zero background) is computed once per volume and reused: identical input, "
        "identical labels.")] = False,
) -> None:
    """Segment volumes with a sliding window; outputs have the input's exact shape and affine.

    Labels are uint8 class indices (X, Y, Z); for multi-label models one 0/1 channel per label (X, Y, Z, K)."""
    import torch

    from gmim_hub.inference.io import plan_outputs
    from gmim_hub.inference.memory import check_jobs, memory_limit
    from gmim_hub.inference.predictor import Predictor, check_options, local_config

    if model is None and onnx is None:
        raise ConfigError("pass --model DIR_OR_REPO (or --onnx EXPORT for the onnx and openvino backends)")
    check_options(sw_batch_size=sw_batch_size, overlap=overlap, threads=threads)
    memory_limit(max_memory_gb)  # a bad --max-memory-gb or $GMIM_MAX_MEMORY_GB fails here, before the model loads
    jobs = plan_outputs(input, output, probabilities=probabilities, overwrite=overwrite, out_format=out_format,
                        series=series)
    config = local_config(model, onnx)
    if config is not None:  # a local model: the inputs are checked before its weights load
        check_jobs(jobs, config, max_memory_gb=max_memory_gb)
    if threads:
        torch.set_num_threads(threads)
    predictor = Predictor.from_pretrained(
        model, backend=backend, precision=precision, device=device, onnx_path=onnx,  # type: ignore[arg-type]
        revision=revision, threads=threads, sw_batch_size=sw_batch_size, overlap=overlap,
    )
    predictor.max_memory_gb, predictor.strict_input = max_memory_gb, strict_input
    predictor.reuse_constant_windows = not compute_every_window
    predictor.on_warning = print_warning
    predictor.check_inputs(jobs)
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        files = bar.add_task("volumes", total=len(jobs))
        windows = bar.add_task("windows", total=None)
        for job in jobs:
            bar.update(windows, description=f"windows of {job.input.name}", completed=0, total=None)
            written = predictor.predict_file(
                job.input, job.labels, probabilities=probabilities, overwrite=overwrite,
                progress=lambda done, total: bar.update(windows, completed=done, total=total), series=job.series,
            )
            bar.advance(files)
            for path in written:
                console.print(f"wrote {path}", highlight=False)
    console.print(f"{len(jobs)} volume(s) in {time.perf_counter() - start:.1f} s "
                  f"({predictor.backend} backend, {predictor.precision})", highlight=False)
