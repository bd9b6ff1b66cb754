"""Case history with an audit trail (issue 16, part 3): every saved analysis, through SQLAlchemy.

SQLite by default (WAL, so readers never block the writer; path from BREAKHIS_HISTORY_DB or ~/.local/share), or any
database SQLAlchemy can reach by URL (BREAKHIS_HISTORY_URL, e.g. postgresql+psycopg://...). The schema is managed by
Alembic (app/migrations/versions): `migrate()` applies the revisions a database lacks, each with its version stamp in
one transaction under a database-level lock. Databases from before Alembic (a `schema_version` table) are stamped
with the revision they have and upgraded from there.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import html
import io
import os
from pathlib import Path

import pandas as pd
from sqlalchemy import (Boolean, Column, DateTime, Float, ForeignKey, Integer, LargeBinary, MetaData, String, Table,
                        Text, create_engine, event, func, insert, select, text)
from sqlalchemy.engine import Engine

SCHEMA_VERSION = 2
meta = MetaData()
schema_version = Table("schema_version", meta, Column("version", Integer, primary_key=True),
                       Column("applied_at", DateTime(timezone=True), nullable=False))
cases = Table(
    "cases", meta,
    Column("id", Integer, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("label", String(200), nullable=False),  # the lab's own case reference (no patient name is asked for)
    Column("magnification", String(8), nullable=False),
    Column("verdict", String(16), nullable=False), Column("verdict_reason", Text, nullable=False),
    Column("mean_p", Float), Column("n_frames", Integer, nullable=False), Column("n_referred", Integer, nullable=False),
    Column("pathologist_call", String(32), nullable=False, default=""),
    Column("pathologist_note", Text, nullable=False, default=""),
    Column("app_user", String(100), nullable=False, default=""),
)
frames = Table(
    "frames", meta,
    Column("id", Integer, primary_key=True),
    Column("case_id", Integer, ForeignKey("cases.id"), nullable=False, index=True),
    Column("file_name", String(500), nullable=False), Column("file_sha256", String(64), nullable=False),
    Column("thumbnail_png", LargeBinary),
    Column("magnification", String(8), nullable=False),
    Column("model_id", String(200), nullable=False), Column("weights_sha256", String(64), nullable=False),
    Column("card_sha256", String(64), nullable=False), Column("tta", Boolean, nullable=False),
    Column("p_malignant", Float), Column("decision", String(16), nullable=False), Column("reason", Text, nullable=False),
    Column("warnings", Text, nullable=False), Column("heatmap_method", String(32), nullable=False, default=""),
    Column("heatmap_png", LargeBinary),  # schema 2: the frame's heatmap over it, with its colour scale, for the report
)


MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"  # Alembic: env.py + versions/NNNN_*.py
REVISIONS = {"0001": 1, "0002": 2}  # Alembic revision -> schema version (the one the older schema_version table kept)
_LOCK_KEY = 7245019  # PostgreSQL advisory lock held while the schema is created or migrated


def default_url() -> str:
    if os.environ.get("BREAKHIS_HISTORY_URL"):
        return os.environ["BREAKHIS_HISTORY_URL"]
    path = Path(os.environ.get("BREAKHIS_HISTORY_DB", Path.home() / ".local" / "share" / "breakhis_dashboard" /
                               "history.db"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_store(url: str | None = None) -> Engine:
    """An engine on the history database, migrated to the current schema. A SQLite file this process cannot write
    opens read-only when its schema is current (read_only_note says so); one that needs migrating is refused."""
    url = url or default_url()
    ro_path = _read_only_sqlite(url)
    if ro_path is not None:
        engine = create_engine(f"sqlite:///file:{ro_path}?mode=ro&immutable=1&uri=true")
        with engine.connect() as c:
            rev = _alembic_revision(c) or _legacy_revision(c)
        if rev != max(REVISIONS):
            raise RuntimeError(f"{ro_path}: read-only and at schema {REVISIONS.get(rev, rev)}, not {SCHEMA_VERSION}: "
                               "it cannot be migrated; open it once with write access")
        return engine
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_setup(dbapi_conn, _):
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below): DDL joins the transaction
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")  # first: a busy database is waited for, never an error
            cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # the migration's transaction takes the write lock at once (BEGIN IMMEDIATE)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("immediate") else "BEGIN")
    migrate(engine)
    return engine


def read_only_note(engine: Engine) -> str:
    """What the pages say about a store opened read-only ("" when it is writable)."""
    return ("The case history is read-only here (the database file cannot be written by this process): saved cases "
            "can be read, new ones cannot be saved.") if "mode=ro" in str(engine.url) else ""


def _read_only_sqlite(url: str) -> Path | None:
    """The path of an existing SQLite file (or its folder) this process cannot write, else None."""
    if not url.startswith("sqlite:///") or "mode=ro" in url:
        return None
    path = Path(url.removeprefix("sqlite:///"))
    if path.exists() and (not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK)):
        return path
    return None


def _alembic_revision(conn) -> str | None:
    from sqlalchemy import inspect

    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def _legacy_revision(conn) -> str | None:
    """A database written before Alembic kept its version in schema_version: the matching revision."""
    from sqlalchemy import inspect

    if not inspect(conn).has_table("schema_version"):
        return None
    v = conn.execute(select(func.max(schema_version.c.version))).scalar() or 0
    if v > SCHEMA_VERSION:
        raise RuntimeError(f"the history database is at schema {v}, newer than this software ({SCHEMA_VERSION})")
    return {1: "0001", 2: "0002"}.get(v)


def migrate(engine: Engine) -> int:
    """Bring the schema to head with Alembic, every step and its version stamp in one transaction, under a
    database-level lock (PostgreSQL advisory lock; SQLite BEGIN IMMEDIATE): racing first opens wait for each other,
    and a migration killed midway leaves the database as it was. Returns the schema version now in place."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        conn.info["immediate"] = True
        try:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
                cfg.attributes["connection"] = conn
                rev = _alembic_revision(conn)
                if rev is not None and rev not in REVISIONS:
                    raise RuntimeError(f"the history database is at schema revision {rev}, newer than this software "
                                       f"({SCHEMA_VERSION})")
                if rev is None:
                    legacy = _legacy_revision(conn)
                    if legacy is not None:  # written before Alembic: stamp what it has, then upgrade from there
                        command.stamp(cfg, legacy)
                        rev = legacy
                if rev != head:
                    command.upgrade(cfg, "head")
        finally:
            conn.info.pop("immediate", None)
    return SCHEMA_VERSION


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def save_case(engine: Engine, label: str, magnification: str, verdict, results: list, files_bytes: list[bytes],
              provenance: dict, heatmap_method: str = "", pathologist_call: str = "", note: str = "",
              user: str = "", heatmaps: list[bytes | None] | None = None) -> int:
    """Store one case and its frames in one transaction (heatmaps: one PNG or None per frame); returns the case id."""
    from models.textsafe import clean_for_storage

    heatmaps = heatmaps or [None] * len(results)
    said: list[str] = []  # what was changed in the user's text before storing it (NUL, controls, truncation)

    def clean(text: str, limit: int | None, what: str) -> str:
        out, notes = clean_for_storage(text or "", limit, what)
        said.extend(notes)
        return out

    label_s, note_s, user_s = clean(label, 200, "label"), clean(note, None, "note"), clean(user, 200, "user")
    names = [clean(r.name, 500, f"file name {i + 1}") for i, r in enumerate(results)]
    warnings = [clean("; ".join(r.warnings), None, f"warnings {i + 1}") for i, r in enumerate(results)]
    with engine.begin() as c:
        cid = c.execute(insert(cases).values(
            created_at=_now(), label=label_s or "unlabelled", magnification=magnification,
            verdict=verdict.verdict, verdict_reason=verdict.reason, mean_p=verdict.mean_p, n_frames=verdict.n_frames,
            n_referred=verdict.n_referred, pathologist_call=pathologist_call,
            pathologist_note=note_s + (("\n[stored with changes: " + "; ".join(said) + "]") if said else ""),
            app_user=user_s,
        )).inserted_primary_key[0]
        for r, data, heat, name, warn in zip(results, files_bytes, heatmaps, names, warnings):
            c.execute(insert(frames).values(
                case_id=cid, file_name=name, file_sha256=hashlib.sha256(data).hexdigest(),
                thumbnail_png=r.thumbnail, magnification=magnification, model_id=r.model_id,
                weights_sha256=provenance.get("weights_sha256", ""), card_sha256=provenance.get("card_sha256", ""),
                tta=bool(provenance.get("tta", False)), p_malignant=r.p_malignant, decision=r.decision,
                reason=clean(r.reason or r.error, None, "reason"), warnings=warn, heatmap_method=heatmap_method,
                heatmap_png=heat))
    return int(cid)


def list_cases(engine: Engine, verdict: str | None = None, search: str = "") -> pd.DataFrame:
    """Saved cases, newest first, optionally filtered by verdict and by a text in the label or note."""
    q = select(cases).order_by(cases.c.created_at.desc(), cases.c.id.desc())
    if verdict:
        q = q.where(cases.c.verdict == verdict)
    if search:  # the text is data: % and _ match themselves, not any characters
        like = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        q = q.where(cases.c.label.like(like, escape="\\") | cases.c.pathologist_note.like(like, escape="\\"))
    with engine.connect() as c:
        return pd.DataFrame(c.execute(q).mappings().all(), columns=[col.name for col in cases.columns])


def case_frames(engine: Engine, case_id: int) -> pd.DataFrame:
    with engine.connect() as c:
        rows = c.execute(select(frames).where(frames.c.case_id == case_id).order_by(frames.c.id)).mappings().all()
    return pd.DataFrame(rows, columns=[col.name for col in frames.columns])


def case_report_html(engine: Engine, case_id: int, disclaimer: str) -> str:
    """A self-contained HTML report: the case, each frame's thumbnail and heatmap (with its colour scale), decision
    and provenance, the disclaimer."""
    import base64

    def img(png: bytes | None, alt: str) -> str:
        return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>" if png else ""

    with engine.connect() as c:
        case = c.execute(select(cases).where(cases.c.id == case_id)).mappings().one()
    fr = case_frames(engine, case_id)
    e = html.escape
    rows = []
    for r in fr.to_dict("records"):
        p = "" if r["p_malignant"] is None or r["p_malignant"] != r["p_malignant"] else f"{r['p_malignant']:.3f}"
        heat = img(r["heatmap_png"], "heatmap") or "<small>no heatmap stored</small>"
        rows.append(f"<tr><td>{img(r['thumbnail_png'], 'frame')}</td><td>{heat}<br><small>{e(r['heatmap_method'])}"
                    f"</small></td><td>{e(r['file_name'])}<br><small>sha256 {r['file_sha256'][:16]}…</small></td>"
                    f"<td><b>{e(r['decision'])}</b><br><small>{e(r['reason'])}</small></td><td>{p}</td>"
                    f"<td><small>{e(r['model_id'])}<br>weights {r['weights_sha256'][:12]}… card "
                    f"{r['card_sha256'][:12]}…<br>TTA {r['tta']}</small></td></tr>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Case {case_id}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td{{border-top:1px solid #ddd;padding:4px;
vertical-align:top}}.warn{{background:#fff3cd;padding:.6em}}</style></head><body>
<p class="warn">{e(disclaimer)}</p>
<h1>Case {case_id}: {e(case['label'])}</h1>
<p>Saved {case['created_at']:%Y-%m-%d %H:%M} UTC · magnification {e(case['magnification'])} ·
<b>case verdict: {e(case['verdict'])}</b> ({e(case['verdict_reason'])}) · {case['n_frames']} frames,
{case['n_referred']} referred</p>
<p>Pathologist's call: <b>{e(case['pathologist_call'] or 'not recorded')}</b>. Note: {e(case['pathologist_note'])}</p>
<p><small>Heatmaps show where the model looked for the class 'malignant' (blue = little, red = much; each map is
scaled to its own maximum, so compare regions within a frame, not across frames).</small></p>
<table><tr><th>frame</th><th>heatmap</th><th>file</th><th>decision</th><th>p(malignant)</th><th>model</th></tr>
{''.join(rows)}</table></body></html>"""


def case_csv(engine: Engine, case_id: int) -> str:
    buf = io.StringIO()
    from models.textsafe import csv_safe

    # every text cell neutralised: a file name like =HYPERLINK(...) stays text in a spreadsheet (OWASP CSV injection)
    csv_safe(case_frames(engine, case_id).drop(columns=["thumbnail_png", "heatmap_png"])).to_csv(buf, index=False)
    return buf.getvalue()


def db_version(engine: Engine) -> int:
    """The schema version in place (from Alembic's revision; a database from before Alembic: its schema_version)."""
    with engine.connect() as c:
        rev = _alembic_revision(c) or _legacy_revision(c)
    return REVISIONS.get(rev, 0)
