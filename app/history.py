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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sqlalchemy import (Boolean, Column, DateTime, Float, ForeignKey, Integer, LargeBinary, MetaData, String, Table,
                        Text, create_engine, event, func, insert, select, text)
from sqlalchemy.engine import Engine

SCHEMA_VERSION = 4
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
    # schema 4: the frame as analysed (lossless PNG, full resolution) and its full-size overlay (JPEG: a derived
    # picture), so History's viewer can zoom to nuclei
    Column("frame_png", LargeBinary), Column("overlay_jpeg", LargeBinary),
)


case_events = Table(  # schema 3: the audit trail, append-only (database triggers refuse UPDATE and DELETE)
    "case_events", meta,
    Column("id", Integer, primary_key=True),
    Column("case_id", Integer, ForeignKey("cases.id"), nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("app_user", String(100), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("pathologist_call", String(32), nullable=False, default=""),
    Column("note", Text, nullable=False, default=""),
    Column("reason", Text, nullable=False, default=""),
)
EVENT_KINDS = ("created", "amended", "signed_off", "withdrawn")


MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"  # Alembic: env.py + versions/NNNN_*.py
REVISIONS = {"0001": 1, "0002": 2, "0003": 3, "0004": 4}  # Alembic revision -> schema version (the one the older schema_version table kept)
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
              user: str = "", heatmaps: list[bytes | None] | None = None,
              full_frames: list[bytes | None] | None = None, overlays: list[bytes | None] | None = None) -> int:
    """Store one case and its frames in one transaction (heatmaps: one small PNG or None per frame; full_frames /
    overlays: the full-resolution frame PNG and overlay JPEG per frame, or None); returns the case id."""
    from models.textsafe import clean_for_storage

    heatmaps = heatmaps or [None] * len(results)
    full_frames = full_frames or [None] * len(results)
    overlays = overlays or [None] * len(results)
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
        c.execute(insert(case_events).values(case_id=cid, at=_now(), app_user=user_s or "unknown", kind="created",
                                             pathologist_call=pathologist_call, note=note_s, reason=""))
        for r, data, heat, name, warn, full, ov in zip(results, files_bytes, heatmaps, names, warnings, full_frames,
                                                       overlays):
            c.execute(insert(frames).values(
                case_id=cid, file_name=name, file_sha256=hashlib.sha256(data).hexdigest(),
                thumbnail_png=r.thumbnail, magnification=magnification, model_id=r.model_id,
                weights_sha256=provenance.get("weights_sha256", ""), card_sha256=provenance.get("card_sha256", ""),
                tta=bool(provenance.get("tta", False)), p_malignant=r.p_malignant, decision=r.decision,
                reason=clean(r.reason or r.error, None, "reason"), warnings=warn, heatmap_method=heatmap_method,
                heatmap_png=heat, frame_png=full, overlay_jpeg=ov))
    return int(cid)


class AuditError(ValueError):
    """An action the audit trail does not allow (e.g. editing a signed-off case); the message is one line."""


def case_events_frame(engine: Engine, case_id: int) -> pd.DataFrame:
    """The case's events, oldest first."""
    with engine.connect() as c:
        rows = c.execute(select(case_events).where(case_events.c.case_id == case_id)
                         .order_by(case_events.c.at, case_events.c.id)).mappings().all()
    return pd.DataFrame(rows, columns=[col.name for col in case_events.columns])


def case_state(engine: Engine, case_id: int) -> dict:
    """Where a case stands: its current call and note (the latest amendment's, else the original), whether it is
    signed off (and by whom) or withdrawn."""
    ev = case_events_frame(engine, case_id)
    state = {"call": "", "note": "", "signed_off_by": "", "withdrawn": False, "events": len(ev)}
    for e in ev.to_dict("records"):
        if e["kind"] in ("created", "amended"):
            state["call"], state["note"] = e["pathologist_call"], e["note"]
        elif e["kind"] == "signed_off":
            state["signed_off_by"] = e["app_user"]
        elif e["kind"] == "withdrawn":
            state["withdrawn"] = True
    return state


def add_event(engine: Engine, case_id: int, kind: str, user: str, reason: str = "", call: str | None = None,
              note: str | None = None) -> int:
    """Append one event (amended, signed_off, withdrawn) with its user; the rules are checked first: a user name
    is required, an amendment needs a reason, a withdrawn case takes no further event, a case is signed off once."""
    from models.textsafe import clean_for_storage

    if kind not in EVENT_KINDS or kind == "created":
        raise AuditError(f"unknown event {kind!r}; one of {EVENT_KINDS[1:]}")
    user_s, _ = clean_for_storage(user or "", 100, "user")
    if not user_s.strip():
        raise AuditError("a user name is required for every action on a case")
    st = case_state(engine, case_id)
    if st["events"] == 0:
        raise AuditError(f"case {case_id} does not exist")
    if st["withdrawn"]:
        raise AuditError(f"case {case_id} was withdrawn: no further action is recorded on it")
    if kind == "signed_off" and st["signed_off_by"]:
        raise AuditError(f"case {case_id} is already signed off by {st['signed_off_by']}")
    if kind in ("amended", "withdrawn") and not (reason or "").strip():
        raise AuditError(f"{'an amendment' if kind == 'amended' else 'a withdrawal'} needs a reason")
    reason_s, _ = clean_for_storage(reason or "", None, "reason")
    note_s, _ = clean_for_storage(note if note is not None else st["note"], None, "note")
    with engine.begin() as c:
        eid = c.execute(insert(case_events).values(
            case_id=case_id, at=_now(), app_user=user_s, kind=kind, reason=reason_s,
            pathologist_call=call if call is not None else st["call"], note=note_s)).inserted_primary_key[0]
    return int(eid)


def edit_case(engine: Engine, case_id: int, label: str) -> None:
    """Correct a case's reference before sign-off; refused (AuditError) once it is signed off or withdrawn: from
    then on only a new event (an amendment) can change what the case says."""
    st = case_state(engine, case_id)
    if st["signed_off_by"] or st["withdrawn"]:
        raise AuditError(f"case {case_id} is {'signed off' if st['signed_off_by'] else 'withdrawn'}: it cannot be "
                         "edited, only amended by a new event")
    from models.textsafe import clean_for_storage

    with engine.begin() as c:
        c.execute(cases.update().where(cases.c.id == case_id).values(label=clean_for_storage(label, 200, "label")[0]))


def duplicate_cases(engine: Engine, files_bytes: list[bytes]) -> list[int]:
    """Saved cases holding exactly these frames (by file sha256): saving them again asks first."""
    want = sorted(hashlib.sha256(b).hexdigest() for b in files_bytes)
    with engine.connect() as c:
        rows = c.execute(select(frames.c.case_id, frames.c.file_sha256)).all()
    by_case: dict[int, list[str]] = {}
    for cid, h in rows:
        by_case.setdefault(int(cid), []).append(h)
    return sorted(cid for cid, hs in by_case.items() if sorted(hs) == want)


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


def _model_lines(model_ids: list[str]) -> list[str]:
    """What the report says about each model: its cross-validated AUC with CI and patients, its referral band."""
    from models.card import CardError, ModelCard, metric
    from models.config import models_root
    from models.refer import ReferPolicy

    out = []
    for mid in model_ids:
        folder = models_root() / mid
        try:
            card = ModelCard.from_json(folder / "card.json")
        except (CardError, OSError):
            out.append(f"{mid}: its model folder is not available where this report was made")
            continue
        auc, n = metric(card.overall), card.overall.get("n_patients") or {}
        line = f"{mid}: AUC {auc.fmt() if auc else 'n/a'} on {n.get('benign', '?')} benign / {n.get('malignant', '?')} " \
               "malignant patients it never saw (cross-validated)"
        try:
            pol = ReferPolicy.load(folder)
        except Exception:  # noqa: BLE001 - said, not raised: the report is still written
            pol = None
        line += (f"; referral band p {pol.band[0]:.2f}-{pol.band[1]:.2f} (referred as uncertain)" if pol else
                 "; no referral policy")
        out.append(line)
    return out


@dataclass(frozen=True)
class CaseReport:
    """Everything a case report says, gathered once for the HTML and the PDF (so the two cannot drift apart)."""

    case: dict
    frames: list[dict]
    events: list[dict]
    state: dict
    status: str
    model_lines: list[str]
    generated_at: _dt.datetime
    commit: str


def case_report_content(engine: Engine, case_id: int) -> CaseReport:
    """The case, its frames, audit trail, current state, models' evidence, generation time and software commit."""
    from models.config import software_version

    with engine.connect() as c:
        case = dict(c.execute(select(cases).where(cases.c.id == case_id)).mappings().one())
    fr = case_frames(engine, case_id)
    state = case_state(engine, case_id)
    status = ("withdrawn" if state["withdrawn"] else f"signed off by {state['signed_off_by']}" if state["signed_off_by"]
              else "not signed off")
    return CaseReport(case, fr.to_dict("records"), case_events_frame(engine, case_id).to_dict("records"), state,
                      status, _model_lines(sorted(set(fr["model_id"]))), _now(), software_version())


def p_text(p) -> str:
    """A stored probability as text ('' when none was made)."""
    return "" if p is None or p != p else f"{p:.3f}"


def case_report_html(engine: Engine, case_id: int, disclaimer: str) -> str:
    """A self-contained HTML report: the case, its verdict and the pathologist's current call, the audit trail, each
    frame's thumbnail and heatmap (with its colour scale), decision and full provenance (hashes, models' AUC with CI
    and referral band, software commit, generation time), the disclaimer. Long labels wrap."""
    import base64

    def img(png: bytes | None, alt: str) -> str:
        return f"<img alt='{alt}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>" if png else ""

    rep = case_report_content(engine, case_id)
    case, state = rep.case, rep.state
    e = html.escape
    rows = []
    for r in rep.frames:
        heat = img(r["heatmap_png"], "heatmap") or "<small>no heatmap stored</small>"
        rows.append(f"<tr><td>{img(r['thumbnail_png'], 'frame')}</td><td>{heat}<br><small>{e(r['heatmap_method'])}"
                    f"</small></td><td>{e(r['file_name'])}<br><small>file sha256 {r['file_sha256']}</small></td>"
                    f"<td><b>{e(r['decision'])}</b><br><small>{e(r['reason'])}</small></td><td>{p_text(r['p_malignant'])}</td>"
                    f"<td><small>{e(r['model_id'])}<br>weights sha256 {r['weights_sha256']}<br>card sha256 "
                    f"{r['card_sha256']}<br>TTA {r['tta']}</small></td></tr>")
    events = "".join(f"<li>{ev_['at']:%Y-%m-%d %H:%M} UTC · {e(ev_['kind'])} by {e(ev_['app_user'])}"
                     + (f" · call {e(ev_['pathologist_call'])}" if ev_["pathologist_call"] else "")
                     + (f" · reason: {e(ev_['reason'])}" if ev_["reason"] else "") + "</li>"
                     for ev_ in rep.events)
    models = "".join(f"<li>{e(m)}</li>" for m in rep.model_lines)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Case {case_id}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;overflow-wrap:anywhere}}td{{border-top:1px solid #ddd;
padding:4px;vertical-align:top;overflow-wrap:anywhere;word-break:break-word}}.warn{{background:#fff3cd;padding:.6em}}
table{{table-layout:fixed;width:100%}}img{{max-width:100%}}</style></head><body>
<p class="warn">{e(disclaimer)}</p>
<h1>Case {case_id}: {e(case['label'])}</h1>
<p><b>Case verdict: {e(case['verdict'])}</b> ({e(case['verdict_reason'])}) · {case['n_frames']} frames,
{case['n_referred']} referred · magnification {e(case['magnification'])} · saved {case['created_at']:%Y-%m-%d %H:%M} UTC</p>
<p>Pathologist's call: <b>{e(state['call'] or 'not recorded')}</b> · status: {e(rep.status)}. Note: {e(state['note'])}</p>
<h2>Audit trail</h2><ul>{events}</ul>
<h2>Models</h2><ul>{models}</ul>
<p><small>Heatmaps show where the model looked for the class 'malignant' (blue = little, red = much; each map is
scaled to its own maximum, so compare regions within a frame, not across frames).</small></p>
<table><tr><th>frame</th><th>heatmap</th><th>file</th><th>decision</th><th>p(malignant)</th><th>model</th></tr>
{''.join(rows)}</table>
<p><small>Report generated {rep.generated_at:%Y-%m-%d %H:%M:%S} UTC by software commit {e(rep.commit)}.</small></p>
</body></html>"""


def case_csv(engine: Engine, case_id: int) -> str:
    buf = io.StringIO()
    from models.textsafe import csv_safe

    # every text cell neutralised: a file name like =HYPERLINK(...) stays text in a spreadsheet (OWASP CSV injection)
    # each row carries the case verdict and the pathologist's current call; a referred frame has no label (the model
    # declined to call it); images stay out of the CSV
    fr = case_frames(engine, case_id).drop(columns=["thumbnail_png", "heatmap_png", "frame_png", "overlay_jpeg"])
    with engine.connect() as c:
        case = c.execute(select(cases).where(cases.c.id == case_id)).mappings().one()
    state = case_state(engine, case_id)
    fr.insert(1, "case_label", case["label"])
    fr.insert(2, "case_verdict", case["verdict"])
    fr.insert(3, "case_reason", case["verdict_reason"])
    fr.insert(4, "pathologist_call", state["call"] or "")
    fr.insert(5, "case_status", "withdrawn" if state["withdrawn"] else "signed off" if state["signed_off_by"] else "open")
    fr["label"] = [("" if d == "refer" else d) for d in fr["decision"]]
    csv_safe(fr).to_csv(buf, index=False)
    return buf.getvalue()


def db_version(engine: Engine) -> int:
    """The schema version in place (from Alembic's revision; a database from before Alembic: its schema_version)."""
    with engine.connect() as c:
        rev = _alembic_revision(c) or _legacy_revision(c)
    return REVISIONS.get(rev, 0)


USER_HEADERS = ("X-Forwarded-User", "X-Remote-User", "X-Auth-Request-User", "Remote-User")  # set by the proxy


def user_from_headers(headers) -> str:
    """The signed-in user as the authenticating reverse proxy states it (oauth2-proxy, nginx auth_request), or ""."""
    for h in USER_HEADERS:
        try:
            v = headers.get(h) if headers is not None else None
        except Exception:  # noqa: BLE001 - a headers object outside a browser session
            v = None
        if v:
            return str(v)[:100]
    return ""
