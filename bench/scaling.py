"""Scaling out: images/s received and scored with 1 vs 2 scorer nodes, and database round trips per image.

    nice -n 10 python bench/scaling.py [--images 24] [--rounds 2] [--json bench/results/scaling.json]

Each round is a fresh private PostgreSQL cluster (tests/multinode.py, with
pg_stat_statements loaded), one receiver node and 1 or 2 scorer nodes, each
a separate ``cxrtriage serve`` process (roles ``receiver`` / ``scorer``, no
destinations: SEG and SR are made and archived, nothing is sent), every
scorer with one torch thread. Once every node has started, DCMTK storescu
sends ``--images`` synthetic CRs over one association; the round measures

* received: images / seconds from the first C-STORE to storescu's exit;
* scored: images / seconds from the first C-STORE to the last result row;
* database round trips per image: statements the nodes sent during the
  round (pg_stat_statements calls of top-level statements, so foreign-key
  checks run inside the server are not counted; BEGIN, COMMIT and ROLLBACK
  are; the bench's own queries are not) / images, and transactions
  (pg_stat_database); also with the idle rate below taken out;
* idle: statements per second with every node started and nothing to do
  (the workers' claim polls), measured before the images are sent;
* CPU seconds of each node process over the round (/proc), beside wall time.

Rounds alternate 1, 2, 1, 2 ... scorers; medians are printed. On a shared
2-core machine the absolute numbers are noisy: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text  # noqa: E402

from cxrtriage.storage.db import Database  # noqa: E402
from tests.harness import NodeProcess  # noqa: E402
from tests.multinode import PrivatePostgres, node, phantoms, storescu  # noqa: E402

STATEMENTS = "pg_stat_statements"
#: The bench's own queries carry this marker and are left out of the counts.
MARK = "bench_scaling"
#: An idle worker's claim poll interval: the default (the tests' harness polls faster).
POLL_SECONDS = 0.2


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def statements(db: Database) -> tuple[int, int]:
    """(statements executed, transactions committed or rolled back) on the server so far, ours excluded."""
    with db.engine.connect() as conn:
        calls = conn.execute(text(f"SELECT coalesce(sum(calls), 0) /* {MARK} */ FROM pg_stat_statements "
                                  f"WHERE query NOT LIKE '%{MARK}%' AND query NOT ILIKE '%pg_stat%'")).scalar_one()
        xacts = conn.execute(text(f"SELECT xact_commit + xact_rollback /* {MARK} */ FROM pg_stat_database "
                                  "WHERE datname = current_database()")).scalar_one()
    return int(calls), int(xacts)


def top_statements(db: Database, limit: int = 8) -> list[dict[str, Any]]:
    """The most called statements (normalised: parameters are $n, never values)."""
    with db.engine.connect() as conn:
        rows = conn.execute(text(f"SELECT calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 90) /* {MARK} */ "
                                 f"FROM pg_stat_statements WHERE query NOT LIKE '%{MARK}%' "
                                 f"AND query NOT ILIKE '%pg_stat%' ORDER BY calls DESC LIMIT {limit}")).all()
    return [{"calls": int(calls), "query": query} for calls, query in rows]


def scored_count(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) /* {MARK} */ FROM results")).scalar_one())


def start_all(nodes: list[NodeProcess]) -> None:
    threads = [threading.Thread(target=n.start) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in nodes:
        if n.process is None or n.process.poll() is not None:
            raise RuntimeError(f"a node did not start:\n{n.log[-2000:]}")


def one_round(work: Path, files: list[Path], scorers: int, idle_seconds: float) -> dict[str, Any]:
    pg = PrivatePostgres(extra_conf="shared_preload_libraries = 'pg_stat_statements'\n"
                                    "pg_stat_statements.track = top\n").start()
    nodes: list[NodeProcess] = []
    db = Database(pg.url)
    try:
        db.migrate()
        with db.engine.begin() as conn:
            conn.execute(text(f"CREATE EXTENSION {STATEMENTS}"))
        archive = work / "archive"
        workers = {"poll_seconds": POLL_SECONDS}
        nodes = [node(work / "receiver", pg.url, "receiver", ["receiver"], archive=archive, workers=workers)]
        nodes += [node(work / f"scorer-{i}", pg.url, f"scorer-{i}", ["scorer"], archive=archive,
                       inference={"threads": 1}, workers={**workers, "scoring_workers": 1})
                  for i in range(scorers)]
        start_all(nodes)

        with db.engine.begin() as conn:
            conn.execute(text(f"SELECT pg_stat_statements_reset() /* {MARK} */"))
        idle0 = statements(db)
        time.sleep(idle_seconds)
        idle1 = statements(db)
        idle_rate = (idle1[0] - idle0[0]) / idle_seconds

        cpu0 = {n.workdir.name: cpu_seconds(n.process.pid) for n in nodes if n.process}
        before = statements(db)
        t0 = time.monotonic()
        sent = storescu(nodes[0].port, files, timeout=600)
        received_s = time.monotonic() - t0
        if len(sent.acknowledged) != len(files):
            raise RuntimeError(f"storescu: {len(sent.acknowledged)} of {len(files)} acknowledged\n"
                               f"{sent.output[-2000:]}")
        while scored_count(db) < len(files):
            time.sleep(0.1)
        scored_s = time.monotonic() - t0
        after = statements(db)
        cpu = {n.workdir.name: round(cpu_seconds(n.process.pid) - cpu0[n.workdir.name], 2) for n in nodes if n.process}
        per_scorer = {}
        for n in nodes[1:]:
            per_scorer[n.workdir.name] = n.log.count('"msg": "scored"')
        return {
            "scorers": scorers,
            "images": len(files),
            "received_per_s": round(len(files) / received_s, 2),
            "scored_per_s": round(len(files) / scored_s, 2),
            "received_seconds": round(received_s, 2),
            "scored_seconds": round(scored_s, 2),
            "statements_per_image": round((after[0] - before[0]) / len(files), 1),
            "transactions_per_image": round((after[1] - before[1]) / len(files), 1),
            "idle_statements_per_s": round(idle_rate, 1),
            "idle_share_of_statements": round(idle_rate * scored_s / max(1, after[0] - before[0]), 2),
            "statements_per_image_without_idle": round(
                max(0.0, after[0] - before[0] - idle_rate * scored_s) / len(files), 1),
            "cpu_seconds": cpu,
            "scored_by": per_scorer,
            "top_statements": top_statements(db),
        }
    finally:
        for n in nodes:
            n.stop()
        db.dispose()
        pg.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per scorer count (alternating)")
    parser.add_argument("--size", type=int, nargs=2, default=(448, 416), metavar=("ROWS", "COLS"))
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        files = phantoms(Path(folder) / "images", args.images, 6_100_000, tuple(args.size))
        for r in range(args.rounds):
            for scorers in (1, 2):
                row = one_round(Path(folder) / f"round-{r}-{scorers}", files, scorers, args.idle_seconds)
                results.append(row)
                print(f"round {r} scorers={scorers}: received {row['received_per_s']}/s, scored "
                      f"{row['scored_per_s']}/s, {row['statements_per_image']} statements/image "
                      f"({row['statements_per_image_without_idle']} without idle polls, "
                      f"{row['transactions_per_image']} transactions), idle {row['idle_statements_per_s']}/s, "
                      f"cpu {row['cpu_seconds']}, scored by {row['scored_by']}", flush=True)
    summary = {}
    for scorers in (1, 2):
        rows = [r for r in results if r["scorers"] == scorers]
        summary[str(scorers)] = {key: statistics.median(r[key] for r in rows) for key in
                                 ("received_per_s", "scored_per_s", "statements_per_image",
                                  "statements_per_image_without_idle", "transactions_per_image",
                                  "idle_statements_per_s")}
        print(f"median, {scorers} scorer node(s): {summary[str(scorers)]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "images": args.images, "size": list(args.size), "cpus": os.cpu_count(),
            "note": "one receiver node + N scorer nodes (separate processes, one torch thread each) on one "
                    "private PostgreSQL; shared machine, alternating rounds",
            "median": summary, "rounds": results,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
