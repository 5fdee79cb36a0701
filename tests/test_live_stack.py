"""End to end with real Airflow processes (api-server, scheduler, dag-processor, triggerer) and both
simulators as subprocesses on free loopback ports (scripts/stack.py), driven through Airflow's REST API.

One stack for the whole module (about a minute to start on a two-core machine). The alert-to-incident
latency is reported, not asserted: see the terminal summary, the ``record_property`` entries (junit xml)
and ``<tmp>/latency.json``.
"""

from __future__ import annotations

import json
import re
import statistics
import time

import pytest
import requests

from scripts.stack import DAG_IDS, DEFENDER_CONN_ID, Stack, StackOptions, alert_key, wait_until

pytestmark = pytest.mark.live

ALERT_POLL_SECONDS = 2
DEVICES = 60
SAMPLES = 5


class _Summary:
    """Lines for pytest's terminal summary (shown with and without -s)."""

    def __init__(self):
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter):
        if self.lines:
            terminalreporter.section("live stack")
            for line in self.lines:
                terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def summary(request):
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "live-stack-summary")
    return plugin


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("live") / "airflow_home"
    live = Stack(StackOptions(home=home, devices=DEVICES, sensors=2, fast=True,
                              alert_poll_seconds=ALERT_POLL_SECONDS))
    try:
        live.start()
        live.wait_for_dags()
        yield live
    finally:
        live.stop()


def _log_text(stack: Stack, dag_id: str, run_id: str, task_id: str | None = None) -> str:
    files = [f for f in stack.task_log_files(dag_id, run_id) if task_id is None or f"task_id={task_id}" in str(f)]
    return "\n".join(f.read_text(errors="replace") for f in files)


def _failure_context(stack: Stack, dag_id: str, run_id: str) -> str:
    tis = {t["task_id"]: t["state"] for t in stack.task_instances(dag_id, run_id)}
    return f"task states {tis}; logs under {stack.home / 'logs'}; last lines:\n{_log_text(stack, dag_id, run_id)[-3000:]}"


def test_dags_parse_and_are_unpaused(stack):
    assert stack.import_errors() == []
    dags = {d["dag_id"]: d for d in stack.api_json("GET", "/api/v2/dags")["dags"]}
    for dag_id in DAG_IDS:
        assert dag_id in dags
        assert dags[dag_id]["is_paused"] is False


def test_connection_form_offers_both_connection_types(stack):
    """The UI's connection form (3.2+ provider metadata): relabelled fields and typed extras."""
    meta = {m["connection_type"]: m for m in stack.api_json("GET", "/ui/connections/hook_meta")}
    servicenow, defender = meta["servicenow"], meta["defender_iot"]
    assert servicenow["hook_name"] == "ServiceNow"
    assert servicenow["standard_fields"]["host"]["title"] == "Instance URL"
    assert {"client_id", "client_secret", "auth_type", "verify", "proxy", "timeout"} <= set(servicenow["extra_fields"])
    assert defender["standard_fields"]["password"]["title"] == "API access token"
    assert defender["standard_fields"]["login"]["hidden"] is True
    assert {"appliance", "name", "verify", "proxy", "timeout"} <= set(defender["extra_fields"])


def test_rest_api_needs_a_token(stack):
    assert requests.get(f"{stack.api_url}/api/v2/dags", timeout=10).status_code == 401


def test_rest_triggered_sync_creates_cis(stack):
    run_id = stack.trigger("defender_device_sync", {"full_resync": True})
    state = stack.wait_for_run("defender_device_sync", run_id)
    assert state == "success", _failure_context(stack, "defender_device_sync", run_id)
    run = stack.api_json("GET", f"/api/v2/dags/defender_device_sync/dagRuns/{run_id}")
    assert (run.get("note") or "").startswith("Last Sync: 1 source(s) synced: seen "), run.get("note")

    devices = requests.get(f"{stack.defender_url}/external/v1/devices", timeout=30,
                           headers={"Authorization": stack.defender_token}).json()
    device_ids = {d["id"] for d in devices}
    rows = stack.cmdb_source_rows()
    synced = {int(r["id"].split(":", 1)[1]) for r in rows}
    assert synced <= device_ids
    # Two devices in fifty are invalid on purpose (malformed IP / MAC); the others all become CIs.
    assert len(synced) >= 0.9 * len(device_ids), f"{len(synced)} CIs for {len(device_ids)} devices"
    for table in {r["target_table"] for r in rows}:
        present = {rec["sys_id"] for rec in stack.sn_records(table)}
        missing = [r["id"] for r in rows if r["target_table"] == table and r["target_sys_id"] not in present]
        assert not missing, f"sys_object_source points at missing {table} records: {missing[:5]}"


def test_new_alerts_become_incidents_once_without_a_manual_trigger(stack, summary, record_property,
                                                                   tmp_path_factory):
    before = {r["dag_run_id"] for r in stack.runs("defender_alert_forwarding")}
    raised: dict[str, float] = {}
    seen: dict[str, float] = {}
    start = time.monotonic()
    while len(seen) < SAMPLES:
        if len(raised) < SAMPLES and time.monotonic() - start >= 3 * len(raised):
            alerts = stack.add_alerts(1)
            assert len(alerts) == 1 and "id" in alerts[0], alerts
            raised[alert_key(alerts[0])] = time.monotonic()
        present = stack.incidents_by_alert()
        now = time.monotonic()
        seen.update({k: now - t for k, t in raised.items() if k in present and k not in seen})
        if now - start > 300:
            pytest.fail(f"only {len(seen)} of {SAMPLES} new alerts became incidents within 300 s; "
                        f"forwarding runs: {[(r['dag_run_id'], r['state']) for r in stack.runs('defender_alert_forwarding')]}")
        time.sleep(0.25)

    latencies = [seen[k] for k in raised]
    median = statistics.median(latencies)
    line = (f"alert-to-incident latency (DEFENDER_ALERT_POLL_SECONDS={ALERT_POLL_SECONDS}): median {median:.1f} s "
            f"over {len(latencies)} alerts raised 3 s apart; each: {', '.join(f'{x:.1f}' for x in latencies)} s")
    print(line)
    summary.lines.append(line)
    record_property("alert_to_incident_latency_median_s", round(median, 2))
    record_property("alert_to_incident_latencies_s", [round(x, 2) for x in latencies])
    out = tmp_path_factory.getbasetemp() / "latency.json"
    out.write_text(json.dumps({"poll_seconds": ALERT_POLL_SECONDS, "median_s": median, "samples_s": latencies}))

    # Exactly once, even after the watcher has polled a few more times and every run has finished.
    time.sleep(3 * ALERT_POLL_SECONDS + 2)
    wait_until(lambda: all(r["state"] in ("success", "failed") for r in stack.runs("defender_alert_forwarding")),
               180, "alert forwarding runs to finish")
    incidents = stack.incidents_by_alert()
    for key in raised:
        assert len(incidents[key]) == 1, f"{key}: {[i.get('number') for i in incidents[key]]}"
    duplicates = {k: len(v) for k, v in incidents.items() if len(v) > 1}
    assert not duplicates, f"alerts forwarded more than once: {duplicates}"
    assert all(k.startswith(f"{DEFENDER_CONN_ID}:") for k in incidents)

    new_runs = [r for r in stack.runs("defender_alert_forwarding") if r["dag_run_id"] not in before]
    assert new_runs, "no alert forwarding run was created"
    assert {r["run_type"] for r in new_runs} == {"asset_triggered"}
    assert all(r["state"] == "success" for r in new_runs), [(r["dag_run_id"], r["state"]) for r in new_runs]


def test_rejected_servicenow_credentials_fail_the_sync_plainly(stack):
    stack.sn_faults(reject_credentials=True, revoke_tokens=True)
    try:
        run_id = stack.trigger("defender_device_sync", {"full_resync": True})

        def failed_tasks():
            tis = stack.task_instances("defender_device_sync", run_id)
            bad = [t for t in tis if t["state"] in ("failed", "up_for_retry")]
            if bad or stack.run_state("defender_device_sync", run_id) in ("success", "failed"):
                return bad or [{"task_id": None, "state": "none failed"}]
            return None

        bad = wait_until(failed_tasks, 300, "the sync to fail against rejected credentials")
        assert bad[0]["task_id"], f"the sync did not fail: {_failure_context(stack, 'defender_device_sync', run_id)}"
        # The attempt's log is complete shortly after the state change.
        text = wait_until(lambda: (t := _log_text(stack, "defender_device_sync", run_id, bad[0]["task_id"]))
                          and re.search(r"(?i)401|credential", t) and t, 60, "the failed task's log")
        # The run itself ends failed (REST), and its note names the failed source.
        assert stack.wait_for_run("defender_device_sync", run_id) == "failed"
        run = stack.api_json("GET", f"/api/v2/dags/defender_device_sync/dagRuns/{run_id}")
        assert "FAILED: 1 source(s): " in (run.get("note") or ""), run.get("note")
    finally:
        stack.sn_faults(reject_credentials=False)
    assert re.search(r"(?i)(credentials?|grant) .*(not accepted|refused|rejected)|"
                     r"(not accepted|refused|rejected).*credentials?", text), text[-3000:]
    for secret in stack.secrets():
        assert secret not in text


def test_no_secret_in_any_airflow_log(stack):
    files = [*(stack.home / "logs").rglob("*.log"),
             *(f for f in stack.logs_dir.glob("*.log") if not f.name.endswith("-sim.log"))]
    assert files
    for path in files:
        text = path.read_text(errors="replace")
        for secret in stack.secrets():
            assert secret not in text, f"a secret appears in {path}"
