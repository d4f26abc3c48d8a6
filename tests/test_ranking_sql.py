"""The worklist's SQL ranking (triage/ranking_sql.py) agrees with the Python priority model.

``Worklist.entries(limit=N)`` lets the database choose the first N studies;
``entries()`` ranks every study in Python (triage/priority.py). On random
studies (pending, failed, one lung or no lung found, STAT orders, DIMSE HIGH,
overdue, claimed and read) both must give the same studies in the same order,
for every filter and for settings other than the defaults.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from cxrtriage.config import PrioritySettings
from cxrtriage.storage.db import Database
from cxrtriage.triage.worklist import Worklist

from .harness import fill_random_studies

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


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
    fill_random_studies(database, 400, seed=len(name), now=NOW)
    worklist = Worklist(database, SETTINGS[name])
    for filters in FILTERS:
        everything = [e.study_instance_uid for e in worklist.entries(NOW, details=False, **filters)]
        assert everything, filters  # every filter selects some studies of this data
        for limit in (1, 25, len(everything) // 2, len(everything) + 5):
            top = [e.study_instance_uid for e in worklist.entries(NOW, details=False, limit=limit, **filters)]
            assert top == everything[:limit], (filters, limit)
