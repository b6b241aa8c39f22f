"""Helpers shared by the CLI command modules: one-line errors and a console for people."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from gmim_hub.atomic import describe_os_error
from gmim_hub.errors import GMIMError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn a `GMIMError` (or a missing file) into one red line on stderr and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (GMIMError, OSError) as e:  # OSError: a path the system refuses (a file where a folder must be, ...)
            err_console.print(f"[bold red]error:[/] {describe_os_error(e)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


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
            err_console.print(f"[bold red]error:[/] {e.format_message()}{hint}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            err_console.print("[yellow]aborted[/]")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)  # typer.Exit(code) comes back as its code here
