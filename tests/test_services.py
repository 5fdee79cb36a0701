"""scripts/services.py without servers: what missing() names, and the distributed test's one-line skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scripts import services

ROOT = Path(__file__).resolve().parents[1]


def _without(monkeypatch, *, postgres: bool, redis: bool, runuser: bool = True, root: bool = False):
    real_which = services.shutil.which
    absent = {"redis-server"} if not redis else set()
    absent |= {"runuser"} if not runuser else set()
    monkeypatch.setattr(services, "postgres_bin", lambda: Path("/usr/lib/postgresql/15/bin") if postgres else None)
    monkeypatch.setattr(services.shutil, "which", lambda name, *a, **k: None if name in absent
                        else real_which(name, *a, **k) or f"/usr/bin/{name}")
    monkeypatch.setattr(services.os, "geteuid", lambda: 0 if root else 1000)


def test_missing_names_each_absent_server(monkeypatch):
    _without(monkeypatch, postgres=False, redis=False)
    assert services.missing() == ["PostgreSQL server (apt-get install postgresql)",
                                  "redis-server (apt-get install redis-server)"]
    _without(monkeypatch, postgres=True, redis=False)
    assert services.missing() == ["redis-server (apt-get install redis-server)"]
    _without(monkeypatch, postgres=True, redis=True)
    assert services.missing() == []


def test_missing_as_root_needs_runuser_for_postgres(monkeypatch):
    _without(monkeypatch, postgres=True, redis=True, runuser=False, root=True)
    assert services.missing() == ["runuser (util-linux), to run Postgres as a non-root user"]
    _without(monkeypatch, postgres=True, redis=True, runuser=False, root=False)
    assert services.missing() == []


def test_postgres_bin_prefers_the_newest_debian_server(monkeypatch):
    found = ["/usr/lib/postgresql/9/bin/initdb", "/usr/lib/postgresql/16/bin/initdb",
             "/usr/lib/postgresql/15/bin/initdb"]
    monkeypatch.setattr(services.glob, "glob", lambda pattern: list(found))
    assert services.postgres_bin() == Path("/usr/lib/postgresql/16/bin")


PLUGIN = '''
import shutil
from scripts import services

_which = shutil.which
services.postgres_bin = lambda: None
shutil.which = lambda name, *a, **k: None if name in ("redis-server", "initdb") else _which(name, *a, **k)
'''


def test_the_distributed_test_skips_with_one_line_without_postgres_and_redis(tmp_path):
    """What ``make test`` prints on a machine without the Debian packages: one SKIPPED line, nothing started."""
    (tmp_path / "no_servers.py").write_text(PLUGIN)
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no_servers", "-p", "no:cacheprovider",
                           "tests/test_distributed.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1, proc.stdout
    assert ("distributed engine test needs PostgreSQL server (apt-get install postgresql), "
            "redis-server (apt-get install redis-server)") in skipped[0]
    assert " passed" not in proc.stdout and " failed" not in proc.stdout and " error" not in proc.stdout
