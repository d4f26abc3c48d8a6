"""Worklist and C-FIND response times over a database of 10 000 studies.

    python bench/queries.py [--studies 10000] [--repeat 15] [--database-url URL] [--json out.json]

Fills a fresh database (SQLite in a temporary folder by default; with a
``postgresql://`` URL, a new database on that server, dropped afterwards) with
``--studies`` studies of 1-3 source CR images each, every image with its SEG and SR
instances and a result as the node stores it (summary columns + the ImageResult
JSON): 3 % still pending, 2 % failed, 5 % with one lung not found; 20 % of the
studies read, 5 % claimed. Rows go in with SQLAlchemy Core bulk inserts.

Then times, ``--repeat`` times each, median and p95 in ms:

* ``Worklist.entries()``: the whole worklist (every unread study), as /api/worklist;
* ``Worklist.entries(limit=200)``: what the page asks for every 2 s;
* ``Worklist.entries(details=False)``: ranking alone (UPS, escalation);
* a study-level C-FIND for one StudyInstanceUID, with Study Comments and the
  private block (so the study's severity is computed);
* the same C-FIND by PatientID wild card (``PAT00012*``: 10 studies).

and where the time of one whole-worklist request goes (SQL, grouping, priority,
ranking, JSON records).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.dataset import Dataset  # noqa: E402
from sqlalchemy import insert  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from cxrtriage.inference.result_model import ImageResult  # noqa: E402
from cxrtriage.inference.scoring import ZONE_NAMES  # noqa: E402
from cxrtriage.scp.query import QueryEngine  # noqa: E402
from cxrtriage.storage.archive import Archive  # noqa: E402
from cxrtriage.storage.db import Database, make_engine  # noqa: E402
from cxrtriage.storage.models import Instance, Reading, ScoreResult  # noqa: E402
from cxrtriage.triage.priority import rank  # noqa: E402
from cxrtriage.triage.study_rank import rebuild  # noqa: E402
from cxrtriage.triage.worklist import Worklist  # noqa: E402

CR, SEG, SR = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"
ROOT = "1.2.826.0.1.3680043.10.999"
NOW = dt.datetime.now(dt.UTC)


def details(rng: random.Random, total: int, brixia: int, p: float, missing: list[str]) -> str:
    """A result record of the size the pipeline writes (zones, areas, models, timings)."""
    zones = {}
    for k, name in enumerate(ZONE_NAMES):
        scored = ("right" if k < 3 else "left") not in missing
        zones[name] = {"brixia_zone": "ABCDEF"[k], "scored": scored, "affected_fraction": rng.random() if scored else None,
                       "binary_score": int(k < total) if scored else None,
                       "brixia_grade": min(3, brixia // 6) if scored else None, "area_px": rng.randint(10_000, 90_000)}
    stage = {"name": "cxrtriage-bundled", "version": "2026.11-abcdef", "origin": "bundled", "training_data": ["synthetic"]}
    return ImageResult.model_validate({
        "source": "archive", "rows": 2500, "columns": 2048, "p_disease": p, "total_score": total,
        "zones_scored": 6 - 3 * len(missing), "missing_lungs": missing, "brixia_total": brixia,
        "geographic_extent": {"right": 2, "left": 1, "total": 3}, "lungs_found": 2 - len(missing),
        "lung_area_px": 1_500_000, "lesion_area_px": 80_000, "zones": zones,
        "models": {"lungs": "lungs-v1", "disease": "disease-v1"},
        "model_identity": {"research_use": True, "notice": "Research use", "lungs": {**stage, "stage": "lungs"},
                           "disease": {**stage, "stage": "disease"}},
        "research_use": True, "algorithm_version": "0.9-p3-0123456789",
        "timings_ms": {"decode": 40.1, "lungs": 310.2, "disease": 420.3, "scoring": 12.0},
    }).model_dump_json()


def fill(db: Database, studies: int, seed: int = 7) -> dict[str, Any]:
    """Bulk-insert the synthetic node state; returns what the C-FIND timings query."""
    rng = random.Random(seed)
    instances: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    readings: list[dict[str, Any]] = []
    next_id = 1
    for s in range(studies):
        study, patient = f"{ROOT}.{s}", f"PAT{s:06d}"
        received = NOW - dt.timedelta(minutes=rng.uniform(0, 720))
        common = {"study_instance_uid": study, "patient_id": patient, "patient_name": f"Synthetic^Patient{s}",
                  "study_date": received.strftime("%Y%m%d"), "study_time": received.strftime("%H%M%S"),
                  "accession_number": f"ACC{s:07d}", "study_description": "Chest PA", "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                  "size": 1_000_000, "received_at": received, "duplicate_of_id": None}
        for i in range(rng.randint(1, 3)):
            source_id, series = next_id, f"{study}.{i}"
            for kind, sop_class, modality in (("source", CR, "CR"), ("seg", SEG, "SEG"), ("sr", SR, "SR")):
                sop = f"{series}.{kind}"
                instances.append({**common, "id": next_id, "sop_instance_uid": sop, "sop_class_uid": sop_class,
                                  "series_instance_uid": series + ("" if kind == "source" else f".{kind}"),
                                  "modality": modality, "kind": kind, "path": f"{study}/{sop}.dcm", "sha256": uuid.uuid4().hex,
                                  "requested_priority": "STAT" if kind == "source" and rng.random() < 0.02 else "",
                                  "derived_from_id": None if kind == "source" else source_id})
                next_id += 1
            roll = rng.random()
            if roll < 0.03:
                continue  # still pending
            if roll < 0.05:
                results.append({"instance_id": source_id, "study_instance_uid": study, "status": "failed",
                                "reason": "error", "message": "boom", "total_score": None, "brixia_total": None,
                                "p_disease": None, "details": "{}", "zones_scored": None,
                                "algorithm_version": "0.9"})
                continue
            total, p = rng.randint(0, 6), round(rng.random(), 4)
            brixia = min(18, total * 3 + rng.randint(0, 2))
            missing = ["left"] if rng.random() < 0.05 else []
            results.append({"instance_id": source_id, "study_instance_uid": study, "status": "scored", "reason": "",
                            "message": "", "total_score": total, "zones_scored": 6 - 3 * len(missing),
                            "brixia_total": brixia, "p_disease": p, "details": details(rng, total, brixia, p, missing),
                            "algorithm_version": "0.9"})
        roll = rng.random()
        if roll < 0.25:
            readings.append({"study_instance_uid": study, "state": "read" if roll < 0.20 else "claimed",
                             "reader": "dr_a", "updated_at": NOW})
    with db.engine.begin() as conn:
        for table, rows in ((Instance, instances), (ScoreResult, results), (Reading, readings)):
            for start in range(0, len(rows), 5000):
                conn.execute(insert(table), rows[start:start + 5000])
    with db.session() as session:  # bulk rows bypass the writers that keep study_ranks current
        rebuild(session)
    if db.engine.dialect.name == "postgresql":
        with db.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    return {"study": f"{ROOT}.{studies // 2}", "patient_pattern": "PAT00012*", "instances": len(instances),
            "results": len(results), "read_or_claimed": len(readings)}


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    fn()  # warm: connections, statement caches
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {"median_ms": statistics.median(samples), "p95_ms": samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]}


def breakdown(worklist: Worklist) -> dict[str, float]:
    """One whole-worklist request, stage by stage (ms)."""
    out: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[name] = (now - t) * 1000
        t = now

    with worklist.db.session() as session:
        found = worklist._studies(session, include_read=False, uids=None)
        lap("sql: image rows + reading state, grouped")
        entries = [worklist._entry(s, NOW) for s in found]
        lap("priority per study (python)")
        entries = [entries[i] for i in rank([(e.priority, e.received_at) for e in entries])]
        lap("ranking")
        records = worklist._details(session, [i for e in entries for i in e.scored_instance_ids])
        lap("sql + ImageResult parse of every shown result")
        for entry in entries:
            entry.apply_details(records)
        lap("zone grades, models into the rows")
    [e.row() for e in entries]
    lap("pydantic rows for the API")
    out["studies"] = len(entries)
    return out


def cfind(engine: QueryEngine, **keys: str) -> Callable[[], list[Dataset]]:
    def run() -> list[Dataset]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = ""
        ds.StudyComments = ""
        ds.add_new(0x00990010, "LO", "")
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        return list(engine.find(ds, "STUDY"))
    return run


@contextmanager
def database(url: str | None) -> Iterator[Database]:
    """A fresh database: SQLite in a temporary folder, or a new database on the given server."""
    if url is None or make_url(url).get_backend_name() == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            db = Database(url or f"sqlite:///{folder}/bench.db")
            db.migrate()
            try:
                yield db
            finally:
                db.dispose()
        return
    name = f"cxrtriage_bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    db = Database(make_url(url).set(database=name).render_as_string(hide_password=False))
    try:
        db.migrate()
        yield db
    finally:
        db.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}"')
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary folder")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with database(args.database_url) as db:
        t0 = time.perf_counter()
        filled = fill(db, args.studies)
        fill_s = time.perf_counter() - t0
        worklist = Worklist(db)
        engine = QueryEngine(db, Archive(tempfile.gettempdir()), "CXRTRIAGE", worklist)
        unread = len(worklist.entries(details=False))
        assert len(cfind(engine, StudyInstanceUID=filled["study"])()) == 1
        assert len(cfind(engine, PatientID=filled["patient_pattern"])()) == 10
        timings = {
            "Worklist.entries() (all unread)": timed(lambda: worklist.entries(), args.repeat),
            "Worklist.entries(limit=200)": timed(lambda: worklist.entries(limit=200), args.repeat),
            "Worklist.entries(details=False)": timed(lambda: worklist.entries(details=False), args.repeat),
            "C-FIND STUDY by StudyInstanceUID": timed(cfind(engine, StudyInstanceUID=filled["study"]), args.repeat),
            f"C-FIND STUDY by PatientID={filled['patient_pattern']}": timed(
                cfind(engine, PatientID=filled["patient_pattern"]), args.repeat),
        }
        stages = breakdown(worklist)
        sample = details(random.Random(1), 3, 9, 0.5, [])
        parse_us = timed(lambda: [json.loads(sample) for _ in range(1000)], 3)["median_ms"]
        report = {"database": db.engine.dialect.name, "studies": args.studies, "unread_or_claimed": unread,
                  **{k: v for k, v in filled.items() if k in ("instances", "results")}, "fill_s": round(fill_s, 1), "json_loads_us": parse_us,
                  "timings": timings, "worklist_breakdown_ms": stages}

    print(f"CPU check: json.loads of one {len(sample)}-byte result record takes {parse_us:.1f} us here "
          "(about 10 us on an idle modern core)")
    print(f"{report['database']}: {args.studies} studies ({unread} unread or claimed), {report['instances']} instances, "
          f"{report['results']} results; filled in {fill_s:.1f} s")
    print(f"{'request':<52} {'median ms':>10} {'p95 ms':>10}")
    for name, t in timings.items():
        print(f"{name:<52} {t['median_ms']:>10.1f} {t['p95_ms']:>10.1f}")
    print(f"\nwhere one whole-worklist request goes ({int(stages.pop('studies'))} studies):")
    for name, ms in stages.items():
        print(f"  {name:<50} {ms:>8.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
