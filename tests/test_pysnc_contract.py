"""Contract test: ServiceNow's own Python client (PySNC) against the ServiceNow simulator.

PySNC's password grant sends the OAuth client credentials in an HTTP Basic header (RFC 6749 2.3.1), as
ServiceNow accepts; the simulator must accept it too. Then a query, paging and a batch delete.
"""

from __future__ import annotations

import subprocess

import pytest

from include.simulators.servicenow_sim import SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_PASSWORD, SIM_USER


@pytest.fixture
def tls_sim(tmp_path):
    """The simulator over HTTPS (PySNC refuses http://), with a throw-away self-signed certificate."""
    from include.simulators import servicenow_sim as sn
    from include.simulators.runner import serve_in_thread

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    app = sn.create_app()
    with serve_in_thread(app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as server:
        yield server.url, app.state.sim, str(cert)


def test_pysnc_password_grant_query_paging_and_batch_delete(tls_sim, monkeypatch):
    from pysnc import ServiceNowClient
    from pysnc.auth import ServiceNowPasswordGrantFlow

    url, sim, cert = tls_sim
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", cert)   # PySNC's token request does not take `verify`
    flow = ServiceNowPasswordGrantFlow(SIM_USER, SIM_PASSWORD, SIM_CLIENT_ID, SIM_CLIENT_SECRET)
    client = ServiceNowClient(url, flow, verify=cert)
    for n in range(25):
        sim.insert("incident", {"short_description": f"pysnc {n}", "correlation_id": f"pysnc:{n}"})
    gr = client.GlideRecord("incident", batch_size=10)          # 3 pages
    gr.add_query("correlation_id", "STARTSWITH", "pysnc:")
    gr.query()
    assert sorted(r.correlation_id for r in gr) == sorted(f"pysnc:{n}" for n in range(25))
    one = client.GlideRecord("incident")
    assert one.get("correlation_id", "pysnc:7") and one.short_description == "pysnc 7"
    doomed = client.GlideRecord("incident", batch_size=10)
    doomed.add_query("correlation_id", "STARTSWITH", "pysnc:")
    doomed.query()
    doomed.delete_multiple()
    assert [r for r in sim.table("incident") if r.get("correlation_id", "").startswith("pysnc:")] == []
