"""`gmim export ...`: deployment exports. This module owns `export_app` and its `onnx` command; other modules add
their own subcommands to `export_app` (e.g. `triton`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gmim_hub.cli._common import console, handle_errors

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
    from gmim_hub.errors import ConfigError

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
@handle_errors
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
    table = Table(title=f"ONNX export {m['name']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    parity = m["parity"]
    rows = [
        ("model", str(result.onnx_path)), ("manifest", str(result.manifest_path)),
        ("sha256", m["sha256"][:16] + "..."), ("window", "x".join(map(str, m["window_size"]))),
        ("channels", f"{m['in_channels']} in, {m['out_channels']} out"), ("max batch", str(m["max_batch_size"])),
        ("parity", f"{parity['max_abs_diff_batch1']:.2e} (batch 1), {parity['max_abs_diff_batch_max']:.2e} "
                   f"(batch {m['max_batch_size']}) <= {parity['atol']:g}"),
        ("source", f"{m['source']['model']} @ {m['source']['revision'] or 'local'}"), ("opset", str(m["opset"])),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
