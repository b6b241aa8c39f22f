"""The `gmim` command group and what every command shares: the consoles, and the one place where an error becomes
one red line and an exit code (`OneLineErrorGroup.invoke` for errors of ours and of the system, `.main` for
Click's usage errors). Commands raise; they never catch to print."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from gmim_hub.atomic import describe_os_error
from gmim_hub.errors import GMIMError

console = Console()
err_console = Console(stderr=True)

def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A two-column table (bold keys) for what a command made or started."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def print_error(message: str) -> None:
    """The one-line error every `gmim` command prints on stderr."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


# Typer may vendor Click (typer 0.29 ships `typer._click`), so Click's exception classes are found through the public
# `typer.BadParameter` rather than imported from either package by a private path.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


# Options whose value may be left out: a bare `--cache` means `--cache memory` (it was an on/off flag before it took
# none | memory | disk). Typer's Click has no optional option values, so the group fills the value in.
OPTIONAL_VALUES = {"--cache": "memory"}


class OneLineErrorGroup(TyperGroup):
    """The `gmim` command group, with Click's usage errors (unknown option, missing argument, bad value) printed as
    one line naming the problem and the --help to read, exit code 2, instead of Click's usage block and boxed
    message. Everything else behaves as Typer's group."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        filled: list[str] = []
        for i, token in enumerate(args):
            filled.append(token)
            following = args[i + 1] if i + 1 < len(args) else None
            if token in OPTIONAL_VALUES and (following is None or following.startswith("-")):
                filled.append(OPTIONAL_VALUES[token])
        return super().parse_args(ctx, filled)

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a `GMIMError` (or a path the system refuses) becomes one red line and exit code 2, Ctrl-C
        one yellow line and 130, never a traceback."""
        try:
            return super().invoke(ctx)
        except (GMIMError, OSError) as e:  # OSError: a path the system refuses (a file where a folder must be, ...)
            print_error(describe_os_error(e))
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLICK_ERROR as e:
            hint = ""
            if isinstance(e, _USAGE_ERROR) and getattr(e, "ctx", None) is not None:
                hint = f" (see '{e.ctx.command_path} --help')"
            print_error(f"{e.format_message()}{hint}")
            sys.exit(e.exit_code)
        except typer.Abort:
            err_console.print("[yellow]aborted[/]")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)  # typer.Exit(code) comes back as its code here
