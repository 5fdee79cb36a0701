"""ServiceNowHook: connection parsing, retry policy and pacing (pure), and every API path against the
running ServiceNow simulator (auth grants, token expiry, paging, Batch API, IRE, faults, proxy, TLS)."""

from __future__ import annotations

import http.client
import json
import logging
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import requests
import structlog.testing
from airflow.sdk import Connection
from defender_servicenow.exceptions import (
    ServiceNowAuthError,
    ServiceNowError,
    ServiceNowForbiddenError,
    ServiceNowHibernatingError,
    ServiceNowInvalidTableError,
    ServiceNowRateLimitedError,
    ServiceNowTransactionCancelledError,
    ServiceNowUnavailableError,
)
from defender_servicenow.hooks import _http
from defender_servicenow.hooks import servicenow as sn_hook
from defender_servicenow.hooks.servicenow import (
    BatchRequest,
    ServiceNowHook,
    _next_offset,
    ire_item_errors,
    parse_connection,
)
from urllib3 import HTTPResponse

from include.simulators import servicenow_sim as sn
from include.simulators.runner import serve_in_thread

SECRETS = (sn.SIM_PASSWORD, sn.SIM_CLIENT_SECRET)
DEVICE_CLASS = "cmdb_ci_ot_plc"


# --------------------------------------------------------------------------- helpers


def set_conn(monkeypatch, url: str, conn_id: str = "servicenow_default", **extra) -> None:
    """Point ``conn_id`` at ``url`` with the simulator's credentials; ``extra`` overrides extras
    (``auth_type="basic"`` drops the OAuth client; ``login``/``password`` override the user)."""
    login, password = extra.pop("login", sn.SIM_USER), extra.pop("password", sn.SIM_PASSWORD)
    extras = {"client_id": sn.SIM_CLIENT_ID, "client_secret": sn.SIM_CLIENT_SECRET, **extra}
    if extras.get("auth_type") == "basic":
        extras.pop("client_id"), extras.pop("client_secret")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
                 "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(
        {"conn_type": "servicenow", "host": url, "login": login, "password": password, "extra": extras}))


@pytest.fixture
def logs(caplog):
    """Everything logged during the test, as text: stdlib records (urllib3, the transport) via caplog at
    DEBUG, and the hook's structlog events (Airflow's ``self.log``) with their arguments."""
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        yield lambda: caplog.text + "\n".join(map(repr, events))


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """Record retry waits instead of sleeping them (Retry-After is honoured, the test stays fast)."""
    recorded: list[float] = []
    monkeypatch.setattr(_http, "_sleep", recorded.append)
    return recorded


@pytest.fixture
def minted(monkeypatch) -> list[str]:
    """Every value the hook hands to mask_secret (the tokens it obtained at run time)."""
    values: list[str] = []
    real = sn_hook.mask_secret
    monkeypatch.setattr(sn_hook, "mask_secret", lambda v, name=None: (values.append(v), real(v, name)))
    return values


def device_item(i: int, **values) -> dict:
    return {"className": DEVICE_CLASS,
            "values": {"name": f"plc-{i}", "serial_number": f"SN-T-{i:06d}", **values},
            "sys_object_source_info": {"source_name": "MicrosoftDefenderIoT", "source_native_key": f"t:{i}"}}


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def conn(host="dev1.service-now.com", login="u", password="p", **extra) -> Connection:
    return Connection(conn_id="sn", conn_type="servicenow", host=host, login=login, password=password,
                      extra=json.dumps(extra))


# --------------------------------------------------------------------------- connection parsing (pure)


@pytest.mark.parametrize(("host", "expected"), [
    ("dev1.service-now.com", "https://dev1.service-now.com"),
    ("https://dev1.service-now.com/", "https://dev1.service-now.com"),
    ("https://dev1.service-now.com/now/nav/ui", "https://dev1.service-now.com"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
])
def test_host_becomes_base_url(host, expected):
    assert parse_connection(conn(host)).base_url == expected


@pytest.mark.parametrize(("extra", "auth_type"), [
    ({}, "basic"),
    ({"client_id": "c", "client_secret": "s"}, "oauth_password"),
    ({"client_id": "c", "client_secret": "s", "auth_type": "oauth_client_credentials"}, "oauth_client_credentials"),
    ({"client_id": "c", "client_secret": "s", "auth_type": "basic"}, "basic"),
])
def test_auth_type_defaults(extra, auth_type):
    assert parse_connection(conn(**extra)).auth_type == auth_type


@pytest.mark.parametrize(("value", "expected"), [
    (None, True), ("", True), ("true", True), ("True", True), (True, True),
    ("false", False), ("FALSE", False), (False, False), ("/etc/ssl/ca.pem", "/etc/ssl/ca.pem"),
])
def test_verify_accepts_ui_strings_and_paths(value, expected):
    assert parse_connection(conn(verify=value)).verify == expected


def test_numbers_from_the_form_and_defaults():
    s = parse_connection(conn(timeout="12", requests_per_hour="500", proxy="http://proxy:3128"))
    assert (s.timeout, s.requests_per_hour, s.proxy) == (12.0, 500.0, "http://proxy:3128")
    d = parse_connection(conn())
    assert (d.timeout, d.requests_per_hour, d.proxy) == (30.0, None, None)


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"auth_type": "kerberos"}, ServiceNowAuthError, "not one of"),
    ({"client_id": "c"}, ServiceNowAuthError, "client_secret"),
    ({"password": "", "client_id": "c", "client_secret": "s"}, ServiceNowAuthError, "login and a password"),
    ({"timeout": "soon"}, ServiceNowError, "timeout"),
    ({"host": ""}, ServiceNowError, "no host"),
])
def test_invalid_connections_say_what_to_fix(kwargs, error, words):
    with pytest.raises(error, match=words):
        parse_connection(conn(**kwargs))


def test_settings_repr_hides_secrets():
    s = parse_connection(conn(password="pw-very-secret", client_id="c", client_secret="cs-very-secret"))
    assert "very-secret" not in repr(s)


# --------------------------------------------------------------------------- retry policy and pacing (pure)


def _response(status: int, **headers) -> HTTPResponse:
    return HTTPResponse(body=b"", headers=headers, status=status)


@pytest.mark.parametrize(("method", "status", "retried"), [
    ("GET", 429, True), ("GET", 502, True), ("GET", 503, True), ("GET", 504, True), ("DELETE", 504, True),
    ("POST", 429, True), ("POST", 503, True), ("PATCH", 429, True), ("PATCH", 503, True),
    ("POST", 502, False), ("POST", 504, False), ("PATCH", 502, False),  # may have been processed
    ("GET", 500, False), ("POST", 500, False), ("GET", 401, False),
])
def test_only_safe_retries(method, status, retried):
    assert _http.make_retry().is_retry(method, status) is retried


def test_rate_limit_reset_used_when_retry_after_is_missing(monkeypatch):
    monkeypatch.setattr(_http.time, "time", lambda: 1_000_000.0)
    retry = _http.make_retry()
    assert retry.get_retry_after(_response(429, **{"X-RateLimit-Reset": "1000042"})) == 42
    assert retry.get_retry_after(_response(429, **{"Retry-After": "7", "X-RateLimit-Reset": "1000042"})) == 7
    assert retry.get_retry_after(_response(200, **{"X-RateLimit-Reset": "1000042"})) is None


def test_retry_budget_ends_retries_instead_of_waiting_too_long():
    retry = _http.make_retry(max_retry_time=60)
    from urllib3.exceptions import MaxRetryError
    with pytest.raises(MaxRetryError, match="budget"):
        retry.increment("GET", "/api/now/table/incident", response=_response(429, **{"Retry-After": "3600"}))


def test_pacer_spaces_requests_to_the_hourly_limit():
    now, slept = [0.0], []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    pacer = _http.Pacer(1800, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        pacer.wait()
    assert slept == [2.0, 2.0, 2.0, 2.0]  # 3600 s / 1800 requests; the first goes at once
    assert _http.Pacer(None).interval == 0


def _links(*pairs) -> SimpleNamespace:
    header = ",".join(f'<https://x/api/now/table/t?sysparm_limit=5&sysparm_offset={o}>;rel="{r}"' for r, o in pairs)
    resp = requests.Response()
    resp.headers.update({"Link": header} if header else {})
    return resp


@pytest.mark.parametrize(("pairs", "offset", "total", "expected"), [
    ((("first", 0), ("prev", -1), ("next", 5), ("last", 20)), 0, None, 5),  # prev=-1 quirk ignored
    ((("first", 0), ("prev", 0), ("last", 20)), 20, None, None),  # last page: no next
    ((("first", 0), ("next", 5)), 5, None, None),  # a next that does not advance ends the crawl
    ((), 0, "12", 5), ((), 10, "12", None),  # no Link header: X-Total-Count decides
])
def test_next_page_offset(pairs, offset, total, expected):
    resp = _links(*pairs)
    if total:
        resp.headers["X-Total-Count"] = total
    assert _next_offset(resp, offset, 5) == expected


def test_ire_item_errors_by_input_index():
    result = {"items": [{"operation": "INSERT", "errors": [], "inputIndices": [0]},
                        {"operation": "NONE", "errors": [{"error": "MISSING_MATCHING_ATTRIBUTES", "message": "m"}],
                         "inputIndices": [1]},
                        {"operation": "NONE", "errors": [{"error": "INVALID_INPUT_DATA", "message": "d"}]}]}
    assert ire_item_errors(result) == {1: [{"error": "MISSING_MATCHING_ATTRIBUTES", "message": "m"}],
                                       2: [{"error": "INVALID_INPUT_DATA", "message": "d"}]}


def test_hook_is_lazy(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_SERVICENOW_DEFAULT", raising=False)
    hook = ServiceNowHook()  # no connection lookup yet
    assert (hook.servicenow_conn_id, hook.conn_type, hook.default_conn_name) == (
        "servicenow_default", "servicenow", "servicenow_default")


# --------------------------------------------------------------------------- against the simulator: auth


AUTH_TYPES = ["basic", "oauth_password", "oauth_client_credentials"]


@pytest.mark.parametrize("auth_type", AUTH_TYPES)
def test_every_auth_path_reads_and_writes(servicenow_sim, monkeypatch, auth_type):
    set_conn(monkeypatch, servicenow_sim.url, auth_type=auth_type)
    hook = ServiceNowHook()
    ok, message = hook.test_connection()
    assert ok, message
    created = hook.create_record("incident", {"short_description": f"via {auth_type}", "impact": "1", "urgency": "1"})
    assert created["number"].startswith("INC") and created["priority"] == "1"
    assert hook.get_record("incident", created["sys_id"])["short_description"] == f"via {auth_type}"
    assert hook.token_count == (0 if auth_type == "basic" else 1)


@pytest.mark.parametrize(("auth_type", "grant"), [
    ("basic", None), ("oauth_password", "password"), ("oauth_client_credentials", "client_credentials")])
def test_rejected_credentials_are_plain_and_secret_free(servicenow_sim, monkeypatch, auth_type, grant):
    set_conn(monkeypatch, servicenow_sim.url, auth_type=auth_type, password="Wrong-Password-9",
             client_secret="wrong-client-secret-000")
    with pytest.raises(ServiceNowAuthError) as caught:
        ServiceNowHook().query("incident", limit=1)
    message = str(caught.value)
    assert caught.value.status == 401
    assert (f"OAuth {grant} grant refused" in message) if grant else ("credentials" in message)
    assert "access_denied" in message or "Not Authenticated" in message.title() or "authenticated" in message
    for secret in ("Wrong-Password-9", "wrong-client-secret-000"):
        assert secret not in message


def test_client_credentials_disabled_on_the_instance(servicenow_sim_factory, monkeypatch):
    server = servicenow_sim_factory(client_credentials_enabled=False)
    set_conn(monkeypatch, server.url, auth_type="oauth_client_credentials")
    ok, message = ServiceNowHook().test_connection()
    assert not ok and "client_credentials" in message and "OAuth Application User" in message


def test_token_is_reused_then_renewed_shortly_before_expiry(servicenow_sim_factory, monkeypatch):
    server = servicenow_sim_factory(token_lifetime=60)
    set_conn(monkeypatch, server.url)
    hook = ServiceNowHook()
    now = [0.0]
    hook._clock = lambda: now[0]  # the hook's view of time
    for _ in range(6):  # at 0, 10, ... 50 s
        hook.query("incident", limit=1)
        now[0] += 10
    assert hook.token_count == 1  # reused while valid (expires_in 59 s)
    now[0] = 54  # within the renewal margin (10% of the lifetime) before expiry
    hook.query("incident", limit=1)
    assert hook.token_count == 2 and hook._token.grant == "refresh_token"
    assert server.sim.counters()["token_requests"] == 2


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_token_dying_between_check_and_use_is_retried_once(servicenow_sim_factory, monkeypatch, how):
    server = servicenow_sim_factory(token_lifetime=2 if how == "expired" else 1800)
    set_conn(monkeypatch, server.url)
    hook = ServiceNowHook()
    hook._clock = lambda: 0.0  # the hook believes its token is still fresh
    hook.query("incident", limit=1)
    if how == "revoked":
        server.sim.set_faults(revoke_tokens=True)  # the instance forgets the access token
    else:
        time.sleep(2.2)  # the instance's 2-second token runs out mid-run
    assert hook.create_record("incident", {"short_description": f"after {how}"})["sys_id"]
    assert hook.token_count == 2 and hook._token.grant == "refresh_token"  # the 401 led to a refresh grant
    assert len(server.sim.table("incident")) == 1


def test_rejected_refresh_token_falls_back_to_a_password_grant(servicenow_sim, monkeypatch, logs):
    set_conn(monkeypatch, servicenow_sim.url)
    hook = ServiceNowHook()
    hook.query("incident", limit=1)
    servicenow_sim.sim.set_faults(revoke_tokens=True, revoke_refresh_tokens=True)
    hook.query("incident", limit=1)
    assert hook.token_count == 3  # refused refresh, then a new password grant
    assert hook._token.grant == "password"
    assert "refresh token was rejected" in logs()


def test_credentials_revoked_mid_run_is_an_auth_error(servicenow_sim, monkeypatch):
    set_conn(monkeypatch, servicenow_sim.url)
    hook = ServiceNowHook()
    hook.query("incident", limit=1)
    servicenow_sim.sim.set_faults(revoke_tokens=True, revoke_refresh_tokens=True, reject_credentials=True)
    with pytest.raises(ServiceNowAuthError, match="password grant refused"):
        hook.query("incident", limit=1)


@pytest.mark.parametrize("auth_type", AUTH_TYPES)
def test_no_secret_in_logs_or_errors(servicenow_sim, monkeypatch, logs, minted, auth_type):
    set_conn(monkeypatch, servicenow_sim.url, auth_type=auth_type)
    messages = []
    hook = ServiceNowHook()
    hook.query("incident", limit=1)
    servicenow_sim.sim.set_faults(revoke_tokens=True)
    hook.query("incident", limit=1)
    servicenow_sim.sim.set_faults(fail_next={"count": 1, "status": 200, "content_type": "text/plain",
                                             "path_prefix": "/api/",
                                             "body": f"echo {sn.SIM_PASSWORD} {sn.SIM_CLIENT_SECRET}"
                                             if auth_type != "basic" else f"echo {sn.SIM_PASSWORD} ***"})
    with pytest.raises(ServiceNowError) as caught:
        hook.query("incident", limit=1)
    messages.append(f"{caught.value} {caught.value.answer}")
    assert "expected JSON" in messages[0] and "echo *** ***" in messages[0]  # echoed secrets are blanked
    servicenow_sim.sim.set_faults(reject_credentials=True, revoke_tokens=True, revoke_refresh_tokens=True)
    with pytest.raises(ServiceNowAuthError) as caught:
        hook.query("incident", limit=1)
    messages.append(f"{caught.value} {caught.value.answer}")
    text = logs()
    assert "/api/now/table/incident" in text  # the logs were captured
    if auth_type != "basic":
        assert len(minted) >= 2 and "Obtained an OAuth access token" in text
    for secret in (*SECRETS, *minted):
        assert secret not in text
        assert all(secret not in m for m in messages)


# --------------------------------------------------------------------------- Table API


def test_paging_over_25000_rows_in_sys_id_order(servicenow_sim, monkeypatch):
    for i in range(25_000):
        servicenow_sim.sim.insert("u_defender_iot_alert", {"u_alert_key": f"p:{i}", "u_title": f"t{i}"})
    set_conn(monkeypatch, servicenow_sim.url)
    hook = ServiceNowHook()
    rows = list(hook.iter_records("u_defender_iot_alert", fields=["sys_id", "u_alert_key"]))
    ids = [r["sys_id"] for r in rows]
    assert len(rows) == 25_000 and len(set(ids)) == 25_000
    # sys_id order. (The simulator sorts the rare sys_id that parses as a float, e.g. "4885...e426...",
    # numerically, ahead of the rest; ServiceNow sorts them as text. Leave those out of the comparison.)
    textual = [i for i in ids if not _is_float(i)]
    assert textual == sorted(textual)
    assert {r["u_alert_key"] for r in rows} == {f"p:{i}" for i in range(25_000)}
    assert set(rows[0]) == {"sys_id", "u_alert_key"}
    assert hook.request_count == 1 + 25  # token + 25 pages of 1000


def test_query_with_encoded_query_fields_and_limit(servicenow_sim, monkeypatch):
    set_conn(monkeypatch, servicenow_sim.url)
    hook = ServiceNowHook()
    for i in range(30):
        hook.create_record("incident", {"short_description": f"q{i}", "correlation_id": f"c{i % 3}"})
    rows = hook.query("incident", "correlation_id=c1", fields=["sys_id", "correlation_id"])
    assert len(rows) == 10 and {r["correlation_id"] for r in rows} == {"c1"}
    assert len(hook.query("incident", "correlation_idINc1,c2", limit=7)) == 7
    small_pages = list(hook.iter_records("incident", "correlation_id=c2", page_size=3))
    assert len(small_pages) == 10


def test_create_update_delete_round_trip(servicenow_sim, monkeypatch):
    set_conn(monkeypatch, servicenow_sim.url)
    hook = ServiceNowHook()
    rec = hook.create_record("incident", {"short_description": "round trip"})
    assert hook.update_record("incident", rec["sys_id"], {"state": "2"})["state"] == "2"
    hook.delete_record("incident", rec["sys_id"])
    assert hook.get_record("incident", rec["sys_id"]) is None
    hook.delete_record("incident", rec["sys_id"])  # already gone: no error


@pytest.mark.parametrize(("values", "words"), [
    ({"short_description": "acl"}, "ACL Exception Insert Failed.*an ACL refused"),
])
def test_acl_refusal_is_forbidden(servicenow_sim, monkeypatch, values, words):
    set_conn(monkeypatch, servicenow_sim.url)
    servicenow_sim.sim.set_faults(deny_writes=["incident"])
    with pytest.raises(ServiceNowForbiddenError, match=words):
        ServiceNowHook().create_record("incident", values)


def test_data_policy_refusal_is_forbidden(servicenow_sim, monkeypatch):
    set_conn(monkeypatch, servicenow_sim.url)
    hook = ServiceNowHook()
    rec = hook.create_record("incident", {"short_description": "to resolve"})
    with pytest.raises(ServiceNowForbiddenError, match="Data Policy Exception.*Resolution code.*a data policy refused"):
        hook.update_record("incident", rec["sys_id"], {"state": "6"})


def test_invalid_table(servicenow_sim, monkeypatch):
    set_conn(monkeypatch, servicenow_sim.url)
    with pytest.raises(ServiceNowInvalidTableError, match="Invalid table no_such_table.*does not exist"):
        ServiceNowHook().query("no_such_table")


# --------------------------------------------------------------------------- Batch API and IRE


def test_batch_resubmits_unserviced_and_surfaces_item_errors(servicenow_sim_factory, monkeypatch):
    server = servicenow_sim_factory(batch_max_items=7)  # 7 serviced per call, the rest unserviced
    set_conn(monkeypatch, server.url)
    hook = ServiceNowHook(batch_size=50)
    existing = hook.create_record("incident", {"short_description": "to patch"})
    reqs = [BatchRequest(f"c{i}", "POST", "/api/now/table/incident", {"short_description": f"b{i}"})
            for i in range(20)]
    reqs += [BatchRequest("patch", "PATCH", f"/api/now/table/incident/{existing['sys_id']}", {"state": "2"}),
             BatchRequest("bad", "GET", "/api/now/table/no_such_table"),
             BatchRequest("gone", "GET", "/api/now/table/incident/0123456789abcdef0123456789abcdef")]
    answers = hook.batch(reqs)
    assert [a.id for a in answers] == [r.id for r in reqs]
    assert all(a.ok and a.status_code == 201 and a.body["result"]["number"] for a in answers[:20])
    assert answers[20].ok and answers[20].body["result"]["state"] == "2"
    assert (answers[21].status_code, answers[21].ok) == (400, False) and "Invalid table" in answers[21].error_message
    assert answers[22].status_code == 404 and "No Record found" in answers[22].error_message
    assert len([r for r in server.sim.table("incident") if r["short_description"].startswith("b")]) == 20
    assert hook.request_count == 1 + 1 + 4  # token, the seed record, 23 items at 7 per call
    assert server.sim.counters()["batch_items"] == 23


def test_ire_creates_updates_and_surfaces_item_errors(servicenow_sim, monkeypatch):
    set_conn(monkeypatch, servicenow_sim.url)
    hook = ServiceNowHook()
    items = [device_item(i) for i in range(5)] + [{"className": DEVICE_CLASS, "values": {"ip_address": "10.0.0.9"}}]
    result = hook.identify_reconcile(items, "Other Automated")
    assert [it["operation"] for it in result["items"][:5]] == ["INSERT"] * 5
    errors = ire_item_errors(result)
    assert list(errors) == [5] and errors[5][0]["error"] == "MISSING_MATCHING_ATTRIBUTES"
    again = hook.identify_reconcile([device_item(i, firmware_version="2.0") for i in range(5)], "Other Automated",
                                    enhanced=True, options={"partial_payloads": False, "generate_summary": True})
    assert {it["operation"] for it in again["items"]} == {"UPDATE"} and not ire_item_errors(again)
    assert len(servicenow_sim.sim.table(DEVICE_CLASS)) == 5


def test_ire_without_a_valid_data_source_reports_every_item(servicenow_sim, monkeypatch):
    set_conn(monkeypatch, servicenow_sim.url)
    result = ServiceNowHook().identify_reconcile([device_item(1), device_item(2)], "NoSuchSource")
    assert {e[0]["error"] for e in ire_item_errors(result).values()} == {"INVALID_INPUT_DATA"}
    assert len(ire_item_errors(result)) == 2


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH"])
def test_429_with_retry_after_is_waited_out(servicenow_sim, monkeypatch, waits, method):
    set_conn(monkeypatch, servicenow_sim.url)
    hook = ServiceNowHook()
    rec = hook.create_record("incident", {"short_description": "seed"})
    servicenow_sim.sim.set_faults(fail_next={"count": 2, "status": 429, "path_prefix": "/api/now/table"})
    call = {"GET": lambda: hook.query("incident", limit=1),
            "POST": lambda: hook.create_record("incident", {"short_description": "after 429"}),
            "PATCH": lambda: hook.update_record("incident", rec["sys_id"], {"state": "2"})}[method]
    call()
    assert len(waits) == 2 and all(w >= 1 for w in waits)  # the simulator's Retry-After, not 0-s backoff
    assert servicenow_sim.sim.counters()["by_status"]["429"] == 2
    if method == "POST":
        assert len([r for r in servicenow_sim.sim.table("incident") if r["short_description"] == "after 429"]) == 1


def test_rate_limited_beyond_the_budget_is_a_plain_error(servicenow_sim, monkeypatch, waits):
    set_conn(monkeypatch, servicenow_sim.url)
    hook = ServiceNowHook(max_retry_time=5)
    hook.query("incident", limit=1)
    servicenow_sim.sim.set_faults(fail_next={"count": 50, "status": 429})
    with pytest.raises(ServiceNowRateLimitedError, match="requests_per_hour"):
        hook.query("incident", limit=1)


def test_requests_per_hour_paces_every_request(servicenow_sim, monkeypatch, waits):
    set_conn(monkeypatch, servicenow_sim.url, requests_per_hour="7200")  # one request per 0.5 s
    hook = ServiceNowHook()
    now, slept = [0.0], []
    hook.pacer._clock, hook.pacer._sleep = (lambda: now[0]), slept.append  # a fake clock that never moves
    servicenow_sim.sim.set_faults(fail_next={"count": 2, "status": 429, "path_prefix": "/api/"})
    for i in range(5):
        hook.create_record("incident", {"short_description": f"paced {i}"})
    sent = servicenow_sim.sim.counters()["requests"]  # token + 5 creates + 2 rate-limited attempts
    assert sent == 8 and slept == [0.5 * n for n in range(1, sent)]  # token and retries paced too


def test_instance_rate_limit_beyond_the_budget(servicenow_sim_factory, monkeypatch, waits):
    server = servicenow_sim_factory(rate_limit_per_hour=3)
    set_conn(monkeypatch, server.url, auth_type="basic")
    hook = ServiceNowHook()
    for _ in range(3):
        hook.query("incident", limit=1)
    with pytest.raises(ServiceNowRateLimitedError, match=r"Retry-After \d+ s.*requests_per_hour") as caught:
        hook.query("incident", limit=1)  # Retry-After is about an hour: more than the 300-s retry budget
    assert caught.value.status == 429 and waits == []


@pytest.mark.parametrize(("method", "status", "retried"), [
    ("GET", 502, True), ("GET", 504, True), ("POST", 503, True), ("POST", 502, False), ("POST", 504, False)])
def test_gateway_errors_retry_only_what_is_safe(servicenow_sim, monkeypatch, waits, method, status, retried):
    set_conn(monkeypatch, servicenow_sim.url, auth_type="basic")
    hook = ServiceNowHook()
    servicenow_sim.sim.set_faults(fail_next={"count": 1, "status": status, "path_prefix": "/api/now/table"})
    call = (lambda: hook.query("incident", limit=1)) if method == "GET" else (
        lambda: hook.create_record("incident", {"short_description": "gw"}))
    if retried:
        call()
        assert servicenow_sim.sim.counters()["requests"] == 2  # the failed attempt and its retry
    else:  # the gateway may have passed the POST on: resending could create a duplicate
        with pytest.raises(ServiceNowUnavailableError, match=f"HTTP {status}.*run the task again later"):
            call()
        assert servicenow_sim.sim.counters()["requests"] == 1


@pytest.mark.parametrize("auth_type", AUTH_TYPES)
def test_hibernating_instance(servicenow_sim, monkeypatch, auth_type):
    set_conn(monkeypatch, servicenow_sim.url, auth_type=auth_type)
    servicenow_sim.sim.set_faults(hibernate=True)
    hook = ServiceNowHook()
    with pytest.raises(ServiceNowHibernatingError, match="hibernating.*developer.servicenow.com"):
        hook.query("incident")
    ok, message = hook.test_connection()
    assert not ok and "hibernating" in message


def test_truncated_answer_is_a_cancelled_transaction(servicenow_sim, monkeypatch):
    set_conn(monkeypatch, servicenow_sim.url)
    hook = ServiceNowHook()
    hook.create_record("incident", {"short_description": "x"})
    servicenow_sim.sim.set_faults(truncate_next=1)
    with pytest.raises(ServiceNowTransactionCancelledError, match="cut off.*smaller page"):
        hook.query("incident")


def test_unreachable_instance(monkeypatch, waits):
    from include.simulators.runner import free_port
    set_conn(monkeypatch, f"http://127.0.0.1:{free_port()}", auth_type="basic")
    with pytest.raises(ServiceNowUnavailableError, match="unreachable"):
        ServiceNowHook().query("incident")
    assert len(waits) == 4  # 5 connect retries, growing backoff (the first retry is immediate)
    assert waits == sorted(waits)


# --------------------------------------------------------------------------- proxy and TLS


class _Proxy(BaseHTTPRequestHandler):
    """A forward proxy for loopback targets that records the absolute URLs it was asked for."""

    seen: list[str] = []

    def _forward(self) -> None:
        target = urlsplit(self.path)
        assert target.hostname == "127.0.0.1", self.path
        self.seen.append(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        headers = {k: v for k, v in self.headers.items() if not k.lower().startswith("proxy-")}
        upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        upstream.request(self.command, target.path + (f"?{target.query}" if target.query else ""), body, headers)
        answer = upstream.getresponse()
        payload = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        upstream.close()

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def proxy():
    _Proxy.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", seen=_Proxy.seen)
    server.shutdown()
    server.server_close()


def test_proxy_carries_every_call_including_the_token_endpoint(servicenow_sim, monkeypatch, proxy):
    set_conn(monkeypatch, servicenow_sim.url, proxy=proxy.url, timeout="10")
    hook = ServiceNowHook()
    hook.create_record("incident", {"short_description": "via proxy"})
    hook.query("incident")
    assert hook.session.proxies == {"http": proxy.url, "https": proxy.url}
    paths = [urlsplit(u).path for u in proxy.seen]
    assert paths[0] == "/oauth_token.do" and paths.count("/api/now/table/incident") == 2


def test_unusable_proxy_or_ca_bundle_is_a_plain_error(servicenow_sim, monkeypatch, waits):
    from include.simulators.runner import free_port
    set_conn(monkeypatch, servicenow_sim.url, proxy=f"http://proxyuser:Proxy-Secret-7@127.0.0.1:{free_port()}")
    with pytest.raises(ServiceNowUnavailableError, match="proxy 127.0.0.1:.*check the connection extra proxy") as caught:
        ServiceNowHook().query("incident")
    assert "Proxy-Secret-7" not in str(caught.value)
    set_conn(monkeypatch, "https://127.0.0.1:1", verify="/nonexistent/ca.pem")
    with pytest.raises(ServiceNowError, match="CA bundle path must exist"):
        ServiceNowHook().query("incident")


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.mark.parametrize(("verify", "works"), [("true", False), (None, False), ("false", True), ("ca", True)])
def test_verify_setting_reaches_the_session(monkeypatch, tls_cert, waits, verify, works):
    cert, key = tls_cert
    with serve_in_thread(sn.create_app(), ssl_certfile=str(cert), ssl_keyfile=str(key)) as server:
        value = str(cert) if verify == "ca" else verify
        set_conn(monkeypatch, server.url, **({} if value is None else {"verify": value}))
        hook = ServiceNowHook()
        assert hook.session.verify == {"true": True, None: True, "false": False}.get(verify, str(cert))
        ok, message = hook.test_connection()
        hook.close()
        assert ok is works, message
        if not works:
            assert "TLS verification failed" in message and "CA bundle" in message


# --------------------------------------------------------------------------- the long run


def test_survives_a_simulated_ten_minute_run(servicenow_sim_factory, monkeypatch, waits):
    """10 minutes with 60-second tokens and a 429 on every tenth request, compressed into seconds.

    The hook's clock advances 0.5 s per call (1200 calls = 600 s), so it renews its 60-second token
    every simulated minute; the instance also revokes tokens once a minute, half-way through their life
    (a token dying before the hook expected: the 401 path); every tenth request is answered 429 with
    Retry-After; retry waits are recorded instead of slept. No call may fail, and no write may be lost
    or duplicated."""
    server = servicenow_sim_factory(token_lifetime=60)
    sim = server.sim
    set_conn(monkeypatch, server.url)
    hook = ServiceNowHook(batch_size=5)
    now = [0.0]
    hook._clock = lambda: now[0]
    rec = hook.create_record("incident", {"short_description": "long run"})
    created, injected = 1, 0
    for i in range(1200):
        now[0] += 0.5
        while injected < (hook.request_count + 1) // 10:  # the next request is the tenth: rate limit it
            sim.set_faults(fail_next={"count": 1, "status": 429})
            injected += 1
        if i % 120 == 60:
            sim.set_faults(revoke_tokens=True)
        kind = i % 5
        if kind == 0:
            assert hook.query("incident", "short_descriptionSTARTSWITHlong", limit=5)
        elif kind == 1:
            hook.create_record("incident", {"short_description": f"long run {i}"})
            created += 1
        elif kind == 2:
            hook.update_record("incident", rec["sys_id"], {"description": f"step {i}"})
        elif kind == 3:
            answers = hook.batch([BatchRequest(f"{i}-{j}", "POST", "/api/now/table/incident",
                                               {"short_description": f"long run batch {i}-{j}"}) for j in range(3)])
            assert all(a.ok for a in answers)
            created += 3
        else:
            assert not ire_item_errors(hook.identify_reconcile([device_item(i % 20)], "Other Automated"))
    counters = sim.counters()
    assert counters["by_status"]["429"] == injected >= 120 and len(waits) == injected
    assert all(w == 1 for w in waits)  # the instance's Retry-After
    assert counters["auth_failures"] == 10  # each revocation cost exactly one 401 and one retry
    assert hook.token_count - 1 - 10 >= 9  # plus a renewal before expiry every simulated minute
    incidents = [r for r in sim.table("incident") if r["short_description"].startswith("long run")]
    assert len(incidents) == created  # no POST lost, none duplicated by a retry
