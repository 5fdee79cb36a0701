"""The pure status computation of the sync health page: recorded state + now -> the JSON document."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from defender_servicenow.ui.health import RecordedState, SourceRecord, compute_health
from defender_servicenow.ui.view import age, page_context

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
COUNTS = {"seen": 10, "inserted": 2, "updated": 1, "unchanged": 7, "retired": 0, "skipped": 0, "failed": 0}


def _iso(minutes_ago: float) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).isoformat()


def _failure(minutes_ago: float, message="Defender answered 401: the API token was rejected.", task="sync_source"):
    return {"at": _iso(minutes_ago), "message": message, "dag_id": "defender_device_sync",
            "run_id": "manual__2026-03-01T11:00:00+00:00", "task_id": task, "map_index": 1, "try_number": 2}


def _url(f: dict) -> str:
    return f"/dags/{f['dag_id']}/runs/{f['run_id']}/tasks/{f['task_id']}/mapped/{f['map_index']}"


def _one(record: SourceRecord, *, servicenow=None, frequency=60) -> dict:
    doc = compute_health(RecordedState([record], "servicenow_default", servicenow, frequency), NOW, _url)
    assert doc["generated_at"] == NOW.isoformat()
    return doc["sources"][0]


def test_healthy_source_is_ok_with_its_counts_and_alert_side():
    src = _one(SourceRecord("sensor_a", sync_meta={"last_success": _iso(30), "counts": COUNTS, "kind": "sensor",
                                                   "last_outcome": "ok"},
                            alert_status={"at": _iso(1), "kind": "sensor", "forwarded_up_to": _iso(2), "pending": 3,
                                          "dead_letter": 1, "last_outcome": "ok", "last_failure": None}))
    assert src == {"id": "sensor_a", "kind": "sensor", "status": "ok", "last_sync": _iso(30),
                   "last_counts": COUNTS, "last_failure": None,
                   "alerts": {"forwarded_up_to": _iso(2), "pending": 3, "dead_letter": 1}}


def test_stale_after_twice_the_sync_frequency():
    assert _one(SourceRecord("a", sync_meta={"last_success": _iso(119), "counts": COUNTS}))["status"] == "ok"
    assert _one(SourceRecord("a", sync_meta={"last_success": _iso(121), "counts": COUNTS}))["status"] == "stale"
    assert _one(SourceRecord("a", sync_meta={"last_success": _iso(21)}), frequency=10)["status"] == "stale"


def test_never_synced_source():
    src = _one(SourceRecord("new_sensor"))
    assert src["status"] == "never" and src["last_sync"] is None and src["last_counts"] is None
    assert src["kind"] is None and src["last_failure"] is None
    assert src["alerts"] == {"forwarded_up_to": None, "pending": None, "dead_letter": None}


def test_recorded_failure_after_the_last_success_is_failing_with_a_log_link():
    failure = _failure(5)
    src = _one(SourceRecord("a", sync_meta={"last_success": _iso(65), "counts": COUNTS, "last_outcome": "failed",
                                            "last_failure": failure}))
    assert src["status"] == "failing"
    assert src["last_failure"] == {"at": failure["at"], "message": failure["message"], "log_url": _url(failure)}


def test_failure_followed_by_a_success_is_shown_but_not_failing():
    src = _one(SourceRecord("a", sync_meta={"last_success": _iso(2), "last_outcome": "ok",
                                            "last_failure": _failure(20)}))
    assert src["status"] == "ok" and src["last_failure"]["at"] == _iso(20)


def test_failed_task_instance_is_the_fallback_when_the_dag_recorded_no_failure():
    # e.g. a task killed before it could record anything: only the failed task instance tells.
    src = _one(SourceRecord("a", sync_meta={"last_success": _iso(90), "counts": COUNTS}, failed_task=_failure(3)))
    assert src["status"] == "failing" and src["last_failure"]["log_url"].endswith("/mapped/1")
    older = _one(SourceRecord("a", sync_meta={"last_success": _iso(1)}, failed_task=_failure(3)))
    assert older["status"] == "ok"


def test_never_succeeded_but_failed_is_failing_not_never():
    assert _one(SourceRecord("a", failed_task=_failure(3)))["status"] == "failing"


def test_alert_forwarding_failure_makes_the_source_failing():
    alert_failure = _failure(1, "ServiceNow answered 503 while creating incidents.", task="forward_alerts")
    src = _one(SourceRecord("a", sync_meta={"last_success": _iso(10), "last_outcome": "ok"},
                            alert_status={"last_outcome": "failed", "last_failure": alert_failure,
                                          "forwarded_up_to": None, "pending": 4, "dead_letter": 0}))
    assert src["status"] == "failing" and src["last_failure"]["message"].startswith("ServiceNow answered 503")
    assert src["alerts"] == {"forwarded_up_to": None, "pending": 4, "dead_letter": 0}


def test_alert_watermark_fallback_from_the_forwarding_key():
    ms = int((NOW - timedelta(minutes=7)).timestamp() * 1000)
    src = _one(SourceRecord("a", watermark={"time_ms": ms, "ids": [5, 6]}))
    assert src["alerts"] == {"forwarded_up_to": _iso(7), "pending": None, "dead_letter": None}


def test_kind_falls_back_to_the_connection_type_and_rejects_garbage():
    assert _one(SourceRecord("a", connection_kind="azure"))["kind"] == "azure"
    assert _one(SourceRecord("a", sync_meta={"kind": "toaster"}, connection_kind="sensor"))["kind"] == "sensor"


def test_garbled_state_does_not_crash_the_page():
    src = _one(SourceRecord("a", sync_meta={"last_success": "yesterday", "counts": {"seen": "many"},
                                            "last_failure": {"at": None}},
                            alert_status={"pending": -3, "dead_letter": True, "forwarded_up_to": 12}))
    assert src["status"] == "never" and src["last_counts"]["seen"] == 0 and src["last_failure"] is None
    assert src["alerts"]["pending"] is None and src["alerts"]["dead_letter"] is None


def test_servicenow_state_and_unknown():
    def status(auth):
        return compute_health(RecordedState([], "sn", auth), NOW, _url)["servicenow"]
    assert status(None) == {"id": "sn", "status": "unknown"}
    assert status({"status": "credentials_rejected", "at": _iso(1), "message": "x"})["status"] == "credentials_rejected"
    assert status({"status": "weird"})["status"] == "unknown"


def test_page_context_labels_ages_and_links():
    doc = compute_health(RecordedState([SourceRecord("a", sync_meta={"last_success": _iso(90), "counts": COUNTS},
                                                     failed_task=_failure(3))], "sn"), NOW, _url)
    ctx = page_context(doc, "/airflow", refresh_seconds=30)
    row = ctx["rows"][0]
    assert row["status_label"] == "Failing" and row["last_sync"]["age"] == "1 h 30 min ago"
    assert row["failure"]["current"] and row["failure"]["when"]["age"] == "3 min ago"
    assert ctx["failing"] == 1
    assert [d["url"] for d in ctx["dags"]][0] == "/airflow/dags/defender_device_sync"
    assert [age(s) for s in (5, 61, 7200, 3 * 86400)] == ["5 s ago", "1 min ago", "2 h ago", "3 days ago"]


def test_the_dags_own_failure_sentence_wins_over_the_failed_task_instance():
    # The task records its failure just before it ends, so the failed task instance ends a moment later;
    # the page must still show what the DAG recorded (what the service answered, what to do).
    recorded = _failure(3, "Sync of a failed: Defender answered 401: the API token was rejected. Fix the token.")
    instance = {**_failure(2.9, "The device sync of a failed (attempt 2); its log says why.")}
    src = _one(SourceRecord("a", sync_meta={"last_success": _iso(90), "last_outcome": "failed",
                                            "last_failure": recorded}, failed_task=instance))
    assert src["status"] == "failing"
    assert src["last_failure"]["message"] == recorded["message"] and src["last_failure"]["at"] == recorded["at"]
    # A later attempt that died without recording anything: the task instance tells.
    died = {**instance, "try_number": 3}
    later = _one(SourceRecord("a", sync_meta={"last_success": _iso(90), "last_outcome": "failed",
                                              "last_failure": recorded}, failed_task=died))
    assert later["last_failure"]["message"] == died["message"]
