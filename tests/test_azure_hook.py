"""DefenderIoTAzureHook against the Azure simulator, its connection parser, and the source interface."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest
from defender_servicenow.azure_models import ALERT_TYPE
from defender_servicenow.exceptions import ConfigError, DefenderAuthError, DefenderError
from defender_servicenow.hooks import _http
from defender_servicenow.hooks.azure import (
    DefenderAzureForbiddenError,
    DefenderIoTAzureHook,
    build_query,
    parse_azure_connection,
    parse_resets_after,
)
from defender_servicenow.models import Alert, Device, InvalidRecord

from include.simulators.azure_sim import SIM_CLIENT_SECRET, SIM_READER_ID


@pytest.fixture
def sleeps(monkeypatch):
    waited: list[float] = []
    monkeypatch.setattr(_http, "_sleep", waited.append)
    return waited


GOOD = {"tenant_id": "t", "subscriptions": "s1, s2"}


@pytest.mark.parametrize("login, password, extra, expected", [
    ("id", "secret", GOOD, {"subscriptions": ("s1", "s2"), "authority": "https://login.microsoftonline.com",
                            "resource_manager": "https://management.azure.com", "verify": True, "timeout": 30.0}),
    ("id", "secret\n", {"tenant_id": "t", "subscriptions": '["a", "b", "a"]'}, {"subscriptions": ("a", "b")}),
    ("id", "x", {"tenant_id": "t", "management_group": "mg", "verify": "false", "timeout": "5",
                 "authority": "https://login.microsoftonline.us/", "sites": "Plant A,Plant B"},
     {"management_group": "mg", "subscriptions": (), "verify": False, "timeout": 5.0,
      "authority": "https://login.microsoftonline.us", "sites": ("Plant A", "Plant B")}),
    ("", "x", GOOD, "client. id in its login"),
    ("id", "", GOOD, "client secret"),
    ("id", "x", {"subscriptions": "s"}, "tenant_id"),
    ("id", "x", {"tenant_id": "t"}, "subscriptions"),
    ("id", "x", {"tenant_id": "t", "subscriptions": "s", "management_group": "m"}, "not both"),
    ("id", "x", {**GOOD, "timeout": "soon"}, "timeout"),
    ("id", "x", {**GOOD, "authority": "login.example"}, "authority"),
    ("id", "x", {**GOOD, "sites": "[bad"}, "sites"),
    ("id", "a\x00b", GOOD, "control characters"),
])
def test_connection_parser(login, password, extra, expected):
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            parse_azure_connection("c", login, password, extra)
        return
    settings = parse_azure_connection("c", login, password, extra)
    for key, value in expected.items():
        assert getattr(settings, key) == value
    assert "secret" not in repr(settings)


def test_query_projects_id_orders_and_never_takes():
    query = build_query("microsoft.iotsecurity/locations/devicegroups/devices", sites=("O'Hare",))
    assert "project id," in query and query.endswith("order by id asc") and " take " not in query
    assert "in~ ('O\\'Hare')" in query
    assert parse_resets_after("00:00:04") == 4 and parse_resets_after(None) is None


def test_devices_paged_with_skiptoken(azure_sim_factory, sleeps):
    sim = azure_sim_factory(devices=2500, removed_every=0, quota=100)
    hook = DefenderIoTAzureHook(sim.conn_id)
    devices = list(hook.iter_devices())
    assert len(devices) == 2500 and all(isinstance(d, Device) for d in devices)
    assert len({d.id for d in devices}) == 2500
    assert hook.request_count == 3 and hook.token_count == 1


def test_small_pages_and_filters(azure_sim_factory, sleeps):
    sim = azure_sim_factory(devices=300, sensors=4, quota=100)
    hook = DefenderIoTAzureHook(sim.conn_id, page_size=100)
    site = sim.sim.devices[0]["properties"]["sensor"]["site"]
    active = [d for d in sim.sim.devices if d["properties"]["deviceStatus"] == "Active"]
    assert len(list(hook.iter_devices())) == len(active)
    assert hook.request_count == (len(active) + 99) // 100
    filtered = DefenderIoTAzureHook(azure_sim_factory("az_site", devices=300, sensors=4,
                                                      extra={"sites": [site]}).conn_id)
    got = list(filtered.iter_devices())
    assert got and all(d.site_name == site for d in got)


def test_removed_devices_are_deleted_ids(azure_sim_factory, sleeps):
    sim = azure_sim_factory(devices=200, removed_every=10)
    hook = DefenderIoTAzureHook(sim.conn_id)
    present = {d.id for d in hook.iter_devices()}
    deleted = hook.deleted_device_ids(datetime(2000, 1, 1, tzinfo=timezone.utc))
    assert len(deleted) == 20 and not present & set(deleted) and len(present) == 180


def test_quota_exhaustion_waits_for_reset(azure_sim_factory, monkeypatch):
    import time as _time

    sleeps: list[float] = []
    monkeypatch.setattr(_http, "_sleep", lambda s: (sleeps.append(s), _time.sleep(s)))
    # A 3 s window: even on a loaded machine three requests fall into one window (with 1 s, requests slower
    # than 0.5 s each never met the quota and the test saw no wait).
    sim = azure_sim_factory(devices=300, quota=2, quota_window=3.0)
    hook = DefenderIoTAzureHook(sim.conn_id, page_size=100)   # small pages: many requests in one window
    assert len([d for d in hook.iter_devices() if isinstance(d, Device)]) > 200
    assert sleeps and hook.throttled == 0   # it waited on the quota header, never ran into a 429


def test_429_is_backed_off_and_resent(azure_sim_factory, sleeps):
    sim = azure_sim_factory(devices=50)
    sim.sim.faults["throttle_next"] = 2
    hook = DefenderIoTAzureHook(sim.conn_id)
    assert len(list(hook.iter_devices())) > 0
    assert hook.throttled == 2 and len(sleeps) >= 2


def test_persistent_429_is_a_plain_error(azure_sim_factory, sleeps):
    sim = azure_sim_factory(devices=50)
    sim.sim.faults["throttle_next"] = 100
    with pytest.raises(DefenderError, match="kept throttling"):
        list(DefenderIoTAzureHook(sim.conn_id, retries=3).iter_devices())


def test_token_renewed_before_expiry(azure_sim_factory, sleeps, monkeypatch):
    import time as _time

    sim = azure_sim_factory(devices=2500, token_lifetime=2, removed_every=0, quota=100)
    hook = DefenderIoTAzureHook(sim.conn_id, page_size=500)
    pages = iter(hook.iter_devices())
    first = [next(pages) for _ in range(500)]
    _time.sleep(2)   # the token has run out
    rest = list(pages)
    assert len(first) + len(rest) == 2500
    assert hook.token_count >= 2 and sim.sim.counters["expired_token"] == 0


def test_wrong_secret_stops_logins_and_leaks_nothing(azure_sim_factory, caplog, sleeps):
    secret = "super-secret-value-123"
    sim = azure_sim_factory(secret=secret)
    hook = DefenderIoTAzureHook(sim.conn_id)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DefenderAuthError) as first:
        list(hook.iter_devices())
    with pytest.raises(DefenderAuthError):
        hook.get_alerts()
    assert sim.sim.counters["token"] == 1   # not retried
    assert "AADSTS7000215" in str(first.value) and secret not in str(first.value)
    assert secret not in caplog.text
    ok, message = DefenderIoTAzureHook(sim.conn_id).test_connection()
    assert not ok and secret not in message


def test_alerts_window_mapping_and_close(azure_sim_factory, sleeps):
    sim = azure_sim_factory(alerts=12)
    hook = DefenderIoTAzureHook(sim.conn_id)
    alerts = hook.get_alerts()
    assert len(alerts) == 12 and all(isinstance(a, Alert) for a in alerts)
    assert [a.time for a in alerts] == sorted(a.time for a in alerts)
    since = alerts[6].time
    window = hook.get_alerts(from_time=since, to_time=since + timedelta(seconds=1))
    assert [a.id for a in window] == [alerts[6].id]
    hook.set_alert_status(alerts[0].resource_id)
    assert alerts[0].id not in {a.id for a in hook.get_alerts(state="unhandled")}
    assert [a.id for a in hook.get_alerts(state="handled")] == [alerts[0].id]


def test_close_without_security_admin_is_plain_403(azure_sim_factory, sleeps):
    sim = azure_sim_factory(client_id=SIM_READER_ID, secret=SIM_CLIENT_SECRET, alerts=2)
    hook = DefenderIoTAzureHook(sim.conn_id)
    alert = hook.get_alerts()[0]
    with pytest.raises(DefenderAzureForbiddenError, match="Security Admin"):
        hook.set_alert_status(alert.resource_id)


def test_truncated_answer_is_an_error_not_a_short_read(azure_sim_factory, sleeps, monkeypatch):
    sim = azure_sim_factory(devices=1500)
    hook = DefenderIoTAzureHook(sim.conn_id)
    with pytest.raises(DefenderError, match="truncated"):
        list(hook.iter_resources("iotsecurityresources | where type =~ "
                                 "'microsoft.iotsecurity/locations/devicegroups/devices' | project name"))


def test_invalid_record_is_counted_not_raised(azure_sim_factory, sleeps):
    sim = azure_sim_factory(devices=100, broken_every=50)
    records = list(DefenderIoTAzureHook(sim.conn_id).iter_devices())
    invalid = [r for r in records if isinstance(r, InvalidRecord)]
    assert len(invalid) == 2 and "ARM 'id'" in invalid[0].reason


def test_spent_quota_with_zero_reset_still_waits(azure_sim_factory, sleeps, monkeypatch):
    """ARG may say remaining 0 with resets-after 00:00:00 (the window ends within the second): the next
    request still waits instead of running into a 429."""
    sim = azure_sim_factory(devices=10)
    hook = DefenderIoTAzureHook(sim.conn_id)
    real_send = hook._send

    def send(method, url, **kw):
        response = real_send(method, url, **kw)
        if "ResourceGraph" in url:
            response.headers["x-ms-user-quota-remaining"] = "0"
            response.headers["x-ms-user-quota-resets-after"] = "00:00:00"
        return response

    monkeypatch.setattr(hook, "_send", send)
    query = build_query(ALERT_TYPE)
    list(hook.iter_resources(query))
    assert not sleeps
    list(hook.iter_resources(query))
    assert sleeps and sleeps[0] > 0


def test_the_lock_out_guard_stops_later_runs_logging_in_with_rejected_credentials(azure_sim_factory, monkeypatch,
                                                                                  sleeps):
    """Rejected by Entra ID once: later hooks (later runs) of the same settings try no login until the
    connection changes; a corrected secret logs in at once."""
    import json
    import os

    from defender_servicenow.hooks.lockout import AuthGuard
    from defender_servicenow.sources import source_for

    class Store(dict):
        def set(self, key, value):
            self[key] = value

    store = Store()
    sim = azure_sim_factory("az_guarded", secret="wrong-secret")

    def guarded():
        return source_for("az_guarded", auth_guard=AuthGuard(store, "defender", "az_guarded", cooldown_minutes=30))

    with pytest.raises(DefenderAuthError):
        list(guarded().iter_devices())
    assert sim.sim.counters["token"] == 1 and store["defender:az_guarded"]["status"] == "credentials_rejected"
    assert "wrong-secret" not in json.dumps(store)
    with pytest.raises(DefenderAuthError, match="lock-out guard"):
        guarded().get_alerts()
    assert sim.sim.counters["token"] == 1                   # no second login with the rejected secret

    conn = json.loads(os.environ["AIRFLOW_CONN_AZ_GUARDED"])
    monkeypatch.setenv("AIRFLOW_CONN_AZ_GUARDED", json.dumps({**conn, "password": SIM_CLIENT_SECRET}))
    assert guarded().get_sensors()                          # the connection changed: logins again
    assert store["defender:az_guarded"]["status"] == "ok"
