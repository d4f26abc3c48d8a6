"""Several nodes, one PostgreSQL (issue #14): a database restart mid-stream, three schedulers with one leader,
two receivers and a scorer behind HAProxy with nodes killed by SIGKILL.

Every process is real and on 127.0.0.1: a private PostgreSQL cluster (tests/multinode.py; restarting it
touches no other server), ``cxrtriage serve`` nodes with roles, DCMTK storescu, HAProxy and Orthanc (in a
private network namespace). The issue's 100 images are scaled down (see each test) to stay near a minute
on a two-core machine; nothing here depends on the count.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from cxrtriage.storage.db import Database
from cxrtriage.storage.models import Instance, Job, Lease, ScoreResult, as_utc

from .harness import StoreSCP, overdue_critical_studies, private_netns, wait_for
from .multinode import HAProxy, PrivatePostgres, node, phantoms, sop_uid, storescu

pytestmark = pytest.mark.slow

ALL_ROLES = ["receiver", "scorer", "sender", "scheduler", "web"]


@pytest.fixture
def pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres().start()
    try:
        yield server
    finally:
        server.destroy()


def rows_by_uid(db: Database) -> dict[str, int]:
    with db.session() as session:
        return {uid: n for uid, n in session.execute(
            select(Instance.sop_instance_uid, func.count()).where(Instance.kind == "source")
            .group_by(Instance.sop_instance_uid))}


def scored_by_uid(db: Database) -> dict[str, list[str]]:
    """Each source instance's result rows' statuses (one row per instance when scored once)."""
    with db.session() as session:
        rows = session.execute(select(Instance.sop_instance_uid, ScoreResult.status)
                               .join(ScoreResult, ScoreResult.instance_id == Instance.id))
        found: dict[str, list[str]] = {}
        for uid, status in rows:
            found.setdefault(uid, []).append(status)
        return found


def job_states(db: Database) -> dict[str, int]:
    with db.session() as session:
        return {state: n for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}


# -- 1. the database restarts mid-stream ----------------------------------------------------------------------

IMAGES_OUTAGE = 16  # the 100 scaled down: one node, two cores, a minute


def test_a_database_restart_mid_stream_loses_no_acknowledged_image(tmp_path: Path, pg: PrivatePostgres) -> None:
    """``pg_ctl restart`` while storescu streams: C-STOREs during the outage fail, never Success without a row;
    the node reconnects by itself, scores every acknowledged image once and sends its results; nothing is
    restarted by hand, and no job waits out its (default, 300 s) lease."""
    files = phantoms(tmp_path / "images", IMAGES_OUTAGE, 5_200_000)
    uids = {path: sop_uid(path) for path in files}
    pacs = StoreSCP(tmp_path / "pacs").start()
    one = node(tmp_path / "node", pg.url, "solo", ALL_ROLES,
               destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
               workers={"backoff_seconds": 0.3, "backoff_max_seconds": 2.0}).start()  # the default 300 s lease
    db = Database(pg.url)
    acknowledged: list[Path] = []
    refused: list[Path] = []
    restarted = threading.Event()
    try:
        def stream() -> None:
            for path in files:  # one association per image: the outage falls between and within them
                result = storescu(one.port, [path])
                (acknowledged if result.acknowledged == [path] else refused).append(path)
                if len(acknowledged) == 6 and not restarted.is_set():
                    restarted.set()

        sender = threading.Thread(target=stream)
        sender.start()
        assert restarted.wait(120), "the stream did not start"
        # Every pooled connection dies; the server stays away until C-STOREs were seen to fail in the outage.
        pg.restart(while_down=lambda: wait_for(lambda: len(refused) >= 2 or not sender.is_alive(), 60,
                                               "C-STOREs during the outage", interval=0.05))
        sender.join(timeout=180)
        assert not sender.is_alive()
        assert len(refused) >= 2, "no C-STORE fell into the outage: the test proved nothing"

        stored = rows_by_uid(db)
        missing = [uids[p] for p in acknowledged if stored.get(uids[p]) != 1]
        assert missing == [], f"{len(missing)} images answered Success have no row"

        for _ in range(3):  # the modality's retry of what was not acknowledged
            pending = [p for p in files if p not in acknowledged]
            if not pending:
                break
            result = storescu(one.port, pending)
            acknowledged.extend(result.acknowledged)
        assert sorted(acknowledged) == sorted(files)

        every = {uids[p] for p in files}
        scored = wait_for(lambda: (lambda s: s if set(s) >= every else None)(scored_by_uid(db)), 180,
                          "every acknowledged image scored")
        assert {uid: scored[uid] for uid in every} == {uid: ["scored"] for uid in every}  # once each
        # The senders resumed too: every SEG and SR reached the PACS, every job is done, none failed.
        wait_for(lambda: len(pacs.received()) >= 2 * IMAGES_OUTAGE, 120, "every SEG and SR at the PACS")
        all_done = {"done": 3 * IMAGES_OUTAGE}  # one score and two send jobs per image, none failed
        wait_for(lambda: job_states(db) == all_done, 60, "every job done")
        assert one.process is not None and one.process.poll() is None  # the same process throughout
        assert '"msg": "store failed"' in one.log  # the outage was answered with a failure status
    finally:
        one.stop()
        pacs.stop()
        db.dispose()


def test_a_job_cut_off_by_a_database_restart_goes_back_unspent(pg: PrivatePostgres) -> None:
    """A stage whose database goes away mid-job: the worker loop puts the job back as soon as the server is
    up again, its attempt not spent, instead of leaving it leased for the whole (300 s) lease."""
    from sqlalchemy import text

    from cxrtriage.stages.lease_loop import LeaseLoop, Turn
    from cxrtriage.storage.models import JobKind
    from cxrtriage.storage.queue import JobQueue

    db = Database(pg.url)
    db.migrate()
    queue = JobQueue(db, backoff_base=0.2)
    with db.session() as session:
        row = Instance(sop_instance_uid="1.2.826.0.1.3680043.10.994.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                       transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid="1.2.826.0.1.3680043.10.994",
                       series_instance_uid="1.2.826.0.1.3680043.10.994.2", path="x.dcm", sha256="0" * 64, size=1,
                       modality="CR", kind="source")
        session.add(row)
        session.flush()
        queue.enqueue(session, JobKind.SCORE, row.id, max_attempts=1)  # one attempt: spending it would fail it
    cut = threading.Event()

    def stage(job: object, worker: str) -> None:
        if not cut.is_set():
            cut.set()
            pg.stop("fast")
            threading.Timer(1.0, pg.start).start()  # back in a second, while the loop retries
        with db.session() as session:
            session.execute(text("SELECT 1"))  # the database is away: OperationalError
            assert queue.complete(session, job, worker)  # type: ignore[arg-type]

    loop = LeaseLoop(queue, JobKind.SCORE, stage, worker="w", lease_seconds=300, poll_seconds=0.05,
                     stopping=threading.Event())
    try:
        assert loop.turn() is Turn.RETRYING
        with db.session() as session:
            job = session.scalars(select(Job)).one()
            assert (job.state, job.attempts, job.lease_until) == ("pending", 0, None)
            assert job.last_error.startswith("database unavailable")
        time.sleep(0.3)  # the queue's first backoff
        assert loop.turn() is Turn.DONE  # the same loop, reconnected by itself
        assert job_states(db) == {"done": 1}
    finally:
        db.dispose()


# -- 2. three schedulers, one leader ---------------------------------------------------------------------------

ESCALATION_INTERVAL = 1.0  # the scheduler lease is three intervals (triage/jobs.py LEASE_INTERVALS)


class Webhook(BaseHTTPRequestHandler):
    """The paging system: keeps every escalation POSTed to it, with when it came."""

    received: list[tuple[float, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Webhook.received.append((time.time(), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_three_schedulers_escalate_once_and_hand_over_when_the_leader_is_killed(
        tmp_path: Path, pg: PrivatePostgres) -> None:
    from cxrtriage.storage.cluster import SCHEDULER_LEASE

    Webhook.received = []
    server = HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    db = Database(pg.url)
    db.migrate()  # the studies go in before the nodes start
    first = overdue_critical_studies(db, 0, 3)
    escalation = {"deadline_minutes": {"critical": 0.01}, "interval_seconds": ESCALATION_INTERVAL,
                  "webhook_url": f"http://127.0.0.1:{server.server_address[1]}/page"}
    names = [f"sched-{i}" for i in range(3)]
    nodes = [node(tmp_path / name, pg.url, name, ["scheduler"], triage={"escalation": escalation}) for name in names]

    def holder_node(holder: str) -> int:
        return next(i for i, name in enumerate(names) if holder.startswith(f"{name}:"))

    def lease() -> Lease | None:
        with db.session() as session:
            return session.get(Lease, SCHEDULER_LEASE)

    def pages() -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, body in Webhook.received:
            counts[body["study_instance_uid"]] = counts.get(body["study_instance_uid"], 0) + 1
        return counts

    try:
        for n in nodes:
            n.start()
        wait_for(lambda: set(pages()) >= set(first), 60, "the first escalations")
        time.sleep(5 * ESCALATION_INTERVAL)  # every node's job has run several times since
        assert pages() == {uid: 1 for uid in first}

        held = lease()
        assert held is not None
        leader = holder_node(held.holder)
        nodes[leader].kill()
        killed_at = time.time()
        old_expiry = as_utc(held.expires_at)
        later = overdue_critical_studies(db, 3, 2)  # arrive while nobody leads

        taken = wait_for(lambda: (lambda row: row if row is not None and row.holder != held.holder else None)(
            lease()), 60, "another node to take the scheduler lease")
        assert holder_node(taken.holder) != leader
        wait_for(lambda: set(pages()) >= set(later), 60, "the new leader's escalations")
        time.sleep(5 * ESCALATION_INTERVAL)
        assert pages() == {uid: 1 for uid in first + later}  # once each, across the hand-over
        # The new leader paged only after the dead one's lease had expired: never two leaders at once.
        first_page_after_kill = min(at for at, body in Webhook.received if body["study_instance_uid"] in later)
        assert first_page_after_kill >= old_expiry.timestamp()
        handover = first_page_after_kill - killed_at
        print(f"hand-over: {handover:.1f} s after the kill; lease {3 * ESCALATION_INTERVAL:.0f} s")
    finally:
        for n in nodes:
            n.stop()
        server.shutdown()
        db.dispose()


# -- 3. receivers behind HAProxy, scorers that die ---------------------------------------------------------------


def test_the_health_check_is_a_dicom_association_not_a_tcp_connect(tmp_path: Path, pg: PrivatePostgres) -> None:
    """A listener that accepts TCP but speaks no DICOM (a wedged process) is DOWN; a receiver is UP and its
    checks are released associations, so none is left open on it."""
    import socket

    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(16)
    # Two associations at a time (one modality, one check): checks that held their associations would fill
    # the slots and the modality's would be refused. (With one, a check that comes while the modality's
    # association is open, or just released, is refused: HAProxy rightly takes a full receiver out.)
    receiver = node(tmp_path / "r", pg.url, "recv", ["receiver"],
                    dicom={"max_associations": 2, "max_associations_per_host": 2}).start()
    lb = HAProxy(tmp_path / "lb", [receiver.port, mute.getsockname()[1]]).start()
    files = phantoms(tmp_path / "images", 3, 5_250_000)
    try:
        states = wait_for(lambda: (lambda s: s if s["receiver-1"] == "UP" and s["receiver-2"].startswith("DOWN")
                                   else None)(lb.server_states()), 30, "the checks to settle")
        assert states == {"receiver-1": "UP", "receiver-2": "DOWN"}
        checks = lb.check_states()
        assert checks["receiver-1"].startswith("L7OK") and checks["receiver-2"].startswith("L7TOUT"), checks
        for path in files:  # while checks keep coming every 500 ms
            assert storescu(lb.port, [path]).acknowledged == [path]
            time.sleep(0.4)
        assert '"association rejected"' not in receiver.log
    finally:
        lb.stop()
        receiver.stop()
        mute.close()


IMAGES_LB = 16  # the 100 scaled down: two receivers, two scorers and Orthanc share two cores
SCORE_LEASE = 8.0  # seconds; far above one image's scoring time, short enough to wait out in a test


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with loopback only, for Orthanc and the nodes that send to it."""
    with private_netns("cxrt-mn") as name:
        yield name


def orthanc_counts(netns: str) -> dict[str, int]:
    """Instances in Orthanc by modality (a second copy under a new SOP Instance UID would count twice)."""
    from .test_orthanc import rest

    counts: dict[str, int] = {}
    listing = rest(netns, "GET", "/series?expand")
    assert isinstance(listing, list)
    for series in listing:
        modality = series["MainDicomTags"].get("Modality", "")
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


def logged(nodes: list, msg: str) -> list[str]:
    """SOP Instance UIDs of the ``msg`` events in these nodes' logs (one entry per event)."""
    uids = []
    for n in nodes:
        for line in n.log.splitlines():
            if f'"msg": "{msg}"' in line:
                uids.append(json.loads(line).get("sop_instance_uid", ""))
    return uids


def test_receivers_behind_haproxy_and_scorers_killed_mid_stream(tmp_path: Path, pg: PrivatePostgres,
                                                                 netns: str) -> None:
    """Two receivers and two scorer+sender nodes on one archive folder and one PostgreSQL, HAProxy in front,
    Orthanc as the PACS. A receiver is killed (SIGKILL) mid-stream: HAProxy's DICOM check marks it down,
    storescu goes on through the other and resends what was not acknowledged. Then a scorer is killed
    mid-batch: the other takes its job over once the lease expired. Every acknowledged image is archived
    once, scored once, and its SEG and SR reach Orthanc once (a send re-run after a lease expired is the
    documented at-least-once window)."""
    import os
    import shutil
    import signal

    from .test_orthanc import ORTHANC_DICOM, Orthanc

    exe = shutil.which("Orthanc") or pytest.skip("Orthanc not installed (apt-get install orthanc)")
    (tmp_path / "orthanc").mkdir()
    orthanc = Orthanc(exe, tmp_path / "orthanc", netns)
    files = phantoms(tmp_path / "images", IMAGES_LB, 5_400_000)
    uids = {path: sop_uid(path) for path in files}
    archive = tmp_path / "archive"
    db = Database(pg.url)  # not migrated here: the four nodes start at once and one of them migrates
    # Every association comes from HAProxy's address: no per-host limit behind it (docs/deploy.md).
    receivers = [node(tmp_path / f"recv-{i}", pg.url, f"recv-{i}", ["receiver"], archive=archive,
                      dicom={"max_associations_per_host": 0}) for i in (1, 2)]
    scorers = [node(tmp_path / f"scorer-{x}", pg.url, f"scorer-{x}", ["scorer", "sender"], netns=netns,
                    archive=archive, inference={"threads": 1},
                    destinations=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": ORTHANC_DICOM}],
                    workers={"lease_seconds": SCORE_LEASE, "backoff_seconds": 0.3, "backoff_max_seconds": 2.0})
               for x in "ab"]
    everyone = receivers + scorers
    lb: HAProxy | None = None
    try:
        orthanc.start()
        starting = [threading.Thread(target=n.start) for n in everyone]
        for t in starting:
            t.start()
        for t in starting:
            t.join()
        assert all(n.process is not None and n.process.poll() is None for n in everyone)
        lb = HAProxy(tmp_path / "lb", [r.port for r in receivers]).start()
        wait_for(lambda: set(lb.server_states().values()) == {"UP"}, 30, "both receivers UP")

        # Two modalities stream through HAProxy, four images per association; receiver 1 dies mid-stream.
        acknowledged: list[Path] = []

        def modality(mine: list[Path]) -> None:
            for k in range(0, len(mine), 4):
                acknowledged.extend(storescu(lb.port, mine[k:k + 4]).acknowledged)

        streams = [threading.Thread(target=modality, args=(files[i::2],)) for i in (0, 1)]
        for t in streams:
            t.start()
        wait_for(lambda: receivers[0].log.count('"msg": "stored"') >= 1 and lb.sessions()["receiver-1"] > 0, 60,
                 "receiver 1 to store an image and be in an association", interval=0.05)
        receivers[0].kill()  # in the middle of an association
        for t in streams:
            t.join(timeout=120)
        wait_for(lambda: lb.server_states()["receiver-1"].startswith("DOWN"), 30, "HAProxy to mark receiver 1 down")
        # Its port is closed: every check from now on says so (the one the kill cut short may have read
        # an empty response instead).
        wait_for(lambda: lb.check_states()["receiver-1"].startswith("L4CON"), 30, "a connection-refused check")
        stored = rows_by_uid(db)
        assert [uids[p] for p in acknowledged if stored.get(uids[p]) != 1] == []  # no Success without its row
        assert len(acknowledged) < len(files)  # the kill cut an association: some images were not acknowledged
        for _ in range(3):  # the modalities resend what was not acknowledged, through the surviving receiver
            pending = [p for p in files if p not in acknowledged]
            if not pending:
                break
            acknowledged.extend(storescu(lb.port, pending).acknowledged)
        assert sorted(acknowledged) == sorted(files)
        assert receivers[1].log.count('"msg": "stored"') > 0

        # Scorer A is frozen while it holds a job, its lease read, then killed: B takes the job over.
        a, b = scorers
        assert a.process is not None
        held: list[tuple[int, dt.datetime]] = []
        for _ in range(5):  # frozen between two jobs holds none: let it run on and freeze it again
            wait_for(lambda: a.log.count('"msg": "scored"') >= 2 and running_jobs(db, "scorer-a:"), 120,
                     "scorer A to have scored some images and to hold the next", interval=0.1)
            os.kill(a.process.pid, signal.SIGSTOP)
            time.sleep(0.3)
            held = running_jobs(db, "scorer-a:")
            if held:
                break
            os.kill(a.process.pid, signal.SIGCONT)
        assert held, "scorer A held no job when it was frozen"
        a.kill()
        every = {uids[p] for p in files}
        scored = wait_for(lambda: (lambda s: s if set(s) >= every else None)(scored_by_uid(db)), 240,
                          "every acknowledged image scored")
        assert {uid: scored[uid] for uid in every} == {uid: ["scored"] for uid in every}  # once each
        with db.session() as session:
            for job_id, lease_until in held:
                job = session.get(Job, job_id)
                assert job is not None and job.state == "done" and job.worker.startswith("scorer-b:"), job
                result = session.scalars(select(ScoreResult).where(ScoreResult.instance_id == job.instance_id)).one()
                assert as_utc(result.created_at) >= as_utc(lease_until)  # taken over only once the lease expired
            kinds = dict(session.execute(select(Instance.kind, func.count()).group_by(Instance.kind)).all())
        assert kinds == {"source": IMAGES_LB, "seg": IMAGES_LB, "sr": IMAGES_LB}  # archived once each
        for uid in every:
            assert len(list(archive.rglob(f"{uid}.*.dcm"))) == 1

        wait_for(lambda: orthanc_counts(netns) == {"SEG": IMAGES_LB, "SR": IMAGES_LB}, 240,
                 "every SEG and SR in Orthanc")

        def send_jobs() -> list[Any]:
            with db.session() as session:
                return list(session.execute(
                    select(Job.state, Job.attempts, Job.worker, Instance.sop_instance_uid)
                    .join(Instance, Instance.id == Job.instance_id).where(Job.kind == "send")).all())

        # A send that scorer A finished on the wire but not in the database (killed between the two) stays
        # running until its lease expires and B sends it again: Orthanc can hold every object before then.
        sends = wait_for(lambda: (lambda s: s if {j.state for j in s} == {"done"} else None)(send_jobs()),
                         SCORE_LEASE + 120, "every send job done")
        assert len(sends) == 2 * IMAGES_LB and {s.state for s in sends} == {"done"}
        rerun = {s.sop_instance_uid for s in sends if s.attempts > 1}  # the at-least-once window
        sent = logged(scorers, "sent")
        twice = {uid for uid in sent if sent.count(uid) > 1}
        assert twice <= rerun, twice - rerun
        # "sent" is logged after the job's commit: only the killed scorer A can have died (frozen, then
        # SIGKILL) between the two, so every send is logged except, at most, ones A completed.
        unlogged = {s.sop_instance_uid: s.worker for s in sends if s.sop_instance_uid not in set(sent)}
        assert all(worker.startswith("scorer-a:") for worker in unlogged.values()), unlogged
        assert len(unlogged) <= 2  # at most one per send worker of A's (workers.send_workers: 2)
    finally:
        if lb is not None:
            lb.stop()
        for n in everyone:
            if n.process is not None and n.process.poll() is None:
                os.kill(n.process.pid, signal.SIGCONT)
            n.stop()
        orthanc.stop()
        db.dispose()


def running_jobs(db: Database, worker_prefix: str) -> list[tuple[int, dt.datetime]]:
    """(id, lease end) of the scoring jobs a node's workers hold now."""
    with db.session() as session:
        jobs = session.scalars(select(Job).where(Job.kind == "score", Job.state == "running",
                                                 Job.worker.like(f"{worker_prefix}%")))
        return [(job.id, job.lease_until) for job in jobs if job.lease_until is not None]


def test_the_deploy_guide_configurations_are_valid() -> None:
    """Every YAML block of docs/deploy.md is a configuration the node accepts, with the roles it names."""
    import re

    import yaml

    from cxrtriage.config import Settings

    guide = (Path(__file__).resolve().parent.parent / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", guide, re.S)
    assert len(blocks) == 3
    roles = []
    for block in blocks:
        settings = Settings.model_validate(yaml.safe_load(block))
        roles.append(settings.node.roles)
    assert roles == [["receiver"], ["scorer", "sender"], ["scheduler", "web"]]
