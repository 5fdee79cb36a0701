"""The one parser of a Defender for IoT in Azure connection (conn type ``defender_iot_azure``) and the
Entra ID client-credentials grant, shared by :class:`~defender_servicenow.hooks.azure.DefenderIoTAzureHook`
and the alert trigger (no requests here: the hook and the trigger send them).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from defender_servicenow.exceptions import ConfigError, DefenderAuthError, DefenderBadResponseError
from defender_servicenow.hooks._http import USERINFO_HINT, has_userinfo, parse_number, parse_verify

DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
DEFAULT_RESOURCE_MANAGER = "https://management.azure.com"
DEFAULT_NAME = "Microsoft Defender for IoT (Azure)"
_SECRET_HELP = ("create a new client secret for the app registration in Entra ID (App registrations > "
                "Certificates & secrets) and put its value in the connection's password field")


@dataclass(frozen=True)
class AzureSettings:
    conn_id: str
    client_id: str
    client_secret: str
    tenant_id: str
    subscriptions: tuple[str, ...]
    management_group: str | None
    authority: str
    resource_manager: str
    name: str
    sites: tuple[str, ...]
    sensors: tuple[str, ...]
    verify: bool | str
    proxy: str | None
    timeout: float

    def __repr__(self) -> str:   # never show the secret
        return f"AzureSettings(conn_id={self.conn_id!r}, tenant_id={self.tenant_id!r}, client_id={self.client_id!r})"

    @property
    def token_url(self) -> str:
        return f"{self.authority}/{self.tenant_id}/oauth2/v2.0/token"

    @property
    def scope(self) -> str:
        return f"{self.resource_manager}/.default"


def _names(value: Any, field: str, conn_id: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise ConfigError(f"Connection {conn_id!r}: extra {field!r} is not a valid JSON list") from None
        else:
            value = text.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"Connection {conn_id!r}: extra {field!r} must be a list of names or a "
                          "comma-separated string")
    return tuple(dict.fromkeys(v.strip() for v in value if v.strip()))


def _url(value: Any, default: str, field: str, conn_id: str) -> str:
    text = str(value or "").strip().rstrip("/") or default
    if has_userinfo(text):
        raise ConfigError(f"Connection {conn_id!r}: extra {field!r} {USERINFO_HINT} (Login, Password)")
    if not text.startswith(("https://", "http://")):
        raise ConfigError(f"Connection {conn_id!r}: extra {field!r} is {text[:80]!r}; give a URL such as {default}")
    return text


def parse_azure_connection(conn_id: str, login: str | None, password: str | None, extra: dict | None
                           ) -> AzureSettings:
    """A ``defender_iot_azure`` connection -> :class:`AzureSettings`; a :class:`ConfigError` naming the field
    otherwise. Pure (used by the hook, the trigger and the tests)."""
    extra = extra or {}
    client_id, secret = (login or "").strip(), (password or "").strip()
    if not client_id:
        raise ConfigError(f"Connection {conn_id!r} has no application (client) id in its login field")
    if not secret:
        raise ConfigError(f"Connection {conn_id!r} has no client secret in its password field; {_SECRET_HELP}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in secret):
        raise ConfigError(f"Connection {conn_id!r}: the client secret contains control characters; paste it again")
    tenant = str(extra.get("tenant_id") or "").strip()
    if not tenant:
        raise ConfigError(f"Connection {conn_id!r} has no extra 'tenant_id' (the Entra ID directory id)")
    subscriptions = _names(extra.get("subscriptions"), "subscriptions", conn_id)
    group = str(extra.get("management_group") or "").strip() or None
    if subscriptions and group:
        raise ConfigError(f"Connection {conn_id!r}: set either extra 'subscriptions' or 'management_group', "
                          "not both (Azure Resource Graph takes one scope)")
    if not subscriptions and not group:
        raise ConfigError(f"Connection {conn_id!r} needs extra 'subscriptions' (ids) or 'management_group'")
    try:
        timeout = parse_number(extra.get("timeout"), 30.0, field="timeout")
    except ValueError as exc:
        raise ConfigError(f"Connection {conn_id!r}: {exc} (seconds per request, default 30)") from None
    return AzureSettings(
        conn_id=conn_id, client_id=client_id, client_secret=secret, tenant_id=tenant,
        subscriptions=subscriptions, management_group=group,
        authority=_url(extra.get("authority"), DEFAULT_AUTHORITY, "authority", conn_id),
        resource_manager=_url(extra.get("resource_manager"), DEFAULT_RESOURCE_MANAGER, "resource_manager", conn_id),
        name=str(extra.get("name") or "").strip() or DEFAULT_NAME,
        sites=_names(extra.get("sites"), "sites", conn_id), sensors=_names(extra.get("sensors"), "sensors", conn_id),
        verify=parse_verify(extra.get("verify")), proxy=str(extra.get("proxy") or "").strip() or None,
        timeout=timeout,
    )


def token_form(s: AzureSettings) -> dict:
    """The client-credentials grant's form (hook and trigger)."""
    return {"grant_type": "client_credentials", "client_id": s.client_id, "client_secret": s.client_secret,
            "scope": s.scope}


def read_token_answer(s: AzureSettings, response: Any) -> tuple[str, float]:
    """The token endpoint's answer (a requests or httpx response) -> (access token, lifetime s), the token
    masked; a 400/401 with an ``error`` body is a rejected credential (:class:`DefenderAuthError`), anything
    else without a token a :class:`DefenderBadResponseError`."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = {}
    if status in (400, 401) and isinstance(body, dict) and body.get("error"):
        codes = body.get("error_codes") or []
        raise DefenderAuthError(
            f"Entra ID rejected the credentials of connection {s.conn_id!r} (HTTP {status}, "
            f"{body.get('error')}{', AADSTS' + str(codes[0]) if codes else ''}); no further login is tried "
            f"by this run. Check the tenant id and client id, or {_SECRET_HELP}.", status=status)
    token, lifetime = (body.get("access_token"), body.get("expires_in")) if isinstance(body, dict) else (None, None)
    if status != 200 or not isinstance(token, str):
        raise DefenderBadResponseError(f"The token endpoint {s.token_url} answered HTTP {status} without an "
                                       "access token", status=status)
    from airflow.sdk.log import mask_secret

    mask_secret(token)
    return token, float(lifetime or 3600)


def token_expiry(lifetime: float) -> float:
    """Monotonic time from which a token of this lifetime is renewed (a tenth of it, at most 5 min, early)."""
    return time.monotonic() + lifetime - min(300.0, lifetime / 10)
