"""deploy/prometheus and deploy/grafana: rules that promtool accepts and that fire when
they should, and queries that only name metrics fanout really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from worker.backends.base import BackendStats, PoolCapacity, ResizeError
from worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "fanout-dashboard.json"
RULE_TESTS = Path(__file__).with_name("alerts_test.yaml")
METRIC = re.compile(r"\bfanout_[a-z0-9_]+")
RECORDED = re.compile(r"\bfanout:[a-z0-9_:]+")
#: What the job monitor exports: the dashboard's Jobs row shows every one of them.
JOB_MONITOR_METRICS = (
    "fanout_jobs_completed_total", "fanout_job_duration_seconds_bucket",
    "fanout_tasks_failed_total", "fanout_jobs_monitored", "fanout_events_published_total",
    "fanout_event_publish_errors_total", "fanout_monitor_requests_total",
    "fanout_monitor_errors_total", "fanout_jobs_terminated_total", "fanout_jobs_deleted_total")
JOB_MONITOR_ALERTS = ("FanoutJobFailureRatioHigh", "FanoutEventsNotPublished",
                      "FanoutMonitorErrors")

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not on PATH (Debian: apt-get install prometheus; CI installs it)")


def exported_names() -> set[str]:
    """Every sample name fanout's registry can expose (counters' _total, histograms' parts;
    no ``_created``: fanout turns those series off)."""
    registry = CollectorRegistry()
    Metrics(registry=registry)
    suffixes = {"counter": ("_total",), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"), "info": ("_info",)}
    names = set()
    for family in registry.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def alert_rules() -> list[dict[str, Any]]:
    """The rules of alerts.yaml, every group flattened."""
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard's panels and variables."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(re.sub(r"^label_values\((\w+),.*\)$", r"\1", var["definition"]))
    return exprs


def test_every_metric_the_rules_use_is_exported() -> None:
    """Each fanout_* name in an alert or recording rule exists in worker/metrics.py."""
    used = {m for rule in alert_rules() for m in METRIC.findall(rule["expr"])}
    assert used, "the rules name no fanout metric"
    assert used - exported_names() == set()


def test_every_metric_the_dashboard_uses_is_exported() -> None:
    """Each fanout_* name in a dashboard query exists in worker/metrics.py."""
    used = {m for expr in dashboard_exprs() for m in METRIC.findall(expr)}
    assert used - exported_names() == set()


def test_the_job_monitor_metrics_are_exported_and_on_the_dashboard() -> None:
    """Every job-monitor metric exists in worker/metrics.py and is queried by a panel."""
    assert set(JOB_MONITOR_METRICS) - exported_names() == set()
    used = {m for expr in dashboard_exprs() for m in METRIC.findall(expr)}
    assert set(JOB_MONITOR_METRICS) - used == set()


def test_recording_rules_the_dashboard_and_alerts_use_are_defined() -> None:
    """fanout:* series used anywhere are recorded by alerts.yaml."""
    recorded = {r["record"] for r in alert_rules() if "record" in r}
    used = {m for e in dashboard_exprs() + [r["expr"] for r in alert_rules()]
            for m in RECORDED.findall(e)}
    assert used and used <= recorded


def _rule_groups(path: Path) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text())
    groups: list[dict[str, Any]] = (data["spec"]["groups"] if data.get("kind") == "PrometheusRule"
                                    else data["groups"])
    return groups


def test_the_prometheus_rule_has_the_same_rules_as_alerts_yaml() -> None:
    """deploy/k8s/prometheusrule.yaml carries alerts.yaml's groups, rule for rule."""
    plain, operator = _rule_groups(ALERTS), _rule_groups(PROMETHEUS_RULE)
    assert [g["name"] for g in operator] == [g["name"] for g in plain]
    for ours, theirs in zip(plain, operator, strict=True):
        assert theirs == ours, f"group {ours['name']} differs between the two files"


def test_every_alert_says_what_it_means_and_what_to_check() -> None:
    """Each alert has a severity, a summary and a description; the job-monitor alerts a
    runbook hint naming what to look at."""
    alerts = {r["alert"]: r for r in alert_rules() if "alert" in r}
    assert set(JOB_MONITOR_ALERTS) <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
    for name in JOB_MONITOR_ALERTS:
        runbook = alerts[name]["annotations"]["runbook"]
        assert "`fanout status`" in runbook and "logs" in runbook, name


def test_the_name_check_catches_a_made_up_metric() -> None:
    """A query on a metric fanout does not export is caught by the same check."""
    assert METRIC.findall("rate(fanout_messages_recieved_total[5m])")[0] not in exported_names()


def test_the_dashboard_has_the_panels_operators_need() -> None:
    """Queue depth, dead letters, outcomes, tasks, latency, pool nodes and job quota panels."""
    dash = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dash["panels"] if p["type"] != "row"}
    wanted = {
        "Queue depth": "fanout_queue_messages",
        "Dead-letter queue": 'state="dead_letter"',
        "Messages by outcome": "fanout_messages_total",
        "Tasks submitted": "fanout_tasks_submitted_total",
        "Submission latency": "fanout_submit_duration_seconds_bucket",
        "Pool nodes by state": "fanout_pool_nodes",
        "Active jobs against quota": "fanout:active_jobs_quota",
        "Jobs completed by outcome": "fanout_jobs_completed_total",
        "Job failure ratio": 'fanout_jobs_completed_total{outcome="failed"}',
        "Job duration": "fanout_job_duration_seconds_bucket",
        "Failed tasks by category": "fanout_tasks_failed_total",
        "Jobs monitored": "fanout_jobs_monitored",
        "Completion events": "fanout_event_publish_errors_total",
        "Monitor requests and errors": "fanout_monitor_errors_total",
        "Jobs terminated and deleted": "fanout_jobs_terminated_total",
    }
    for title, needle in wanted.items():
        assert title in panels, title
        assert any(needle in t["expr"] for t in panels[title]["targets"]), title
    latency = " ".join(t["expr"] for t in panels["Submission latency"]["targets"])
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.95," in latency
    duration = " ".join(t["expr"] for t in panels["Job duration"]["targets"])
    assert "histogram_quantile(0.5," in duration and "histogram_quantile(0.95," in duration
    assert duration.count("by (le, handler)") == 2
    events = " ".join(t["expr"] for t in panels["Completion events"]["targets"])
    assert "fanout_events_published_total" in events
    monitor = " ".join(t["expr"] for t in panels["Monitor requests and errors"]["targets"])
    assert "sum by (operation) (rate(fanout_monitor_requests_total" in monitor
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels.values())
    assert all(t["datasource"]["uid"] == "${datasource}"
               for p in panels.values() for t in p["targets"])
    assert all(len({t["refId"] for t in p["targets"]}) == len(p["targets"])
               for p in panels.values())


def test_the_jobs_row_holds_the_job_panels() -> None:
    """A "Jobs" row comes after the others and the job-monitor panels sit under it."""
    dash = json.loads(DASHBOARD.read_text())
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    assert rows[-1]["title"] == "Jobs"
    under = [p for p in dash["panels"] if p["gridPos"]["y"] > rows[-1]["gridPos"]["y"]]
    used = {m for p in under for t in p["targets"] for m in METRIC.findall(t["expr"])}
    assert set(JOB_MONITOR_METRICS) - used == set()


def _overlaps(panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of panels whose gridPos rectangles share a cell, or that leave the 24 columns."""
    found = []
    for i, a in enumerate(panels):
        ga = a["gridPos"]
        if ga["x"] < 0 or ga["x"] + ga["w"] > 24:
            found.append((a["title"], "outside the grid"))
        for b in panels[i + 1:]:
            gb = b["gridPos"]
            if (ga["x"] < gb["x"] + gb["w"] and gb["x"] < ga["x"] + ga["w"]
                    and ga["y"] < gb["y"] + gb["h"] and gb["y"] < ga["y"] + ga["h"]):
                found.append((a["title"], b["title"]))
    return found


def test_the_dashboard_panels_do_not_overlap() -> None:
    """No two panels (rows included) share a grid cell; rows span the full width."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert _overlaps(panels) == []
    assert all(p["gridPos"]["w"] == 24 for p in panels if p["type"] == "row")


def test_the_overlap_check_catches_a_misplaced_panel() -> None:
    """The same check flags a panel moved onto its neighbour."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    last = panels[-1]
    panels.append({**last, "title": "moved", "gridPos": {**last["gridPos"], "x": 6}})
    assert "moved" in {t for pair in _overlaps(panels) for t in pair}


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    """promtool check rules passes on alerts.yaml."""
    out = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The same check fails on a rule with a PromQL syntax error."""
    broken = tmp_path / "alerts.yaml"
    broken.write_text(ALERTS.read_text().replace("> 0.8", "> > 0.8", 1))
    out = subprocess.run(["promtool", "check", "rules", str(broken)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0


@needs_promtool
def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL (checked by promtool as recording rules)."""
    rules = [{"record": f"dashboard:query_{i}",
              "expr": expr.replace("$__rate_interval", "5m").replace("$pool", ".*")
              .replace("$queue", ".*")}
             for i, expr in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _rules_without_annotations(tmp_path: Path, old: str = "", new: str = "") -> Path:
    # promtool's unit tests compare annotations verbatim; the templates are checked
    # by `check rules`, the expressions, durations and labels here.
    data = yaml.safe_load(ALERTS.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
            if old:
                rule["expr"] = rule["expr"].replace(old, new)
    path = tmp_path / "alerts.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@needs_promtool
def test_each_alert_fires_when_it_should_and_only_then(tmp_path: Path) -> None:
    """promtool test rules: every alert fires on its symptom and stays quiet without it."""
    _rules_without_annotations(tmp_path)
    (tmp_path / "alerts_test.yaml").write_text(RULE_TESTS.read_text())
    out = subprocess.run(["promtool", "test", "rules", "alerts_test.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_firing_case() -> None:
    """Each alert of alerts.yaml is expected to fire in at least one rule test."""
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {c["alertname"] for t in cases for c in t.get("alert_rule_test", [])
              if c.get("exp_alerts")}
    quiet = {c["alertname"] for t in cases for c in t.get("alert_rule_test", [])
             if not c.get("exp_alerts")}
    alerts = {r["alert"] for r in alert_rules() if "alert" in r}
    assert alerts == firing
    assert alerts == quiet


@needs_promtool
def test_the_rule_tests_catch_a_weakened_alert(tmp_path: Path) -> None:
    """Raising an alert's threshold out of reach makes promtool test rules fail."""
    _rules_without_annotations(tmp_path, "> 120", "> 1200000")
    (tmp_path / "alerts_test.yaml").write_text(RULE_TESTS.read_text())
    out = subprocess.run(["promtool", "test", "rules", "alerts_test.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "FanoutNoHeartbeat" in out.stdout + out.stderr


def _live_metrics() -> bytes:
    registry = CollectorRegistry()
    m = Metrics(registry=registry)
    m.messages.labels("sweep", "completed").inc(3)
    m.messages.labels("sweep", "dead_lettered").inc()
    m.dead_letters.labels("invalid_params").inc()
    m.message_duration.labels("sweep").observe(1.5)
    m.tasks_submitted.labels("sweep").inc(100)
    m.tasks_existing.labels("sweep").inc(2)
    m.submit_requests.labels("ok").inc()
    m.submit_retries.inc()
    m.submit_seconds.labels("sweep").observe(0.4)
    m.inflight.set(2)
    m.queue_messages.labels("fanout", "active").set(7)
    m.queue_messages.labels("fanout", "dead_letter").set(1)
    m.backend_stats.update(BackendStats(
        pool_nodes={("cpu", "idle"): 2, ("cpu", "lowpriority_preempted"): 1},
        pool_size={("cpu", "target_dedicated"): 2}, active_jobs=4, job_tasks={"running": 8},
        pools={"cpu": PoolCapacity(pool="cpu", nodes={"idle": 2}, pending=3,
                                   resize_errors=[ResizeError("AllocationTimedOut")],
                                   target_dedicated=3, current_dedicated=2)}))
    m.ready.set(1)
    m.heartbeat.set(1.7e9)
    m.poll_errors.labels("backend").inc()
    m.jobs_completed.labels("sweep", "succeeded").inc(5)
    m.jobs_completed.labels("sweep", "failed").inc()
    m.job_duration.labels("sweep").observe(420)
    m.tasks_failed.labels("sweep", "exit_code").inc(3)
    m.jobs_monitored.set(3)
    m.events_published.labels("configured").inc(6)
    m.event_publish_errors.inc()
    m.monitor_requests.labels("list_jobs").inc(10)
    m.monitor_errors.inc()
    m.jobs_terminated.labels("FanoutBlocked").inc()
    m.jobs_deleted.inc(2)
    return generate_latest(registry)


@needs_promtool
def test_promtool_accepts_fanouts_real_metrics_output() -> None:
    """promtool check metrics finds no lint problem in what /metrics serves."""
    body = _live_metrics()
    assert b"fanout_messages_total" in body
    assert b'fanout_jobs_completed_total{handler="sweep",outcome="failed"} 1.0' in body
    out = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                         timeout=60)
    assert out.returncode == 0, (out.stdout + out.stderr).decode()


@needs_promtool
def test_promtool_check_metrics_flags_a_badly_named_counter() -> None:
    """The metrics check bites: a counter without _total is reported."""
    body = b"# HELP fanout_bad A counter.\n# TYPE fanout_bad counter\nfanout_bad 1\n"
    out = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                         timeout=60)
    assert out.returncode != 0


def test_the_docs_describe_every_metric_and_alert() -> None:
    """docs/observability.md names each exported metric family and each alert."""
    doc = (ROOT / "docs" / "observability.md").read_text()
    registry = CollectorRegistry()
    Metrics(registry=registry)
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in doc, f"{name} is not documented"
    for rule in alert_rules():
        assert f"`{rule.get('alert') or rule['record']}`" in doc
