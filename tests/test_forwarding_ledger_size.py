"""The delivery ledger within the asset state store's value limit (done kept in segments), and a broken
destination that must not widen every run's Defender read (parked alerts retried slice by slice)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

from defender_servicenow import forwarding as fwd
from defender_servicenow.ledger import Ledger, dest_text, ledger_key
from defender_servicenow.ledger_state import LedgerState, done_segment_key, segment_key
from defender_servicenow.models import datetime_to_ms
from defender_servicenow.rules import parse_rules
from defender_servicenow.sources import source_for
from defender_servicenow.sync_state import max_value_bytes

from tests.test_forwarding import EPOCH, PLC_TITLE, DictState, baseline, cid, done, forwarder, pending, routes

HOUR_MS = 3_600_000


def _limit() -> int:
    from airflow.configuration import conf

    limit = max_value_bytes()
    assert limit == conf.getint("state_store", "max_value_storage_bytes") > 0
    return limit


class SizedState(DictState):
    """Records the size of every value written, as Airflow measures it (``len(json.dumps(value))``)."""

    def __init__(self, data=None):
        super().__init__(data)
        self.sizes: list[tuple[str, int]] = []

    def set(self, key, value):
        self.sizes.append((key, len(json.dumps(value))))
        super().set(key, value)

    def delete(self, key):
        self.data.pop(key, None)


def _no_rule_matches():
    return parse_rules({"rules": [{"name": "crit", "minimum_severity": "Critical",
                                   "actions": [{"type": "servicenow"}]}]}, default_connection_id="servicenow_default")


def test_a_large_reconcile_window_stays_within_the_state_store_value_limit(defender_sim_factory, servicenow_conn):
    """1,500 alerts in the window (each needs a `done` entry): no value passes Airflow's configured
    max_value_storage_bytes, and the next run still recognises every one of them (nothing read twice)."""
    conn = "defender_ledger_size_a"
    d = defender_sim_factory(mode="sensor", alerts=0, conn_id=conn)
    limit = _limit()
    rules = _no_rule_matches()
    state = SizedState({"rule_first_seen:crit": EPOCH})
    baseline(rules, state, [conn])
    d.sim.add_alerts(1500, severity="Major", engine="Anomaly", title="Address Scan Detected")
    (report,) = forwarder(rules, state).run([conn])
    assert report.unmatched == 1500 and not report.failed
    assert max(size for _, size in state.sizes) <= limit
    assert len(done(state, conn)) == 1500
    assert "done" not in state.data[ledger_key(conn)]
    before = routes(servicenow_conn)
    (again,) = forwarder(rules, state).run([conn])
    assert (again.seen, again.unmatched) == (0, 0) and routes(servicenow_conn) == before


def test_saving_per_chunk_writes_only_the_newest_segment_within_the_limit():
    """10,000 confirmed alerts saved per 100-alert chunk (the benchmark's volume): each save writes the
    segment it appended to (two when one fills) and the main value only when pending changed; pruning
    rewrites only the oldest segments; a reload sees the same `done`."""
    limit = _limit()
    state, src = SizedState(), "defender_ledger_size_b"
    t0 = datetime_to_ms(datetime(2026, 1, 1, tzinfo=timezone.utc))
    store = LedgerState(state, src, limit)
    ledger = Ledger(floor_ms=t0, keys_since_ms=t0)
    store.save(ledger)
    per_save = []
    for chunk in range(100):
        for i in range(100):
            n = chunk * 100 + i
            ledger.done[f"{src}:{100000 + n}@{t0 + n * 1000}"] = t0 + n * 1000
        per_save.append(store.save(ledger))
    segments = state.data[ledger_key(src)]["done_segments"]
    assert len(segments) >= 3 and max(size for _, size in state.sizes) <= limit
    assert max(per_save) <= 3                              # when a segment fills: it, the next, the main value
    main_writes = sum(1 for key, _ in state.sizes[1:] if key == ledger_key(src))
    assert main_writes == len(segments)                     # only when the segment list changed
    assert sum(per_save) <= 100 + 2 * len(segments)
    assert {key for key, _ in state.sizes} <= {ledger_key(src), *(done_segment_key(src, s) for s in segments)}
    assert LedgerState(state, src, limit).load().done == ledger.done
    state.sizes.clear()
    ledger.prune(t0 + 1000 * 1000)                          # the oldest 1,000 leave the window
    store.save(ledger)
    assert len(state.sizes) <= 3                            # the oldest segment(s) and the main value
    assert len(state.data[ledger_key(src)]["done_segments"]) <= len(segments)
    assert LedgerState(state, src, limit).load().done == ledger.done


def test_a_ledger_in_the_single_value_format_is_upgraded_without_forwarding_again(defender_sim_factory,
                                                                                     servicenow_conn):
    """Upgrade path: a ledger written by the previous version (`done` inline) is read as it is; its alerts
    are not forwarded again, and its `done` moves into segments."""
    conn = "defender_ledger_size_c"
    d = defender_sim_factory(mode="sensor", alerts=0, conn_id=conn)
    rules = parse_rules({"rules": [{"name": "all", "actions": [{"type": "servicenow"}]}]},
                        default_connection_id="servicenow_default")
    alerts = d.sim.add_alerts(5, severity="Major", engine="Malware", title=PLC_TITLE)
    keys = {f"{conn}:{a['id']}@{a['time']}": a["time"] for a in alerts}
    floor = min(keys.values()) - HOUR_MS
    state = SizedState({"rule_first_seen:all": EPOCH,
                        ledger_key(conn): {"floor_ms": floor, "keys_since_ms": floor, "done": keys, "pending": {}}})
    (report,) = forwarder(rules, state).run([conn])
    assert (report.seen, report.created) == (0, 0) and servicenow_conn.sim.table("incident") == []
    assert "done" not in state.data[ledger_key(conn)] and done(state, conn) == keys


def test_a_long_pending_list_stays_within_the_limit_and_round_trips():
    """A destination broken for days: 5,000 alerts pending (one or two destinations each, one no longer
    listed by Defender) are kept in capped segments, read back unchanged; delivering the oldest rewrites
    only the segments that held them."""
    from defender_servicenow.rules import Destination

    limit = _limit()
    state, src = SizedState(), "defender_ledger_size_f"
    t0 = datetime_to_ms(datetime(2026, 1, 1, tzinfo=timezone.utc))
    a, b = (dest_text(Destination("servicenow_default", "incidents", t)) for t in ("incident", "sn_si_incident"))
    ledger = Ledger(floor_ms=t0, keys_since_ms=t0)
    for n in range(5000):
        ledger.pending[f"{src}:{n}@{t0 + n * 60_000}"] = {"t": t0 + n * 60_000, "dests": [a, b] if n % 2 else [b]}
    ledger.pending[f"{src}:7@{t0 + 7 * 60_000}"]["unlisted"] = True
    store = LedgerState(state, src, limit)
    store.save(ledger)
    assert max(size for _, size in state.sizes) <= limit
    assert len(state.data[ledger_key(src)]["pending_segments"]) >= 2
    assert LedgerState(state, src, limit).load().pending == ledger.pending
    state.sizes.clear()
    for n in range(100):
        del ledger.pending[f"{src}:{n}@{t0 + n * 60_000}"]
    assert store.save(ledger) == 1 and state.sizes[0][0] == segment_key(src, "pending", 0)
    assert LedgerState(state, src, limit).load().pending == ledger.pending


def _critical_to_security_incidents():
    return parse_rules({"rules": [{"name": "crit", "minimum_severity": "Critical",
                                   "actions": [{"type": "servicenow", "table": "sn_si_incident"}]}]},
                       default_connection_id="servicenow_default")


def _an_hour_later(d, now: list, n: int) -> list[dict]:
    """Move the engine's clock on by an hour; the sensor raises ``n`` critical alerts a minute before."""
    now[0] += timedelta(hours=1)
    return d.sim.add_alerts(n, severity="Critical", engine="Malware", title=PLC_TITLE,
                            time=datetime_to_ms(now[0]) - 60_000)


class CountingSource:
    """A source that counts its alert reads and the alerts they return."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_alerts(self, **kw):
        records = self.inner.get_alerts(**kw)
        self.log[-1].append(len(records))
        return records


def test_a_destination_broken_for_longer_than_the_window_keeps_the_read_bounded(defender_sim_factory,
                                                                                servicenow_conn, caplog):
    """sn_si_incident refuses writes for 8 hours with a 1-hour reconcile window: every run reads the window
    and one window of parked alerts, not everything since the oldest parked one, says how many stay parked;
    once fixed, every parked alert lands exactly once and `done` is pruned to the window."""
    conn = "defender_ledger_size_d"
    d = defender_sim_factory(mode="sensor", alerts=0, conn_id=conn)
    sn, rules = servicenow_conn, _critical_to_security_incidents()
    now = [datetime.now(timezone.utc) - timedelta(hours=20)]
    reads: list[list[int]] = []

    def engine():
        reads.append([])
        return fwd.AlertForwarder(rules, state, defender_hook=lambda c: CountingSource(source_for(c), reads),
                                  servicenow_hook=forwarder(rules, state, retry_seconds=1).servicenow_hook,
                                  clock=lambda: now[0], reconcile_hours=1)

    state = DictState({"rule_first_seen:crit": EPOCH})
    engine().run([conn])
    sn.sim.set_faults(deny_writes=["sn_si_incident"])
    raised = []
    for _ in range(8):
        raised += _an_hour_later(d, now, 3)
        with caplog.at_level(logging.WARNING, logger="defender_servicenow.forwarding"):
            (report,) = engine().run([conn])
        assert report.failed and len(pending(state, conn)) == len(raised)
    assert max(len(r) for r in reads) <= 2 and max(sum(r) for r in reads) <= 6   # not 24 at the end
    assert "parked alert(s) older than the reconcile window" in caplog.text
    assert sn.sim.table("sn_si_incident") == []

    sn.sim.set_faults(deny_writes=[])
    for _ in range(12):
        now[0] += timedelta(hours=1)
        engine().run([conn])
        if not pending(state, conn):
            break
    assert pending(state, conn) == {}
    landed = sorted(r["correlation_id"] for r in sn.sim.table("sn_si_incident"))
    assert landed == sorted(cid(a, conn) for a in raised)                       # each exactly once
    assert all(t >= datetime_to_ms(now[0]) - HOUR_MS for t in done(state, conn).values())


def test_a_parked_alert_defender_no_longer_lists_does_not_hold_up_the_others(defender_sim_factory,
                                                                             servicenow_conn, caplog):
    """The oldest parked alert was purged by the appliance: the slice moves past it (it stays pending and
    counted, with a WARNING naming it) and the newer parked alerts still land."""
    conn = "defender_ledger_size_e"
    d = defender_sim_factory(mode="sensor", alerts=0, conn_id=conn)
    sn, rules = servicenow_conn, _critical_to_security_incidents()
    now = [datetime.now(timezone.utc) - timedelta(hours=10)]
    state = DictState({"rule_first_seen:crit": EPOCH})

    def run():
        return forwarder(rules, state, retry_seconds=1, clock=lambda: now[0], reconcile_hours=1).run([conn])

    run()
    sn.sim.set_faults(deny_writes=["sn_si_incident"])
    raised = []
    for _ in range(3):
        raised += _an_hour_later(d, now, 1)
        run()
    purged = raised[0]
    d.sim.alerts[:] = [a for a in d.sim.alerts if a["id"] != purged["id"]]
    sn.sim.set_faults(deny_writes=[])
    with caplog.at_level(logging.WARNING, logger="defender_servicenow.forwarding"):
        for _ in range(4):
            now[0] += timedelta(hours=1)
            (report,) = run()
    assert sorted(r["correlation_id"] for r in sn.sim.table("sn_si_incident")) == sorted(
        cid(a, conn) for a in raised[1:])
    assert list(pending(state, conn)) == [cid(purged, conn).removeprefix("defender-iot:")]
    assert report.pending == 1 and "no longer listed by Defender" in caplog.text
