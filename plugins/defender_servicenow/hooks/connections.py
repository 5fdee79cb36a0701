"""The one parser of a Defender for IoT connection (conn type ``defender_iot``), shared by
:class:`~defender_servicenow.hooks.defender.DefenderIoTHook` and the alert trigger, so that the device
sync and the alert poll never read the same connection differently (host with or without a scheme, the
port field, a token with a trailing newline, ``verify`` as true/false/yes/no/1/0 or a CA bundle path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from defender_servicenow.exceptions import ConfigError
from defender_servicenow.hooks._http import USERINFO_HINT, has_userinfo, parse_number, parse_verify

SENSOR = "sensor"
MANAGEMENT_CONSOLE = "management_console"
APPLIANCES = (SENSOR, MANAGEMENT_CONSOLE)
TOKEN_HELP = ("generate a new token on the appliance under System Settings > Integrations > Access Tokens "
              "and put it in the connection's password field")


@dataclass(frozen=True)
class DefenderConnection:
    """A parsed Defender connection (the token is a secret: never log this object)."""

    conn_id: str
    base_url: str
    token: str
    appliance: str
    name: str
    verify: bool | str
    proxy: str | None
    timeout: float

    def __repr__(self) -> str:
        return f"DefenderConnection(conn_id={self.conn_id!r}, base_url={self.base_url!r})"

    def __getitem__(self, item: str) -> Any:   # the hook's settings dict interface
        return getattr(self, item)


def _verify(value: Any, conn_id: str) -> bool | str:
    verify = parse_verify(value)
    if isinstance(verify, bool):
        return verify
    if not Path(verify).is_file():
        raise ConfigError(f"Connection {conn_id!r}: extra 'verify' is {verify!r}, which is neither true/false "
                          "nor an existing CA bundle file; give the path of the appliance's CA certificate (PEM)")
    return verify


def parse_defender_connection(conn: Any, conn_id: str | None = None) -> DefenderConnection:
    """An Airflow connection -> :class:`DefenderConnection`; :class:`ConfigError` naming the field."""
    cid = conn_id or conn.conn_id
    extra = conn.extra_dejson or {}
    host = (conn.host or "").strip().rstrip("/")
    if not host:
        raise ConfigError(f"Connection {cid!r} has no host; set it to the appliance URL, e.g. https://10.1.0.2")
    if has_userinfo(host):
        raise ConfigError(f"Connection {cid!r}: the host {USERINFO_HINT} (the API token goes in Password)")
    if "://" not in host:
        host = f"https://{host}"
    if conn.port and urlsplit(host).port is None:
        parts = urlsplit(host)
        host = f"{parts.scheme}://{parts.hostname}:{conn.port}{parts.path}".rstrip("/")
    token = (conn.password or "").strip()   # a token pasted or stored with a trailing newline
    if not token:
        raise ConfigError(f"Connection {cid!r} has no API access token in its password field; {TOKEN_HELP}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in token):
        raise ConfigError(f"Connection {cid!r}: the API access token contains control characters (e.g. a line "
                          f"break in the middle); paste it again. {TOKEN_HELP}")
    appliance = (extra.get("appliance") or SENSOR).strip().lower()
    if appliance not in APPLIANCES:
        raise ConfigError(f"Connection {cid!r}: extra 'appliance' is {appliance!r}; "
                          "use 'sensor' or 'management_console'")
    try:
        timeout = parse_number(extra.get("timeout"), 30.0, field="timeout")
    except ValueError as exc:
        raise ConfigError(f"Connection {cid!r}: {exc} (seconds per request, default 30)") from None
    return DefenderConnection(
        conn_id=cid, base_url=host, token=token, appliance=appliance,
        name=(extra.get("name") or "").strip() or (urlsplit(host).hostname or host),
        verify=_verify(extra.get("verify"), cid), proxy=extra.get("proxy") or None, timeout=timeout)
