"""Value normalisers of Defender records (pure, never raise for bad data): one raw JSON value -> a clean
value or ``None``. :mod:`defender_servicenow.models` builds its records with them and re-exports the public
ones (``normalize_mac``, ``normalize_ip``, ``ms_to_datetime``, ``datetime_to_ms``); the Azure parsers
(:mod:`defender_servicenow.azure_models`) share the private helpers.

* MAC addresses in any common format (``0002A21F1C59``, ``00-02-a2-1f-1c-59``, ``0002.a21f.1c59``) ->
  lower-case colon form; IP addresses validated with :mod:`ipaddress` (normalised text form); an invalid
  value is dropped with a note in the caller's ``issues`` list;
* ``N/A``-like values (and empty strings) -> ``None``; numbers -> text; objects and lists are an error;
* times: integer milliseconds since the epoch (UTC) <-> aware UTC datetimes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

_NA = {"", "n/a", "na", "none", "null"}
_HEX12 = re.compile(r"^[0-9a-f]{12}$")


def normalize_mac(value: Any) -> str | None:
    """``00-02-A2-1F-1C-59`` / ``0002A21F1C59`` / ``0002.a21f.1c59`` -> ``00:02:a2:1f:1c:59``; else None."""
    if not isinstance(value, str):
        return None
    digits = re.sub(r"[\s:.\-]", "", value).lower()
    if not _HEX12.match(digits):
        return None
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def normalize_ip(value: Any) -> str | None:
    """A valid IPv4/IPv6 address in its normalised text form, else None."""
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def ms_to_datetime(value: Any) -> datetime | None:
    """Epoch milliseconds (UTC) -> aware UTC datetime; None for null, 0, negatives or garbage."""
    if value is None or isinstance(value, bool):
        return None
    try:
        ms = int(value)
    except (TypeError, ValueError):
        return None
    if ms <= 0:
        return None
    try:
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def datetime_to_ms(value: datetime) -> int:
    """Aware (or naive = UTC) datetime -> epoch milliseconds."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)


def _na(value: Any, field: str = "value") -> str | None:
    """Text, with ``N/A``-like values as None; numbers become text; objects and lists are an error."""
    if value is None:
        return None
    if isinstance(value, (Mapping, list, tuple, set)):
        raise ValueError(f"{field!r} should be text, got a JSON "
                         f"{'object' if isinstance(value, Mapping) else 'array'}: {str(value)[:40]}")
    text = str(value).strip()
    return None if text.lower() in _NA else text


def _txt(record: Mapping, key: str) -> str | None:
    return _na(record.get(key), key)


def _get(record: Mapping, key: str, default: Any = None) -> Any:
    """``record[key]``, falling back to a case-insensitive match of the key."""
    if key in record:
        return record[key]
    lower = key.lower()
    for k, v in record.items():
        if isinstance(k, str) and k.lower() == lower:
            return v
    return default


def _opt_int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _device_ref(value: Any) -> int | None:
    """Alert source/destination device: ``0`` (or null) means none."""
    ref = _opt_int(value)
    return ref if ref else None


def _record_id(record: Any, key: str = "id") -> str | None:
    if isinstance(record, Mapping):
        value = record.get(key)
        return None if value is None else str(value)[:64]
    return None


def _require_id(record: Any, key: str) -> int:
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    value = record.get(key)
    if isinstance(value, bool) or value is None:
        raise ValueError(f"missing or invalid {key!r}")
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError(f"{key!r} is not an integer: {value[:40]!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key!r} is not an integer") from None


def _normalized(values: Any, normalize, what: str, issues: list[str]) -> list[str]:
    """Distinct normalised values in input order; each invalid one is dropped with a note in ``issues``."""
    out: list[str] = []
    for raw in [values] if isinstance(values, str) else values or []:
        value = normalize(raw)
        if value is None:
            issues.append(f"dropped invalid {what} {str(raw)[:60]!r}")
        elif value not in out:
            out.append(value)
    return out


def _macs(values: Any, issues: list[str]) -> list[str]:
    return _normalized(values, normalize_mac, "MAC address", issues)


def _ips(values: Any, issues: list[str]) -> list[str]:
    return _normalized(values, normalize_ip, "IP address", issues)


def _protocols(values: Any) -> list[str]:
    """Protocol names from ``[{"name": ..., "addresses"|"ipAddresses": ...}]``, ``[{"u_protocol": ...}]``
    or plain strings; addresses are not kept."""
    out: list[str] = []
    for item in values or []:
        if isinstance(item, Mapping):
            name = item.get("name", item.get("u_protocol"))
        else:
            name = item
        name = _na(name) if name is not None else None
        if name and name not in out:
            out.append(name)
    return out


def _validation_reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def _optional_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _steps(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # CM v1 types it as a String
        return [value] if value.strip() else []
    return [str(v) for v in value if v is not None and str(v).strip()]


def _additional(value: Any) -> dict | None:
    if isinstance(value, Mapping):
        return dict(value)
    return None


def _address(value: Any) -> str | None:
    """Alert device address: an IP or a MAC (normalised when recognisable), else the text as given."""
    text = _na(value)
    if text is None:
        return None
    return normalize_ip(text) or normalize_mac(text) or text
