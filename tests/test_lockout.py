"""Case 7: after ServiceNow rejects the credentials, no further login is tried for that connection until
its settings change or the cool-down passes; every run in between fails without a request."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from defender_servicenow import forwarding as fwd
from defender_servicenow.hooks.lockout import AuthGuard
from defender_servicenow.hooks.servicenow import ServiceNowHook
from defender_servicenow.sources import source_for

from tests.test_forwarding import SRC, DictState, baseline, rules_with


def test_rejected_credentials_stop_further_logins(defender_sim_factory, servicenow_conn, monkeypatch):
    d = defender_sim_factory(mode="sensor", alerts=0)
    sn = servicenow_conn
    rules = rules_with()
    state, auth = DictState(), DictState()
    now = [datetime.now(timezone.utc)]
    guard = lambda conn: AuthGuard(auth, "servicenow", conn, cooldown_minutes=30, clock=lambda: now[0])  # noqa: E731

    def engine():
        return fwd.AlertForwarder(rules, state, defender_hook=source_for,
                                  servicenow_hook=lambda c: ServiceNowHook(c, max_retry_time=1, auth_guard=guard(c)))

    baseline(rules, state, [SRC])
    d.sim.add_alerts(2, severity="Major", engine="Anomaly", title="Address Scan Detected")
    sn.sim.set_faults(reject_credentials=True, revoke_tokens=True)
    (first,) = engine().run([SRC])
    assert first.credentials_rejected and auth.data["servicenow:servicenow_default"]["status"] == "credentials_rejected"
    record = json.dumps(auth.data)
    assert "sim-Password-1" not in record and "sim-client-secret" not in record
    sent = sn.sim.counters()["requests"]
    for _ in range(3):   # each trigger event: a run that fails plainly without a request
        (again,) = engine().run([SRC])
        assert again.credentials_rejected and "lock-out guard" in again.failures[0].answer
    assert sn.sim.counters()["requests"] == sent
    now[0] += timedelta(minutes=31)          # cool-down over; the admin fixed the user meanwhile
    sn.sim.set_faults(reject_credentials=False)
    (fixed,) = engine().run([SRC])
    assert fixed.created == 2 and auth.data["servicenow:servicenow_default"]["status"] == "ok"
