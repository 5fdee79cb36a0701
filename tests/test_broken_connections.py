"""An answer cut off part way (the server or a proxy drops the connection mid-body) is a plain, retryable
'unavailable/unreachable' error from both hooks, never a raw requests traceback; and a Batch API that keeps
answering with ids we never sent cannot make the hook resubmit (and so repeat) creates forever."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading

import pytest
from defender_servicenow.exceptions import (
    DefenderUnreachableError,
    ServiceNowError,
    ServiceNowUnavailableError,
)
from defender_servicenow.hooks.defender import DefenderIoTHook
from defender_servicenow.hooks.servicenow import BatchRequest, ServiceNowHook


def _read_request(conn: socket.socket) -> None:
    """Read one whole request (headers and Content-Length body): answering while the client is still sending
    resets the connection, which made the test fail on a ConnectionError in 1 of many CI runs."""
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


def serve(answer: bytes, count: int = 10) -> int:
    """A loopback server answering each request with ``answer`` and then closing; stops by itself."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(15)

    def run():
        with sock:
            for _ in range(count):
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                with conn:
                    _read_request(conn)
                    conn.sendall(answer)

    threading.Thread(target=run, daemon=True).start()
    return sock.getsockname()[1]


CUT_OFF = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
           b'{"result": [{"id": 1')


def test_defender_answer_cut_off(monkeypatch):
    port = serve(CUT_OFF)
    monkeypatch.setenv("AIRFLOW_CONN_DEF_CUT", json.dumps({"conn_type": "defender_iot",
                       "host": f"http://127.0.0.1:{port}", "password": "a" * 32, "extra": {"appliance": "sensor"}}))
    with pytest.raises(DefenderUnreachableError, match="broke during GET /api/v2/alerts"):
        DefenderIoTHook("def_cut", retries=0).get_alerts()


def test_servicenow_answer_cut_off(monkeypatch):
    port = serve(CUT_OFF)
    monkeypatch.setenv("AIRFLOW_CONN_SN_CUT", json.dumps({"conn_type": "servicenow",
                       "host": f"http://127.0.0.1:{port}", "login": "svc", "password": "Pa55-word-x"}))
    with pytest.raises(ServiceNowUnavailableError, match="cut off part way") as err:
        ServiceNowHook("sn_cut").query("incident")
    assert "Pa55-word-x" not in str(err.value)


def test_batch_answers_with_unknown_ids_do_not_loop(monkeypatch):
    body = json.dumps({"batch_request_id": "1", "unserviced_requests": [], "serviced_requests": [
        {"id": "not-ours", "status_code": 201, "status_text": "Created", "headers": [],
         "body": base64.b64encode(b'{"result": {}}').decode()}]}).encode()
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    port = serve(answer, count=20)
    monkeypatch.setenv("AIRFLOW_CONN_SN_LOOP", json.dumps({"conn_type": "servicenow",
                       "host": f"http://127.0.0.1:{port}", "login": "svc", "password": "Pa55-word-x"}))
    hook = ServiceNowHook("sn_loop")
    with pytest.raises(ServiceNowError, match="stayed unserviced"):
        hook.batch([BatchRequest(id="1", method="POST", url="/api/now/table/incident", body={"a": "b"})])
    assert hook.request_count <= 4   # the first try plus at most 3 resubmissions
