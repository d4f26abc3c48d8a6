"""``cxrtriage models``: list, pull, import and verify the published checkpoints.

The registry and the cache are imported inside each command: they import torch,
and ``cxrtriage --help`` must not wait for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from .inference import registry

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The checkpoints published with Danilov et al. 2022: list, pull, import, verify.",
)
console = Console()
errors = Console(stderr=True)

EXIT_FAILED = 1  #: a download, import or check failed
EXIT_USAGE = 2  #: an unknown model name or a missing file argument


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """One red line on stderr, no traceback."""
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _entries(name: str) -> list[registry.RegistryEntry]:
    from .inference import registry

    try:
        return registry.expand(name)
    except registry.UnknownModel as error:
        fail(str(error), EXIT_USAGE)


@contextmanager
def _progress() -> Iterator[Progress]:
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        yield progress


def _human(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@app.command("list")
def list_models() -> None:
    """Show every published checkpoint and whether it is in the cache."""
    from .inference import model_cache, registry

    table = Table(title=f"published models (cache: {model_cache.models_dir()})")
    for column in ("name", "stage", "arch", "encoder", "input", "T", "size", "cached"):
        table.add_column(column, justify="right" if column in ("input", "T", "size") else "left")
    for entry in registry.REGISTRY.values():
        threshold = "-" if entry.zone_threshold is None else f"{entry.zone_threshold:.2f}"
        table.add_row(entry.name, entry.stage, entry.published_arch, entry.encoder, str(entry.input_size),
                      threshold, _human(entry.size), "yes" if model_cache.is_cached(entry) else "no")
    console.print(table)
    for pair, members in registry.PAIRS.items():
        console.print(f"pair [bold]{pair}[/bold] = {' + '.join(members)}", highlight=False)


@app.command("pull")
def pull(
    name: str = typer.Argument(..., help="a registry name (see `list`) or a pair: danilov2022"),
    base_url: str | None = typer.Option(
        None, "--base-url",
        help="where <path in the repository> is served; default $CXRTRIAGE_MODELS_URL or the published "
        "repository's Git LFS media on GitHub",
    ),
) -> None:
    """Download checkpoints into the cache (resumable; size and SHA-256 checked before use)."""
    from .inference import model_cache

    entries = _entries(name)
    with _progress() as progress:
        for entry in entries:
            task = progress.add_task(entry.name, total=entry.size)

            def report(done: int, total: int, t: TaskID = task) -> None:
                progress.update(t, completed=done)

            try:
                path = model_cache.pull(entry, base_url, report)
            except model_cache.ModelCacheError as error:
                progress.stop()
                fail(str(error))
            progress.console.print(f"{entry.name}: ok, sha256 verified -> {path}", highlight=False)


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="a weights.pth copied from the published repository or a mirror"),
    name: str | None = typer.Option(None, "--name", help="the registry name it must be (default: found by SHA-256)"),
) -> None:
    """Copy a local checkpoint into the cache if it is one of the published files."""
    from .inference import model_cache

    if name is not None:
        _entries(name)  # an unknown name is a usage error, before any copying
    if not file.is_file():
        fail(f"cannot import {file}: no such file", EXIT_USAGE)
    try:
        entry = model_cache.import_file(file, name)
    except model_cache.ModelCacheError as error:
        fail(str(error))
    console.print(f"{entry.name}: imported, sha256 verified -> {model_cache.cached_path(entry)}", highlight=False)


@app.command("verify")
def verify() -> None:
    """Re-hash every cached checkpoint; exit 1 if any is corrupt."""
    from .inference import model_cache

    table = Table(title=f"model cache {model_cache.models_dir()}")
    for column in ("name", "status"):
        table.add_column(column)
    results = model_cache.verify()
    colour = {"ok": "green", "missing": "dim", "corrupt": "red"}
    for result in results:
        table.add_row(result.entry.name, f"[{colour[result.status]}]{result.status}[/]")
    console.print(table)
    corrupt = [r for r in results if r.status == "corrupt"]
    for result in corrupt:  # the reason, unwrapped: expected vs actual size / sha256
        console.print(f"[red]corrupt[/red] {escape(result.detail)}", highlight=False, soft_wrap=True)
    if corrupt:
        names = ", ".join(r.entry.name for r in corrupt)
        fail(f"corrupt in the cache: {names}; run `cxrtriage models pull NAME` to replace them")
