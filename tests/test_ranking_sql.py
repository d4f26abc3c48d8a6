"""The worklist's SQL ranking (triage/ranking_sql.py) agrees with the Python priority model.

``Worklist.entries(limit=N)`` lets the database choose the first N studies;
``entries()`` ranks every study in Python (triage/priority.py). On random
studies (pending, failed, one lung or no lung found, STAT orders, DIMSE HIGH,
overdue, claimed and read) both must give the same studies in the same order,
for every filter and for settings other than the defaults.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

import pytest
from sqlalchemy import insert

from cxrtriage.config import PrioritySettings
from cxrtriage.storage.db import Database
from cxrtriage.storage.models import Instance, Reading, ScoreResult
from cxrtriage.triage.worklist import Worklist

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
CR = "1.2.840.10008.5.1.4.1.1.1"


def fill(db: Database, studies: int, seed: int) -> None:
    rng = random.Random(seed)
    instances: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    readings: list[dict[str, Any]] = []
    for s in range(studies):
        uid = f"1.2.826.0.1.3680043.10.998.{seed}.{s}"
        # most within their band's maximum wait (where severity orders them), some far past it
        received = NOW - dt.timedelta(minutes=rng.uniform(0, 1500) if rng.random() < 0.1 else rng.uniform(0, 100))
        for i in range(rng.randint(1, 3)):
            iid = len(instances) + 1
            instances.append({
                "id": iid, "sop_instance_uid": f"{uid}.{i}", "sop_class_uid": CR,
                "transfer_syntax_uid": "1.2.840.10008.1.2.1", "study_instance_uid": uid,
                "series_instance_uid": f"{uid}.1", "modality": rng.choice(["CR", "DX"]), "kind": "source",
                "path": f"{uid}/{i}.dcm", "sha256": f"{iid:064x}", "size": 1,
                "requested_priority": rng.choice(["", "", "", "ROUTINE", "stat ", "HIGH", "LOW"]),
                "dimse_priority": rng.choice([None, 0, 1, 2]),
                "received_at": received + dt.timedelta(seconds=i),
            })
            roll = rng.random()
            if roll < 0.1:
                continue  # pending
            if roll < 0.15:
                status = rng.choice(["failed", "not_scorable"])
                results.append({"instance_id": iid, "study_instance_uid": uid, "status": status,
                                "total_score": None, "brixia_total": None, "zones_scored": None, "p_disease": None,
                                "details": "{}"})
                continue
            total = rng.randint(0, 6)
            zones = rng.choice([6, 6, 6, 6, 3, 0, None])
            results.append({"instance_id": iid, "study_instance_uid": uid, "status": "scored", "total_score": total,
                            "brixia_total": rng.randint(0, 20), "zones_scored": zones,
                            "p_disease": round(rng.random(), 6), "details": "{}"})
        roll = rng.random()
        if roll < 0.3:
            state = "read" if roll < 0.15 else rng.choice(["claimed", "unread"])
            readings.append({"study_instance_uid": uid, "state": state,
                             "reader": "dr_a", "updated_at": NOW})
    with db.engine.begin() as conn:
        for table, rows in ((Instance, instances), (ScoreResult, results), (Reading, readings)):
            if rows:
                conn.execute(insert(table), rows)


SETTINGS = {
    "defaults": PrioritySettings(),
    "missing lungs clear, other bands": PrioritySettings(
        missing_lung_zones_affected=False, critical_total=6, high_total=4, moderate_total=2, moderate_p_disease=0.8,
        base={"critical": 85.0, "high": 50.0, "moderate": 30.0, "low": 10.0, "unscored": 45.0, "ai_failed": 35.0},
        max_wait_minutes={"critical": 20.0, "high": 90.0, "moderate": 300.0, "low": 900.0, "unscored": 60.0,
                          "ai_failed": 100.0},
        order_base={"STAT": 95.0, "HIGH": 70.0, "ROUTINE": 5.0, "LOW": 0.0},
    ),
}
FILTERS: list[dict[str, Any]] = [
    {}, {"band": "critical"}, {"band": "moderate"}, {"band": "unscored"}, {"band": "ai_failed"},
    {"modality": "dx"}, {"unread_only": True}, {"include_read": True}, {"band": "low", "modality": "CR"},
]


@pytest.mark.parametrize("name", SETTINGS)
def test_sql_ranking_matches_the_python_model(database: Database, name: str) -> None:
    fill(database, 400, seed=len(name))
    worklist = Worklist(database, SETTINGS[name])
    for filters in FILTERS:
        everything = [e.study_instance_uid for e in worklist.entries(NOW, details=False, **filters)]
        assert everything, filters  # every filter selects some studies of this data
        for limit in (1, 25, len(everything) // 2, len(everything) + 5):
            top = [e.study_instance_uid for e in worklist.entries(NOW, details=False, limit=limit, **filters)]
            assert top == everything[:limit], (filters, limit)
