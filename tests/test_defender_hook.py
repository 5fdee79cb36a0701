"""DefenderIoTHook against the Defender simulator (sensor and management console), the streaming JSON array
splitter, and the plain error messages."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pytest
from defender_servicenow.exceptions import (
    ConfigError,
    DefenderAuthError,
    DefenderBadResponseError,
    DefenderCertificateError,
    DefenderError,
    DefenderUnreachableError,
    DefenderWrongApplianceError,
)
from defender_servicenow.hooks.defender import DefenderIoTHook, iter_json_array
from defender_servicenow.models import SEVERITIES, Alert, Device, InvalidRecord

from include.simulators.runner import free_port

# --------------------------------------------------------------------------- iter_json_array (pure)

ITEMS = [{"id": i, "name": f"Pumpe-Süd-{i} 水处理 😀", "s": "a \"]}, [{\" \\ b", "n": [1.5e3, -2, None, True]}
         for i in range(40)] + [12345, -7.25, True, None, "str", [], {}, [[]]]
RAW = json.dumps(ITEMS, ensure_ascii=False, indent=1).encode()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 1000, len(RAW)])
def test_splitter_fixed_chunk_sizes(size):
    chunks = [RAW[i:i + size] for i in range(0, len(RAW), size)]
    assert list(iter_json_array(chunks)) == ITEMS


def test_splitter_random_boundaries_inside_strings_numbers_and_utf8():
    rng = random.Random(7)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(RAW)), rng.randint(1, 40)))
        chunks = [RAW[a:b] for a, b in zip([0, *cuts], [*cuts, len(RAW)], strict=True)]
        assert list(iter_json_array(chunks)) == ITEMS


def test_splitter_number_split_at_chunk_end_is_not_cut():
    assert list(iter_json_array([b"[1", b"2", b"3, 4", b"5]"])) == [123, 45]
    assert list(iter_json_array([b" [ ", b" ] "])) == []


def test_splitter_is_incremental():
    consumed = []

    def chunks():
        for i in range(1000):
            consumed.append(i)
            yield (b"[" if i == 0 else b",") + json.dumps({"id": i}).encode()
        yield b"]"

    items = iter_json_array(chunks())
    assert next(items) == {"id": 0}
    assert len(consumed) <= 2  # only what was needed for the first item was read
    assert sum(1 for _ in items) == 999


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "empty"),
    (b'{"error": "Operation failed"}', "expected a JSON array"),
    (b"<html><body>Login</body></html>", "expected a JSON array"),
    (b'[{"id": 1}, {"id": 2', "cut off"),
    (b'[{"id": 1} {"id": 2}]', "expected ','"),
    (b'[{"id": 1},]', "malformed"),
    (b'[1] trailing', "after the JSON array"),
])
def test_splitter_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        list(iter_json_array([raw[i:i + 3] for i in range(0, len(raw), 3)]))


# --------------------------------------------------------------------------- helpers


def _set_conn(monkeypatch, conn_id: str, base: str, **changes) -> str:
    """Copy connection ``base`` (an AIRFLOW_CONN_ JSON set by the fixture) to ``conn_id`` with changes."""
    conn = json.loads(__import__("os").environ[f"AIRFLOW_CONN_{base.upper()}"])
    extra = {**conn.get("extra", {}), **changes.pop("extra", {})}
    conn.update(changes, extra=extra)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


def _fast(conn_id: str, **kw) -> DefenderIoTHook:
    return DefenderIoTHook(conn_id, backoff_factor=0.01, **kw)


def _split(records):
    devices = [r for r in records if isinstance(r, Device)]
    invalid = [r for r in records if isinstance(r, InvalidRecord)]
    assert len(devices) + len(invalid) == len(records)
    return devices, invalid


# --------------------------------------------------------------------------- sensor


@pytest.fixture
def sensor(defender_sim_factory):
    return defender_sim_factory(mode="sensor", devices=120, seed=3, alerts=30, conn_id="def_sensor", name="sensor-a")


def test_sensor_inventory_streamed_and_normalised(sensor, logs):
    hook = _fast(sensor.conn_id)
    assert hook.appliance == "sensor" and hook.appliance_name == "sensor-a"
    devices, invalid = _split(list(hook.iter_devices()))
    assert len(devices) + len(invalid) == 120
    assert len({d.native_key for d in devices}) == len(devices)
    assert all(d.source == "def_sensor" and d.sensor_name == "sensor-a" for d in devices)
    for device in devices:
        assert all(mac == mac.lower() and len(mac) == 17 and mac.count(":") == 5 for mac in device.mac_addresses)
        assert all(fw.serial != "N/A" and fw.firmware_version != "N/A" for fw in device.firmware)
    sample = next(d for d in devices if d.id == 79)  # the documented sample device
    assert sample.name == "10.4.14.102" and sample.protocols == ["Omron FINS"] and len(sample.firmware) == 4
    # messy generated data: odd MAC formats normalised, IPv6 kept, malformed values reported
    assert any(":" in ip for d in devices for ip in d.ip_addresses)
    assert any(d.issues for d in devices)
    assert all(r.source == "def_sensor" and r.reason for r in invalid)
    assert hook.request_count == 1
    text = logs()
    assert f"Read {len(devices)} devices from def_sensor" in text and sensor.token not in text


def test_sensor_authorized_filter(sensor):
    hook = _fast(sensor.conn_id)
    everything, _ = _split(list(hook.iter_devices()))
    authorized, _ = _split(list(hook.iter_devices(authorized=True)))
    unauthorized, _ = _split(list(hook.iter_devices(authorized=False)))
    assert authorized and all(d.authorized for d in authorized)
    assert all(d.authorized is False for d in unauthorized)
    assert len(authorized) + len(unauthorized) == len(everything)


def test_sensor_alerts_sorted_filtered(sensor):
    hook = _fast(sensor.conn_id)
    records = hook.get_alerts()
    alerts = [r for r in records if isinstance(r, Alert)]
    assert len(alerts) == 30
    assert [(a.time, a.id) for a in alerts] == sorted((a.time, a.id) for a in alerts)
    assert {a.severity for a in alerts} <= set(SEVERITIES)
    assert all(a.time.tzinfo is not None and a.key.startswith("def_sensor:") for a in alerts)
    assert all(a.source_device_id != 0 and a.destination_device_id != 0 for a in alerts)
    middle = alerts[len(alerts) // 2].time
    later = [a for a in hook.get_alerts(from_time=middle) if isinstance(a, Alert)]
    assert later and all(a.time >= middle for a in later) and len(later) < len(alerts)
    new = sensor.sim.add_alerts(1, severity="Critical")
    latest = [a for a in hook.get_alerts(from_time=middle) if isinstance(a, Alert)]
    assert latest[-1].id == new[0]["id"] and latest[-1].severity == "Critical"
    unhandled = [a for a in hook.get_alerts(state="unhandled") if isinstance(a, Alert)]
    assert unhandled and all(a.handled is False for a in unhandled)


def test_sensor_connections_and_cves(sensor):
    hook = _fast(sensor.conn_id)
    connections = list(hook.iter_device_connections())
    assert connections and all({"firstDeviceId", "secondDeviceId"} <= set(c) for c in connections)
    one = list(hook.iter_device_connections(2))
    assert one and all(2 in (c["firstDeviceId"], c["secondDeviceId"]) for c in one)
    assert all("cveId" in c for c in hook.iter_device_cves())


def test_sensor_has_no_v3_api(sensor):
    hook = _fast(sensor.conn_id)
    with pytest.raises(DefenderWrongApplianceError, match="management console"):
        list(hook.iter_devices_changed_since(datetime(2024, 1, 1, tzinfo=timezone.utc)))
    with pytest.raises(DefenderWrongApplianceError):
        hook.handle_alert("1-1594550943000")


# --------------------------------------------------------------------------- management console


@pytest.fixture
def cm(defender_sim_factory):
    return defender_sim_factory(mode="management_console", devices=150, seed=2, sensors=3, alerts=25,
                                conn_id="def_cm", name="cm-1")


def test_cm_inventory_paged_v3_merged_with_v1(cm):
    hook = _fast(cm.conn_id, page_size=40)
    devices, invalid = _split(list(hook.iter_devices()))
    assert len(devices) + len(invalid) == 150
    assert len({d.id for d in devices}) == len(devices)
    assert hook.request_count >= 1 + 1 + 4  # sensors, v1 stream, 4 pages of 40
    sensor_names = {s["u_id"]: s["u_name"] for s in hook.get_sensors()}
    assert len(sensor_names) == 3
    for device in devices:
        assert device.sensor_id in sensor_names and device.sensor_name == sensor_names[device.sensor_id]
        assert device.site_name and device.zone_name and device.site_id is not None and device.zone_id is not None
        assert device.authorized is not None and device.scanner is not None  # from v1
        assert device.first_seen is not None and device.last_seen is not None  # from v3
        assert device.category in {"IT", "ICS", "IoT", "Network"}
    assert any(d.firmware for d in devices) and any(d.purdue_level for d in devices)


def test_cm_filters(cm):
    hook = _fast(cm.conn_id, page_size=50)
    everything, _ = _split(list(hook.iter_devices()))
    authorized, _ = _split(list(hook.iter_devices(authorized=True)))
    assert authorized and all(d.authorized for d in authorized)
    assert len(authorized) == sum(1 for d in everything if d.authorized)
    one_sensor, _ = _split(list(hook.iter_devices(sensor_ids=[2])))
    assert one_sensor and {d.sensor_id for d in one_sensor} == {2}


def test_cm_delta_and_deleted(cm):
    hook = _fast(cm.conn_id, page_size=30)
    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    cm.sim.update_device(5, name="Renamed-PLC")
    cm.sim.delete_device(6)
    changed = [d for d in hook.iter_devices_changed_since(start) if isinstance(d, Device)]
    assert 5 in {d.id for d in changed} and len(changed) < 150
    assert next(d for d in changed if d.id == 5).name == "Renamed-PLC"
    assert 6 in hook.deleted_device_ids(start)
    assert 6 not in {d.id for d in hook.iter_devices() if isinstance(d, Device)}


def test_cm_alerts_and_handle(cm):
    hook = _fast(cm.conn_id)
    alerts = [a for a in hook.get_alerts(state="unhandled") if isinstance(a, Alert)]
    assert len(alerts) == 25
    assert all(a.sensor_name and a.zone_name and a.site_name and a.uuid for a in alerts)
    target = alerts[0]
    assert "successfully" in hook.handle_alert(target.uuid, "handle")
    handled = [a for a in hook.get_alerts(state="handled") if isinstance(a, Alert)]
    assert [a.id for a in handled] == [target.id] and handled[0].handled is True
    with pytest.raises(DefenderError, match="no alert was found|not found"):
        hook.handle_alert("999-1594550943000")
    with pytest.raises(ConfigError):
        hook.handle_alert(target.uuid, "delete")
    one_sensor = [a for a in hook.get_alerts(sensor_id=1) if isinstance(a, Alert)]
    assert all(a.sensor_id == 1 for a in one_sensor)


def test_test_connection_both_modes(sensor, cm):
    ok, message = _fast(sensor.conn_id).test_connection()
    assert ok and "sensor" in message
    ok, message = _fast(cm.conn_id).test_connection()
    assert ok and "3 sensors" in message


# --------------------------------------------------------------------------- errors


@pytest.fixture
def logs(caplog, capsys):
    """All log output of the test so far: stdlib logging (caplog) and Airflow's structlog lines (stdout)."""
    seen: list[str] = []

    def text() -> str:
        out = capsys.readouterr()
        seen.extend([out.out, out.err])
        return caplog.text + "".join(seen)

    return text


def _assert_no_token(exc_info, logs, token):
    assert token not in str(exc_info.value) and token not in repr(exc_info.value)
    assert token not in logs()


def test_bad_token(sensor, monkeypatch, logs):
    bad = "0" * 32
    conn_id = _set_conn(monkeypatch, "def_bad_token", sensor.conn_id, password=bad)
    with pytest.raises(DefenderAuthError, match="System Settings > Integrations > Access Tokens") as exc_info:
        list(_fast(conn_id).iter_devices())
    _assert_no_token(exc_info, logs, bad)
    _assert_no_token(exc_info, logs, sensor.token)
    ok, message = _fast(conn_id).test_connection()
    assert not ok and "Access Tokens" in message and bad not in message


@pytest.mark.parametrize(("kind", "wrong"), [("sensor", "management_console"), ("management_console", "sensor")])
def test_wrong_appliance_kind(defender_sim_factory, monkeypatch, logs, kind, wrong):
    handle = defender_sim_factory(mode=kind, devices=10, conn_id=f"def_{kind}")
    conn_id = _set_conn(monkeypatch, "def_wrong", handle.conn_id, extra={"appliance": wrong})
    with pytest.raises(DefenderWrongApplianceError, match=f"extra 'appliance'.*'{kind}'") as exc_info:
        list(_fast(conn_id).iter_devices())
    _assert_no_token(exc_info, logs, handle.token)


def test_html_and_invalid_json_answers(sensor):
    hook = _fast(sensor.conn_id)
    sensor.sim.set_faults(html_next=1)
    with pytest.raises(DefenderBadResponseError, match="HTML.*<") as exc_info:
        list(hook.iter_devices())
    assert "starts with" in str(exc_info.value)
    sensor.sim.set_faults(invalid_json_next=1)
    with pytest.raises(DefenderBadResponseError, match="starts with"):
        hook.get_alerts()
    assert [r for r in hook.get_alerts() if isinstance(r, Alert)]  # the next call is fine


def test_transient_errors_are_retried(sensor):
    hook = _fast(sensor.conn_id)
    sensor.sim.set_faults(fail_next={"count": 2, "status": 503, "path_prefix": "/api/v1/devices"})
    devices, _ = _split(list(hook.iter_devices()))
    assert devices
    assert hook.request_count == 1  # one call, retried below it by urllib3
    counters = sensor.sim.counters()
    assert counters["faults_served"] == 2 and counters["requests"] == 3


def test_persistent_server_error_is_plain(sensor):
    hook = _fast(sensor.conn_id, retries=2)
    sensor.sim.set_faults(fail_next={"count": 10, "status": 503, "path_prefix": "/api/v2/alerts"})
    with pytest.raises(DefenderError, match="HTTP 503.*Unexpected error occurred") as exc_info:
        hook.get_alerts()
    assert exc_info.value.status == 503
    sensor.sim.set_faults(fail_next={"count": 1, "status": 500, "path_prefix": "/api/v2/alerts"})
    with pytest.raises(DefenderError, match="HTTP 500"):  # 500 is not retried: it is the appliance's answer
        hook.get_alerts()
    sensor.sim.set_faults(fail_next={"count": 0, "status": 500, "path_prefix": ""})


def test_truncated_stream_is_an_error_not_a_short_inventory(sensor):
    sensor.sim.set_faults(invalid_json_next=1)
    with pytest.raises(DefenderBadResponseError, match="cut off"):
        list(_fast(sensor.conn_id).iter_devices())


def test_token_rejected_by_appliance(sensor, logs):
    sensor.sim.set_faults(reject_token=True)
    with pytest.raises(DefenderAuthError, match="HTTP 401.*Access Tokens") as exc_info:
        _fast(sensor.conn_id).get_alerts()
    _assert_no_token(exc_info, logs, sensor.token)


def test_unreachable_host(monkeypatch, logs):
    token = "1234b734a9244d54ab8d40aedddcabcd"
    monkeypatch.setenv("AIRFLOW_CONN_DEF_DOWN", json.dumps({
        "conn_type": "defender_iot", "host": f"http://127.0.0.1:{free_port()}", "password": token,
        "extra": {"appliance": "sensor", "timeout": 2}}))
    with pytest.raises(DefenderUnreachableError, match="Could not reach") as exc_info:
        list(DefenderIoTHook("def_down", retries=1, backoff_factor=0.01).iter_devices())
    _assert_no_token(exc_info, logs, token)


def test_certificate_failure_says_how_to_set_verify(defender_sim_factory, monkeypatch, logs):
    handle = defender_sim_factory(mode="sensor", devices=5, tls=True, conn_id="def_tls")
    hook = _fast(handle.conn_id)  # the fixture sets verify=false: works
    assert _split(list(hook.iter_devices()))[0]
    conn_id = _set_conn(monkeypatch, "def_tls_verify", handle.conn_id, extra={"verify": True})
    with pytest.raises(DefenderCertificateError, match="extra 'verify'") as exc_info:
        list(_fast(conn_id).iter_devices())
    _assert_no_token(exc_info, logs, handle.token)
    conn_id = _set_conn(monkeypatch, "def_tls_ca", handle.conn_id, extra={"verify": handle.ca_bundle})
    assert _split(list(_fast(conn_id).iter_devices()))[0]  # the CA bundle named in extra 'verify' works


def test_connection_field_errors(monkeypatch):
    base = {"conn_type": "defender_iot", "host": "https://10.1.0.2", "password": "x" * 32}
    cases = {
        "DEF_NOAPPL": ({**base, "extra": {"appliance": "cloud"}}, "appliance"),
        "DEF_NOTOKEN": ({**base, "password": None}, "Access Tokens"),
        "DEF_BADCA": ({**base, "extra": {"verify": "/nonexistent/ca.pem"}}, "CA bundle"),
        "DEF_BADTIMEOUT": ({**base, "extra": {"timeout": "soon"}}, "timeout"),
    }
    for conn_id, (conn, message) in cases.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id}", json.dumps(conn))
        with pytest.raises(ConfigError, match=message):
            DefenderIoTHook(conn_id.lower()).get_conn()
    assert DefenderIoTHook("never_looked_up").defender_conn_id == "never_looked_up"  # lazy


def test_console_capping_the_page_size_still_yields_the_whole_inventory(defender_sim_factory):
    """A console may return fewer devices per v3 page than asked for: paging follows u_count, not page size."""
    sim = defender_sim_factory(mode="management_console", devices=250, conn_id="def_capped")
    hook = _fast("def_capped", page_size=1000)
    real = hook._json

    def capped(method, path, params=None, **kw):
        if "/v3/integration/devices/" in path:
            params = {**(params or {}), "size": 40}   # the console answers 40 per page whatever we ask
        return real(method, path, params=params, **kw)

    hook._json = capped
    devices, invalid = _split(list(hook.iter_devices()))
    assert len(devices) + len(invalid) == sim.sim.device_count() == 250


def test_token_with_stray_whitespace_works_and_control_characters_are_refused(defender_sim_factory, monkeypatch,
                                                                               caplog):
    """Tokens from files or secrets backends often end with a newline: it is stripped. A line break inside
    the token is refused plainly, and the token never appears in the error."""
    sim = defender_sim_factory(mode="sensor", devices=5, conn_id="def_ws")
    _set_conn(monkeypatch, "def_ws_nl", "def_ws", password=sim.token + "\n")
    devices, _ = _split(list(_fast("def_ws_nl").iter_devices()))
    assert len(devices) >= 4
    _set_conn(monkeypatch, "def_ws_bad", "def_ws", password=sim.token[:10] + "\n" + sim.token[10:])
    with pytest.raises(ConfigError, match="control characters") as err:
        list(_fast("def_ws_bad").iter_devices())
    assert sim.token[:10] not in str(err.value) and sim.token[10:] not in str(err.value)
    ok, message = _fast("def_ws_bad").test_connection()
    assert ok is False and "control characters" in message


def test_connection_port_is_used_with_a_scheme_in_the_host(defender_sim_factory, monkeypatch):
    sim = defender_sim_factory(mode="sensor", devices=3, conn_id="def_port")
    url = sim.url.rsplit(":", 1)[0]                      # http://127.0.0.1 without the port
    _set_conn(monkeypatch, "def_port_split", "def_port", host=url, port=int(sim.url.rsplit(":", 1)[1]))
    assert _fast("def_port_split").base_url == sim.url
    assert _split(list(_fast("def_port_split").iter_devices()))[0]
