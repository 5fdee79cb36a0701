"""The ServiceNow connection (conn type ``servicenow``), parsed and validated (pure; plain errors).

Used by :class:`~defender_servicenow.hooks.servicenow.ServiceNowHook`; the fields are described there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from defender_servicenow.exceptions import ServiceNowAuthError, ServiceNowError
from defender_servicenow.hooks._http import USERINFO_HINT, has_userinfo, parse_number, parse_verify

AUTH_TYPES = ("oauth_password", "oauth_client_credentials", "basic")


@dataclass(frozen=True)
class ServiceNowSettings:
    """The connection, parsed and validated (secrets included: never log this object)."""

    conn_id: str
    base_url: str
    auth_type: str
    username: str | None
    password: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    verify: bool | str = True
    proxy: str | None = None
    timeout: float = 30.0
    requests_per_hour: float | None = None

    def __repr__(self) -> str:  # keep secrets out of tracebacks and debuggers
        return f"ServiceNowSettings(conn_id={self.conn_id!r}, base_url={self.base_url!r}, auth_type={self.auth_type!r})"

    @property
    def secrets(self) -> list[str]:
        proxy_password = urlsplit(self.proxy).password if self.proxy else None
        return [s for s in (self.password, self.client_secret, proxy_password) if s]


def parse_connection(conn: Any) -> ServiceNowSettings:
    """Turn an Airflow connection into :class:`ServiceNowSettings` (pure; plain errors)."""
    cid = conn.conn_id
    extra = conn.extra_dejson or {}
    host = (conn.host or "").strip().rstrip("/")
    if not host:
        raise ServiceNowError(f"Connection {cid!r} has no host: set it to the instance URL, "
                              "e.g. https://dev12345.service-now.com")
    if has_userinfo(host):
        raise ServiceNowError(f"Connection {cid!r}: the host {USERINFO_HINT} (Login, Password)")
    if "://" not in host:
        host = "https://" + host
    parts = urlsplit(host)
    netloc = parts.netloc
    if conn.port and ":" not in netloc:
        netloc = f"{netloc}:{conn.port}"
    client_id = (extra.get("client_id") or "").strip() or None
    client_secret = extra.get("client_secret") or None
    auth_type = (extra.get("auth_type") or "").strip().lower() or ("oauth_password" if client_id else "basic")
    if auth_type not in AUTH_TYPES:
        raise ServiceNowAuthError(f"Connection {cid!r}: extra auth_type={auth_type!r} is not one of "
                                  f"{', '.join(AUTH_TYPES)}")
    if auth_type.startswith("oauth") and not (client_id and client_secret):
        raise ServiceNowAuthError(f"Connection {cid!r}: auth_type {auth_type} needs the extras client_id and "
                                  "client_secret (from the instance's Application Registry)")
    if auth_type != "oauth_client_credentials" and not (conn.login and conn.password):
        raise ServiceNowAuthError(f"Connection {cid!r}: auth_type {auth_type} needs a login and a password")
    try:
        timeout = parse_number(extra.get("timeout"), 30.0, field="timeout")
        rph = parse_number(extra.get("requests_per_hour"), None, field="requests_per_hour")
    except ValueError as exc:
        raise ServiceNowError(f"Connection {cid!r}: {exc}") from None
    return ServiceNowSettings(
        conn_id=cid, base_url=f"{parts.scheme}://{netloc}", auth_type=auth_type, username=conn.login or None,
        password=conn.password or None, client_id=client_id, client_secret=client_secret,
        verify=parse_verify(extra.get("verify")), proxy=(extra.get("proxy") or "").strip() or None,
        timeout=timeout, requests_per_hour=rph,
    )
