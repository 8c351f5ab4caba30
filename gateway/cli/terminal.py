"""What every `bastion` command shares: the consoles, the common options, failing with a message, and calling a
gateway with its errors turned into that message."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import httpx
import typer
from rich.console import Console

from gateway.settings import DEFAULT_WORKSPACE

if TYPE_CHECKING:
    from gateway.client import Client

# Wide when piped, so tables are not truncated in logs and scripts.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

Workspace = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w", help=f"workspace directory [default: ./{DEFAULT_WORKSPACE}]", envvar="BASTION_WORKSPACE"
    ),
]
Url = Annotated[str, typer.Option("--url", envvar="BASTION_URL", help="gateway URL")]
Token = Annotated[str | None, typer.Option("--token", envvar="BASTION_TOKEN", help="bearer token")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def make_client(url: str, token: str | None) -> Client:
    from gateway.client import Client

    return Client(url, token)


@contextlib.contextmanager
def gateway_client(url: str, token: str | None) -> Iterator[Client]:
    """A client for the gateway at `url`; its errors (and an unreachable gateway) end the command with a message."""
    from gateway.client import BastionError

    try:
        with make_client(url, token) as c:
            yield c
    except BastionError as exc:
        fail(f"{exc.code}: {exc.message}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach the gateway at {url}: {exc}")
