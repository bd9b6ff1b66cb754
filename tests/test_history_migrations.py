"""History migrations under Alembic (issue 28): a migration killed midway leaves the database as it was, and 8
processes opening a fresh (or an old) database at once all succeed, on SQLite and on PostgreSQL."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, inspect

from app.history import db_version, list_cases, open_store, save_case
from tests.conftest import ROOT
from tests.test_history import PROV, _back_to_schema_1, _case, url  # noqa: F401  (the sqlite/postgresql fixture)

OPEN = ("import sys, time; sys.path.insert(0, {root!r}); from app.history import open_store; "
        "time.sleep(max(0.0, {start!r} - time.time())); open_store({url!r})")  # all open at the same instant


def _open_in(n: int, url: str, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """n processes opening the store at the same moment (each imports first, then waits for a shared start time)."""
    import time

    code = OPEN.format(root=str(ROOT), url=url, start=time.time() + 8.0)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})}) for _ in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def _columns(url: str) -> set[str]:
    eng = create_engine(url)
    try:
        return {c["name"] for c in inspect(eng).get_columns("frames")}
    finally:
        eng.dispose()


def test_a_migration_killed_midway_leaves_the_database_as_it_was(url):  # noqa: F811
    eng = open_store(url)
    results, verdict, data = _case()
    save_case(eng, "KEEP", "100X", verdict, results, data, PROV)
    _back_to_schema_1(eng, legacy=False)
    # killed (os._exit) right after 0002's ALTER TABLE, before its stamp: the transaction never commits
    [r] = _open_in(1, url, {"BREAKHIS_TEST_CRASH_IN_MIGRATION": "0002"})
    assert r.returncode == 9, r.stderr[-2000:]
    assert db_version(create_engine(url)) == 1 and "heatmap_png" not in _columns(url)
    eng = open_store(url)  # the next open migrates cleanly: no "duplicate column"
    assert db_version(eng) == 4 and "heatmap_png" in _columns(url)
    assert list_cases(eng)["label"].tolist() == ["KEEP"]


@pytest.mark.slow
@pytest.mark.parametrize("start", ["fresh", "schema-1"])
def test_eight_processes_opening_at_once_all_succeed(url, start):  # noqa: F811
    if start == "schema-1":
        eng = open_store(url)
        results, verdict, data = _case()
        save_case(eng, "OLD", "100X", verdict, results, data, PROV)
        _back_to_schema_1(eng, legacy=True)
    runs = _open_in(8, url)
    failed = [r.stderr.strip().splitlines()[-1] for r in runs if r.returncode != 0]
    assert not failed, failed
    eng = open_store(url)
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == ["0004"]
    assert db_version(eng) == 4 and len(list_cases(eng)) == (1 if start == "schema-1" else 0)


def test_a_read_only_database_opens_for_reading(tmp_path):
    from app.history import read_only_note

    db = tmp_path / "ro" / "h.db"
    db.parent.mkdir()
    eng = open_store(f"sqlite:///{db}")
    results, verdict, data = _case()
    save_case(eng, "READ-ME", "100X", verdict, results, data, PROV)
    eng.dispose()
    os.chmod(db, 0o444)
    os.chmod(db.parent, 0o555)
    try:
        if os.access(db, os.W_OK):
            pytest.skip("running as root: a read-only file cannot be made here")
        ro = open_store(f"sqlite:///{db}")
        assert read_only_note(ro) and list_cases(ro)["label"].tolist() == ["READ-ME"]
    finally:
        os.chmod(db.parent, 0o755)
        os.chmod(db, 0o644)
