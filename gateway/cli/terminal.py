"""What every `bastion` command shares: the consoles, the common options, failing with a message, calling a
gateway with its errors turned into that message, and rendering answers as tables.

This module is imported by every command, `--help` included: it imports nothing heavy (no pandas, no httpx until
a command talks to a gateway)."""

from __future__ import annotations

import contextlib
import json
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console, RenderableType
from rich.table import Column, Table
from rich.text import Text

if TYPE_CHECKING:
    from gateway.client import Client

# The workspace's default directory name (gateway.settings.DEFAULT_WORKSPACE; not imported here, as settings pull
# pydantic, which a client command does not need).
DEFAULT_WORKSPACE = "bastion-workspace"

# Wide when piped, so tables are not truncated in logs and scripts.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def visible(text: str) -> str:
    """`text` with its control characters (but newline and tab) and bidi controls written as escapes (`\\x1b`,
    `\\u202e`): a value from a caller or a row (a purpose, a group key) cannot move the cursor, clear or retitle
    the terminal, write its clipboard or reorder what is shown beside it."""
    if text.isprintable():
        return text
    return "".join(
        (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        if (unicodedata.category(ch) == "Cc" and ch not in "\n\t") or ch in BIDI_CONTROLS
        else ch
        for ch in text
    )


class DataTable(Table):
    """A table whose header, title and cell strings are shown as they are, never read as rich markup: they hold
    names and values from answers (a released group key, a slice, a column alias), and `[red]x` or `[/x]` in one
    would be shown as something else or end the command with a markup error after the answer was paid for. Control
    characters in them are shown as escapes (`visible`)."""

    def __init__(self, *headers: str, title: str | None = None, **kwargs: Any) -> None:
        super().__init__(
            *(Column(header=Text(visible(h))) for h in headers),
            title=None if title is None else Text(visible(title)),
            **kwargs,
        )

    def add_row(self, *renderables: RenderableType | None, **kwargs: Any) -> None:
        super().add_row(*(Text(visible(r)) if isinstance(r, str) else r for r in renderables), **kwargs)


def typer_app(help: str) -> typer.Typer:
    """A command group. Help is plain click help (no rich markup mode): it shows no type after a flag (`--dry-run`,
    not `--dry-run <bool>`), keeps `[default: ...]` in help texts, and needs no rich import to print."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False)


Workspace = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w", help=f"workspace directory [default: ./{DEFAULT_WORKSPACE}]", envvar="BASTION_WORKSPACE"
    ),
]
Store = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="BASTION_STORE",
        metavar="postgresql://...",
        help="where the ledger, release cache, tokens, audit log and synthesis job records live: a PostgreSQL "
        "address that replicas share [default: SQLite files and the audit/ directory in the workspace]",
    ),
]
SharedDir = Annotated[
    Path | None,
    typer.Option(
        "--shared-dir",
        envvar="BASTION_SHARED_DIR",
        metavar="PATH",
        help="a directory every replica mounts, for synthetic proxies, their DP models and reports and labeling "
        "functions' label outputs (derived from private rows: mode 0700) [default: the workspace's own paths]",
    ),
]
Url = Annotated[str, typer.Option("--url", envvar="BASTION_URL", help="gateway URL")]
Token = Annotated[str | None, typer.Option("--token", envvar="BASTION_TOKEN", help="bearer token")]
AsJson = Annotated[bool, typer.Option("--json", help="print the raw JSON answer (for scripts)")]


def one_line(text: str) -> str:
    """`text` on one line: the lines of a multi-line message joined by ' | '."""
    return " | ".join(part.strip() for part in str(text).splitlines() if part.strip())


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with `error: <message>` on one line of stderr and exit status `code`."""
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(visible(one_line(message)))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def make_client(url: str, token: str | None) -> Client:
    from gateway.client import Client

    return Client(url, token)


@contextlib.contextmanager
def gateway_client(url: str, token: str | None) -> Iterator[Client]:
    """A client for the gateway at `url`; its errors (and an unreachable gateway) end the command with a message."""
    import httpx

    from gateway.client import BastionError

    try:
        with make_client(url, token) as c:
            yield c
    except BastionError as exc:
        fail(f"{exc.code}: {exc.message}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach the gateway at {url}: {exc}")


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def fmt(value: Any) -> str:
    """A cell: floats to 6 significant digits with thousands separators, integral floats as integers, lists joined."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:,.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    return str(value)


def print_records(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str = "") -> None:
    """A table of dicts: the given columns, or every key in order of first appearance."""
    if columns is None:
        seen: dict[str, None] = {}
        for r in records:
            seen.update(dict.fromkeys(r))
        columns = list(seen)
    table = DataTable(*columns, title=title or None)
    for r in records:
        table.add_row(*(fmt(r.get(c)) for c in columns))
    console.print(table)
