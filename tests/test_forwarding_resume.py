"""Resume after a retry (issue #10): the delivery ledger is saved after every confirmed chunk, so an attempt
that ServiceNow stops answering, or that dies part way through a large backlog, is followed by a retry that
neither re-sends nor even looks up again the alerts ServiceNow already confirmed."""

from __future__ import annotations

from collections import Counter

import pytest
from defender_servicenow import forwarding as fwd
from defender_servicenow.hooks import _http
from defender_servicenow.hooks.servicenow import ServiceNowHook
from defender_servicenow.sources import source_for

from tests.test_forwarding import PLC_TITLE, SRC, DictState, baseline, cid, done, pending, routes, rules_with

BACKLOG = 450          # 5 chunks of 100
CONFIRMED = 200        # the first two chunks go through before the fault


class WorkerKilled(BaseException):
    """Stands for SIGKILL / an execution timeout: nothing after it runs, no ``finally`` bookkeeping counts."""


def creates(sn) -> int:
    """Incident creates ServiceNow received (Batch API items)."""
    return sn.sim.counters()["by_route"].get("batch POST /api/now/table/incident", 0)


def engine(rules, state, *, kill_at_batch: int | None = None, killed_after_send: bool = False):
    """The forwarder; with ``kill_at_batch`` the worker dies at that Batch API call (before it is sent, or
    after ServiceNow processed it but before the answer was used)."""
    calls = [0]

    def sn(conn_id):
        hook = ServiceNowHook(conn_id, max_retry_time=1)
        if kill_at_batch is not None:
            real = hook.batch

            def batch(requests_, **kw):
                calls[0] += 1
                if calls[0] == kill_at_batch:
                    if killed_after_send:
                        real(requests_, **kw)
                    raise WorkerKilled()
                return real(requests_, **kw)
            hook.batch = batch
        return hook

    return fwd.AlertForwarder(rules, state, defender_hook=source_for, servicenow_hook=sn)


@pytest.mark.parametrize("fault", ["servicenow_503", "worker_killed", "killed_after_send"])
def test_a_retry_resumes_after_the_last_confirmed_chunk(defender_sim_factory, servicenow_conn, monkeypatch, fault):
    d = defender_sim_factory(mode="sensor", alerts=0)
    sn = servicenow_conn
    monkeypatch.setattr(_http, "_sleep", lambda seconds: None)
    rules = rules_with()
    state = DictState()
    baseline(rules, state, [SRC])
    backlog = d.sim.add_alerts(BACKLOG, severity="Major", engine="Malware", title=PLC_TITLE)

    # Attempt 1: ServiceNow confirms two chunks, then fails (or the worker dies at the third chunk).
    if fault == "servicenow_503":
        sn.sim.set_faults(fail_next={"status": 503, "count": 10**6, "path_prefix": "/api/now/v1/batch", "after": 2})
        (first,) = engine(rules, state).run([SRC])
        assert first.created == CONFIRMED and len(first.failures) == BACKLOG - CONFIRMED
        sn.sim.faults.fail_next.clear()
    else:
        with pytest.raises(WorkerKilled):
            engine(rules, state, kill_at_batch=3, killed_after_send=fault == "killed_after_send").run([SRC])
    landed = len(sn.sim.table("incident"))
    assert landed == (CONFIRMED + 100 if fault == "killed_after_send" else CONFIRMED)
    assert len(done(state)) == CONFIRMED          # saved per confirmed chunk

    # Attempt 2 (the retry): only the unconfirmed alerts are looked up, only the missing ones created.
    created_before, routes_before = creates(sn), routes(sn)
    (retry,) = engine(rules, state).run([SRC])
    assert retry.failures == [] and retry.seen == BACKLOG - CONFIRMED
    assert (retry.created, retry.present) == (BACKLOG - landed, landed - CONFIRMED)
    assert creates(sn) - created_before == BACKLOG - landed                  # nothing confirmed is re-sent
    lookups = routes(sn).get("GET /api/now/table/incident", 0) - routes_before.get("GET /api/now/table/incident", 0)
    assert lookups == 3                                                      # 250 alerts: 3 chunks, not 5
    counts = Counter(r["correlation_id"] for r in sn.sim.table("incident"))
    assert set(counts) == {cid(a) for a in backlog} and set(counts.values()) == {1}
    assert pending(state) == {}
