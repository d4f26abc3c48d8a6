"""The files of deploy/: the systemd unit (systemd-analyze verify), log rotation with the node's real log
handler (logrotate), and alert rules that use only metrics the node exports."""

from __future__ import annotations

import getpass
import grp
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cxrtriage.config import LoggingSettings
from cxrtriage.observability import Metrics, setup_logging
from cxrtriage.stages.circuit import Circuits

DEPLOY = Path(__file__).parents[1] / "deploy"
UNIT = DEPLOY / "systemd" / "cxrtriage.service"
RULES = DEPLOY / "prometheus" / "cxrtriage-alerts.yml"
#: Metrics of other exporters the rules may use: Prometheus's own ``up``.
EXTERNAL = {"up"}
#: PromQL words that look like metric names.
PROMQL = {"sum", "by", "without", "and", "or", "unless", "delta", "increase", "rate", "min_over_time",
          "max_over_time", "avg_over_time", "absent", "on", "ignoring", "bool"}


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (CI installs systemd)")
    # verify rejects an ExecStart binary that does not exist here: check a copy that runs /bin/true instead.
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/cxrtriage/.venv/bin/cxrtriage", "/bin/true"))
    done = subprocess.run([exe, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=120)
    ours = [line for line in (done.stdout + done.stderr).splitlines() if UNIT.name in line]
    assert done.returncode == 0 and ours == [], done.stdout + done.stderr  # unknown keys and bad values print here

    settings = unit_settings()
    assert settings["ExecStart"] == ["/opt/cxrtriage/.venv/bin/cxrtriage serve -c /etc/cxrtriage/config.yaml"]
    assert settings["User"] == ["cxrtriage"] and settings["StateDirectory"] == ["cxrtriage"]
    assert settings["LogsDirectory"] == ["cxrtriage"] and settings["Restart"] == ["on-failure"]
    assert settings["ProtectSystem"] == ["strict"] and settings["NoNewPrivileges"] == ["yes"]
    assert settings["ReadWritePaths"] == ["/var/lib/cxrtriage /var/log/cxrtriage"]


def test_systemd_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt hardening option is reported."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (CI installs systemd)")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/cxrtriage/.venv/bin/cxrtriage", "/bin/true")
                    .replace("ProtectSystem=strict", "ProtectSystem=sideways"))
    done = subprocess.run([exe, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=120)
    assert any(UNIT.name in line for line in (done.stdout + done.stderr).splitlines())


def test_logrotate_rotation_and_the_node_reopening_its_log(tmp_path: Path) -> None:
    exe = shutil.which("logrotate")
    if exe is None:
        pytest.skip("logrotate is not installed")
    logs = tmp_path / "log"
    logs.mkdir(mode=0o750)
    user, group = getpass.getuser(), grp.getgrgid(os.getgid()).gr_name
    config = (DEPLOY / "logrotate" / "cxrtriage").read_text()
    directives = [line.split()[0] for line in config.splitlines() if line.strip() and not line.startswith("#")]
    assert "/var/log/cxrtriage/*.log" in directives and "copytruncate" not in directives
    local = tmp_path / "cxrtriage.logrotate"
    local.write_text(config.replace("/var/log/cxrtriage", str(logs)).replace("cxrtriage cxrtriage", f"{user} {group}"))
    local.chmod(0o644)
    log_file = logs / "cxrtriage.log"
    loggers = [logging.getLogger("cxrtriage"), logging.getLogger("pynetdicom")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    setup_logging(LoggingSettings(file=str(log_file), json_lines=True))
    node_log = logging.getLogger("cxrtriage.test_deploy")
    try:
        node_log.warning("before rotation")
        done = subprocess.run([exe, "-f", "-s", str(tmp_path / "state"), str(local)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        node_log.warning("after rotation")
    finally:
        for handler in loggers[0].handlers:
            handler.close()
        for lg, (handlers, level, propagate) in zip(loggers, saved):
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    rotated = logs / "cxrtriage.log.1"
    assert rotated.is_file() and "before rotation" in rotated.read_text()
    assert "after rotation" in log_file.read_text() and "before rotation" not in log_file.read_text()


def registry_metrics() -> dict[str, set[str]]:
    """Every sample name the node's registry can export, with its label names (as the node builds it)."""
    metrics = Metrics()
    Circuits(["PACS"], 3, 60.0, registry=metrics.registry)
    names: dict[str, set[str]] = {}
    for collector, families in metrics.registry._collector_to_names.items():  # noqa: SLF001 - label names
        labels = set(getattr(collector, "_labelnames", ()))
        for family in families:
            names[family] = labels | {"le"} if family.endswith("_bucket") else labels
    return names


def rule_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """Each metric name of a PromQL expression with the label names its selector matches on."""
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    found = []
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", re.sub(r'"[^"]*"', '""', expr)):
        name, selector = match.group(1), match.group(2) or ""
        if name in PROMQL or re.fullmatch(r"\d+[smhd]?", name) or expr[match.end():].lstrip().startswith("("):
            continue
        found.append((name, set(re.findall(r"([a-zA-Z_]+)\s*=~?", selector))))
    return found


def test_alert_rules_use_only_metrics_the_node_exports() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    wanted = {"CxrtriageNodeDown", "CxrtriageQueueStuck", "CxrtriageDestinationCircuitOpen", "CxrtriageDiskLow",
              "CxrtriageNoImagesScored"}
    assert wanted <= {rule["alert"] for rule in rules}
    exported = registry_metrics()
    used: set[str] = set()
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"} and rule["annotations"]["summary"]
        assert rule["expr"].count("(") == rule["expr"].count(")") and rule["expr"].count("{") == rule["expr"].count("}")
        for name, labels in rule_selectors(rule["expr"]):
            used.add(name)
            if name in EXTERNAL:
                continue
            assert name in exported, f"{rule['alert']}: {name} is not exported by the node ({sorted(exported)})"
            assert labels - {"job", "instance"} <= exported[name], f"{rule['alert']}: {name} has no {labels}"
    assert {"cxrtriage_queue_depth", "cxrtriage_destination_circuit_state", "up"} <= used


def test_the_rule_check_can_fail() -> None:
    assert rule_selectors('sum by (kind) (cxrtriage_bogus_total{state="x"}) > 0') == [
        ("cxrtriage_bogus_total", {"state"})]
    assert "cxrtriage_bogus_total" not in registry_metrics()
