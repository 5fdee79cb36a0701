"""DefenderIoTHook: I/O with a Microsoft Defender for IoT OT sensor (``/api/...``) or on-premises management
console (``/external/...``), returning normalised :mod:`defender_servicenow.models` records.

Inventory extraction never holds the whole inventory twice:

* sensor: ``GET /api/v1/devices`` is one (unpaged) JSON array; it is read from the response stream and
  split into items as they arrive (:func:`iter_json_array`), each turned into a :class:`Device` and yielded.
* management console: the paged v3 integration API (``/external/v3/integration/devices/0``) is the
  primary inventory (site/zone names, Purdue layer, category, first/last seen, sensor); what only
  ``/external/v1/devices`` has (firmware, authorized, scanner, engineering station, dynamic address,
  site/zone ids) is streamed first into a compact per-device tuple (not a model, not the raw JSON), then
  merged into each v3 page and dropped from the side table as it is used. Peak memory is one v3 page plus
  that side table (a few hundred bytes per device, more for devices with firmware modules).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

import requests
from airflow.sdk import BaseHook

from defender_servicenow.alert_parsing import parse_alert_safely
from defender_servicenow.exceptions import (
    ConfigError,
    DefenderAuthError,
    DefenderBadResponseError,
    DefenderCertificateError,
    DefenderError,
    DefenderUnreachableError,
    DefenderWrongApplianceError,
)
from defender_servicenow.hooks._http import build_session, make_retry
from defender_servicenow.hooks.connections import (  # noqa: E402  (re-exported)
    MANAGEMENT_CONSOLE,
    SENSOR,
    DefenderConnection,
    parse_defender_connection,
)
from defender_servicenow.hooks.connections import TOKEN_HELP as _TOKEN_HELP  # noqa: E402
from defender_servicenow.hooks.defender_answers import (  # noqa: F401  (re-exported for callers)
    MAX_ITEM_CHARS,
    iter_json_array,
)
from defender_servicenow.hooks.defender_answers import excerpt as _excerpt
from defender_servicenow.hooks.defender_answers import first_text as _first
from defender_servicenow.hooks.defender_answers import reject_html as _reject_html
from defender_servicenow.models import (
    Alert,
    Device,
    InvalidRecord,
    datetime_to_ms,
    merge_v1_extras,
    parse_device,
    parse_v3_device,
    v1_extras,
)

HANDLE_ACTIONS = ("handle", "handleAndLearn")
_KIND = {SENSOR: "an OT sensor", MANAGEMENT_CONSOLE: "an on-premises management console"}


class DefenderIoTHook(BaseHook):
    """Read devices and alerts from a Defender for IoT OT sensor or on-premises management console.

    :param defender_conn_id: connection of type ``defender_iot``: host = appliance URL, password = API
        access token (sent raw in ``Authorization``), extras ``appliance`` (``sensor`` | ``management_console``),
        ``name``, ``verify`` (true/false/CA bundle path), ``proxy``, ``timeout`` (seconds, default 30).
    :param page_size: page size for the management console v3 integration API.
    :param retries: retries of connection errors and 429/502/503/504 answers (exponential back-off,
        ``Retry-After`` honoured; see ``hooks/_http.py``), within ``max_retry_time`` seconds per call.

    Nothing is looked up at construction; the connection is read on first use.
    """

    conn_name_attr = "defender_conn_id"
    default_conn_name = "defender_iot_default"
    conn_type = "defender_iot"
    hook_name = "Microsoft Defender for IoT"

    def __init__(self, defender_conn_id: str = default_conn_name, *, page_size: int = 1000, retries: int = 5,
                 backoff_factor: float = 0.5, max_retry_time: float = 120.0, chunk_size: int = 256 * 1024,
                 auth_guard: Any = None) -> None:
        super().__init__()
        self.auth_guard = auth_guard   # hooks.lockout.AuthGuard: no request after a rejected token
        self._guard_checked = False
        self.defender_conn_id = defender_conn_id
        self.page_size = page_size
        self.retries = retries
        self.backoff_factor = backoff_factor
        self.max_retry_time = max_retry_time
        self.chunk_size = chunk_size
        self._requests = 0

    # ------------------------------------------------------------------ connection

    @cached_property
    def _settings(self) -> DefenderConnection:
        settings = parse_defender_connection(self.get_connection(self.defender_conn_id), self.defender_conn_id)
        from airflow.sdk.log import mask_secret

        mask_secret(settings.token)
        return settings

    @property
    def appliance(self) -> str:
        """``sensor`` or ``management_console`` (connection extra ``appliance``)."""
        return self._settings["appliance"]

    @property
    def appliance_name(self) -> str:
        """Display name: connection extra ``name``, else the host."""
        return self._settings["name"]

    @property
    def base_url(self) -> str:
        return self._settings["base_url"]

    @property
    def request_count(self) -> int:
        """Requests sent so far (retries not counted)."""
        return self._requests

    def get_conn(self) -> requests.Session:
        """Return the configured requests session (token header, TLS, proxy, retries)."""
        return self._session

    @cached_property
    def _session(self) -> requests.Session:
        settings = self._settings
        retry = make_retry(total=self.retries, backoff_factor=self.backoff_factor,
                           max_retry_time=self.max_retry_time)
        session = build_session(verify=settings["verify"], proxy=settings["proxy"], retry=retry, pool_size=4)
        session.headers["Authorization"] = settings["token"]  # raw token, no scheme (documented)
        return session

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, *, params: dict | None = None, body: dict | None = None,
                 stream: bool = False) -> requests.Response:
        settings = self._settings
        if self.auth_guard is not None and not self._guard_checked:
            self._guard_checked = True
            suspended = self.auth_guard.check(f"{settings.base_url}|{settings.token}")
            if suspended:
                raise DefenderAuthError(suspended, status=401)
        url = settings["base_url"] + path
        self._requests += 1
        try:
            response = self._session.request(
                method, url, params=params, json=body, stream=stream, verify=settings["verify"],
                proxies=self._session.proxies or None, timeout=(settings["timeout"], settings["timeout"]))
        except requests.exceptions.SSLError:
            raise DefenderCertificateError(
                f"The TLS certificate of {settings['base_url']} could not be verified. Appliances usually have "
                f"self-signed certificates: export the appliance's certificate (or its CA) as PEM and set the "
                f"connection extra 'verify' to that file's path (or, for a lab only, to false)."
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise DefenderUnreachableError(
                f"Could not reach the Defender for IoT appliance at {settings['base_url']} after "
                f"{self.retries} retries ({type(exc).__name__}); check the connection host, that the appliance "
                f"is up and reachable from Airflow, and the proxy/timeout extras."
            ) from None
        except requests.exceptions.RequestException as exc:   # e.g. the answer was cut off part way
            raise DefenderUnreachableError(
                f"The connection to the Defender for IoT appliance at {settings['base_url']} broke during "
                f"{method} {path} ({type(exc).__name__}); the next run tries again. If it persists, check the "
                f"network path and proxy between Airflow and the appliance."
            ) from None
        self._check_status(response, path)
        return response

    def _check_status(self, response: requests.Response, path: str) -> None:
        status = response.status_code
        if status < 400:
            if self.auth_guard is not None:
                self.auth_guard.accepted()
            return
        excerpt = _excerpt(response)
        response.close()
        kind = _KIND[self.appliance]
        if status in (401, 403):
            if self.auth_guard is not None:
                self.auth_guard.rejected(f"{self.base_url}|{self._settings.token}", f"{path} answered HTTP {status}")
            raise DefenderAuthError(
                f"{self.base_url} rejected the API access token (HTTP {status}) for connection "
                f"{self.defender_conn_id!r}; {_TOKEN_HELP}.", status=status)
        if status in (404, 405) and path.startswith(("/api/", "/external/")):
            other = MANAGEMENT_CONSOLE if self.appliance == SENSOR else SENSOR
            raise DefenderWrongApplianceError(
                f"{self.base_url} answered HTTP {status} to {path}: it does not look like {kind} "
                f"(perhaps it is {_KIND[other]}). Set the connection extra 'appliance' of "
                f"{self.defender_conn_id!r} to '{other}' if so, or check the host.", status=status)
        raise DefenderError(f"{self.base_url} answered HTTP {status} to {response.request.method} {path}: "
                            f"{excerpt}", status=status)

    def _json(self, method: str, path: str, **kw) -> Any:
        response = self._request(method, path, **kw)
        text = response.content[:200]
        _reject_html(response, text, self.base_url, path)
        try:
            return response.json()
        except ValueError:
            raise DefenderBadResponseError(
                f"{self.base_url} answered {path} with invalid JSON; it starts with {_first(text)}",
                status=response.status_code
            ) from None

    def _stream_array(self, path: str, params: dict | None = None) -> Iterator[Any]:
        """GET ``path`` and yield the items of its JSON array answer as they arrive."""
        response = self._request("GET", path, params=params, stream=True)
        with response:
            head = bytearray()

            def chunks() -> Iterator[bytes]:
                for chunk in response.iter_content(chunk_size=self.chunk_size):
                    if len(head) < 200:
                        head.extend(chunk[:200 - len(head)])
                        _reject_html(response, bytes(head), self.base_url, path)
                    yield chunk

            try:
                yield from iter_json_array(chunks())
            except ValueError as exc:
                raise DefenderBadResponseError(
                    f"{self.base_url} answered {path} with something that is not the documented JSON array "
                    f"({exc}); it starts with {_first(bytes(head))}", status=response.status_code) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError):
                raise DefenderUnreachableError(
                    f"The connection to {self.base_url} dropped while reading {path}; nothing after that point "
                    f"was read. Try again; if it keeps happening raise the 'timeout' extra.") from None

    def _require(self, appliance: str, what: str) -> None:
        if self.appliance != appliance:
            raise DefenderWrongApplianceError(
                f"{what} needs {_KIND[appliance]}, but connection {self.defender_conn_id!r} is configured as "
                f"{_KIND[self.appliance]} (extra 'appliance').")

    # ------------------------------------------------------------------ devices

    def iter_devices(self, authorized: bool | None = None, *, site_ids: Iterable[int] | None = None,
                     zone_ids: Iterable[int] | None = None, sensor_ids: Iterable[int] | None = None
                     ) -> Iterator[Device | InvalidRecord]:
        """The complete inventory, streamed (site/zone/sensor filters: management console only)."""
        src, name = self.defender_conn_id, self.appliance_name
        counts = {"devices": 0, "invalid": 0}
        if self.appliance == SENSOR:
            if site_ids or zone_ids or sensor_ids:
                raise DefenderWrongApplianceError("site/zone/sensor filters need a management console; "
                                                  f"{src!r} is a sensor")
            params = None if authorized is None else {"authorized": str(authorized).lower()}
            for raw in self._stream_array("/api/v1/devices", params):
                record = parse_device(raw, source=src, appliance_name=name, sensor_name=name)
                counts["devices" if isinstance(record, Device) else "invalid"] += 1
                yield record
        else:
            yield from self._iter_cm_devices(authorized, site_ids, zone_ids, sensor_ids, counts)
        self.log.info("Read %d devices from %s (%s), %d invalid records", counts["devices"], src,
                      self.appliance, counts["invalid"])

    def _iter_cm_devices(self, authorized, site_ids, zone_ids, sensor_ids, counts) -> Iterator:
        src, name = self.defender_conn_id, self.appliance_name
        sensor_names = self._sensor_names()
        params: dict[str, str] = {}
        if authorized is not None:
            params["authorized"] = str(authorized).lower()
        for key, ids in (("siteId", site_ids), ("zoneId", zone_ids), ("sensorId", sensor_ids)):
            if ids:
                params[key] = ",".join(str(int(i)) for i in ids)
        filtered = bool(params)
        # 1. what only v1 has, compactly, per device id
        extras: dict[int, tuple] = {}
        v1_invalid = 0
        for raw in self._stream_array("/external/v1/devices", params or None):
            record = parse_device(raw, source=src, appliance_name=name, sensor_names=sensor_names)
            if isinstance(record, Device):
                extras[record.id] = v1_extras(record)
            else:
                v1_invalid += 1
        if v1_invalid:
            self.log.warning("%d records of /external/v1/devices on %s could not be parsed; those devices get "
                             "no firmware/authorized/scanner values", v1_invalid, src)
        # 2. the v3 inventory, page by page, merged
        seen: set[int] = set()
        v3_sensor = ",".join(str(int(i)) for i in sensor_ids) if sensor_ids else None
        for raw in self._iter_v3_devices(0, v3_sensor):
            record = parse_v3_device(raw, source=src, appliance_name=name, sensor_names=sensor_names)
            if isinstance(record, InvalidRecord):
                counts["invalid"] += 1
                yield record
                continue
            if record.id in seen:
                continue
            seen.add(record.id)
            extra = extras.pop(record.id, None)
            if filtered and extra is None:
                continue
            counts["devices"] += 1
            yield merge_v1_extras(record, extra)
        if extras:
            self.log.info("%d devices listed by /external/v1/devices on %s were not in the v3 inventory "
                          "(deleted meanwhile?); skipped", len(extras), src)

    def _iter_v3_devices(self, since_ms: int, sensor_id: str | None = None) -> Iterator[Any]:
        yield from self._iter_v3_pages(f"/external/v3/integration/devices/{since_ms}", "u_devices",
                                       {"sensorId": sensor_id} if sensor_id else {})

    def iter_v3_connections(self, since_ms: int = 0) -> Iterator[dict]:
        """Management console connections updated after ``since_ms`` (raw ``u_src_device_id`` /
        ``u_dest_device_id`` / ``u_connection_type`` objects), every page."""
        self._require(MANAGEMENT_CONSOLE, "Device connections (v3 integration API)")
        path = f"/external/v3/integration/connections/{int(since_ms)}"
        yield from (c for c in self._iter_v3_pages(path, "u_connections", {}) if isinstance(c, dict))

    def iter_v3_device_cves(self, since_ms: int = 0, min_score: float | None = None) -> Iterator[dict]:
        """Management console device CVEs (raw ``u_id`` / ``u_cves`` records) of devices updated after
        ``since_ms``; ``min_score`` is the console's ``score`` filter (>=)."""
        self._require(MANAGEMENT_CONSOLE, "Device CVEs (v3 integration API)")
        path = f"/external/v3/integration/devicecves/{int(since_ms)}"
        extra = {"score": min_score} if min_score else {}
        yield from (c for c in self._iter_v3_pages(path, "u_device_cves", extra) if isinstance(c, dict))

    def _iter_v3_pages(self, path: str, list_key: str, extra: dict[str, Any]) -> Iterator[Any]:
        page, read = 0, 0
        while True:
            params: dict[str, Any] = {"page": page, "size": self.page_size, **extra}
            body = self._json("GET", path, params=params)
            if not isinstance(body, dict) or not isinstance(body.get(list_key), list):
                raise DefenderBadResponseError(f"{self.base_url} answered {path} without a '{list_key}' list; "
                                               f"it starts with {_first(json.dumps(body)[:80].encode())}")
            items = body[list_key]
            total = body.get("u_count")
            yield from items
            read += len(items)
            page += 1
            if not items:
                return
            if isinstance(total, int):   # a console may cap the page size below ours: trust u_count
                if read >= total:
                    return
            elif len(items) < self.page_size:
                return

    def iter_devices_changed_since(self, ts: datetime) -> Iterator[Device | InvalidRecord]:
        """Devices new or updated after ``ts`` (management console v3 only).

        v3 records carry no firmware/authorized/scanner/engineering station/site and zone ids: those are None
        (unknown) on these devices, not False.
        """
        self._require(MANAGEMENT_CONSOLE, "Delta extraction (v3 integration API)")
        src, name = self.defender_conn_id, self.appliance_name
        sensor_names = self._sensor_names()
        count = 0
        for raw in self._iter_v3_devices(datetime_to_ms(ts)):
            count += 1
            yield parse_v3_device(raw, source=src, appliance_name=name, sensor_names=sensor_names)
        self.log.info("%d devices changed on %s since %s", count, src, ts.isoformat())

    def deleted_device_ids(self, since: datetime) -> list[int]:
        """Ids of devices deleted after ``since`` (management console v3 only)."""
        self._require(MANAGEMENT_CONSOLE, "Deleted-device extraction (v3 integration API)")
        path = f"/external/v3/integration/deleteddevices/{datetime_to_ms(since)}"
        body = self._json("GET", path)
        if not isinstance(body, list):
            raise DefenderBadResponseError(f"{self.base_url} answered {path} with a {type(body).__name__}, "
                                           "not the documented list of {{u_id}}")
        ids = sorted({int(item["u_id"]) for item in body
                      if isinstance(item, dict) and isinstance(item.get("u_id"), int)})
        self.log.info("%d devices deleted on %s since %s", len(ids), self.defender_conn_id, since.isoformat())
        return ids

    def get_sensors(self) -> list[dict]:
        """The management console's sensors (``/external/v3/integration/sensors``, ``u_*`` fields)."""
        self._require(MANAGEMENT_CONSOLE, "Listing sensors")
        body = self._json("GET", "/external/v3/integration/sensors")
        if not isinstance(body, list):
            raise DefenderBadResponseError(f"{self.base_url} answered the sensors list with a "
                                           f"{type(body).__name__}, not a list")
        return [item for item in body if isinstance(item, dict)]

    def get_appliances(self) -> list[dict]:
        """The management console's sensors as ``/external/v1/appliances`` lists them (raw)."""
        self._require(MANAGEMENT_CONSOLE, "Listing appliances")
        body = self._json("GET", "/external/v1/appliances")
        return [item for item in body if isinstance(item, dict)] if isinstance(body, list) else []

    def _sensor_names(self) -> dict[int, str]:
        names = {}
        for sensor in self.get_sensors():
            if isinstance(sensor.get("u_id"), int) and sensor.get("u_name"):
                names[sensor["u_id"]] = str(sensor["u_name"])
        return names

    def iter_device_connections(self, device_id: int | None = None, *, last_active_minutes: int | None = None,
                                discovered_after: datetime | None = None) -> Iterator[dict]:
        """Sensor device connections (raw ``firstDeviceId``/``secondDeviceId``/``lastSeen``/... objects)."""
        self._require(SENSOR, "Device connections")
        path = f"/api/v1/devices/{int(device_id)}/connections" if device_id is not None \
            else "/api/v1/devices/connections"
        params: dict[str, Any] = {}
        if last_active_minutes is not None:
            params["lastActiveInMinutes"] = int(last_active_minutes)
        if discovered_after is not None:
            params["discoveredAfter"] = datetime_to_ms(discovered_after)
        yield from (c for c in self._stream_array(path, params or None) if isinstance(c, dict))

    def iter_device_cves(self, top: int | None = None) -> Iterator[dict]:
        """Sensor CVEs per device IP (raw ``cveId``/``ipAddress``/``score``/... objects)."""
        self._require(SENSOR, "Device CVEs")
        params = {"top": int(top)} if top is not None else None
        yield from (c for c in self._stream_array("/api/v1/devices/cves", params) if isinstance(c, dict))

    # ------------------------------------------------------------------ alerts

    def get_alerts(self, from_time: datetime | None = None, to_time: datetime | None = None,
                   state: str | None = None, *, site_id: int | None = None, zone_id: int | None = None,
                   sensor_id: int | None = None) -> list[Alert | InvalidRecord]:
        """v2 alerts, sorted by (time, id); invalid records at the end.

        :param state: ``handled`` or ``unhandled`` (None: both).
        :param site_id, zone_id, sensor_id: management console filters.
        """
        if state not in (None, "handled", "unhandled"):
            raise ConfigError(f"state must be 'handled', 'unhandled' or None, not {state!r}")
        params: dict[str, Any] = {}
        if state:
            params["state"] = state
        if from_time is not None:
            params["fromTime"] = datetime_to_ms(from_time)
        if to_time is not None:
            params["toTime"] = datetime_to_ms(to_time)
        if self.appliance == SENSOR:
            if site_id is not None or zone_id is not None or sensor_id is not None:
                raise DefenderWrongApplianceError("site/zone/sensor alert filters need a management console")
            path, sensor_names = "/api/v2/alerts", None
        else:
            path = "/external/v2/alerts"
            for key, value in (("siteId", site_id), ("zoneId", zone_id), ("sensor", sensor_id)):
                if value is not None:
                    params[key] = int(value)
            sensor_names = None  # v2 carries sensorName
        body = self._json("GET", path, params=params or None)
        if not isinstance(body, list):
            raise DefenderBadResponseError(f"{self.base_url} answered {path} with a {type(body).__name__}, "
                                           "not the documented list of alerts")
        handled = None if state is None else state == "handled"
        records = [parse_alert_safely(raw, source=self.defender_conn_id, sensor_name=self.appliance_name
                               if self.appliance == SENSOR else None, sensor_names=sensor_names, handled=handled,
                               derive_uuid=self.appliance == MANAGEMENT_CONSOLE)
                   for raw in body]
        alerts = sorted((r for r in records if isinstance(r, Alert)), key=lambda a: (a.time, a.id))
        invalid = [r for r in records if isinstance(r, InvalidRecord)]
        self.log.info("Read %d alerts from %s (%s)%s", len(alerts), self.defender_conn_id, path,
                      f", {len(invalid)} invalid records" if invalid else "")
        return [*alerts, *invalid]

    def handle_alert(self, uuid: str, action: str = "handle") -> str:
        """Handle (``handle``) or handle-and-learn (``handleAndLearn``) an alert on the management console.

        Returns the console's message, e.g. "Alert update request finished successfully".
        """
        self._require(MANAGEMENT_CONSOLE, "Handling alerts")
        if action not in HANDLE_ACTIONS:
            raise ConfigError(f"action must be one of {', '.join(HANDLE_ACTIONS)}, not {action!r}")
        path = f"/external/v1/alerts/{requests.utils.quote(str(uuid), safe='')}"
        try:
            body = self._json("PUT", path, body={"action": action})
        except DefenderError as exc:
            if exc.status == 500:
                raise DefenderError(f"The management console refused to {action} alert {uuid}: {exc}",
                                    status=500) from None
            raise
        message = body.get("content") or body.get("error") if isinstance(body, dict) else None
        if isinstance(body, dict) and body.get("error"):
            raise DefenderError(f"The management console refused to {action} alert {uuid}: {body['error']}")
        self.log.info("Alert %s on %s: %s (%s)", uuid, self.defender_conn_id, action, message)
        return str(message or "")

    # ------------------------------------------------------------------ connection test

    def test_connection(self) -> tuple[bool, str]:
        """Check the URL, token and appliance kind with one small request."""
        try:
            now = datetime_to_ms(datetime.now(timezone.utc))
            if self.appliance == SENSOR:
                self._json("GET", "/api/v1/alerts", params={"fromTime": now})
                return True, f"Connected to the OT sensor {self.appliance_name} at {self.base_url}."
            sensors = self.get_sensors()
            return True, (f"Connected to the management console {self.appliance_name} at {self.base_url} "
                          f"({len(sensors)} sensors).")
        except (DefenderError, ConfigError) as exc:
            return False, str(exc)
