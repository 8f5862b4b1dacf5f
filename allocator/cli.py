"""Command line (typer + rich). Later issues add the full command set."""
from __future__ import annotations

import typer

app = typer.Typer(help="rq-allocator: GPU memory, CPU core and RAM allocation for queued tasks.", no_args_is_help=True)


def main() -> None:
    app()
