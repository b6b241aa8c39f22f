"""`gmim` entry point. Each command group lives in its own module with a `register(app)` function."""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from gmim_hub.cli._common import OneLineErrorGroup
from gmim_hub.errors import GMIMError

app = typer.Typer(
    name="gmim",
    help="GMIM self-supervised pre-training, fine-tuning, export and serving for 3-D Swin UNETR segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=OneLineErrorGroup,
)

# Modules under gmim_hub.cli that add commands; each defines `register(app: typer.Typer) -> None`.
_COMMAND_MODULES: tuple[str, ...] = (
    "pretrain",
    "train",
    "predict",
    "export",
    "serving",
    "hub",
    "ablate",
)

@app.callback()
def _root() -> None:
    """GMIM self-supervised pre-training, fine-tuning, export and serving for 3-D Swin UNETR segmentation."""


@app.command()
def version() -> None:
    """Print the versions of gmim-hub and the libraries it runs on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from gmim_hub import __version__

    def of(package: str) -> str:  # the installed distribution's version: importing MONAI alone takes ~10 s
        try:
            return installed(package)
        except PackageNotFoundError:
            return "not installed"

    typer.echo(f"gmim-hub {__version__} (torch {of('torch')}, monai {of('monai')})")


for _name in _COMMAND_MODULES:
    importlib.import_module(f"gmim_hub.cli.{_name}").register(app)


def main() -> None:
    """Run the CLI; library errors become one red line and exit code 2, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except GMIMError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
