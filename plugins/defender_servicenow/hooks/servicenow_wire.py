"""What the ServiceNow hook sends and reads on the wire, as pure functions and values: Batch API items
and answers, the IRE's per-item errors, reference fields, encoded ``IN`` queries and Table API paging.

I/O stays in :class:`~defender_servicenow.hooks.servicenow.ServiceNowHook`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests


@dataclass(frozen=True)
class BatchRequest:
    """One item of a Batch API call; ``url`` is relative, e.g. ``/api/now/table/incident``."""

    id: str
    method: str
    url: str
    body: dict | None = None


@dataclass(frozen=True)
class BatchResponse:
    """The answer to one :class:`BatchRequest`: status, decoded JSON body and a plain error message."""

    id: str
    status_code: int
    body: dict | None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300 and not self.error_message


def ire_item_errors(result: dict) -> dict[int, list[dict]]:
    """Per-input-item IRE errors: ``{input index: [{"error": CODE, "message": text}, ...]}``.

    The IRE answers HTTP 200 even when items fail; an item that committed nothing carries ``errors``.
    """
    found: dict[int, list[dict]] = {}
    for position, item in enumerate(result.get("items") or []):
        errors = item.get("errors") or []
        if not errors:
            continue
        indices = [i for i in (item.get("inputIndices") or []) if isinstance(i, int)] or [position]
        for index in indices:
            found.setdefault(index, []).extend(errors)
    return found


def sys_id_of(value: Any) -> str:
    """A reference field's sys_id, whether ServiceNow sent it plain or as ``{"link", "value"}``."""
    return (value.get("value") or "") if isinstance(value, dict) else (value or "")


MAX_QUERY_CHARS = 6000  # encoded IN-queries stay well below URL length limits (414 Request-URI Too Long)


def in_queries(field_name: str, values: Iterable[str], prefix: str = "",
               max_chars: int = MAX_QUERY_CHARS) -> Iterator[str]:
    """Encoded ``<field>IN<v1>,<v2>...`` queries, split so that none exceeds ``max_chars``."""
    head = f"{prefix}^{field_name}IN" if prefix else f"{field_name}IN"
    part: list[str] = []
    size = len(head)
    for value in dict.fromkeys(values):
        if part and size + len(value) + 1 > max_chars:
            yield head + ",".join(part)
            part, size = [], len(head)
        part.append(value)
        size += len(value) + 1
    if part:
        yield head + ",".join(part)


def next_offset(resp: requests.Response, offset: int, page_size: int) -> int | None:
    """The offset of the next page from ``Link rel="next"``, else from ``X-Total-Count``; None at the end."""
    link = resp.links.get("next", {}).get("url")
    if link:
        try:
            nxt = int(parse_qs(urlsplit(link).query).get("sysparm_offset", ["-1"])[0])
        except ValueError:
            nxt = -1
        return nxt if nxt > offset else None
    if resp.headers.get("Link") is not None:
        return None  # a Link header without next: this was the last page
    try:
        total = int(resp.headers.get("X-Total-Count", "0"))
    except ValueError:
        return None
    return offset + page_size if offset + page_size < total else None


def batch_item(r: BatchRequest) -> dict:
    item = {"id": str(r.id), "method": r.method.upper(), "url": r.url, "exclude_response_headers": True,
            "headers": [{"name": "Content-Type", "value": "application/json"},
                        {"name": "Accept", "value": "application/json"}]}
    if r.body is not None:
        item["body"] = base64.b64encode(json.dumps(r.body).encode()).decode()
    return item


def batch_response(item: dict) -> BatchResponse:
    status = int(item.get("status_code") or 0)
    body, error = None, item.get("error_message") or None
    raw = item.get("body")
    if raw:
        try:
            body = json.loads(base64.b64decode(raw))
        except (ValueError, TypeError):
            error = error or "the item's body is not base64-encoded JSON"
    if status >= 400 and not error:
        err = (body or {}).get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            error = "; ".join(str(x) for x in (err.get("message"), err.get("detail")) if x)
        error = error or item.get("status_text") or f"HTTP {status}"
    return BatchResponse(id=str(item.get("id")), status_code=status, body=body, error_message=error)
