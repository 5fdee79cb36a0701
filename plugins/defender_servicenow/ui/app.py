"""The FastAPI app the API server mounts at ``/defender-servicenow``: the sync health page and its JSON.

Airflow mounts plugin apps as they are, without authentication, so every route here depends on Airflow's
own ``requires_access_*`` dependencies: a bearer token from ``POST /auth/token`` or the UI's session
cookie, checked by the configured auth manager (read access to DAG task instances and to assets).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from defender_servicenow import settings
from defender_servicenow.exceptions import ConfigError
from defender_servicenow.ui.health import compute_health
from defender_servicenow.ui.reader import log_url, read_recorded_state, ui_base_path
from defender_servicenow.ui.view import page_context

URL_PREFIX = "/defender-servicenow"
_TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                         autoescape=select_autoescape(["html", "j2"]))


def _auth_dependencies() -> list:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_asset, requires_access_dag

    return [Depends(requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE)),
            Depends(requires_access_asset("GET"))]


def _health(now: datetime | None = None) -> dict:
    from airflow.utils.session import create_session

    with create_session() as session:
        state = read_recorded_state(session)
    return compute_health(state, now or datetime.now(timezone.utc), log_url)


def create_app() -> FastAPI:
    app = FastAPI(title="Defender for IoT to ServiceNow: sync health", dependencies=_auth_dependencies(),
                  docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ConfigError)
    def config_error(request: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.get("/api/health")
    def health() -> dict:
        """The health document (shape: README, "Sync health page")."""
        return _health()

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> HTMLResponse:
        refresh = settings.DEFAULT_HEALTH_REFRESH_SECONDS
        try:
            refresh = settings.health_refresh_seconds()
            context = page_context(_health(), ui_base_path(), refresh_seconds=refresh)
        except ConfigError as exc:  # invalid DEFENDER_* settings: say which, as the DAGs' import errors do
            context = {"config_error": str(exc), "refresh_seconds": refresh}
        return HTMLResponse(_TEMPLATES.get_template("health.html.j2").render(**context),
                            headers={"Cache-Control": "no-store"})

    # Any other path (docs, openapi.json, typos) passes the same authentication first: an anonymous
    # request learns nothing, not even which paths exist; a logged-in user gets a plain 404.
    @app.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                   include_in_schema=False)
    def not_found(path: str) -> None:
        raise HTTPException(status_code=404, detail=f"No such page: /{path} (the page is {URL_PREFIX}/)")

    return app
