"""`gmim export onnx` (a verified ONNX window model) and `gmim export triton` (a Triton model repository)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gmim_hub.cli._common import console, key_value_table
from gmim_hub.errors import ConfigError
from gmim_hub.serving.repository import write_triton_repository
from gmim_hub.serving.validate import validate_gpu_config, validate_openvino_config

export_app = typer.Typer(
    name="export",
    help="Export a segmentation model for deployment (ONNX window model, Triton model repository).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")


def parse_roi(text: str | None) -> tuple[int, int, int] | None:
    """'96' -> (96, 96, 96); '96,96,64' -> (96, 96, 64)."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise ConfigError(f"--roi must be one size or three comma-separated sizes such as 96,96,96, got {text!r}")
    return (parts[0], parts[1], parts[2])


@export_app.command("onnx")
def onnx(
    model: Annotated[str, typer.Argument(help="Model folder (save_pretrained) or Hub repo id.")],
    name: Annotated[str | None, typer.Option(help="Export name (default: the model folder's or repo's name).")] = None,
    out_dir: Annotated[Path, typer.Option(help="Exports land in OUT_DIR/NAME/.")] = Path("export"),
    max_batch: Annotated[int, typer.Option(help="Largest batch of windows verified (and served).")] = 4,
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 17,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    roi: Annotated[str | None, typer.Option(help="Window size, e.g. 96 or 96,96,64 (default: the config's).")] = None,
    atol: Annotated[float, typer.Option(help="Max abs PyTorch/onnxruntime difference accepted.")] = 1e-4,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing export of this name.")] = False,
) -> None:
    """Export a segmentation model to ONNX for its window size (dynamic batch), verified against PyTorch."""
    from gmim_hub.export.onnx import export_onnx

    with console.status("exporting and checking with onnxruntime..."):
        result = export_onnx(model, out_dir, name=name, max_batch=max_batch, opset=opset, revision=revision,
                             roi=parse_roi(roi), atol=atol, overwrite=overwrite)
    m = result.manifest
    parity = m["parity"]
    rows = [
        ("model", str(result.onnx_path)), ("manifest", str(result.manifest_path)),
        ("sha256", m["sha256"][:16] + "..."), ("window", "x".join(map(str, m["window_size"]))),
        ("channels", f"{m['in_channels']} in, {m['out_channels']} out"), ("max batch", str(m["max_batch_size"])),
        ("parity", f"{parity['max_abs_diff_batch1']:.2e} (batch 1), {parity['max_abs_diff_batch_max']:.2e} "
                   f"(batch {m['max_batch_size']}) <= {parity['atol']:g}"),
        ("source", f"{m['source']['model']} @ {m['source']['revision'] or 'local'}"), ("opset", str(m["opset"])),
    ]
    console.print(key_value_table(f"ONNX export {m['name']}", rows))


@export_app.command("triton")
def triton(
    export_dir: Annotated[Path, typer.Argument(help="ONNX export folder (model.onnx + manifest.json).")],
    repo: Annotated[Path, typer.Option(help="Triton model repository to write into.")] = Path("triton_models"),
    name: Annotated[str | None, typer.Option(help="Model name (default: the export's name).")] = None,
    tensorrt: Annotated[bool, typer.Option("--tensorrt", help="Add the TensorRT FP16 accelerator to the GPU model.")]
    = False,
    max_batch: Annotated[int | None, typer.Option(help="max_batch_size (default: the export's).")] = None,
    instance_count: Annotated[int, typer.Option(help="Model instances per device.")] = 1,
    openvino: Annotated[bool, typer.Option("--openvino", help="Also write `<name>_openvino` (OpenVINO IR) for "
                                           "Triton's openvino backend (NVIDIA's container, CPU).")] = False,
) -> None:
    """Write `<name>` (GPU, onnxruntime), `<name>_cpu` and `<name>_volume` (python backend, OpenVINO on the CPU)
    into a repository."""
    files = write_triton_repository(export_dir, repo, name=name, tensorrt=tensorrt, max_batch=max_batch,
                                    instance_count=instance_count, openvino_model=openvino)
    gpu_dir = files[0].parent
    cfg = validate_gpu_config(gpu_dir / "config.pbtxt", gpu_dir / "1" / "model.onnx")
    if openvino:
        validate_openvino_config(gpu_dir.parent / f"{cfg.name}_openvino", gpu_dir / "1" / "model.onnx")
    models = sorted({f.parent.name if f.name == "config.pbtxt" else f.parent.parent.name for f in files})
    console.print(key_value_table(f"Triton repository {repo}", [
        ("models", ", ".join(models)),
        (cfg.name, f"onnxruntime_onnx, KIND_GPU, max_batch_size {cfg.max_batch_size}"
                   + (", TensorRT FP16" if tensorrt else "") + " (checked against the ONNX graph)"),
        (f"{cfg.name}_cpu / _volume", "python backend: `gmim serve` runs these on this machine"),
    ] + ([(f"{cfg.name}_openvino", "openvino backend, OpenVINO IR (checked against the ONNX graph): for NVIDIA's "
                                   "Triton container (CPU); `gmim serve` cannot load it")] if openvino else [])))
