"""Contract tests of the Azure simulator (Entra ID token, Resource Graph paging/quota/errors, alert PATCH)."""

from __future__ import annotations

import requests

from include.simulators.azure_sim import (
    SIM_CLIENT_ID,
    SIM_CLIENT_SECRET,
    SIM_READER_ID,
    SIM_SUBSCRIPTION,
    SIM_TENANT,
)

DEVICES = "iotsecurityresources | where type =~ 'microsoft.iotsecurity/locations/devicegroups/devices'"


def _token(url, client=SIM_CLIENT_ID, secret=SIM_CLIENT_SECRET, tenant=SIM_TENANT):
    return requests.post(f"{url}/{tenant}/oauth2/v2.0/token", data={
        "grant_type": "client_credentials", "client_id": client, "client_secret": secret,
        "scope": f"{url}/.default"}, timeout=10)


def _query(url, token, query, options=None, version="2024-04-01", **scope):
    body = {"query": query, "options": options or {}, **(scope or {"subscriptions": [SIM_SUBSCRIPTION]})}
    return requests.post(f"{url}/providers/Microsoft.ResourceGraph/resources?api-version={version}", json=body,
                         headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_token_endpoint_client_credentials(azure_sim_factory):
    sim = azure_sim_factory(token_lifetime=7)
    answer = _token(sim.url)
    assert answer.status_code == 200
    body = answer.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 7 and body["access_token"]
    wrong = _token(sim.url, secret="nope")
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client" and wrong.json()["error_codes"] == [7000215]
    assert wrong.json()["error_description"].startswith("AADSTS7000215")
    assert _token(sim.url, client="unknown").status_code == 400
    assert _token(sim.url, tenant="other").json()["error_codes"] == [90002]


def test_paging_with_skiptoken_only_when_id_projected(azure_sim_factory):
    sim = azure_sim_factory(devices=2300, quota=1000)
    token = _token(sim.url).json()["access_token"]
    query = DEVICES + " | project id, properties | order by id asc"
    seen, options, pages = [], {"$top": 1000, "resultFormat": "objectArray"}, 0
    while True:
        page = _query(sim.url, token, query, options).json()
        assert page["resultTruncated"] == "false" and page["count"] <= 1000
        seen += [r["id"] for r in page["data"]]
        pages += 1
        if "$skipToken" not in page:
            break
        options = {**options, "$skipToken": page["$skipToken"]}
    assert pages == 3 and len(seen) == len(set(seen)) == 2300 and seen == sorted(seen)
    no_id = _query(sim.url, token, DEVICES + " | project name", {"resultFormat": "objectArray"}).json()
    assert no_id["resultTruncated"] == "true" and "$skipToken" not in no_id and no_id["count"] == 1000
    take = _query(sim.url, token, DEVICES + " | project id | take 1500", {"resultFormat": "objectArray"}).json()
    assert take["resultTruncated"] == "true" and "$skipToken" not in take
    assert _query(sim.url, token, DEVICES, {"$top": 1001}).status_code == 400


def test_result_format_default_is_table_and_token_bound_to_query(azure_sim_factory):
    sim = azure_sim_factory(devices=1200)
    token = _token(sim.url).json()["access_token"]
    table = _query(sim.url, token, DEVICES + " | project id, name").json()
    assert set(table["data"]) == {"columns", "rows"} and table["data"]["columns"][0]["name"] == "id"
    skip = table["$skipToken"]
    other = _query(sim.url, token, DEVICES + " | project id", {"$skipToken": skip})
    assert other.status_code == 400


def test_unknown_query_is_400_with_arg_envelope(azure_sim_factory):
    sim = azure_sim_factory()
    token = _token(sim.url).json()["access_token"]
    answer = _query(sim.url, token, "resources | summarize count() by type")
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "BadRequest" and error["details"][0]["code"] == "InvalidQuery"
    assert "x-ms-user-quota-remaining" in answer.headers


def test_quota_headers_and_429(azure_sim_factory):
    sim = azure_sim_factory(quota=3, quota_window=60)
    token = _token(sim.url).json()["access_token"]
    remaining = [_query(sim.url, token, DEVICES).headers["x-ms-user-quota-remaining"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    throttled = _query(sim.url, token, DEVICES)
    assert throttled.status_code == 429 and throttled.json()["error"]["code"] == "RateLimiting"
    assert throttled.headers["x-ms-user-quota-resets-after"].startswith("00:0")


def test_expired_token_is_401(azure_sim_factory):
    import time

    sim = azure_sim_factory(token_lifetime=1)
    token = _token(sim.url).json()["access_token"]
    time.sleep(1.1)
    answer = _query(sim.url, token, DEVICES)
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "ExpiredAuthenticationToken"


def test_alert_patch_state_machine_and_403(azure_sim_factory):
    sim = azure_sim_factory(alerts=3)
    alert = sim.sim.alerts[0]
    url = f"{sim.url}{alert['id']}?api-version=2021-07-01-preview"
    admin = _token(sim.url).json()["access_token"]
    reader = _token(sim.url, client=SIM_READER_ID).json()["access_token"]

    def patch(token, status, version_url=url):
        return requests.patch(version_url, json={"properties": {"status": status}},
                              headers={"Authorization": f"Bearer {token}"}, timeout=10)

    denied = patch(reader, "Closed")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "AuthorizationFailed"
    assert alert["properties"]["status"] == "New"
    assert patch(admin, "Done").status_code == 400
    assert patch(admin, "Closed", url.replace("2021-07-01-preview", "2024-01-01")).status_code == 400
    closed = patch(admin, "Closed")
    assert closed.status_code == 200 and closed.json()["properties"]["status"] == "Closed"
    assert patch(admin, "Closed", url.replace(alert["name"], "unknown")).status_code == 404


def test_inventory_has_hard_cases(azure_sim_factory):
    sim = azure_sim_factory(devices=400, broken_every=100)
    devices = sim.sim.devices
    statuses = {d["properties"]["deviceStatus"] for d in devices}
    assert {"Active", "Removed", "Deleted"} <= statuses
    assert sum("id" not in d for d in devices) == 4
    assert any(not d["properties"]["nics"] for d in devices)
    assert any(len(d["properties"]["deviceName"] or "") > 200 for d in devices)
    assert any(any(ord(c) > 127 for c in d["properties"]["deviceName"] or "") for d in devices)
