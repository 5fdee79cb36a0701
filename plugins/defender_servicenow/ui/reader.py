"""Read what the DAGs recorded, in the API server process, through Airflow's own interfaces.

The asset state store through the configured state backend (``airflow.state.get_state_backend()``, the
same backend the REST API's ``/assets/{id}/state-store`` routes read), the task instances through the
ORM session, the connection *type* through ``Connection.get_connection_from_secrets`` (never a field
that holds a secret). Nothing here calls Defender or ServiceNow.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import quote, urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from defender_servicenow import settings
from defender_servicenow.ui.health import RecordedState, SourceRecord, iso

log = logging.getLogger(__name__)

SYNC_DAG_ID = "defender_device_sync"
SYNC_TASK_ID = "sync_source"
SYNC_STATE_ASSET = "defender_device_sync_state"
ALERTS_ASSET = "defender_iot_alerts"
AUTH_ASSET = "defender_servicenow_auth"
FAILED_TASKS_SCANNED = 200  # newest failed sync_source task instances looked at for the fallback
KIND_BY_CONN_TYPE = {"defender_iot_azure": "azure"}


def ui_base_path() -> str:
    """The path part of ``[api] base_url`` (empty when Airflow is served at the root)."""
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def log_url(failure: dict) -> str:
    """The Airflow UI page of a task instance (its log is the page's first tab)."""
    path = (f"{ui_base_path()}/dags/{quote(str(failure['dag_id']), safe='')}/runs/"
            f"{quote(str(failure['run_id']), safe='')}/tasks/{quote(str(failure['task_id']), safe='')}")
    map_index = failure.get("map_index")
    if isinstance(map_index, int) and map_index >= 0:
        path += f"/mapped/{map_index}"
    try_number = failure.get("try_number")
    return path + (f"?try_number={try_number}" if isinstance(try_number, int) and try_number > 0 else "")


def _asset_ids(session: Session, names: list[str]) -> dict[str, int]:
    from airflow.models.asset import AssetActive, AssetModel

    rows = session.execute(
        select(AssetModel.name, AssetModel.id)
        .join(AssetActive, (AssetActive.name == AssetModel.name) & (AssetActive.uri == AssetModel.uri))
        .where(AssetModel.name.in_(names))
    ).all()
    return {name: asset_id for name, asset_id in rows}


def _state(session: Session, asset_id: int | None, key: str) -> dict | None:
    from airflow.state import AssetScope, get_state_backend

    if asset_id is None:
        return None
    raw = get_state_backend().get(AssetScope(asset_id=asset_id), key)
    try:
        value = json.loads(raw) if raw is not None else None
    except ValueError:
        log.warning("asset %s key %s does not hold JSON; ignored", asset_id, key)
        return None
    return value if isinstance(value, dict) else None


def _failed_sync_tasks(session: Session, sources: list[str]) -> dict[str, dict]:
    """Per source, the newest failed ``sync_source`` task instance, as a failure object."""
    from airflow.models.taskinstance import TaskInstance

    rows = session.scalars(
        select(TaskInstance)
        .where(TaskInstance.dag_id == SYNC_DAG_ID, TaskInstance.task_id == SYNC_TASK_ID,
               TaskInstance.state == "failed")
        .order_by(TaskInstance.end_date.desc())
        .limit(FAILED_TASKS_SCANNED)
    ).all()
    found: dict[str, dict] = {}
    for ti in rows:
        source = ti.rendered_map_index
        if source in sources and source not in found and ti.end_date is not None:
            found[source] = {
                "at": iso(ti.end_date),
                "message": f"The device sync of {source} failed (attempt {ti.try_number}); its log says "
                           "what the service answered and what to do.",
                "dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id,
                "map_index": ti.map_index, "try_number": ti.try_number,
            }
    return found


def _connection_kind(conn_id: str) -> str | None:
    """The source kind from the connection's type (and its non-secret ``appliance`` extra)."""
    from airflow.models.connection import Connection

    try:
        conn = Connection.get_connection_from_secrets(conn_id)
    except Exception:  # missing or unreadable connection: the page shows the kind as unknown
        return None
    if conn.conn_type in KIND_BY_CONN_TYPE:
        return KIND_BY_CONN_TYPE[conn.conn_type]
    if conn.conn_type == "defender_iot":
        appliance = conn.extra_dejson.get("appliance") or "sensor"
        return appliance if appliance in ("sensor", "management_console") else None
    return None


def read_recorded_state(session: Session) -> RecordedState:
    """Everything the page shows, for the sources in ``DEFENDER_SOURCES``."""
    sources = settings.defender_sources()
    servicenow_id = settings.servicenow_conn_id()
    ids = _asset_ids(session, [SYNC_STATE_ASSET, ALERTS_ASSET, AUTH_ASSET])
    failed = _failed_sync_tasks(session, sources)
    records = []
    for source in sources:
        meta = _state(session, ids.get(SYNC_STATE_ASSET), f"{source}/meta")
        record = SourceRecord(
            id=source, sync_meta=meta,
            alert_status=_state(session, ids.get(ALERTS_ASSET), f"status:{source}"),
            watermark=_state(session, ids.get(ALERTS_ASSET), f"forwarded_up_to:{source}"),
            failed_task=failed.get(source),
        )
        if not (meta or {}).get("kind") and not (record.alert_status or {}).get("kind"):
            record.connection_kind = _connection_kind(source)
        records.append(record)
    return RecordedState(
        sources=records, servicenow_id=servicenow_id,
        servicenow_auth=_state(session, ids.get(AUTH_ASSET), f"servicenow:{servicenow_id}"),
        sync_frequency_minutes=settings.sync_frequency_minutes(),
    )
