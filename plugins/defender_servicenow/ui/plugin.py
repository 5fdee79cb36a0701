"""The Airflow plugin: registered through the ``airflow.plugins`` entry point of this distribution.

It adds the FastAPI app (the page and its JSON, mounted by the API server at ``/defender-servicenow``) and
a navigation entry, **Defender ⇄ ServiceNow**, that shows the page inside the Airflow UI.

Every Airflow component loads plugins (the scheduler, the triggerer, task processes), but only the API
server serves the app: it is built on its first request, so the other components import nothing of the
API server's security or ORM code because of this plugin.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from defender_servicenow.ui.app import URL_PREFIX

NAV_NAME = "Defender ⇄ ServiceNow"
URL_ROUTE = "defender-servicenow"


class LazyHealthApp:
    """An ASGI app that builds :func:`defender_servicenow.ui.app.create_app` on its first request."""

    def __init__(self):
        self._app = None

    async def __call__(self, scope, receive, send):
        if self._app is None:
            from defender_servicenow.ui.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


def _nav_href() -> str:
    from defender_servicenow.ui.reader import ui_base_path

    return f"{ui_base_path()}{URL_PREFIX}/"


class DefenderServiceNowPlugin(AirflowPlugin):
    name = "defender_servicenow"
    fastapi_apps = [{"name": "defender_servicenow_health", "app": LazyHealthApp(), "url_prefix": URL_PREFIX}]
    external_views = [{"name": NAV_NAME, "href": _nav_href(), "url_route": URL_ROUTE, "destination": "nav",
                       "nav_top_level": True}]
