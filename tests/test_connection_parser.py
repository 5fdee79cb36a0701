"""Case 8: the alert trigger reads a Defender connection exactly as the hook does (one parser)."""

from __future__ import annotations

import asyncio
import json

import pytest
from defender_servicenow.hooks.connections import parse_defender_connection
from defender_servicenow.hooks.defender import DefenderIoTHook
from defender_servicenow.triggers.pollers import poller_for

CASES = [  # (host, port, password, extra) -> expected base URL, token, verify
    ("appliance.example", None, "tok", {}, "https://appliance.example", "tok", True),
    ("https://appliance.example", 8443, "tok", {}, "https://appliance.example:8443", "tok", True),
    ("appliance.example", 8443, "tok\n", {"verify": "no"}, "https://appliance.example:8443", "tok", False),
    ("http://10.1.0.2/", None, " tok ", {"verify": "0"}, "http://10.1.0.2", "tok", False),
    ("10.1.0.2", None, "tok", {"verify": "yes"}, "https://10.1.0.2", "tok", True),
    ("10.1.0.2", None, "tok", {"verify": "1", "appliance": "management_console"}, "https://10.1.0.2", "tok", True),
]


@pytest.mark.parametrize("host, port, password, extra, url, token, verify", CASES)
def test_hook_and_trigger_read_a_connection_the_same_way(monkeypatch, host, port, password, extra, url, token,
                                                          verify):
    conn = {"conn_type": "defender_iot", "host": host, "password": password, "extra": extra}
    if port:
        conn["port"] = port
    monkeypatch.setenv("AIRFLOW_CONN_DEFENDER_PARSE", json.dumps(conn))
    hook = DefenderIoTHook("defender_parse")
    assert (hook.base_url, hook._settings.token, hook._settings.verify) == (url, token, verify)

    async def trigger_client():
        poller = await poller_for("defender_parse", 600_000)   # what the trigger polls with
        try:
            return str(poller.client.base_url).rstrip("/"), poller.client.headers["Authorization"], poller.path
        finally:
            await poller.aclose()

    base, header, path = asyncio.run(trigger_client())
    assert (base, header) == (url, token)
    assert path == ("/external/v2/alerts" if extra.get("appliance") == "management_console" else "/api/v2/alerts")


def test_the_parser_names_the_field():
    class Conn:
        conn_id, host, port, password, extra_dejson = "c", "h", None, "a\nb", {}

    with pytest.raises(Exception, match="control characters"):
        parse_defender_connection(Conn())


@pytest.mark.parametrize("host", ["https://admin:Hunter2-secret@sn.example.com", "admin:Hunter2-secret@sn.example.com",
                                  "https://Hunter2-secret@10.1.0.2:443"])
def test_credentials_written_into_a_host_are_refused_without_showing_them(host):
    """A host such as https://user:password@instance would be kept in the base URL, which error messages and
    logs show: every parser refuses it, naming the field, never echoing the host."""
    from types import SimpleNamespace

    from defender_servicenow.hooks.azure_connection import parse_azure_connection
    from defender_servicenow.hooks.servicenow_connection import parse_connection

    conn = SimpleNamespace(conn_id="c", host=host, port=None, login="u", password="p", extra_dejson={})
    for parse in (parse_connection, parse_defender_connection,
                  lambda _: parse_azure_connection("c", "client", "secret", {"tenant_id": "t", "subscriptions": ["s"],
                                                                             "resource_manager": host})):
        with pytest.raises(Exception, match="user name or password") as caught:
            parse(conn)
        assert "Hunter2-secret" not in str(caught.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan")])
def test_a_timeout_that_is_not_a_finite_number_is_refused(value):
    """float() reads 'nan' and 'inf'; as a timeout they would make every request fail or wait forever."""
    from types import SimpleNamespace

    from defender_servicenow.hooks.servicenow_connection import parse_connection

    for extra in ({"timeout": value}, {"requests_per_hour": value}):
        conn = SimpleNamespace(conn_id="c", host="sn.example.com", port=None, login="u", password="p",
                               extra_dejson=extra)
        with pytest.raises(Exception, match="not a finite number"):
            parse_connection(conn)
    conn = SimpleNamespace(conn_id="c", host="10.1.0.2", port=None, login=None, password="tok",
                           extra_dejson={"timeout": value})
    with pytest.raises(Exception, match="not a finite number"):
        parse_defender_connection(conn)
