"""The ServiceNow connection state on the sync health page, as the device sync DAG records it (dag.test()
against the simulators): unreachable, then credentials rejected, then ok after the admin fixed the password.

The state is asset ``defender_servicenow_auth``, key ``servicenow:<conn id>`` (the lock-out guard's record),
read back through the page's own reader (the asset state backend), as the API server reads it.
"""

from __future__ import annotations

import json
import socket

import pytest

from include.simulators.servicenow_sim import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_USER
from tests.test_device_sync_dag import fast_servicenow_retries, run_dag  # noqa: F401 (fixture)

pytestmark = pytest.mark.airflow_db

CONN_ID = "servicenow_health_states"   # a connection of its own: other tests record servicenow_default
SOURCE = "health_state_sensor"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _use_servicenow(monkeypatch, host: str, password: str) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(
        {"conn_type": "servicenow", "host": host, "login": SIM_USER, "password": password,
         "extra": {"client_id": SIM_CLIENT_ID, "client_secret": SIM_CLIENT_SECRET}}))


def _page_state() -> tuple[dict, dict]:
    """(the health document's ``servicenow`` part, the raw record), as the page reads them."""
    from airflow.utils.session import create_session
    from defender_servicenow.ui.health import compute_health
    from defender_servicenow.ui.reader import read_recorded_state

    with create_session() as session:
        state = read_recorded_state(session)
    from datetime import datetime, timezone

    return compute_health(state, datetime.now(timezone.utc), lambda f: None)["servicenow"], state.servicenow_auth


def _state(dagrun) -> str:
    return str(getattr(dagrun.state, "value", dagrun.state))


def test_unreachable_then_rejected_then_ok(airflow_db, monkeypatch, defender_sim_factory, servicenow_sim,
                                           fast_servicenow_retries, capfd, caplog):  # noqa: F811
    defender_sim_factory(mode="sensor", devices=4, seed=31, conn_id=SOURCE)
    monkeypatch.setenv("DEFENDER_SOURCES", SOURCE)
    monkeypatch.setenv("SERVICENOW_CONN_ID", CONN_ID)

    _use_servicenow(monkeypatch, f"http://127.0.0.1:{_closed_port()}", SIM_PASSWORD)
    assert _state(run_dag()) == "failed"
    shown, record = _page_state()
    assert shown == {"id": CONN_ID, "status": "unreachable"}, record
    assert "could not reach 127.0.0.1" in record["message"]

    wrong = "not-the-password-7"
    _use_servicenow(monkeypatch, servicenow_sim.url, wrong)
    assert _state(run_dag()) == "failed"
    shown, record = _page_state()
    assert shown["status"] == "credentials_rejected", record

    _use_servicenow(monkeypatch, servicenow_sim.url, SIM_PASSWORD)   # the admin fixed the password
    assert _state(run_dag()) == "success"
    shown, record = _page_state()
    assert shown["status"] == "ok", record

    out, err = capfd.readouterr()   # after other Airflow tests the task logs reach only the log records
    said = out + err + caplog.text
    assert wrong not in json.dumps(record) + said and SIM_PASSWORD not in said
    assert "failed after retries (ConnectionError)" in said   # the logs were read at all


class _Store(dict):
    reads = writes = 0

    def get(self, key, default=None):
        self.reads += 1
        return super().get(key, default)

    def set(self, key, value):
        self.writes += 1
        self[key] = value


def test_unreachable_never_replaces_a_rejection_recorded_by_the_same_hook():
    from defender_servicenow.hooks.lockout import AuthGuard

    store = _Store()
    guard = AuthGuard(store, "servicenow", "sn", cooldown_minutes=30)
    guard.check("settings")
    guard.rejected("settings", "OAuth password grant refused (HTTP 401)")
    guard.unreachable("POST /x could not reach sn.example (ConnectTimeout)")
    assert store["servicenow:sn"]["status"] == "credentials_rejected"
    suspended = guard.check("settings")                  # logins stay suspended, saying what the service answered
    assert "rejected at" in suspended and "(OAuth password grant refused (HTTP 401))" in suspended
    fresh = AuthGuard(store, "servicenow", "sn", cooldown_minutes=30)
    assert fresh.check("other settings") is None         # the admin changed the connection
    fresh.unreachable("POST /x could not reach sn.example (ConnectTimeout)")
    assert store["servicenow:sn"]["status"] == "unreachable" and fresh.check("other settings") is None
    fresh.accepted()
    assert store["servicenow:sn"]["status"] == "ok"


def test_unreachable_never_replaces_a_rejection_another_task_recorded_meanwhile():
    """Two tasks on one ServiceNow connection (the mapped syncs, the forwarding): one is refused, the other then
    cannot reach the instance. The rejection must stay, else the next runs log in again with refused
    credentials (the lock-out the guard is there to prevent)."""
    from defender_servicenow.hooks.lockout import AuthGuard

    store = _Store({"servicenow:sn": {"status": "ok", "at": "2026-01-01T00:00:00+00:00"}})
    refused, cut_off = (AuthGuard(store, "servicenow", "sn", cooldown_minutes=30) for _ in range(2))
    assert refused.check("settings") is None and cut_off.check("settings") is None
    refused.rejected("settings", "OAuth password grant refused (HTTP 401)")
    cut_off.unreachable("POST /x could not reach sn.example (ConnectTimeout)")
    assert store["servicenow:sn"]["status"] == "credentials_rejected"
    assert "rejected at" in AuthGuard(store, "servicenow", "sn", cooldown_minutes=30).check("settings")
    # A rejection of other settings (the admin has changed the connection since) does not hold it back.
    other = AuthGuard(store, "servicenow", "sn", cooldown_minutes=30)
    assert other.check("new settings") is None
    other.unreachable("POST /x could not reach sn.example (ConnectTimeout)")
    assert store["servicenow:sn"]["status"] == "unreachable"


def test_a_working_task_clears_an_unreachable_another_task_recorded_after_its_check():
    """Task B checked (ok) and works; task A then finds the instance unreachable. B's later successes put
    the record back to ok within a minute (before, the page showed 'unreachable' until the next run)."""
    from datetime import datetime, timedelta, timezone

    from defender_servicenow.hooks.lockout import RECHECK, AuthGuard

    now = [datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)]
    store = _Store({"servicenow:sn": {"status": "ok", "at": "2026-03-01T11:00:00+00:00"}})
    working, cut_off = (AuthGuard(store, "servicenow", "sn", cooldown_minutes=30, clock=lambda: now[0])
                        for _ in range(2))
    assert working.check("settings") is None and cut_off.check("settings") is None
    working.accepted()
    cut_off.unreachable("POST /x could not reach sn.example (ConnectTimeout)")
    reads = store.reads
    working.accepted()                                     # within RECHECK: no read, no write
    assert store["servicenow:sn"]["status"] == "unreachable" and store.reads == reads
    now[0] += RECHECK + timedelta(seconds=1)
    working.accepted()
    assert store["servicenow:sn"]["status"] == "ok"
    now[0] += timedelta(seconds=5)
    writes = store.writes
    for _ in range(100):                                   # a busy task: no read or write per request
        working.accepted()
    assert store.writes == writes and store.reads == reads + 1
