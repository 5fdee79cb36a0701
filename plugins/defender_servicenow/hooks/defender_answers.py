"""Reading a Defender for IoT appliance's answers (pure, no requests sent): the streamed JSON array parser
(:func:`iter_json_array`), the rejection of HTML pages (login pages, proxies, wrong URLs) and the short
excerpts of an answer that error messages quote.

Used by :class:`~defender_servicenow.hooks.defender.DefenderIoTHook`.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from typing import Any

import requests

from defender_servicenow.exceptions import DefenderBadResponseError

MAX_ITEM_CHARS = 16 * 1024 * 1024


def iter_json_array(chunks: Iterable[bytes], *, max_item_chars: int = MAX_ITEM_CHARS) -> Iterator[Any]:
    """Yield the items of a JSON array read from ``chunks`` of bytes, one at a time.

    Chunk boundaries may fall anywhere (inside strings, numbers, multi-byte UTF-8 characters): each item is
    decoded with ``json.JSONDecoder.raw_decode`` once it is complete, and only the unread rest of the text
    is kept. Raises ``ValueError`` when the text is not a JSON array, an item is malformed or longer than
    ``max_item_chars``, or the array is cut off.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    source = iter(chunks)
    buf, pos, eof = "", 0, False
    state = "start"  # start -> first -> (item -> sep)* -> done
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n":
            pos += 1
        need_more = pos >= len(buf)
        if not need_more:
            char = buf[pos]
            if state == "done":
                raise ValueError(f"unexpected data after the JSON array: {buf[pos:pos + 60]!r}")
            if state == "start":
                if char != "[":
                    raise ValueError(f"expected a JSON array, got {buf[pos:pos + 60]!r}")
                pos, state = pos + 1, "first"
                continue
            if char == "]" and state in ("first", "sep"):
                pos, state = pos + 1, "done"
                continue
            if state == "sep":
                if char != ",":
                    raise ValueError(f"expected ',' or ']' after an array item, got {buf[pos:pos + 60]!r}")
                pos, state = pos + 1, "item"
                continue
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if eof:
                    if exc.pos >= len(buf.rstrip()) or exc.msg.startswith("Unterminated string"):
                        raise ValueError("the JSON array was cut off inside an item") from None
                    raise ValueError(f"malformed array item ({exc.msg}): {buf[pos:pos + 60]!r}") from None
                if len(buf) - pos > max_item_chars:
                    raise ValueError(f"an array item is longer than {max_item_chars} characters") from None
                need_more = True
            else:
                # a number followed by nothing yet (or by "." / "e" ...) may go on in the next chunk
                number = isinstance(item, (int, float)) and not isinstance(item, bool)
                if eof or (end < len(buf) and (not number or buf[end] in " \t\r\n,]")):
                    yield item
                    pos, state = end, "sep"
                    continue
                need_more = True
        if eof:
            if state == "done":
                return
            raise ValueError("the answer was empty" if state == "start" and not buf.strip()
                             else "the JSON array was cut off before its end")
        try:
            chunk = next(source)
        except StopIteration:
            eof, text = True, utf8.decode(b"", final=True)
        else:
            text = utf8.decode(chunk)
        buf, pos = buf[pos:] + text, 0


def first_text(data: bytes) -> str:
    text = data[:120].decode("utf-8", errors="replace")
    return repr(text) if text else "nothing (empty answer)"


def excerpt(response: requests.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and (body.get("error") or body.get("content")):
            return str(body.get("error") or body.get("content"))[:200]
    except ValueError:
        pass
    try:
        return first_text(response.content[:200])
    except requests.exceptions.RequestException:
        return "(no readable body)"


def reject_html(response: requests.Response, head: bytes, base_url: str, path: str) -> None:
    ctype = response.headers.get("Content-Type", "").lower()
    if "html" in ctype or head.lstrip()[:1] == b"<":
        raise DefenderBadResponseError(
            f"{base_url} answered {path} with an HTML page instead of JSON (a login page, proxy or wrong URL?); "
            f"it starts with {first_text(head)}", status=response.status_code)
