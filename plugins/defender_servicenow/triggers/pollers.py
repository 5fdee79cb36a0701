"""What the alert trigger asks one source per poll: one poller per connection type, picked by ``conn_type``
(as :func:`defender_servicenow.sources.source_for` picks a source), so the trigger loop never compares kinds.

* :class:`AppliancePoller` (``defender_iot``): ``GET /api/v2/alerts`` (sensor) or ``/external/v2/alerts``
  (console) with ``fromTime``; new = after the watermark time, or an id above every id seen (late delivery).
* :class:`AzurePoller` (``defender_iot_azure``): one Resource Graph query per poll for the alerts whose
  ``startTimeUtc`` is inside the look-back window. Resource Graph lags the sensors by minutes and its ids
  are not ordered, so new = an id not among those seen inside the window (``recent``: ``[time_ms, id]``
  pairs) and raised after the watch started (``floor_ms``). ``x-ms-user-quota-remaining: 0`` and 429
  answers set :attr:`wait_s`, the least time before the next poll of that source (``-resets-after``).
  Tokens: the client-credentials grant of the hook's connection (same parser), masked, renewed before expiry.

Both share the connection parsers of their hooks (``hooks/connections.py``, ``hooks/azure_connection.py``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from airflow.sdk.log import mask_secret

from defender_servicenow.azure_models import ALERT_TYPE, parse_time, stable_id


def new_cloud_alerts(items: list[tuple[int, int]], watermark: dict) -> list[tuple[int, int]]:
    """``(time_ms, id)`` of the Azure alerts not seen yet and raised after the watch started."""
    seen = {int(i) for _, i in watermark.get("recent") or ()}
    floor = int(watermark.get("floor_ms", watermark["time_ms"]))
    return sorted((ms, i) for ms, i in set(items) if i not in seen and ms > floor)


def advance_cloud(watermark: dict, found: list[tuple[int, int]], lookback_ms: int) -> dict:
    t = max([int(watermark["time_ms"])] + [ms for ms, _ in found])
    recent = {(int(ms), int(i)) for ms, i in watermark.get("recent") or ()} | set(found)
    return {"time_ms": t, "ids": [], "floor_ms": int(watermark.get("floor_ms", watermark["time_ms"])),
            "recent": sorted([ms, i] for ms, i in recent if ms >= t - lookback_ms)}


class AppliancePoller:
    wait_s = 0.0

    def __init__(self, conn: Any, conn_id: str, lookback_ms: int):
        from defender_servicenow.hooks.connections import MANAGEMENT_CONSOLE, parse_defender_connection

        settings = parse_defender_connection(conn, conn_id)   # the hook's own parser: same reading
        mask_secret(settings.token)
        self.path = "/external/v2/alerts" if settings.appliance == MANAGEMENT_CONSOLE else "/api/v2/alerts"
        self.material = f"{settings.base_url}|{settings.token}"   # the lock-out guard's, as the hook's
        self.lookback_ms = lookback_ms
        self.client = httpx.AsyncClient(base_url=settings.base_url, headers={"Authorization": settings.token,
                                                                             "Accept": "application/json"},
                                        verify=settings.verify, proxy=settings.proxy, timeout=settings.timeout,
                                        follow_redirects=False)

    async def poll(self, watermark: dict) -> list[tuple[int, int]]:
        from defender_servicenow.triggers.alerts import new_alerts

        response = await self.client.get(self.path, params={"fromTime": int(watermark["time_ms"]) - self.lookback_ms})
        if response.status_code in (401, 403):   # the API token is rejected: the trigger's lock-out guard stops
            from defender_servicenow.exceptions import DefenderAuthError

            raise DefenderAuthError(f"{self.path} answered HTTP {response.status_code} to the API token",
                                    status=response.status_code)
        _raise_for(response)
        return new_alerts(response.json(), watermark)

    def advance(self, watermark: dict, found: list[tuple[int, int]]) -> dict:
        from defender_servicenow.triggers.alerts import advance

        return advance(watermark, found)

    async def aclose(self) -> None:
        await self.client.aclose()


class AzurePoller:
    def __init__(self, conn: Any, conn_id: str, lookback_ms: int, page_size: int = 1000):
        from defender_servicenow.hooks.azure_connection import parse_azure_connection

        self.settings = s = parse_azure_connection(conn_id, conn.login, conn.password, conn.extra_dejson)
        mask_secret(s.client_secret)
        self.material = f"{s.authority}|{s.tenant_id}|{s.client_id}|{s.client_secret}"   # as the hook's guard
        self.lookback_ms, self.page_size = lookback_ms, page_size
        self.wait_s = 0.0
        self.requests = 0
        self._token: tuple[str, float] | None = None
        self._out_of_scope: set[int] = set()   # alerts whose devices are of other sites / sensors
        self.client = httpx.AsyncClient(verify=s.verify, proxy=s.proxy, timeout=s.timeout, follow_redirects=False)

    async def _access_token(self) -> str:
        if self._token and time.monotonic() < self._token[1]:
            return self._token[0]
        from defender_servicenow.exceptions import DefenderAuthError
        from defender_servicenow.hooks.azure_connection import read_token_answer, token_expiry, token_form

        s = self.settings
        try:
            token, lifetime = read_token_answer(s, await self.client.post(s.token_url, data=token_form(s)))
        except DefenderAuthError:
            self.wait_s = 300.0   # rejected credentials: no quick retries
            raise
        self._token = (token, token_expiry(lifetime))
        return token

    def query(self, watermark: dict) -> str:
        from defender_servicenow.hooks.azure import _kql_time, build_query

        since = parse_time_ms(int(watermark["time_ms"]) - self.lookback_ms)
        return build_query(ALERT_TYPE, where=(f"where properties.startTimeUtc >= datetime({_kql_time(since)})",))

    async def poll(self, watermark: dict) -> list[tuple[int, int]]:
        by_key: dict[tuple[int, int], dict] = {}
        for record in await self._records(self.query(watermark)):
            when = parse_time((record.get("properties") or {}).get("startTimeUtc")) if isinstance(
                record, dict) else None
            if when is not None and isinstance(record.get("id"), str):
                by_key[(int(when.timestamp() * 1000), stable_id(record["id"]))] = record
        new = new_cloud_alerts(list(by_key), watermark)
        s = self.settings
        if new and (s.sites or s.sensors):   # through the new alerts' devices, as the hook does (azure_scope.py)
            from defender_servicenow.azure_scope import alert_device_ids, scope_queries, split_by_scope

            new = [k for k in new if k[1] not in self._out_of_scope]
            raws = [by_key[k] for k in new]
            if new and self.wait_s:   # the alerts query spent the quota: the device query waits for its reset
                await asyncio.sleep(self.wait_s)
            scoped: set[str] = set()
            for q in scope_queries((i for raw in raws for i in alert_device_ids(raw)), s.sites, s.sensors):
                scoped |= {str(r.get("id")).lower() for r in await self._records(q) if isinstance(r, dict)}
            kept, unplaced = split_by_scope(raws, scoped)
            keep = {id(r) for r in (*kept, *unplaced)}
            self._out_of_scope |= {k[1] for k in new if id(by_key[k]) not in keep}   # a device keeps its site
            new = [k for k in new if id(by_key[k]) in keep]
        return new

    async def _records(self, query: str) -> list:
        """Every record of one Resource Graph query (normally one page: the window holds minutes of alerts)."""
        from defender_servicenow.hooks.azure import ARG_API_VERSION, parse_resets_after

        s = self.settings
        url = f"{s.resource_manager}/providers/Microsoft.ResourceGraph/resources?api-version={ARG_API_VERSION}"
        body: dict[str, Any] = {"query": query, "options": {"$top": self.page_size, "resultFormat": "objectArray"}}
        body.update({"managementGroups": [s.management_group]} if s.management_group
                    else {"subscriptions": list(s.subscriptions)})
        records: list = []
        while True:
            self.wait_s = 0.0
            headers = {"Authorization": f"Bearer {await self._access_token()}"}
            self.requests += 1
            response = await self.client.post(url, json=body, headers=headers)
            resets = parse_resets_after(response.headers.get("x-ms-user-quota-resets-after"))
            if (response.headers.get("x-ms-user-quota-remaining") or "").strip() == "0" or response.status_code == 429:
                self.wait_s = max(resets or 0.0, 1.0)   # the quota is spent: no poll before it resets
            if response.status_code == 401:
                self._token = None   # expired or revoked: a fresh token next time
            _raise_for(response)
            page = response.json()
            records += page.get("data") or []
            token = page.get("$skipToken")
            if not token:
                return records
            body["options"] = {**body["options"], "$skipToken": token}

    def advance(self, watermark: dict, found: list[tuple[int, int]]) -> dict:
        return advance_cloud(watermark, found, self.lookback_ms)

    async def aclose(self) -> None:
        await self.client.aclose()


def parse_time_ms(ms: int):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms / 1000, timezone.utc)


def _raise_for(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise httpx.HTTPStatusError(f"HTTP {response.status_code}", request=response.request, response=response)


async def poller_for(conn_id: str, lookback_ms: int):
    """The poller of a Defender connection: ``defender_iot_azure`` -> Azure, any other -> an appliance."""
    from airflow.sdk import BaseHook

    conn = await BaseHook.aget_connection(conn_id)
    conn_type = (conn.conn_type or "").strip().lower()
    if conn_type == "defender_iot_azure":
        return AzurePoller(conn, conn_id, lookback_ms)
    return AppliancePoller(conn, conn_id, lookback_ms)
