"""Column lengths of the key columns the alert forwarding writes (``correlation_id`` on incidents,
``u_alert_key`` on the application table), read from the instance's ``sys_dictionary`` once per run and
ServiceNow connection, before the first record is created.

ServiceNow cuts a string longer than its column's ``max_length`` silently. A cut key never matches its own
look-up, so every run would create the record again; instead, a destination whose key column is too short
for the keys about to be written fails with :class:`ColumnTooShortError`, naming table and column (its
alerts stay pending, the run ends failed). An instance where the integration user cannot read
``sys_dictionary`` (an ACL: a 403, or rows filtered away) gets one warning per run and is not checked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from defender_servicenow.exceptions import ServiceNowAuthError, ServiceNowError
from defender_servicenow.rules import Destination

log = logging.getLogger(__name__)

KEY_COLUMNS = {"incidents": "correlation_id", "defender_for_iot_application": "u_alert_key"}
TASK = "task"   # incident and sn_si_incident extend task, where correlation_id is defined
# What the README asks for (its "Column lengths" table); shown in the error.
MINIMUM = {"correlation_id": 100, "u_alert_key": 255}


class ColumnTooShortError(ServiceNowError):
    """A key column would cut the keys of this run (retrying cannot help: the column must be widened)."""


def key_column(dest: Destination) -> str:
    return KEY_COLUMNS.get(dest.report_type, "u_alert_key")


def dictionary_tables(dest: Destination) -> tuple[str, ...]:
    """Where the key column's dictionary entry can be: the table itself, or ``task`` for incident tables."""
    return (dest.table, TASK) if dest.report_type == "incidents" else (dest.table,)


def length_of(lengths: Mapping[tuple[str, str], int], dest: Destination) -> int | None:
    column = key_column(dest)
    return next((lengths[(t, column)] for t in dictionary_tables(dest) if (t, column) in lengths), None)


def check(dest: Destination, length: int | None, keys: Iterable[str]) -> None:
    """Raise :class:`ColumnTooShortError` when a key is longer than the column holds (``None``: unknown)."""
    if length is None:
        return
    longest = max(keys, key=len, default="")
    if len(longest) > length:
        column = key_column(dest)
        raise ColumnTooShortError(
            f"{dest.table}.{column} holds {length} characters on {dest.connection_id} (sys_dictionary), but "
            f"keys of this run need up to {len(longest)} (e.g. {longest!r}): ServiceNow would cut them and every "
            f"run would create the records again. Make {dest.table}.{column} at least {MINIMUM[column]} "
            "characters long (README, column lengths); nothing is written there until then")


class ColumnLengths:
    """The key column lengths of one run, read once per ServiceNow connection for all its destinations."""

    def __init__(self, destinations: Iterable[Destination]):
        self.destinations = sorted(set(destinations))
        self._by_conn: dict[str, dict[tuple[str, str], int]] = {}

    def check(self, hook, dest: Destination, keys: Iterable[str]) -> None:
        if dest.connection_id not in self._by_conn:
            self._by_conn[dest.connection_id] = self._read(hook, dest.connection_id)
        check(dest, length_of(self._by_conn[dest.connection_id], dest), keys)

    def _read(self, hook, conn: str) -> dict[tuple[str, str], int]:
        dests = [d for d in self.destinations if d.connection_id == conn]
        tables = sorted({t for d in dests for t in dictionary_tables(d)})
        columns = sorted({key_column(d) for d in dests})
        try:
            rows = hook.query("sys_dictionary", f"nameIN{','.join(tables)}^elementIN{','.join(columns)}",
                              fields=["name", "element", "max_length"])
        except ServiceNowAuthError:
            raise
        except ServiceNowError as exc:
            log.warning("Could not read column lengths from sys_dictionary on %s (%s): keys are not checked for "
                        "truncation in this run. Give the integration user read access to sys_dictionary, or make "
                        "sure the key columns are long enough (README, column lengths)", conn, exc)
            return {}
        out = {}
        for row in rows:
            try:
                out[(str(row.get("name")), str(row.get("element")))] = int(str(row.get("max_length")))
            except ValueError:
                continue
        missing = [f"{d.table}.{key_column(d)}" for d in dests if length_of(out, d) is None]
        if missing:
            log.warning("sys_dictionary on %s shows no length for %s (no read access to those entries?): they are "
                        "not checked for truncation in this run; make sure they are long enough (README, column "
                        "lengths)", conn, ", ".join(missing))
        return out
