"""Case history with an audit trail (issue 16, part 3): every saved analysis, through SQLAlchemy.

SQLite by default (WAL, so readers never block the writer; path from BREAKHIS_HISTORY_DB or ~/.local/share), or any
database SQLAlchemy can reach by URL (BREAKHIS_HISTORY_URL, e.g. postgresql+psycopg://...). The schema is versioned:
`schema_version` holds the applied version and `migrate()` applies the numbered steps below in order.
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


def _add_heatmap_column(engine: Engine) -> None:
    kind = LargeBinary().compile(dialect=engine.dialect)  # BLOB on SQLite, BYTEA on PostgreSQL
    with engine.begin() as c:
        c.exec_driver_sql(f"ALTER TABLE frames ADD COLUMN heatmap_png {kind}")


# version -> the step that brings a database from version-1 to it (version 1: the first cases/frames tables). A new
# database gets the current tables at once (metadata.create_all), stamped SCHEMA_VERSION; an older one gets only
# the steps it lacks, in order.
MIGRATIONS = {2: _add_heatmap_column}


def default_url() -> str:
    if os.environ.get("BREAKHIS_HISTORY_URL"):
        return os.environ["BREAKHIS_HISTORY_URL"]
    path = Path(os.environ.get("BREAKHIS_HISTORY_DB", Path.home() / ".local" / "share" / "breakhis_dashboard" /
                               "history.db"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_store(url: str | None = None) -> Engine:
    """An engine on the history database, migrated to SCHEMA_VERSION."""
    url = url or default_url()
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _wal(dbapi_conn, _):  # readers do not block the writer; a busy writer waits instead of failing
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()
    migrate(engine)
    return engine


def migrate(engine: Engine) -> int:
    """Apply the numbered schema steps not yet applied; returns the version now in place."""
    schema_version.create(engine, checkfirst=True)
    with engine.begin() as c:
        current = c.execute(select(func.max(schema_version.c.version))).scalar() or 0
    if current > SCHEMA_VERSION:
        raise RuntimeError(f"the history database is at schema {current}, newer than this software ({SCHEMA_VERSION})")
    if current == 0:
        meta.create_all(engine)
        with engine.begin() as c:
            c.execute(insert(schema_version).values(version=SCHEMA_VERSION, applied_at=_now()))
        return SCHEMA_VERSION
    for v in range(current + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[v](engine)
        with engine.begin() as c:
            c.execute(insert(schema_version).values(version=v, applied_at=_now()))
    return SCHEMA_VERSION


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def save_case(engine: Engine, label: str, magnification: str, verdict, results: list, files_bytes: list[bytes],
              provenance: dict, heatmap_method: str = "", pathologist_call: str = "", note: str = "",
              user: str = "", heatmaps: list[bytes | None] | None = None) -> int:
    """Store one case and its frames in one transaction (heatmaps: one PNG or None per frame); returns the case id."""
    heatmaps = heatmaps or [None] * len(results)
    with engine.begin() as c:
        cid = c.execute(insert(cases).values(
            created_at=_now(), label=label[:200] or "unlabelled", magnification=magnification,
            verdict=verdict.verdict, verdict_reason=verdict.reason, mean_p=verdict.mean_p, n_frames=verdict.n_frames,
            n_referred=verdict.n_referred, pathologist_call=pathologist_call, pathologist_note=note, app_user=user,
        )).inserted_primary_key[0]
        for r, data, heat in zip(results, files_bytes, heatmaps):
            c.execute(insert(frames).values(
                case_id=cid, file_name=r.name[:500], file_sha256=hashlib.sha256(data).hexdigest(),
                thumbnail_png=r.thumbnail, magnification=magnification, model_id=r.model_id,
                weights_sha256=provenance.get("weights_sha256", ""), card_sha256=provenance.get("card_sha256", ""),
                tta=bool(provenance.get("tta", False)), p_malignant=r.p_malignant, decision=r.decision,
                reason=r.reason or r.error, warnings="; ".join(r.warnings), heatmap_method=heatmap_method,
                heatmap_png=heat))
    return int(cid)


def list_cases(engine: Engine, verdict: str | None = None, search: str = "") -> pd.DataFrame:
    """Saved cases, newest first, optionally filtered by verdict and by a text in the label or note."""
    q = select(cases).order_by(cases.c.created_at.desc(), cases.c.id.desc())
    if verdict:
        q = q.where(cases.c.verdict == verdict)
    if search:
        like = f"%{search}%"
        q = q.where(cases.c.label.like(like) | cases.c.pathologist_note.like(like))
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
    case_frames(engine, case_id).drop(columns=["thumbnail_png", "heatmap_png"]).to_csv(buf, index=False)
    return buf.getvalue()


def db_version(engine: Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(text("select max(version) from schema_version")).scalar() or 0)
