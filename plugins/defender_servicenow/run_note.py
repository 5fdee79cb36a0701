"""Write a run's one-line summary as its DAG run note (shown in the Airflow UI's run list and run page).

Airflow 3.3's task interface cannot set the note of the task's own run, so this goes through Airflow's
public REST API, with an Airflow connection the user opts into: ``AIRFLOW_API_CONN_ID`` names a connection
whose host is the API server's base URL (e.g. ``http://airflow-apiserver:8080``) and whose login/password
belong to an Airflow user allowed to edit DAG runs. A failure here is logged and never fails the run.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import requests

log = logging.getLogger(__name__)

MAX_NOTE_CHARS = 1000  # the API's limit for a run note


def set_run_note(conn_id: str, dag_id: str, run_id: str, note: str, *, timeout: float = 10.0) -> bool:
    """Set the note of ``dag_id``/``run_id`` through the REST API; True when Airflow accepted it."""
    from airflow.sdk import BaseHook
    from airflow.sdk.log import mask_secret

    try:
        conn = BaseHook.get_connection(conn_id)
        base = (conn.host or "").rstrip("/")
        if "://" not in base:
            base = f"http://{base}{f':{conn.port}' if conn.port else ''}"
        token = requests.post(f"{base}/auth/token", json={"username": conn.login, "password": conn.password},
                              timeout=timeout)
        if token.status_code not in (200, 201):
            log.warning("Could not write the run note: Airflow's /auth/token answered HTTP %s for the user of "
                        "connection %r; check its login and password", token.status_code, conn_id)
            return False
        access = token.json()["access_token"]
        mask_secret(access)
        answer = requests.patch(
            f"{base}/api/v2/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}",
            params={"update_mask": "note"}, json={"note": note[:MAX_NOTE_CHARS]},
            headers={"Authorization": f"Bearer {access}"}, timeout=timeout,
        )
    except (requests.RequestException, ValueError, KeyError) as exc:
        log.warning("Could not write the run note through connection %r: %s", conn_id, type(exc).__name__)
        return False
    except Exception as exc:  # noqa: BLE001 - e.g. the connection does not exist: never fail the run for a note
        log.warning("Could not write the run note through connection %r: %s", conn_id, exc)
        return False
    if answer.status_code != 200:
        log.warning("Could not write the run note: Airflow answered HTTP %s (the user of connection %r needs "
                    "permission to edit DAG runs)", answer.status_code, conn_id)
        return False
    log.info("Run note set: %s", note[:MAX_NOTE_CHARS])
    return True
