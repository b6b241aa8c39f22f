"""`gmim` entry point. Each command group lives in its own module under `gmim_hub.cli` (the module is named after the
group) with a `register(app)` function; this file lists them. Command modules import only the light parts of
gmim_hub at module level (torch and MONAI are imported inside the commands that use them), so `gmim --help` stays
fast; errors are turned into one line in one place, `OneLineErrorGroup` (`gmim_hub.cli._common`)."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed

import typer

from gmim_hub._version import __version__
from gmim_hub.cli import ablate, demo, export, hub, predict, pretrain, serving, train
from gmim_hub.cli._common import OneLineErrorGroup

app = typer.Typer(
    name="gmim",
    help="GMIM self-supervised pre-training, fine-tuning, export and serving for 3-D Swin UNETR segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=OneLineErrorGroup,
)


@app.callback()
def _root() -> None:
    """GMIM self-supervised pre-training, fine-tuning, export and serving for 3-D Swin UNETR segmentation."""


@app.command()
def version() -> None:
    """Print the versions of gmim-hub and the libraries it runs on."""

    def of(package: str) -> str:  # the installed distribution's version: importing MONAI alone takes ~10 s
        try:
            return installed(package)
        except PackageNotFoundError:
            return "not installed"

    typer.echo(f"gmim-hub {__version__} (torch {of('torch')}, monai {of('monai')})")


# The order of `gmim --help`'s command list.
for _group in (pretrain, train, demo, predict, export, serving, hub, ablate):
    _group.register(app)


def main() -> None:
    """Run the CLI (the console script); errors are printed by `OneLineErrorGroup`, never as a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
