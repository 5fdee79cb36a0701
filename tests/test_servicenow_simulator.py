"""Contract tests for the ServiceNow simulator: real HTTP against the running app, pinning the documented
shapes of ServiceNow's REST APIs (OAuth, Table API, Batch, IRE, faults)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time

import pytest
import requests

from include.simulators.runner import free_port
from include.simulators.servicenow_sim import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_USER

AUTH = (SIM_USER, SIM_PASSWORD)
DS = {"sysparm_data_source": "Other Automated"}


def token(url: str, **extra) -> requests.Response:
    data = {"grant_type": "password", "client_id": SIM_CLIENT_ID, "client_secret": SIM_CLIENT_SECRET,
            "username": SIM_USER, "password": SIM_PASSWORD, **extra}
    return requests.post(f"{url}/oauth_token.do", data=data, timeout=10)


def ci(key: str, name: str | None = None, cls: str = "cmdb_ci_ot_plc", serial: str | None = None,
       macs: tuple[str, ...] = (), ips: tuple[str, ...] = (), **values) -> dict:
    item = {"className": cls, "values": {**({"name": name} if name else {}), **values},
            "lookup": [{"className": "cmdb_ci_network_adapter", "values": {"mac_address": m, "name": m}} for m in macs]
            + [{"className": "cmdb_ci_ip_address", "values": {"ip_address": ip}} for ip in ips]
            + ([{"className": "cmdb_serial_number", "values": {"serial_number": serial,
                                                               "serial_number_type": "manufacturer"}}]
               if serial else [])}
    if key:
        item["sys_object_source_info"] = {"source_name": "MicrosoftDefenderIoT", "source_native_key": key}
    return item


def ire(url: str, items: list, path: str = "", params: dict | None = None, **body) -> dict:
    r = requests.post(f"{url}/api/now/identifyreconcile{path}", params=DS if params is None else params,
                      json={"items": items, **body}, auth=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["result"]


def errors_of(item: dict) -> list[str]:
    return [e["error"] for e in item.get("errors", [])]


# --------------------------------------------------------------------------- OAuth
def test_password_grant_shape_and_same_token_within_lifespan(servicenow_sim):
    first = token(servicenow_sim.url)
    assert first.status_code == 200
    body = first.json()
    assert set(body) == {"scope", "token_type", "expires_in", "refresh_token", "access_token"}
    assert body["token_type"] == "Bearer" and body["scope"] == "useraccount"
    assert body["expires_in"] == 1799 and isinstance(body["expires_in"], int)
    assert re.fullmatch(r"[A-Za-z0-9_-]{80,90}", body["access_token"])
    second = token(servicenow_sim.url).json()
    assert second["access_token"] == body["access_token"]
    assert second["refresh_token"] == body["refresh_token"]
    r = requests.get(f"{servicenow_sim.url}/api/now/table/incident",
                     headers={"Authorization": f"Bearer {body['access_token']}"}, timeout=10)
    assert r.status_code == 200 and r.json() == {"result": []}


def test_refresh_grant_echoes_refresh_token_and_issues_new_access_after_revocation(servicenow_sim):
    body = token(servicenow_sim.url).json()
    requests.post(f"{servicenow_sim.url}/sim/faults", json={"revoke_tokens": True}, timeout=10)
    r = requests.get(f"{servicenow_sim.url}/api/now/table/incident",
                     headers={"Authorization": f"Bearer {body['access_token']}"}, timeout=10)
    assert r.status_code == 401
    assert r.json() == {"error": {"message": "User Not Authenticated",
                                  "detail": "Required to provide Auth information"}, "status": "failure"}
    assert r.headers["WWW-Authenticate"] == 'Basic realm="Service-now"'
    refreshed = requests.post(f"{servicenow_sim.url}/oauth_token.do", data={
        "grant_type": "refresh_token", "client_id": SIM_CLIENT_ID, "client_secret": SIM_CLIENT_SECRET,
        "refresh_token": body["refresh_token"]}, timeout=10).json()
    assert refreshed["refresh_token"] == body["refresh_token"]
    assert refreshed["access_token"] != body["access_token"]
    r = requests.get(f"{servicenow_sim.url}/api/now/table/incident",
                     headers={"Authorization": f"Bearer {refreshed['access_token']}"}, timeout=10)
    assert r.status_code == 200
    requests.post(f"{servicenow_sim.url}/sim/faults", json={"revoke_refresh_tokens": True}, timeout=10)
    again = requests.post(f"{servicenow_sim.url}/oauth_token.do", data={
        "grant_type": "refresh_token", "client_id": SIM_CLIENT_ID, "client_secret": SIM_CLIENT_SECRET,
        "refresh_token": body["refresh_token"]}, timeout=10)
    assert again.status_code == 401


@pytest.mark.parametrize("variant", ["bad_password", "bad_secret", "json_body", "query_params", "unknown_grant"])
def test_token_errors_are_401_access_denied(servicenow_sim, variant):
    url = f"{servicenow_sim.url}/oauth_token.do"
    form = {"grant_type": "password", "client_id": SIM_CLIENT_ID, "client_secret": SIM_CLIENT_SECRET,
            "username": SIM_USER, "password": SIM_PASSWORD}
    if variant == "bad_password":
        r = requests.post(url, data={**form, "password": "wrong"}, timeout=10)
    elif variant == "bad_secret":
        r = requests.post(url, data={**form, "client_secret": "wrong"}, timeout=10)
    elif variant == "json_body":
        r = requests.post(url, json=form, timeout=10)
    elif variant == "query_params":
        r = requests.post(url, params=form, timeout=10)
    else:
        r = requests.post(url, data={**form, "grant_type": "authorization_code"}, timeout=10)
    assert r.status_code == 401
    assert r.json() == {"error_description": "access_denied", "error": "server_error"}


def test_client_credentials_grant(servicenow_sim, servicenow_sim_factory):
    data = {"grant_type": "client_credentials", "client_id": SIM_CLIENT_ID, "client_secret": SIM_CLIENT_SECRET}
    body = requests.post(f"{servicenow_sim.url}/oauth_token.do", data=data, timeout=10).json()
    assert "refresh_token" not in body and body["expires_in"] == 1799
    disabled = servicenow_sim_factory(client_credentials_enabled=False)
    assert requests.post(f"{disabled.url}/oauth_token.do", data=data, timeout=10).status_code == 401


def test_token_lifetime_fault_and_basic_auth_failures(servicenow_sim):
    requests.post(f"{servicenow_sim.url}/sim/faults", json={"token_lifetime": 60}, timeout=10)
    assert token(servicenow_sim.url).json()["expires_in"] == 59
    assert requests.get(f"{servicenow_sim.url}/api/now/table/incident", timeout=10).status_code == 401
    r = requests.get(f"{servicenow_sim.url}/api/now/table/incident", auth=(SIM_USER, "nope"), timeout=10)
    assert r.status_code == 401 and r.json()["status"] == "failure"
    requests.post(f"{servicenow_sim.url}/sim/faults", json={"reject_credentials": True}, timeout=10)
    assert requests.get(f"{servicenow_sim.url}/api/now/table/incident", auth=AUTH, timeout=10).status_code == 401
    assert token(servicenow_sim.url).status_code == 401


# --------------------------------------------------------------------------- Table API
@pytest.mark.parametrize("impact,urgency,priority", [("1", "1", "1"), ("1", "3", "3"), ("2", "2", "3"),
                                                     ("2", "3", "4"), ("3", "3", "5")])
def test_incident_insert_envelope_number_and_priority(servicenow_sim, impact, urgency, priority):
    r = requests.post(f"{servicenow_sim.url}/api/now/table/incident", auth=AUTH, timeout=10,
                      json={"short_description": "PLC firmware change", "impact": impact, "urgency": int(urgency),
                            "priority": "1", "correlation_id": "defender-iot:s1:7"})
    assert r.status_code == 201
    rec = r.json()["result"]
    assert r.headers["Location"] == f"{servicenow_sim.url}/api/now/table/incident/{rec['sys_id']}"
    assert re.fullmatch(r"[0-9a-f]{32}", rec["sys_id"])
    assert rec["number"] == "INC0010001" and rec["priority"] == priority and rec["urgency"] == urgency
    assert rec["state"] == "1" and rec["active"] == "true" and rec["close_code"] == ""
    assert rec["opened_by"]["link"].startswith(f"{servicenow_sim.url}/api/now/table/sys_user/")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rec["sys_created_on"])
    sir = requests.post(f"{servicenow_sim.url}/api/now/table/sn_si_incident", auth=AUTH, timeout=10,
                        json={"short_description": "x"}).json()["result"]
    assert sir["number"] == "SIR0010001" and sir["state"] == "10"


def test_record_errors_and_crud(servicenow_sim):
    url = f"{servicenow_sim.url}/api/now/table"
    r = requests.get(f"{url}/u_nope", auth=AUTH, timeout=10)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "Invalid table u_nope", "detail": None}, "status": "failure"}
    r = requests.get(f"{url}/incident/{'0' * 32}", auth=AUTH, timeout=10)
    assert r.status_code == 404
    assert r.json()["error"] == {"message": "No Record found",
                                 "detail": "Record doesn't exist or ACL restricts the record retrieval"}
    assert requests.post(f"{url}/incident", data="short_description=x", auth=AUTH, timeout=10,
                         headers={"Content-Type": "text/plain"}).status_code == 415
    sid = servicenow_sim.sim.insert("u_defender_iot_alert", {"u_alert_key": "s1:1", "u_title": "a"})["sys_id"]
    r = requests.patch(f"{url}/u_defender_iot_alert/{sid}", json={"u_title": "b"}, auth=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["result"]["u_title"] == "b"
    r = requests.put(f"{url}/u_defender_iot_alert/{sid}", json={"u_note": "n"}, auth=AUTH, timeout=10)
    assert r.json()["result"]["u_title"] == "b" and r.json()["result"]["sys_mod_count"] == "2"
    r = requests.delete(f"{url}/u_defender_iot_alert/{sid}", auth=AUTH, timeout=10)
    assert r.status_code == 204 and r.content == b""
    assert servicenow_sim.sim.table("u_defender_iot_alert") == []
    assert requests.get(f"{url}/sn_si_incident", params={"sysparm_query": "active=true"}, auth=AUTH,
                        timeout=10).json() == {"result": []}
    assert requests.get(f"{servicenow_sim.url}/api/now/v1/table/sn_si_incident", auth=AUTH,
                        timeout=10).status_code == 404


def test_absent_plugin_table_is_invalid(servicenow_sim_factory):
    handle = servicenow_sim_factory(absent_tables=("sn_si_incident",))
    r = requests.get(f"{handle.url}/api/now/table/sn_si_incident", auth=AUTH, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"] == "Invalid table sn_si_incident"


def test_sys_dictionary_lengths_cut_longer_values_and_a_plugin_table_can_appear(servicenow_sim_factory):
    handle = servicenow_sim_factory(absent_tables=("sn_si_incident",),
                                    column_lengths={"u_defender_iot_alert.u_alert_key": 40})
    url = f"{handle.url}/api/now/table"
    rows = requests.get(f"{url}/sys_dictionary", auth=AUTH, timeout=10, params={
        "sysparm_query": "nameINincident,task,u_defender_iot_alert^elementINcorrelation_id,u_alert_key",
        "sysparm_fields": "name,element,max_length"}).json()["result"]
    assert sorted(rows, key=lambda r: r["name"]) == [
        {"name": "task", "element": "correlation_id", "max_length": "100"},       # defined on task, as on an instance
        {"name": "u_defender_iot_alert", "element": "u_alert_key", "max_length": "40"}]
    r = requests.post(f"{url}/u_defender_iot_alert", json={"u_alert_key": "k" * 45}, auth=AUTH, timeout=10)
    assert r.status_code == 201 and r.json()["result"]["u_alert_key"] == "k" * 40   # cut silently
    r = requests.post(f"{url}/incident", json={"correlation_id": "c" * 120}, auth=AUTH, timeout=10)
    assert r.json()["result"]["correlation_id"] == "c" * 100
    handle.sim.add_table("sn_si_incident")                    # the plugin is activated
    r = requests.post(f"{url}/sn_si_incident", json={"correlation_id": "c" * 120}, auth=AUTH, timeout=10)
    assert r.status_code == 201 and r.json()["result"]["correlation_id"] == "c" * 100
    handle.sim.set_faults(deny_reads=["sys_dictionary"])
    r = requests.get(f"{url}/sys_dictionary", auth=AUTH, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["message"] == "Insufficient rights to query records"


def test_fail_next_after_lets_requests_through_first(servicenow_sim):
    servicenow_sim.sim.set_faults(fail_next={"status": 503, "count": 1, "path_prefix": "/api/now/table/incident",
                                             "after": 2})
    codes = [requests.get(f"{servicenow_sim.url}/api/now/table/incident", auth=AUTH, timeout=10).status_code
             for _ in range(4)]
    assert codes == [200, 200, 503, 200]


def test_resolving_without_close_code_is_a_data_policy_403(servicenow_sim):
    sid = servicenow_sim.sim.insert("incident", {"short_description": "x"})["sys_id"]
    url = f"{servicenow_sim.url}/api/now/table/incident/{sid}"
    r = requests.patch(url, json={"state": "6"}, auth=AUTH, timeout=10)
    assert r.status_code == 403 and "Data Policy Exception" in r.json()["error"]["detail"]
    r = requests.patch(url, json={"state": "7", "close_code": "Solution provided", "close_notes": "done"},
                       auth=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["result"]["active"] == "false"


def test_paging_link_header_and_total_count(servicenow_sim):
    for n in range(7):
        servicenow_sim.sim.insert("incident", {"short_description": f"n{n}"})
    url = f"{servicenow_sim.url}/api/now/table/incident"
    r = requests.get(url, params={"sysparm_limit": 3, "sysparm_query": "active=true"}, auth=AUTH, timeout=10)
    assert r.headers["X-Total-Count"] == "7"
    links = re.findall(r'<([^>]+)>;rel="(\w+)"', r.headers["Link"])
    assert [rel for _, rel in links] == ["first", "prev", "next", "last"]
    offsets = {rel: int(re.search(r"sysparm_offset=(-?\d+)", u).group(1)) for u, rel in links}
    assert offsets == {"first": 0, "prev": -1, "next": 3, "last": 6}
    assert ", " not in r.headers["Link"] and "sysparm_query=active%3Dtrue" in links[2][0]
    seen = [x["short_description"] for x in r.json()["result"]]
    nxt = dict((rel, u) for u, rel in links)["next"]
    while nxt:
        page = requests.get(nxt, auth=AUTH, timeout=10)
        seen += [x["short_description"] for x in page.json()["result"]]
        nxt = dict((rel, u) for u, rel in re.findall(r'<([^>]+)>;rel="(\w+)"', page.headers["Link"])).get("next")
    assert seen == [f"n{n}" for n in range(7)]
    explicit = requests.get(url, params={"sysparm_limit": 3, "sysparm_offset": 0}, auth=AUTH, timeout=10)
    assert 'rel="prev"' not in explicit.headers["Link"]
    assert "Link" not in requests.get(url, params={"sysparm_limit": 10}, auth=AUTH, timeout=10).headers
    assert "Link" not in requests.get(url, params={"sysparm_limit": 3, "sysparm_suppress_pagination_header": "true"},
                                      auth=AUTH, timeout=10).headers


def test_encoded_queries(servicenow_sim):
    sim = servicenow_sim.sim
    rows = [{"short_description": "alpha", "impact": "1", "urgency": "1", "correlation_id": "k1", "category": "x"},
            {"short_description": "beta", "impact": "2", "urgency": "2", "correlation_id": "k2"},
            {"short_description": "alphabet", "impact": "3", "urgency": "3", "correlation_id": "k3", "category": "y"}]
    ids = [sim.insert("incident", r, user=SIM_USER)["sys_id"] for r in rows]
    sim.update(ids[2], {"state": "7", "close_code": "Duplicate", "close_notes": "n"})

    def numbers(query: str, **params) -> list[str]:
        r = requests.get(f"{servicenow_sim.url}/api/now/table/incident", auth=AUTH, timeout=10,
                         params={"sysparm_query": query, "sysparm_fields": "short_description", **params})
        assert r.status_code == 200, r.text
        return [x["short_description"] for x in r.json()["result"]]

    assert numbers("short_descriptionSTARTSWITHalpha") == ["alpha", "alphabet"]
    assert numbers("correlation_idINk1,k3,zz^ORDERBYDESCshort_description") == ["alphabet", "alpha"]
    assert numbers("priority=1^ORpriority=5") == ["alpha", "alphabet"]
    assert numbers("active=true^short_description!=alpha") == ["beta"]
    assert numbers("categoryISEMPTY") == ["beta"] and numbers("categoryISNOTEMPTY") == ["alpha", "alphabet"]
    assert numbers("stateNOT IN6,7,8^ORDERBYpriority") == ["alpha", "beta"]
    assert numbers("short_description=beta^NQcategory=y") == ["beta", "alphabet"]
    assert numbers("sys_created_on>=javascript:gs.daysAgo(1)^sys_created_on<2999-01-01 00:00:00") == [
        "alpha", "beta", "alphabet"]
    assert numbers("sys_created_on<2000-01-01 00:00:00") == []
    assert numbers("u_no_such_field=1^short_descriptionLIKEbet") == ["beta", "alphabet"]  # invalid part ignored
    assert numbers("opened_by.user_name=admin^impact<=2") == ["alpha", "beta"]
    assert numbers("", short_description="beta") == ["beta"]  # name=value pairs


def test_references_display_values_and_dot_walk_fields(servicenow_sim):
    sim = servicenow_sim.sim
    plc = sim.insert("cmdb_ci_ot_plc", {"name": "plc-1"})["sys_id"]
    sim.insert("incident", {"short_description": "x", "cmdb_ci": plc, "impact": "2", "urgency": "1"})
    url = f"{servicenow_sim.url}/api/now/table/incident"
    rec = requests.get(url, params={"sysparm_fields": "cmdb_ci,priority,cmdb_ci.name,nonexistent"},
                       auth=AUTH, timeout=10).json()["result"][0]
    assert rec == {"cmdb_ci": {"link": f"{servicenow_sim.url}/api/now/table/cmdb_ci/{plc}", "value": plc},
                   "priority": "2", "cmdb_ci.name": "plc-1"}
    rec = requests.get(url, params={"sysparm_fields": "cmdb_ci,priority", "sysparm_exclude_reference_link": "true"},
                       auth=AUTH, timeout=10).json()["result"][0]
    assert rec == {"cmdb_ci": plc, "priority": "2"}
    rec = requests.get(url, params={"sysparm_fields": "cmdb_ci,priority", "sysparm_display_value": "all"},
                       auth=AUTH, timeout=10).json()["result"][0]
    assert rec["priority"] == {"display_value": "2 - High", "value": "2"}
    assert rec["cmdb_ci"]["display_value"] == "plc-1" and rec["cmdb_ci"]["value"] == plc


def test_parent_class_query_returns_subclasses(servicenow_sim):
    sim = servicenow_sim.sim
    sim.insert("cmdb_ci_ot_plc", {"name": "plc", "os": "x"})
    sim.insert("cmdb_ci_server", {"name": "srv", "os": "Linux"})
    sim.insert("incident", {"short_description": "not a CI"})
    r = requests.get(f"{servicenow_sim.url}/api/now/table/cmdb_ci_hardware", auth=AUTH, timeout=10,
                     params={"sysparm_fields": "name,sys_class_name,os"})
    assert r.json()["result"] == [{"name": "plc", "sys_class_name": "cmdb_ci_ot_plc"},
                                  {"name": "srv", "sys_class_name": "cmdb_ci_server"}]
    r = requests.get(f"{servicenow_sim.url}/api/now/table/cmdb_ci", auth=AUTH, timeout=10,
                     params={"sysparm_query": "sys_class_nameINSTANCEOFcmdb_ci_ot", "sysparm_fields": "name"})
    assert r.json()["result"] == [{"name": "plc"}]


def test_uri_too_long_and_not_acceptable(servicenow_sim):
    query = "correlation_idIN" + ",".join(f"defender-iot:sensor:{n}" for n in range(600))
    r = requests.get(f"{servicenow_sim.url}/api/now/table/incident", params={"sysparm_query": query}, auth=AUTH,
                     timeout=10)
    assert r.status_code == 414
    r = requests.get(f"{servicenow_sim.url}/api/now/table/incident", headers={"Accept": "text/csv"}, auth=AUTH,
                     timeout=10)
    assert r.status_code == 406


# --------------------------------------------------------------------------- Batch API
def test_batch_envelope(servicenow_sim):
    body = base64.b64encode(json.dumps({"short_description": "from batch"}).encode()).decode()
    hdrs = [{"name": "Content-Type", "value": "application/json"}, {"name": "Accept", "value": "application/json"}]
    payload = {"batch_request_id": 7, "rest_requests": [
        {"id": "a", "method": "POST", "url": "/api/now/table/incident", "headers": hdrs, "body": body},
        {"id": "b", "method": "GET", "url": "/api/now/table/incident?sysparm_fields=number", "headers": hdrs,
         "exclude_response_headers": True},
        {"id": "c", "method": "GET", "url": "/api/now/table/u_missing", "headers": hdrs}]}
    r = requests.post(f"{servicenow_sim.url}/api/now/v1/batch", json=payload, auth=AUTH, timeout=10)
    assert r.status_code == 200
    out = r.json()
    assert out["batch_request_id"] == "7" and out["unserviced_requests"] == []
    a, b, c = out["serviced_requests"]
    assert (a["id"], a["status_code"], a["status_text"]) == ("a", 201, "Created")
    assert json.loads(base64.b64decode(a["body"]))["result"]["number"] == "INC0010001"
    assert isinstance(a["execution_time"], int) and {"name": "Location", "value": a["headers"][1]["value"]} in a["headers"]
    assert b["headers"] == [] and json.loads(base64.b64decode(b["body"])) == {"result": [{"number": "INC0010001"}]}
    assert c["status_code"] == 400 and c["error_message"] == "Invalid table u_missing"
    for path in ("/api/now/batch", "/api/now/v2/batch"):
        r = requests.post(f"{servicenow_sim.url}{path}", json=payload, auth=AUTH, timeout=10)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "Requested URI does not represent any resource"


def test_batch_unserviced_requests(servicenow_sim_factory):
    handle = servicenow_sim_factory(batch_max_items=1)
    reqs = [{"id": str(i), "method": "GET", "url": "/api/now/table/incident"} for i in range(3)]
    out = requests.post(f"{handle.url}/api/now/v1/batch", json={"batch_request_id": "1", "rest_requests": reqs},
                        auth=AUTH, timeout=10).json()
    assert [s["id"] for s in out["serviced_requests"]] == ["0"] and out["unserviced_requests"] == ["1", "2"]


# --------------------------------------------------------------------------- IRE
def test_ire_insert_then_no_change(servicenow_sim):
    sim = servicenow_sim.sim
    item = ci("s1:1", "plc-1", serial="SN-1", macs=("00:11:22:33:44:55",), ips=("10.1.0.5",), vendor="Siemens")
    first = ire(servicenow_sim.url, [item])
    res = first["items"][0]
    assert res["operation"] == "INSERT" and re.fullmatch(r"[0-9a-f]{32}", res["sysId"])
    assert res["errorCount"] == 0 and "errors" not in res and first["hasError"] is False
    assert res["inputIndices"] == [0] and len(res["relatedSysIds"]) == 3
    rec = sim.get(res["sysId"])
    assert rec["sys_class_name"] == "cmdb_ci_ot_plc" and rec["discovery_source"] == "Other Automated"
    assert rec["first_discovered"] == rec["last_discovered"] != ""
    adapter = sim.table("cmdb_ci_network_adapter")[0]
    assert (adapter["name"], adapter["mac_address"], adapter["cmdb_ci"]) == ("00:11:22:33:44:55",) * 2 + (rec["sys_id"],)
    assert sim.table("cmdb_ci_ip_address")[0]["cmdb_ci"] == rec["sys_id"]
    assert sim.table("cmdb_serial_number")[0]["serial_number"] == "SN-1"
    src = sim.table("sys_object_source")[0]
    assert (src["name"], src["id"], src["target_sys_id"], src["target_table"]) == (
        "MicrosoftDefenderIoT", "s1:1", rec["sys_id"], "cmdb_ci_ot_plc")
    sim.update(rec["sys_id"], {"last_discovered": "2000-01-01 00:00:00"})
    again = ire(servicenow_sim.url, [item])["items"][0]
    assert again["operation"] == "NO_CHANGE" and again["sysId"] == rec["sys_id"]
    assert sim.get(rec["sys_id"])["last_discovered"] > "2000-01-01 00:00:00"
    changed = ire(servicenow_sim.url, [ci("s1:1", "plc-1", serial="SN-1", vendor="Rockwell")])["items"][0]
    assert changed["operation"] == "UPDATE" and sim.get(rec["sys_id"])["vendor"] == "Rockwell"
    assert len(sim.table("cmdb_ci_hardware")) == 1


def test_ire_identification_order(servicenow_sim):
    sim = servicenow_sim.sim
    url = servicenow_sim.url
    by_serial = ire(url, [ci("a:1", "dev-a", serial="SER-A")])["items"][0]["sysId"]
    by_mac = ire(url, [ci("a:2", "dev-b", macs=("aa:aa:aa:aa:aa:02",))])["items"][0]["sysId"]
    by_name = ire(url, [ci("a:3", "dev-c")])["items"][0]["sysId"]
    # other native keys (another sensor): the Hardware Rule's documented order is serial, name, MAC + name
    res = ire(url, [ci("b:9", "renamed", serial="SER-A"), ci("b:8", "renamed-2", macs=("AA:AA:AA:AA:AA:02",)),
                    ci("b:7", "dev-c")])["items"]
    assert [r["sysId"] for r in res] == [by_serial, by_mac, by_name]
    assert [(a["attemptResult"], a["attributes"]) for a in res[1]["identificationAttempts"]] == [
        ("SKIPPED", ["serial_number", "serial_number_type"]), ("SKIPPED", ["serial_number"]),
        ("NO_MATCH", ["name"]), ("MATCHED", ["mac_address", "name"])]
    assert len(sim.table("cmdb_ci_hardware")) == 3 and len(sim.table("sys_object_source")) == 6
    # the name is tried before the MAC: dev-c's name wins over dev-b's MAC
    both = ire(url, [ci("c:1", "dev-c", macs=("aa:aa:aa:aa:aa:02",))])["items"][0]
    assert both["sysId"] == by_name and both["identificationAttempts"][-1]["attributes"] == ["name"]
    # an adapter matches on MAC and name together: the same MAC under another adapter name is no match
    other = ire(url, [ci("c:2", "dev-z", macs=())])["items"][0]
    item = ci("c:3", "dev-y")
    item["lookup"] = [{"className": "cmdb_ci_network_adapter", "values": {"mac_address": "aa:aa:aa:aa:aa:02",
                                                                          "name": "eth0"}}]
    assert ire(url, [item])["items"][0]["sysId"] not in (by_mac, other["sysId"])


def test_ire_data_source_errors_commit_nothing(servicenow_sim):
    sim = servicenow_sim.sim
    missing = ire(servicenow_sim.url, [ci("s:1", "x"), ci("s:2", "y")], params={})
    assert missing["hasError"] is True
    assert [errors_of(i) for i in missing["items"]] == [["INVALID_INPUT_DATA"]] * 2
    assert "[null]" in missing["items"][0]["errors"][0]["message"]
    assert missing["items"][0]["sysId"] == "Unknown"
    invalid = ire(servicenow_sim.url, [ci("s:1", "x")], params={"sysparm_data_source": "Bogus"})
    assert "[Bogus]" in invalid["items"][0]["errors"][0]["message"]
    assert sim.table("cmdb_ci") == [] and sim.table("sys_object_source") == []


def test_ire_item_errors(servicenow_sim):
    sim = servicenow_sim.sim
    sim.insert("cmdb_ci_ot_plc", {"name": "twin"})
    sim.insert("cmdb_ci_ot_hmi", {"name": "twin"})
    res = ire(servicenow_sim.url, [
        {"className": "cmdb_ci_ot_plc", "values": {"vendor": "x"}},                # nothing to identify by
        ci("", "twin"),                                                            # two CIs named twin
        ci("", "ok", manufacturer="Siemens"),                                      # reference must be a sys_id
        {"className": "cmdb_ci_nope", "values": {"name": "z"}},
        ci("", "lk", macs=("", )),
    ])["items"]
    assert [errors_of(r) for r in res] == [["MISSING_MATCHING_ATTRIBUTES"], ["MULTI_MATCH"], ["INVALID_INPUT_DATA"],
                                           ["INVALID_INPUT_DATA"], ["MISSING_MATCHING_ATTRIBUTES"]]
    assert all(r["sysId"] == "Unknown" and r["errorCount"] == 1 for r in res)
    assert len(sim.table("cmdb_ci")) == 2


def test_ire_duplicates_options_and_dry_run(servicenow_sim):
    sim, url = servicenow_sim.sim, servicenow_sim.url
    dup = [ci("s:1", "a"), ci("s:1", "a")]
    res = ire(url, dup)["items"]
    assert [errors_of(r) for r in res] == [["DUPLICATE_PAYLOAD_RECORDS"]] * 2
    assert "index 0 and 1" in res[1]["errors"][0]["message"] and sim.table("cmdb_ci") == []
    enhanced = ire(url, dup, "/enhanced", params={**DS, "options": "generate_summary:true"})
    assert [r["operation"] for r in enhanced["items"]] == ["INSERT", "NO_CHANGE"]
    assert enhanced["hasError"] is False and enhanced["hasWarning"] is False
    assert enhanced["summary"]["cmdb_ci_ot_plc"]["inserted"] == 1
    assert enhanced["items"][0]["identificationAttempts"][0]["info"] == "sys_object_source NO_MATCH"
    r = requests.post(f"{url}/api/now/identifyreconcile/enhanced", params={**DS, "options": "partial"},
                      json={"items": dup}, auth=AUTH, timeout=10)
    assert r.status_code == 500 and r.json()["error"]["detail"] == "Chunk [partial] is not a valid entry"
    strict = ire(url, [ci("s:5", "new"), {"className": "cmdb_ci_ot_plc", "values": {}}], "/enhanced",
                 params={**DS, "options": "partial_payloads:false,partial_commits:false"})
    assert [errors_of(r) for r in strict["items"]] == [["ABANDONED"], ["MISSING_MATCHING_ATTRIBUTES"]]
    before = len(sim.table("cmdb_ci"))
    dry = ire(url, [ci("s:6", "dry")], "/query")["items"][0]
    assert dry["operation"] == "INSERT" and len(sim.table("cmdb_ci")) == before


def test_ire_reclassification_and_relations(servicenow_sim):
    sim, url = servicenow_sim.sim, servicenow_sim.url
    sid = ire(url, [ci("s:1", "dev", cls="cmdb_ci_ot")])["items"][0]["sysId"]
    up = ire(url, [ci("s:1", "dev", cls="cmdb_ci_ot_plc"), ci("s:2", "eng", cls="cmdb_ci_ot_ews")],
             relations=[{"parent": 1, "child": 0, "type": "Sends data to::Receives data from"},
                        {"parent": 0, "child": 1, "type": "Nope::Nope"}])
    assert up["items"][0]["operation"] == "UPDATE_WITH_UPGRADE" and sim.where[sid] == "cmdb_ci_ot_plc"
    assert up["relations"][0]["operation"] == "INSERT" and errors_of(up["relations"][1]) == ["INVALID_INPUT_DATA"]
    rel = sim.table("cmdb_rel_ci")[0]
    assert (rel["parent"], rel["child"]) == (up["items"][1]["sysId"], sid)


def test_ire_rejects_non_json(servicenow_sim):
    r = requests.post(f"{servicenow_sim.url}/api/now/identifyreconcile", params=DS, data="items=1",
                      headers={"Content-Type": "application/x-www-form-urlencoded"}, auth=AUTH, timeout=10)
    assert r.status_code == 415


def test_ire_item_time_is_reported_as_delay(servicenow_sim):
    from include.simulators import servicenow_ire

    servicenow_sim.sim.set_faults(ire_item_ms=20)
    body = json.dumps({"items": [ci("s:1", "a"), ci("s:2", "b")]}).encode()
    reply = servicenow_ire.handle(servicenow_sim.sim, "", DS, body, {"content-type": "application/json"}, SIM_USER)
    assert reply.delay == pytest.approx(0.04)


# --------------------------------------------------------------------------- CMDB Instance API
def test_cmdb_instance_create_read_update_list_and_errors(servicenow_sim):
    url = f"{servicenow_sim.url}/api/now/cmdb/instance/cmdb_ci_ot_plc"
    made = requests.post(url, json={"source": "Other Automated", "attributes": {"name": "plc-ci-1"}},
                         auth=AUTH, timeout=10)
    assert made.status_code == 200, made.text
    sys_id = made.json()["result"]["attributes"]["sys_id"]
    assert made.json()["result"]["attributes"]["name"] == "plc-ci-1"
    again = requests.post(url, json={"source": "Other Automated", "attributes": {"name": "plc-ci-1"}},
                          auth=AUTH, timeout=10)
    assert again.json()["result"]["attributes"]["sys_id"] == sys_id  # identified by name, not a second CI
    patched = requests.patch(f"{url}/{sys_id}", json={"source": "Other Automated",
                                                      "attributes": {"serial_number": "SN-9"}}, auth=AUTH, timeout=10)
    assert patched.status_code == 200 and patched.json()["result"]["attributes"]["serial_number"] == "SN-9"
    read = requests.get(f"{url}/{sys_id}", auth=AUTH, timeout=10).json()["result"]
    assert read["outbound_relations"] == [] and read["inbound_relations"] == []
    listed = requests.get(url, auth=AUTH, timeout=10).json()["result"]
    assert listed == [{"sys_id": sys_id, "name": "plc-ci-1"}]
    bad_source = requests.post(url, json={"source": "Nope", "attributes": {"name": "x"}}, auth=AUTH, timeout=10)
    assert bad_source.status_code == 400 and "Nope" in bad_source.text
    missing = requests.get(f"{url}/{'0' * 32}", auth=AUTH, timeout=10)
    assert missing.status_code == 404
    not_ci = requests.get(f"{servicenow_sim.url}/api/now/cmdb/instance/incident", auth=AUTH, timeout=10)
    assert not_ci.status_code == 400


# --------------------------------------------------------------------------- Import Set API
def test_import_set_row_results(servicenow_sim):
    url = f"{servicenow_sim.url}/api/now/import/u_defender_iot_alert_import"
    r = requests.post(url, json={"u_alert_key": "s1:1", "u_title": "x"}, auth=AUTH, timeout=10)
    assert r.status_code == 201
    body = r.json()
    assert body["staging_table"] == "u_defender_iot_alert_import" and body["result"][0]["status"] == "inserted"
    again = requests.post(url, json={"u_alert_key": "s1:1", "u_title": "y"}, auth=AUTH, timeout=10).json()
    assert again["result"][0]["status"] == "updated" and again["result"][0]["sys_id"] == body["result"][0]["sys_id"]
    servicenow_sim.sim.set_faults(import_error_next=1)
    err = requests.post(url, json={"u_alert_key": "s1:2"}, auth=AUTH, timeout=10)
    assert err.status_code == 201 and err.json()["result"][0]["status"] == "error"
    assert err.json()["result"][0]["error_message"] == "Target record not found"


# --------------------------------------------------------------------------- faults
def test_rate_limit_429_headers(servicenow_sim_factory):
    handle = servicenow_sim_factory(rate_limit_per_hour=2)
    url = f"{handle.url}/api/now/table/incident"
    ok = requests.get(url, auth=AUTH, timeout=10)
    assert ok.status_code == 200 and ok.headers["X-RateLimit-Limit"] == "2"
    assert "X-RateLimit-Remaining" not in ok.headers
    requests.get(url, auth=AUTH, timeout=10)
    r = requests.get(url, auth=AUTH, timeout=10)
    assert r.status_code == 429
    assert r.json() == {"error": {"message": "Rate limit exceeded",
                                  "detail": "Rate limit of 2 requests per hour for Table API exceeded"},
                        "status": "failure"}
    assert 3500 <= int(r.headers["Retry-After"]) <= 3600
    assert int(r.headers["X-RateLimit-Reset"]) > time.time()
    assert r.headers["X-RateLimit-Rule"] and "X-RateLimit-Remaining" not in r.headers
    assert requests.get(f"{handle.url}/sim/counters", timeout=10).json()["rate_limited"] == 1


def test_hibernation_page(servicenow_sim):
    requests.post(f"{servicenow_sim.url}/sim/faults", json={"hibernate": True}, timeout=10)
    for r in (requests.get(f"{servicenow_sim.url}/api/now/table/incident", auth=AUTH, timeout=10), token(servicenow_sim.url)):
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
        assert "<title>Instance Hibernating page</title>" in r.text and "<html>" in r.text
        with pytest.raises(ValueError):
            r.json()
    assert requests.get(f"{servicenow_sim.url}/sim/state", timeout=10).status_code == 200


def test_truncated_json_then_recovery(servicenow_sim):
    for n in range(4):
        servicenow_sim.sim.insert("incident", {"short_description": f"n{n}"})
    servicenow_sim.sim.set_faults(truncate_next=1)
    url = f"{servicenow_sim.url}/api/now/table/incident"
    r = requests.get(url, auth=AUTH, timeout=10)
    assert r.status_code == 200 and "Transaction cancelled: maximum execution time exceeded" in r.text
    with pytest.raises(ValueError):
        json.loads(r.text)
    assert len(requests.get(url, auth=AUTH, timeout=10).json()["result"]) == 4


def test_fail_next_by_path_prefix(servicenow_sim):
    requests.post(f"{servicenow_sim.url}/sim/faults", timeout=10,
                  json={"fail_next": {"count": 1, "status": 502, "path_prefix": "/api/now/identifyreconcile"}})
    assert requests.get(f"{servicenow_sim.url}/api/now/table/incident", auth=AUTH, timeout=10).status_code == 200
    r = requests.post(f"{servicenow_sim.url}/api/now/identifyreconcile", params=DS, json={"items": []},
                      auth=AUTH, timeout=10)
    assert r.status_code == 502 and "502 Bad Gateway" in r.text and "nginx" in r.text
    assert requests.post(f"{servicenow_sim.url}/api/now/identifyreconcile", params=DS, json={"items": []},
                         auth=AUTH, timeout=10).status_code == 200
    requests.post(f"{servicenow_sim.url}/sim/faults", json={"deny_writes": ["incident"]}, timeout=10)
    r = requests.post(f"{servicenow_sim.url}/api/now/table/incident", json={}, auth=AUTH, timeout=10)
    assert r.status_code == 403 and "ACL Exception Insert Failed" in r.json()["error"]["detail"]
    assert requests.post(f"{servicenow_sim.url}/sim/faults", json={"bogus": 1}, timeout=10).status_code == 400


def test_control_routes(servicenow_sim):
    url = servicenow_sim.url
    ire(url, [ci("s:1", "plc-demo")])
    servicenow_sim.sim.insert("incident", {"short_description": "<b>alert</b>"})
    page = requests.get(f"{url}/sim/", timeout=10)
    assert page.status_code == 200 and "plc-demo" in page.text and "&lt;b&gt;alert&lt;/b&gt;" in page.text
    state = requests.get(f"{url}/sim/state", timeout=10).json()
    assert state["tables"]["cmdb_ci_ot_plc"] == 1 and state["tables"]["incident"] == 1
    assert state["tables"]["sys_choice"] >= 4
    counters = requests.get(f"{url}/sim/counters", timeout=10).json()
    assert counters["requests"] == 1 and counters["by_route"] == {"POST /api/now/identifyreconcile": 1}
    assert requests.get(f"{url}/sim/tables/incident", timeout=10).json()["records"][0]["number"] == "INC0010001"
    assert requests.post(f"{url}/sim/reset", timeout=10).status_code == 200
    assert servicenow_sim.sim.table("incident") == [] and servicenow_sim.sim.counters()["requests"] == 0


def test_standard_choices_and_cli():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "include.simulators.servicenow_sim", "--port", str(port),
                             "--rate-limit-per-hour", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/api/now/table/sys_choice", auth=AUTH, timeout=2,
                                 params={"sysparm_query": "name=cmdb_ci^element=discovery_source",
                                         "sysparm_fields": "value"})
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.2)
        values = {x["value"] for x in r.json()["result"]}
        assert {"Other Automated", "ServiceNow", "SCCM", "Manual via IRE"} <= values
        assert r.headers["X-RateLimit-Limit"] == "100"
    finally:
        proc.terminate()
        proc.wait(10)


def test_ire_related_entries_are_stored_and_compared(servicenow_sim):
    """Related entries of the OT rule (cmdb_key_value, cmdb_ot_entity) land linked to the CI; an unknown
    related class is refused, and a changed related value makes an UPDATE, not a NO_CHANGE."""
    import requests

    from include.simulators.servicenow_sim import SIM_PASSWORD, SIM_USER

    def ire(related):
        item = {"className": "cmdb_ci_ot_plc", "values": {"name": "PLC-9"},
                "lookup": [{"className": "cmdb_ci_network_adapter",
                            "values": {"name": "00:11:22:33:44:55", "mac_address": "00:11:22:33:44:55"}}],
                "related": related,
                "sys_object_source_info": {"source_name": "MicrosoftDefenderIoT", "source_native_key": "s:9"}}
        r = requests.post(f"{servicenow_sim.url}/api/now/identifyreconcile",
                          params={"sysparm_data_source": "Other Automated"}, json={"items": [item]},
                          auth=(SIM_USER, SIM_PASSWORD), timeout=10)
        assert r.status_code == 200
        return r.json()["result"]["items"][0]

    related = [{"className": "cmdb_ot_entity", "values": {"ot_asset_type": "PLC", "purdue_level": "1"}},
               {"className": "cmdb_key_value", "values": {"key": "defender.protocols", "value": "MODBUS"}}]
    first = ire(related)
    assert first["operation"] == "INSERT"
    sim = servicenow_sim.sim
    (entity,) = sim.table("cmdb_ot_entity")
    assert entity["ot_device"] == first["sysId"] and entity["purdue_level"] == "1"
    (kv,) = sim.table("cmdb_key_value")
    assert (kv["configuration_item"], kv["key"], kv["value"]) == (first["sysId"], "defender.protocols", "MODBUS")

    assert ire(related)["operation"] == "NO_CHANGE"
    related[1]["values"]["value"] = "MODBUS, DNP3"
    assert ire(related)["operation"] == "UPDATE"
    assert [r["value"] for r in sim.table("cmdb_key_value")] == ["MODBUS, DNP3"]

    bad = ire([{"className": "cmdb_not_a_related_table", "values": {"x": "1"}}])
    assert bad["errors"][0]["error"] == "IDENTIFICATION_RULE_FOR_RELATED_ITEM_MISSING"
    dup = ire([{"className": "cmdb_key_value", "values": {"key": "k", "value": "1"}},
               {"className": "cmdb_key_value", "values": {"key": "k", "value": "2"}}])
    assert dup["errors"][0]["error"] == "DUPLICATE_RELATED_PAYLOAD"


def test_client_credentials_in_an_http_basic_header_are_accepted(servicenow_sim):
    """RFC 6749 2.3.1 (what ServiceNow accepts and PySNC sends); repeated grants keep one token."""
    basic = base64.b64encode(f"{SIM_CLIENT_ID}:{SIM_CLIENT_SECRET}".encode()).decode()
    data = {"grant_type": "password", "username": SIM_USER, "password": SIM_PASSWORD}
    answers = [requests.post(f"{servicenow_sim.url}/oauth_token.do", data=data, timeout=10,
                             headers={"Authorization": f"Basic {basic}"}) for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    assert len({a.json()["access_token"] for a in answers}) == 1            # the current token, re-issued
    assert token(servicenow_sim.url).json()["access_token"] == answers[0].json()["access_token"]
    assert len(servicenow_sim.sim.access) == 1                              # the token table does not grow
    wrong = base64.b64encode(f"{SIM_CLIENT_ID}:nope".encode()).decode()
    assert requests.post(f"{servicenow_sim.url}/oauth_token.do", data=data, timeout=10,
                         headers={"Authorization": f"Basic {wrong}"}).status_code == 401
