"""The Airflow REST API side of the live stack (:class:`scripts.stack.Stack`): a token from ``POST
/auth/token`` (SimpleAuthManager), calls with one renewal on 401, and the waits the demo and the live tests
use (DAGs parsed and unpaused, a run finished). :class:`AirflowApi` is a mixin of ``Stack``: it uses the
stack's ``_http`` session, ``api_url``, ``password``, ``_token`` and ``home``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import requests

DAG_IDS = ("defender_device_sync", "defender_alert_forwarding", "defender_servicenow_cleanup")
USERNAME = "admin"
FINAL_STATES = {"success", "failed"}


class StackError(RuntimeError):
    """The stack could not start or did not reach the expected state in time."""


class AirflowApi:
    """Airflow REST API helpers of :class:`scripts.stack.Stack`."""

    _http: requests.Session
    _token: str | None
    api_url: str
    password: str
    home: Path

    def _headers(self) -> dict[str, str]:
        if self._token is None:
            try:
                resp = self._http.post(f"{self.api_url}/auth/token", timeout=10,
                                       json={"username": USERNAME, "password": self.password})
            except requests.RequestException:
                return {}
            if resp.status_code != 201:
                return {}
            self._token = resp.json()["access_token"]
        return {"Authorization": f"Bearer {self._token}"}

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        """Call the Airflow REST API (``path`` like ``/api/v2/dags``) with a token from POST /auth/token."""
        resp = self._http.request(method, f"{self.api_url}{path}", headers=self._headers(), timeout=30, **kwargs)
        if resp.status_code == 401:  # token expired: get a new one once
            self._token = None
            resp = self._http.request(method, f"{self.api_url}{path}", headers=self._headers(), timeout=30,
                                      **kwargs)
        return resp

    def api_json(self, method: str, path: str, **kwargs) -> dict:
        resp = self.api(method, path, **kwargs)
        if resp.status_code >= 400:
            raise StackError(f"{method} {path} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def wait_for_dags(self, dag_ids=DAG_IDS, timeout: float = 240.0) -> dict[str, dict]:
        """Wait until the DAG processor has parsed ``dag_ids`` (or reported import errors); unpause them."""
        def ready():
            dags = {d["dag_id"]: d for d in self.api_json("GET", "/api/v2/dags", params={"limit": 100})["dags"]}
            self.raise_on_import_errors()
            return dags if all(d in dags for d in dag_ids) else None

        dags = wait_until(ready, timeout, f"DAGs {', '.join(dag_ids)} to be parsed")
        for dag_id in dag_ids:
            if dags[dag_id].get("is_paused"):
                self.api_json("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        return dags

    def import_errors(self) -> list[dict]:
        return self.api_json("GET", "/api/v2/importErrors")["import_errors"]

    def raise_on_import_errors(self) -> None:
        """StackError naming each DAG file that does not import and the last line of its error."""
        errors = self.import_errors()
        if errors:
            raise StackError("DAG import errors: " + "; ".join(
                f"{e['filename']}: {e['stack_trace'].strip().splitlines()[-1]}" for e in errors))

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        """Start a run; a 500 "Database error" (a lock on a busy SQLite) is retried under the same run id, so a
        retry can never start a second run (409: the first attempt did create it)."""
        run_id = f"manual__stack_{uuid.uuid4().hex[:12]}"
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf or {}}
        for attempt in range(3):
            resp = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)
            if resp.status_code in (200, 201) or (resp.status_code == 409 and attempt):
                return run_id
            if resp.status_code != 500 or "Database error" not in resp.text:
                break
            time.sleep(2)
        raise StackError(f"POST /api/v2/dags/{dag_id}/dagRuns answered {resp.status_code}: {resp.text[:300]}")

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.api_json("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300.0) -> str:
        """Wait until the run is finished; return its final state."""
        return wait_until(lambda: (s := self.run_state(dag_id, run_id)) in FINAL_STATES and s,
                          timeout, f"run {run_id} of {dag_id} to finish")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api_json("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def task_log_files(self, dag_id: str, run_id: str) -> list[Path]:
        """The task log files of a run (``<home>/logs/dag_id=…/run_id=…/task_id=…/[map_index=…/]attempt=N.log``)."""
        return sorted((self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}").rglob("attempt=*.log"))

    def runs(self, dag_id: str) -> list[dict]:
        return self.api_json("GET", f"/api/v2/dags/{dag_id}/dagRuns",
                             params={"limit": 100, "order_by": "-run_after"})["dag_runs"]


def wait_until(check: Callable, timeout: float, what: str, interval: float = 1.0):
    """Call ``check`` until it returns something truthy (returned); StackError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
