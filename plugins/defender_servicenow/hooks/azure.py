"""DefenderIoTAzureHook: Defender for IoT in Azure (cloud-connected sensors) through Entra ID, Azure Resource
Graph (``iotsecurityresources``) and the ARM alert PATCH.

* Token: client-credentials grant at ``<authority>/<tenant>/oauth2/v2.0/token`` with scope
  ``<resource_manager>/.default``; cached and renewed when less than a tenth of its lifetime (at most
  5 minutes) is left, or after a 401 from ARM. A rejected secret stops every further login by this hook
  (:class:`DefenderAuthError`, never retried). The secret and tokens are masked and never logged.
* ARG: every query projects ``id`` and orders by ``id`` (stable pages), sends ``$top`` (≤ 1000) and
  ``resultFormat=objectArray`` explicitly and follows ``$skipToken`` with the same query and scope. When
  ``x-ms-user-quota-remaining`` reaches 0 the next request waits ``x-ms-user-quota-resets-after``; a 429
  waits the same (or the back-off) and is resent, within ``max_retry_time`` per request.
* ``resultTruncated: "true"`` (no token although rows are missing) is an error, never a silent short read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

import requests
from airflow.sdk import BaseHook

from defender_servicenow.azure_models import (
    ALERT_TYPE,
    DEVICE_TYPE,
    SENSOR_TYPE,
    SITE_TYPE,
    VULNERABILITY_TYPE,
    parse_azure_alert,
    parse_azure_device,
    stable_id,
)
from defender_servicenow.exceptions import (
    ConfigError,
    DefenderAuthError,
    DefenderBadResponseError,
    DefenderCertificateError,
    DefenderError,
    DefenderForbiddenError,
    DefenderUnreachableError,
)
from defender_servicenow.hooks import _http
from defender_servicenow.hooks._http import SafeRetry, build_session, make_retry
from defender_servicenow.hooks.azure_connection import (  # noqa: F401  (re-exported for callers)
    DEFAULT_AUTHORITY,
    DEFAULT_NAME,
    DEFAULT_RESOURCE_MANAGER,
    AzureSettings,
    parse_azure_connection,
    read_token_answer,
    token_expiry,
    token_form,
)
from defender_servicenow.models import Alert, Device, InvalidRecord

ARG_API_VERSION = "2024-04-01"
ALERT_API_VERSION = "2021-07-01-preview"
PAGE_SIZE = 1000
REMOVED = "('Removed', 'Deleted')"


class DefenderAzureForbiddenError(DefenderForbiddenError):
    """403 from ARM: the app lacks a role (Security Admin to change alerts, Reader to read)."""


def _kql_list(values: tuple[str, ...]) -> str:
    return ", ".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in values)


def build_query(record_type: str, *, sites: tuple[str, ...] = (), sensors: tuple[str, ...] = (),
                where: tuple[str, ...] = (), project: str = "id, name, type, properties") -> str:
    """The ARG query for one record type: filters, ``project`` with ``id``, ``order by id asc``; no take.
    ``sites``/``sensors`` apply to devices only (``properties.sensor``): alerts and sensors carry no such
    field, they are filtered as :mod:`defender_servicenow.azure_scope` says."""
    stages = [f"where type =~ '{record_type}'", *where]
    if sites and record_type == DEVICE_TYPE:
        stages.append(f"where properties.sensor.site in~ ({_kql_list(sites)})")
    if sensors and record_type == DEVICE_TYPE:
        stages.append(f"where properties.sensor.name in~ ({_kql_list(sensors)})")
    stages += [f"project {project}", "order by id asc"]
    return " | ".join(["iotsecurityresources", *stages])


def _kql_time(value: datetime) -> str:
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_resets_after(value: str | None) -> float | None:
    """``hh:mm:ss`` -> seconds (None when absent or unreadable)."""
    try:
        hours, minutes, seconds = (float(p) for p in str(value).split(":"))
    except (TypeError, ValueError):
        return None
    return hours * 3600 + minutes * 60 + seconds


class _NoRateLimitRetry(SafeRetry):
    """urllib3 retries for connection errors and 5xx; 429 is handled by the hook (quota headers)."""

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        return status_code != 429 and super().is_retry(method, status_code, has_retry_after)


class DefenderIoTAzureHook(BaseHook):
    """Read devices, alerts and sensors of cloud-connected Defender for IoT sensors; close alerts.

    :param defender_conn_id: a ``defender_iot_azure`` connection (see :func:`parse_azure_connection`).
    :param page_size: ARG ``$top`` (1-1000).
    :param max_retry_time: seconds one request may spend waiting for quota / retries.
    :param auth_guard: a ``hooks.lockout.AuthGuard``: no token request after Entra ID rejected these settings.
    """

    conn_name_attr = "defender_conn_id"
    default_conn_name = "defender_iot_azure_default"
    conn_type = "defender_iot_azure"
    hook_name = "Microsoft Defender for IoT (Azure)"
    kind = "azure"

    def __init__(self, defender_conn_id: str = default_conn_name, *, page_size: int = PAGE_SIZE,
                 retries: int = 5, max_retry_time: float = 120.0, api_version: str = ARG_API_VERSION,
                 auth_guard: Any = None) -> None:
        super().__init__()
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be 1..1000 (ARG $top)")
        self.defender_conn_id = defender_conn_id
        self.page_size, self.retries, self.max_retry_time = page_size, retries, max_retry_time
        self.api_version = api_version
        self.auth_guard = auth_guard
        self._guard_checked = False
        self._token: tuple[str, float] | None = None
        self._rejected: str | None = None
        self._quota_wait_until = 0.0
        self.request_count = 0
        self.token_count = 0
        self.throttled = 0

    # ------------------------------------------------------------------ connection
    @cached_property
    def settings(self) -> AzureSettings:
        conn = self.get_connection(self.defender_conn_id)
        settings = parse_azure_connection(self.defender_conn_id, conn.login, conn.password, conn.extra_dejson)
        from airflow.sdk.log import mask_secret

        mask_secret(settings.client_secret)
        return settings

    @property
    def appliance(self) -> str:
        return self.kind

    @property
    def appliance_name(self) -> str:
        return self.settings.name

    @cached_property
    def _session(self) -> requests.Session:
        template = make_retry(total=self.retries, max_retry_time=self.max_retry_time)
        retry = _NoRateLimitRetry(**{k: getattr(template, k) for k in (
            "total", "connect", "read", "other", "redirect", "backoff_factor", "backoff_max", "backoff_jitter",
            "raise_on_status", "raise_on_redirect")}, max_retry_time=self.max_retry_time)
        return build_session(verify=self.settings.verify, proxy=self.settings.proxy, retry=retry, pool_size=4)

    def _send(self, method: str, url: str, **kw) -> requests.Response:
        s = self.settings
        try:
            return self._session.request(method, url, verify=s.verify, proxies=self._session.proxies or None,
                                         timeout=(s.timeout, s.timeout), **kw)
        except requests.exceptions.SSLError:
            raise DefenderCertificateError(
                f"The TLS certificate of {url.split('/', 3)[2]} could not be verified; set the connection extra "
                "'verify' to the CA bundle of your proxy or sovereign cloud (or fix the system CA store).") from None
        except requests.exceptions.RequestException as exc:
            raise DefenderUnreachableError(
                f"Could not reach {url.split('/', 3)[2]} for connection {s.conn_id!r} ({type(exc).__name__}); "
                "check the authority / resource_manager extras, the proxy and that Airflow can reach Azure.") from None

    # ------------------------------------------------------------------ token
    def _access_token(self) -> str:
        if self._rejected:
            raise DefenderAuthError(self._rejected, status=401)
        if self._token and time.monotonic() < self._token[1]:
            return self._token[0]
        s = self.settings
        material = f"{s.authority}|{s.tenant_id}|{s.client_id}|{s.client_secret}"
        if self.auth_guard is not None and not self._guard_checked:
            self._guard_checked = True
            suspended = self.auth_guard.check(material)
            if suspended:
                self._rejected = suspended
                raise DefenderAuthError(suspended, status=401)
        self.token_count += 1
        try:
            token, lifetime = read_token_answer(s, self._send("POST", s.token_url, data=token_form(s)))
        except DefenderAuthError as exc:
            self._rejected = str(exc)
            if self.auth_guard is not None:
                self.auth_guard.rejected(material, self._rejected)
            raise
        if self.auth_guard is not None:
            self.auth_guard.accepted()
        self._token = (token, token_expiry(lifetime))
        return token

    def _arm(self, method: str, url: str, **kw) -> requests.Response:
        """One ARM/ARG request with a valid token, quota waits and 429 back-off."""
        deadline = time.monotonic() + self.max_retry_time
        renewed = False
        attempt = 0
        while True:
            wait = self._quota_wait_until - time.monotonic()
            if wait > 0:
                self.log.info("Azure Resource Graph quota spent; waiting %.1f s for it to reset", wait)
                _http._sleep(wait)
            headers = {"Authorization": f"Bearer {self._access_token()}"}
            self.request_count += 1
            response = self._send(method, url, headers=headers, **kw)
            remaining = response.headers.get("x-ms-user-quota-remaining")
            resets = parse_resets_after(response.headers.get("x-ms-user-quota-resets-after"))
            if remaining is not None and remaining.strip() == "0":   # "00:00:00" or none: wait a second
                self._quota_wait_until = time.monotonic() + (resets or 1.0)
            if response.status_code == 401 and not renewed:
                self._token, renewed = None, True   # expired or revoked: one fresh token, then give up
                continue
            if response.status_code == 429:
                self.throttled += 1
                attempt += 1
                delay = resets or _retry_after(response) or min(30.0, 0.5 * 2 ** attempt)
                if attempt > self.retries or time.monotonic() + delay > deadline:
                    raise DefenderError(
                        f"Azure Resource Graph kept throttling connection {self.settings.conn_id!r} (HTTP 429 "
                        f"RateLimiting, {attempt} times); the next run tries again. Fewer parallel queries from "
                        "the same app registration help.", status=429)
                self.log.info("Azure answered 429 RateLimiting; waiting %.1f s", delay)
                _http._sleep(delay)
                continue
            return response

    def _check(self, response: requests.Response, what: str) -> Any:
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if status < 400 and isinstance(body, dict):
            return body
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        details = error.get("details") if isinstance(error, dict) else None
        text = (details[0].get("message") if details and isinstance(details[0], dict) else None) \
            or (error.get("message") if isinstance(error, dict) else None) or response.text[:120]
        cid = self.settings.conn_id
        if status == 401:
            raise DefenderAuthError(f"Azure rejected the token of connection {cid!r} for {what} (HTTP 401 {code}); "
                                    "check the tenant and that the app registration is enabled.", status=401)
        if status == 403:
            raise DefenderAzureForbiddenError(
                f"Azure refused {what} for connection {cid!r} (HTTP 403 {code}): the app registration lacks a "
                "role. Reading needs Reader (or Security Reader) on the subscriptions; closing alerts needs "
                "Security Admin.", status=403)
        if status < 400:
            raise DefenderBadResponseError(f"Azure answered {what} with something that is not a JSON object",
                                           status=status)
        raise DefenderError(f"Azure answered {what} with HTTP {status} {code}: {str(text)[:300]}", status=status)

    # ------------------------------------------------------------------ Resource Graph
    def iter_resources(self, query: str) -> Iterator[dict]:
        """Every record of an ARG query, page by page ($skipToken), as raw objects."""
        s = self.settings
        url = f"{s.resource_manager}/providers/Microsoft.ResourceGraph/resources?api-version={self.api_version}"
        body: dict[str, Any] = {"query": query, "options": {"$top": self.page_size, "resultFormat": "objectArray"}}
        if s.management_group:
            body["managementGroups"] = [s.management_group]
        else:
            body["subscriptions"] = list(s.subscriptions)
        while True:
            page = self._check(self._arm("POST", url, json=body), "a Resource Graph query")
            data = page.get("data")
            if not isinstance(data, list):
                raise DefenderBadResponseError("Azure Resource Graph answered without a 'data' object array")
            yield from data
            token = page.get("$skipToken")
            if not token:
                if str(page.get("resultTruncated")).lower() == "true":
                    raise DefenderBadResponseError(
                        f"Azure Resource Graph truncated the answer for {s.conn_id!r} and gave no $skipToken; "
                        "records would be missing, so the read is stopped.")
                return
            body["options"] = {**body["options"], "$skipToken": token}

    def iter_devices(self) -> Iterator[Device | InvalidRecord]:
        """Devices that are not Removed/Deleted, streamed."""
        s = self.settings
        query = build_query(DEVICE_TYPE, sites=s.sites, sensors=s.sensors,
                            where=(f"where properties.deviceStatus !in~ {REMOVED}",))
        counts = {"devices": 0, "invalid": 0}
        for raw in self.iter_resources(query):
            record = parse_azure_device(raw, source=s.conn_id, source_name=s.name)
            counts["devices" if isinstance(record, Device) else "invalid"] += 1
            yield record
        self.log.info("Read %d devices from %s (Azure), %d invalid records", counts["devices"], s.conn_id,
                      counts["invalid"])

    def deleted_device_ids(self, since: datetime) -> list[int]:
        """Ids (as in ``Device.id``) of devices Removed or Deleted and updated after ``since``."""
        s = self.settings
        query = build_query(DEVICE_TYPE, sites=s.sites, sensors=s.sensors, where=(
            f"where properties.deviceStatus in~ {REMOVED}",
            f"where properties.lastUpdated >= datetime({_kql_time(since)})"))
        return sorted({stable_id(r["id"]) for r in self.iter_resources(query)
                       if isinstance(r, dict) and isinstance(r.get("id"), str)})

    def get_alerts(self, from_time: datetime | None = None, to_time: datetime | None = None,
                   state: str | None = None) -> list[Alert | InvalidRecord]:
        """Alerts by ``startTimeUtc`` window, sorted by (time, id); invalid records at the end.
        ``state``: ``unhandled`` (status not Closed), ``handled`` (Closed) or None. Listed for forwarding
        (``state`` None), alerts carry their devices' ids, sensor, site and zone (one more Resource Graph
        query per 100 devices named; :func:`~defender_servicenow.azure_models.place_alert`)."""
        if state not in (None, "handled", "unhandled"):
            raise ConfigError(f"state must be 'handled', 'unhandled' or None, not {state!r}")
        where = []
        if from_time is not None:
            where.append(f"where properties.startTimeUtc >= datetime({_kql_time(from_time)})")
        if to_time is not None:
            where.append(f"where properties.startTimeUtc <= datetime({_kql_time(to_time)})")
        if state:
            where.append(f"where properties.status {'=~' if state == 'handled' else '!~'} 'Closed'")
        s = self.settings
        raws = list(self.iter_resources(build_query(ALERT_TYPE, where=tuple(where))))
        devices: dict[str, dict] = {}
        if raws and (state is None or s.sites or s.sensors):   # the alerts' devices (azure_scope.py)
            from defender_servicenow.azure_scope import filter_alerts, read_alert_devices

            devices = read_alert_devices(raws, s.sites, s.sensors, self.iter_resources)
            if s.sites or s.sensors:
                raws, unplaced = filter_alerts(raws, devices)
                if unplaced:
                    self.log.warning("%d alerts from %s name no device (DeviceResourceIds), so their site and "
                                     "sensor are unknown: kept despite the sites/sensors filter", unplaced, s.conn_id)
        records = [parse_azure_alert(raw, source=s.conn_id, devices=devices) for raw in raws]
        alerts = sorted((r for r in records if isinstance(r, Alert)), key=lambda a: (a.time, a.id))
        invalid = [r for r in records if isinstance(r, InvalidRecord)]
        self.log.info("Read %d alerts from %s (Azure)%s", len(alerts), s.conn_id,
                      f", {len(invalid)} invalid records" if invalid else "")
        return [*alerts, *invalid]

    def get_sensors(self) -> list[dict]:
        """Sensors (``…/sites/sensors``) as raw ARG records."""
        from defender_servicenow.azure_scope import sensors_in_sites, wanted_site_segments

        s = self.settings
        sensors = list(self.iter_resources(build_query(SENSOR_TYPE)))
        if s.sites:   # a sensor's site is the /sites/<site>/ segment of its id (and the site's displayName)
            sites = self.iter_resources(build_query(SITE_TYPE, project="id, name, properties"))
            sensors = sensors_in_sites(sensors, wanted_site_segments(s.sites, sites))
        return sensors

    def iter_vulnerabilities(self) -> Iterator[dict]:
        """Device vulnerabilities (``…/devicegroups/vulnerabilities``) as raw ARG records, streamed; not
        narrowed by the sites / sensors extras (they carry no sensor: the CVE sync keeps those of this
        source's devices)."""
        return self.iter_resources(build_query(VULNERABILITY_TYPE))

    def set_alert_status(self, resource_id: str, status: str = "Closed") -> dict:
        """PATCH the alert's status (New, InProgress, Closed); needs Security Admin."""
        if status not in ("New", "InProgress", "Closed"):
            raise ConfigError(f"status must be New, InProgress or Closed, not {status!r}")
        if not resource_id.startswith("/subscriptions/"):
            raise ConfigError(f"{resource_id[:80]!r} is not an ARM alert id")
        url = f"{self.settings.resource_manager}{resource_id}?api-version={ALERT_API_VERSION}"
        body = self._check(self._arm("PATCH", url, json={"properties": {"status": status}}),
                           f"setting alert {resource_id.rsplit('/', 1)[-1]} to {status}")
        self.log.info("Alert %s on %s: status %s", resource_id.rsplit("/", 1)[-1], self.settings.conn_id, status)
        return body

    def test_connection(self) -> tuple[bool, str]:
        try:
            sensors = self.get_sensors()
            scope = (f"management group {self.settings.management_group}" if self.settings.management_group
                     else f"{len(self.settings.subscriptions)} subscription(s)")
            return True, f"Connected to Azure Resource Graph ({scope}, {len(sensors)} sensors)."
        except (DefenderError, ConfigError) as exc:
            return False, str(exc)


def _retry_after(response: requests.Response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
