"""Contract tests for the Defender for IoT simulator: real HTTP against the running app.

They pin the shapes documented by Microsoft for both kinds of appliance.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time

import pytest
import requests

from include.simulators import inventory as inv
from include.simulators.defender_sim import SIM_TOKEN, DefenderSimConfig, DefenderSimulator
from include.simulators.runner import free_port

SENSOR_DEVICE_KEYS = {"vendor", "name", "firmware", "id", "macAddresses", "authorized", "ipAddresses",
                      "engineeringStation", "type", "operatingSystem", "protocols", "scanner"}
FIRMWARE_KEYS = {"slot", "additionalData", "moduleAddress", "rack", "address", "model", "serial", "firmwareVersion"}
V1_ALERT_KEYS = {"id", "time", "title", "message", "severity", "engine", "sourceDevice", "destinationDevice",
                 "additionalInformation"}
V2_EXTRA = {"sourceDeviceAddress", "destinationDeviceAddress", "remediationSteps"}
CM_V1_ALERT_KEYS = V1_ALERT_KEYS | {"sensorId", "zoneId", "siteId", "handled"}
CM_V2_EXTRA = V2_EXTRA | {"sensorName", "zoneName", "siteName"}
V3_DEVICE_KEYS = {"u_id", "u_name", "u_vendor", "u_appliance", "u_operating_system", "u_ip_address_objects",
                  "u_mac_address_objects", "u_groups", "u_site", "u_zone", "u_last_activity", "u_first_discovered",
                  "u_last_update", "u_device_type", "u_purdue_layer", "u_protocol_objects", "u_vlans",
                  "u_sensor_ids", "u_cm_device_url", "u_device_urls", "u_firmwares"}
ANCHOR = 1_700_000_000_000


def get(handle, path, token=None, **params):
    return requests.get(handle.url + path, params=params,
                        headers={"Authorization": token if token is not None else handle.token}, timeout=30,
                        verify=handle.ca_bundle or True)


def put_action(handle, uuid, action):
    return requests.put(f"{handle.url}/external/v1/alerts/{uuid}", data=json.dumps({"action": action}),
                        headers={"Authorization": handle.token}, timeout=30)


# --------------------------------------------------------------------------- sensor


def test_sensor_devices_have_the_documented_shape(defender_sim):
    response = get(defender_sim, "/api/v1/devices")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    devices = response.json()
    assert [d["id"] for d in devices] == list(range(1, 51))
    for device in devices:
        assert SENSOR_DEVICE_KEYS <= set(device) <= SENSOR_DEVICE_KEYS | {"hasDynamicAddress"}
        assert isinstance(device["firmware"], list)
        assert all(set(fw) == FIRMWARE_KEYS for fw in device["firmware"])
        assert device["protocols"] is None or all(set(p) == {"addresses", "id", "name"} for p in device["protocols"])
        assert isinstance(device["authorized"], bool) and isinstance(device["scanner"], bool)
        assert "sensorId" not in device and "u_id" not in device
    assert get(defender_sim, "/api/v1/devices/").json() == devices   # trailing slash, as in the 2022 docs


def test_sensor_authorized_filter_partitions_the_inventory(defender_sim):
    every = {d["id"] for d in get(defender_sim, "/api/v1/devices").json()}
    yes = get(defender_sim, "/api/v1/devices", authorized="true").json()
    no = get(defender_sim, "/api/v1/devices", authorized="false").json()
    assert all(d["authorized"] for d in yes) and not any(d["authorized"] for d in no)
    assert yes and no and {d["id"] for d in yes} | {d["id"] for d in no} == every
    assert get(defender_sim, "/api/v1/devices", authorized="maybe").status_code == 400


@pytest.mark.parametrize("token", ["", "wrong-token", f"Bearer {SIM_TOKEN}"])
def test_bad_or_missing_token_is_401_json(defender_sim, token):
    response = get(defender_sim, "/api/v1/devices", token=token)
    assert response.status_code == 401
    assert "error" in response.json()
    assert defender_sim.sim.counters()["unauthorized"] == 1


def test_other_appliance_routes_are_404(defender_sim, defender_sim_factory):
    assert get(defender_sim, "/external/v1/devices").status_code == 404
    assert get(defender_sim, "/external/v3/integration/sensors").status_code == 404
    cm = defender_sim_factory(mode="management_console", conn_id="defender_cm")
    assert get(cm, "/api/v1/devices").status_code == 404
    assert get(cm, "/api/v2/alerts").status_code == 404


def test_sensor_alerts_v1_and_v2_fields(defender_sim):
    v1 = get(defender_sim, "/api/v1/alerts").json()
    v2 = get(defender_sim, "/api/v2/alerts").json()
    assert len(v1) == len(v2) == 20
    assert all(set(a) == V1_ALERT_KEYS for a in v1)
    assert all(set(a) == V1_ALERT_KEYS | V2_EXTRA for a in v2)
    assert [a["id"] for a in v2] == sorted(a["id"] for a in v2)
    system = [a for a in v2 if a["title"] == "No Traffic Detected on Sensor Interface"]
    assert system and system[0]["sourceDevice"] is None and system[0]["engine"] == "Operational"
    assert all(isinstance(a["remediationSteps"], list) for a in v2)
    assert {a["severity"] for a in v2} == set(inv.SEVERITIES)
    assert {a["engine"] for a in v2} == set(inv.ENGINES)


def test_sensor_alert_filters(defender_sim):
    alerts = get(defender_sim, "/api/v2/alerts").json()
    middle = alerts[10]["time"]
    after = get(defender_sim, "/api/v2/alerts", fromTime=middle).json()
    before = get(defender_sim, "/api/v2/alerts", toTime=middle).json()
    assert [a["id"] for a in before + after] == [a["id"] for a in alerts]
    assert min(a["time"] for a in after) == middle and max(a["time"] for a in before) < middle
    defender_sim.sim.add_alerts(1, handled=True)
    handled = get(defender_sim, "/api/v2/alerts", state="handled").json()
    assert [a["id"] for a in handled] == [21]
    assert len(get(defender_sim, "/api/v2/alerts", state="unhandled").json()) == 20
    disconnections = get(defender_sim, "/api/v1/alerts", type="disconnections").json()
    assert disconnections and all("Disconnected" in a["title"] for a in disconnections)
    assert len(get(defender_sim, "/api/v1/alerts", type="anything").json()) == 21   # other values are ignored
    assert get(defender_sim, "/api/v2/alerts", state="all").status_code == 400
    assert get(defender_sim, "/api/v2/alerts", fromTime="yesterday").status_code == 400


def test_alert_devices_exist_in_the_inventory_with_protocols(defender_sim):
    devices = {d["id"]: d for d in get(defender_sim, "/api/v1/devices").json()}
    with_source = [a for a in get(defender_sim, "/api/v2/alerts").json() if a["sourceDevice"]]
    assert len(with_source) >= 10
    for alert in with_source:
        source = devices[alert["sourceDevice"]]
        assert source["protocols"]
        assert alert["sourceDeviceAddress"] in (source["ipAddresses"] or []) + (source["macAddresses"] or [])
        if alert["destinationDevice"] is not None:
            assert alert["destinationDevice"] in devices


def test_sensor_connections_and_cves(defender_sim_factory):
    handle = defender_sim_factory(devices=120)
    connections = get(handle, "/api/v1/devices/connections").json()
    assert connections and all(set(c) == {"firstDeviceId", "secondDeviceId", "lastSeen", "discovered", "ports",
                                          "protocols"} for c in connections)
    one = get(handle, "/api/v1/devices/5/connections").json()
    assert one and all(5 in (c["firstDeviceId"], c["secondDeviceId"]) for c in one)
    cutoff = sorted(c["discovered"] for c in connections)[len(connections) // 2]
    assert all(c["discovered"] < cutoff for c in get(handle, "/api/v1/devices/connections",
                                                     discoveredBefore=cutoff).json())
    cves = get(handle, "/api/v1/devices/cves").json()
    assert cves and [float(c["score"]) for c in cves] == sorted((float(c["score"]) for c in cves), reverse=True)
    assert all(isinstance(c["score"], str) for c in cves)
    assert all(len([c for c in get(handle, "/api/v1/devices/cves", top=1).json() if c["ipAddress"] == ip]) == 1
               for ip in {c["ipAddress"] for c in cves})


def test_device_listing_is_streamed_in_chunks(defender_sim_factory):
    handle = defender_sim_factory(devices=3000)
    response = requests.get(handle.url + "/api/v1/devices", headers=handle.headers, stream=True, timeout=60)
    assert response.headers.get("transfer-encoding") == "chunked"
    assert len(json.loads(b"".join(response.iter_content(65536)))) == 3000


# --------------------------------------------------------------------------- management console


def test_cm_devices_shape_and_filters(defender_sim_factory):
    cm = defender_sim_factory(mode="management_console", devices=80, sensors=4)
    devices = get(cm, "/external/v1/devices").json()
    assert len(devices) == 80
    assert all(SENSOR_DEVICE_KEYS | {"sensorId", "zoneId", "siteId"} <= set(d) for d in devices)
    assert {d["sensorId"] for d in devices} == {1, 2, 3, 4}
    by_sensor = get(cm, "/external/v1/devices", sensorId="1,3").json()
    assert by_sensor and {d["sensorId"] for d in by_sensor} == {1, 3}
    assert len(by_sensor) == sum(d["sensorId"] in (1, 3) for d in devices)
    zone = get(cm, "/external/v1/devices", zoneId="2").json()
    assert zone and {d["zoneId"] for d in zone} == {2}
    site = get(cm, "/external/v1/devices", siteId="2").json()
    assert site and {d["siteId"] for d in site} == {2} and {d["zoneId"] for d in site} == {3, 4}
    assert all(d["authorized"] for d in get(cm, "/external/v1/devices", authorized="true", siteId="1").json())
    assert get(cm, "/external/v1/devices", siteId="one").status_code == 400


def test_cm_alerts_v1_v2_and_filters(defender_cm):
    v1 = get(defender_cm, "/external/v1/alerts").json()
    v2 = get(defender_cm, "/external/v2/alerts").json()
    assert all(set(a) == CM_V1_ALERT_KEYS for a in v1)
    assert all(set(a) == CM_V1_ALERT_KEYS | CM_V2_EXTRA for a in v2)
    system = [a for a in v1 if a["title"] == "Traffic Detected on sensor Interface"]
    assert system and system[0]["sourceDevice"] == 0 and system[0]["destinationDevice"] == 0
    assert all(a["sourceDevice"] is not None and a["destinationDevice"] is not None for a in v1)
    sensor_2 = get(defender_cm, "/external/v2/alerts", sensor="2").json()
    assert sensor_2 and {a["sensorId"] for a in sensor_2} == {2}
    assert get(defender_cm, "/external/v2/alerts", sensorId="2").json() == sensor_2
    assert all(a["sensorName"] == "OT-Sensor-02" and a["zoneId"] == 2 for a in sensor_2)
    assert {a["id"] for a in get(defender_cm, "/external/v2/alerts", zoneId="2").json()} == {a["id"] for a in sensor_2}
    assert len(get(defender_cm, "/external/v2/alerts", state="bogus").json()) == 20   # ignored on the console


def test_cm_handle_state_machine(defender_cm):
    alert = defender_cm.sim.alerts[0]
    uuid = alert["uuid"]
    assert uuid == f"{alert['id']}-{alert['time']}"
    steps = [("handle", "Alert update request finished successfully"),
             ("handle", "Alert was already handled (handle)."),
             ("handleAndLearn", "Alert was already handled (handled). Handle and learn (handleAndLearn) was "
                                "performed on the alert."),
             ("handleAndLearn", "Alert was already handled and learned (handleAndLearn)."),
             ("handle", "Alert was already handled and learned (handleAndLearn). Ignored handle request.")]
    for action, message in steps:
        response = put_action(defender_cm, uuid, action)
        assert (response.status_code, response.json()) == (200, {"content": message})
    assert defender_cm.sim.alert_by_uuid(uuid)["state"] == "handledAndLearned"
    handled = get(defender_cm, "/external/v1/alerts", state="handled").json()
    assert [a["id"] for a in handled] == [alert["id"]] and handled[0]["handled"] is True
    assert alert["id"] not in {a["id"] for a in get(defender_cm, "/external/v1/alerts", state="unhandled").json()}
    second = defender_cm.sim.alerts[1]["uuid"]
    assert put_action(defender_cm, second, "handleAndLearn").json() == {
        "content": "Alert update request finished successfully"}
    bad = put_action(defender_cm, uuid, "close")
    assert (bad.status_code, bad.json()) == (500, {"error": "Invalid action"})
    missing = put_action(defender_cm, "999-1594550943000", "handle")
    assert missing.status_code == 500 and "no alert was found" in missing.json()["error"]
    unauth = requests.put(f"{defender_cm.url}/external/v1/alerts/{uuid}", json={"action": "handle"}, timeout=10)
    assert unauth.status_code == 401


def test_cm_appliances_and_v3_sensors(defender_cm):
    appliances = get(defender_cm, "/external/v1/appliances").json()
    assert get(defender_cm, "/external/v2/appliances").json()[0]["id"] == appliances[0]["id"]
    assert [a["id"] for a in appliances] == [1, 2]
    assert set(inv.SAMPLE_APPLIANCE) <= set(appliances[0])
    assert sum(a["deviceCount"] for a in appliances) == 50
    assert sum(a["alertCount"] for a in appliances) == 20
    sensors = get(defender_cm, "/external/v3/integration/sensors").json()
    assert get(defender_cm, "/external/v3/integration/sensors/").json() == sensors
    assert all(set(s) == set(inv.SAMPLE_V3_SENSOR) for s in sensors)
    assert [s["u_id"] for s in sensors] == [1, 2] and {s["u_connection_state"] for s in sensors} == {"SYNCED"}


def test_v3_devices_shape_paging_and_delta(defender_cm):
    sim = defender_cm.sim
    everything = get(defender_cm, "/external/v3/integration/devices/0").json()
    assert everything["u_count"] == 50 and len(everything["u_devices"]) == 50   # default size 50
    device = everything["u_devices"][0]
    assert set(device) == V3_DEVICE_KEYS
    assert set(device["u_device_type"]) == {"u_category", "u_purdue_layer", "u_name"}
    assert device["u_device_type"]["u_category"] in {"IT", "ICS", "IoT", "Network"}
    assert device["u_appliance"] == "Management console (CM)"
    assert device["u_sensor_ids"] == [{"u_sensor_id": sim.devices[device["u_id"]]["sensorId"]}]
    pages = [get(defender_cm, "/external/v3/integration/devices/0", page=p, size=20).json() for p in range(3)]
    assert [p["u_count"] for p in pages] == [50, 50, 50]
    assert [d["u_id"] for p in pages for d in p["u_devices"]] == list(range(1, 51))
    assert get(defender_cm, "/external/v3/integration/devices/0", page=3, size=20).json()["u_devices"] == []
    # Changes made after a timestamp are exactly what the delta returns.
    since = max(d["u_last_update"] for d in everything["u_devices"])
    assert get(defender_cm, f"/external/v3/integration/devices/{since}").json() == {"u_count": 0, "u_devices": []}
    sim.update_device(7, name="Renamed PLC")
    new = sim.add_device(name="Brand new", sensorId=2)
    delta = get(defender_cm, f"/external/v3/integration/devices/{since}").json()
    assert [d["u_id"] for d in delta["u_devices"]] == [7, new["id"]] and delta["u_count"] == 2
    assert delta["u_devices"][0]["u_name"] == "Renamed PLC" and delta["u_devices"][0]["u_last_update"] > since
    only_new = get(defender_cm, f"/external/v3/integration/devices/{since}", notificationType=1).json()
    only_updated = get(defender_cm, f"/external/v3/integration/devices/{since}", notificationType=2).json()
    assert [d["u_id"] for d in only_new["u_devices"]] == [new["id"]]
    assert [d["u_id"] for d in only_updated["u_devices"]] == [7]
    assert get(defender_cm, f"/external/v3/integration/devices/{since}", sensorId=1).json()["u_count"] == (
        sim.devices[7]["sensorId"] == 1)
    assert get(defender_cm, "/external/v3/integration/devices/0", size=0).status_code == 400
    assert get(defender_cm, "/external/v3/integration/devices/yesterday").status_code == 400


def test_v3_connections_are_paged(defender_cm):
    first = get(defender_cm, "/external/v3/integration/connections/0", size=10).json()
    assert first["u_count"] > 10 and len(first["u_connections"]) == 10
    assert all(set(c) == {"u_src_device_id", "u_dest_device_name", "u_src_device_name", "u_appliance",
                          "u_connection_type", "u_dest_device_id"} for c in first["u_connections"])
    assert {c["u_connection_type"] for c in first["u_connections"]} <= {"One Way", "Two Way", "Multicast"}
    last_page = (first["u_count"] - 1) // 10
    tail = get(defender_cm, "/external/v3/integration/connections/0", size=10, page=last_page).json()
    assert len(tail["u_connections"]) == first["u_count"] - 10 * last_page


def test_v3_deleted_devices(defender_cm):
    sim = defender_cm.sim
    before = sim.tick()
    sim.delete_device(4)
    sim.delete_device(9)
    assert get(defender_cm, f"/external/v3/integration/deleteddevices/{before}").json() == [{"u_id": 4}, {"u_id": 9}]
    assert get(defender_cm, f"/external/v3/integration/deleteddevices/{sim.tick()}").json() == []
    ids = [d["id"] for d in get(defender_cm, "/external/v1/devices").json()]
    assert 4 not in ids and 9 not in ids and len(ids) == 48


# --------------------------------------------------------------------------- control routes, faults


def test_control_routes(defender_cm):
    url = defender_cm.url
    created = requests.post(f"{url}/sim/alerts", json={"count": 2, "severity": "Critical", "sourceDevice": 3},
                            timeout=10).json()["alerts"]
    assert [a["id"] for a in created] == [21, 22] and all(a["severity"] == "Critical" for a in created)
    source_address = inv.device_address(defender_cm.sim.devices[3])
    assert created[0]["sourceDeviceAddress"] == source_address and created[0]["sensorId"] == \
        defender_cm.sim.devices[3]["sensorId"]
    assert all(source_address in a["message"] + " ".join(a["remediationSteps"]) for a in created)
    system = defender_cm.sim.add_alerts(1, sourceDevice=0, destinationDevice=0)[0]
    assert system["kind"] == "system" and system["sourceDeviceAddress"] is None
    assert requests.post(f"{url}/sim/alerts", json={"count": "many"}, timeout=10).status_code == 400
    assert requests.post(f"{url}/sim/alerts", json={"colour": "red"}, timeout=10).status_code == 400
    device = requests.post(f"{url}/sim/devices", json={"name": "added", "type": "RTU"}, timeout=10).json()
    assert device["id"] == 51
    assert requests.patch(f"{url}/sim/devices/51", json={"vendor": "ABB"}, timeout=10).json()["vendor"] == "ABB"
    assert requests.patch(f"{url}/sim/devices/999", json={"vendor": "ABB"}, timeout=10).status_code == 404
    assert requests.patch(f"{url}/sim/devices/5", json={"nonsense": 1}, timeout=10).status_code == 400
    assert requests.delete(f"{url}/sim/devices/51", timeout=10).json() == {"deleted": 51}
    assert requests.delete(f"{url}/sim/devices/51", timeout=10).status_code == 404
    state = requests.get(f"{url}/sim/state", timeout=10).json()
    assert state["mode"] == "management_console" and state["devices"] == 50 and state["alerts"] == 23
    get(defender_cm, "/external/v1/devices")
    counters = requests.get(f"{url}/sim/counters", timeout=10).json()
    assert counters["requests"] == 1 and counters["by_route"] == {"GET /external/v1/devices": 1}


def test_faults(defender_sim):
    url, sim = defender_sim.url, defender_sim.sim
    requests.post(f"{url}/sim/faults", json={"html_next": 1}, timeout=10)
    page = get(defender_sim, "/api/v1/devices")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert get(defender_sim, "/api/v1/devices").status_code == 200   # only the next one
    sim.set_faults(invalid_json_next=1)
    broken = get(defender_sim, "/api/v2/alerts")
    assert broken.headers["content-type"].startswith("application/json")
    with pytest.raises(ValueError):
        broken.json()
    sim.set_faults(fail_next={"count": 2, "status": 503, "path_prefix": "/api/v2/alerts"})
    assert get(defender_sim, "/api/v1/devices").status_code == 200   # other path: untouched
    assert [get(defender_sim, "/api/v2/alerts").status_code for _ in range(3)] == [503, 503, 200]
    sim.set_faults(reject_token=True)
    assert get(defender_sim, "/api/v1/devices").status_code == 401
    sim.set_faults(reject_token=False, latency_ms=5)
    assert get(defender_sim, "/api/v1/devices").status_code == 200
    assert sim.counters()["faults_served"] == 4
    with pytest.raises(ValueError):
        sim.set_faults(explode=True)


def test_alert_generator_adds_alerts_and_stops_with_the_server(defender_sim_factory):
    handle = defender_sim_factory(alert_interval_s=0.05, alerts=0)
    get(handle, "/api/v2/alerts")   # the first request starts the generator in the server's loop
    deadline = time.monotonic() + 20
    while len(handle.sim.alerts) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(handle.sim.alerts) >= 2
    ids = [a["id"] for a in get(handle, "/api/v2/alerts").json()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    handle.stop()
    assert not handle.server.thread.is_alive()
    assert handle.sim._generator_task.done()


# --------------------------------------------------------------------------- TLS, connection, CLI


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_verification_modes(defender_sim_factory):
    handle = defender_sim_factory(tls=True, conn_id="defender_tls")
    assert handle.url.startswith("https://127.0.0.1:")
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(handle.url + "/api/v1/devices", headers=handle.headers, timeout=10)
    assert requests.get(handle.url + "/api/v1/devices", headers=handle.headers, timeout=10,
                        verify=handle.ca_bundle).status_code == 200
    assert requests.get(handle.url + "/api/v1/devices", headers=handle.headers, timeout=10,
                        verify=False).status_code == 200
    conn = json.loads(os.environ["AIRFLOW_CONN_DEFENDER_TLS"])
    assert conn == {"conn_type": "defender_iot", "host": handle.url, "password": SIM_TOKEN,
                    "extra": {"appliance": "sensor", "name": "sensor-1", "verify": False}}


def test_cli_serves_the_chosen_mode(tmp_path):
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "include.simulators.defender_sim", "--port", str(port),
                             "--mode", "management_console", "--devices", "10", "--sensors", "3"],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, response = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/external/v3/integration/sensors",
                                        headers={"Authorization": SIM_TOKEN}, timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert response is not None and [s["u_id"] for s in response.json()] == [1, 2, 3]
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------- determinism and inventory data


def _dump(sim: DefenderSimulator) -> list:
    return [sim.devices[i] for i in sim.devices] + sim.alerts


def test_deterministic_by_seed():
    make = lambda seed: DefenderSimulator(DefenderSimConfig(  # noqa: E731
        mode="management_console", devices=120, seed=seed, anchor_ms=ANCHOR))
    assert _dump(make(3)) == _dump(make(3))
    assert _dump(make(3)) != _dump(make(4))


def test_same_seed_gives_identical_responses(defender_sim_factory):
    a = defender_sim_factory(conn_id="a", anchor_ms=ANCHOR)
    b = defender_sim_factory(conn_id="b", anchor_ms=ANCHOR)
    for path in ("/api/v1/devices", "/api/v2/alerts", "/api/v1/devices/connections"):
        assert get(a, path).content == get(b, path).content


def test_inventory_is_messy_on_purpose():
    devices = list(inv.generate_devices(300, seed=2, sensors=3, anchor_ms=ANCHOR))
    assert {d["type"] for d in devices} == set(inv.DEVICE_TYPES)
    assert set(inv.OPERATING_SYSTEMS) == {d["operatingSystem"] for d in devices} - {None}
    protocols = {p["name"] for d in devices for p in d["protocols"] or []}
    assert protocols <= set(inv.PROTOCOL_NAMES) and len(protocols) > 40

    def bad_ip(value):
        try:
            ipaddress.ip_address(value)
            return False
        except ValueError:
            return True

    ips = [ip for d in devices for ip in d["ipAddresses"] or []]
    macs = [m for d in devices for m in d["macAddresses"] or []]
    assert any(bad_ip(ip) for ip in ips)                                            # invalid on purpose
    assert any(":" in ip and not bad_ip(ip) for ip in ips)                          # IPv6
    assert any(len(d["ipAddresses"] or []) > 1 for d in devices)
    assert any(d["ipAddresses"] is None and d["macAddresses"] is None for d in devices)
    assert any(len(m) == 12 and m.isupper() for m in macs)                          # 0002A21F1C59
    assert any(m.count("-") == 5 for m in macs) and any(m.count(".") == 2 for m in macs)
    assert any("zz" in m for m in macs)
    assert any(not n.isascii() for n in (d["name"] for d in devices))
    assert any(len(d["name"]) > 255 for d in devices)
    assert any(fw["serial"] == "N/A" for d in devices for fw in d["firmware"])
    assert any("hasDynamicAddress" not in d for d in devices)
    assert any(d["vendor"] is None for d in devices) and any(d["protocols"] is None for d in devices)


def test_documented_samples_are_reproduced():
    samples = inv.samples()
    assert samples["sensor_device"]["protocols"] == [{"addresses": [], "id": 62, "name": "Omron FINS"}]
    assert samples["cm_alerts"][0]["sourceDevice"] == 0
    assert samples["handle_ok"] == {"content": "Alert update request finished successfully"}
    sim = DefenderSimulator(DefenderSimConfig(devices=100, anchor_ms=ANCHOR))
    assert sim.sensor_device_view(sim.devices[79]) == inv.SAMPLE_SENSOR_DEVICE
    samples["sensor_device"]["name"] = "changed"   # copies, not the constants
    assert inv.SAMPLE_SENSOR_DEVICE["name"] == "10.4.14.102"
