"""The case history (issue 16, part 3): SQLite store with a versioned schema, concurrent writers, reports."""
import os
import threading

import pytest
from sqlalchemy import create_engine

from app.dashboard import FrameResult
from app.history import (SCHEMA_VERSION, case_csv, case_frames, case_report_html, db_version, list_cases, open_store,
                         save_case, schema_version)
from models.case import CaseFrame, case_verdict


def _case(n=3, p=0.9):
    results = [FrameResult(name=f"f{i}.png", task="malignancy", model_id="all/m", probability=p, label="malignant",
                           warnings=("w",), thumbnail=b"\x89PNGfake", decision="malignant", decision_kind="call")
               for i in range(n)]
    verdict = case_verdict([CaseFrame(r.name, "100X", r.model_id, r.p_malignant, r.decision) for r in results])
    return results, verdict, [f"bytes{i}".encode() for i in range(n)]


PROV = {"weights_sha256": "a" * 64, "card_sha256": "b" * 64, "tta": False}
PG_URL = os.environ.get("BREAKHIS_TEST_PG_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """The same tests on SQLite (default) and on a real PostgreSQL (.ci/run starts Debian's; skipped without)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'h.db'}"
    if not PG_URL:
        pytest.skip("no PostgreSQL: BREAKHIS_TEST_PG_URL is unset (.ci/run sets it after scripts/start_postgres.sh)")
    eng = create_engine(PG_URL)
    with eng.begin() as c:  # a clean database for each test
        c.exec_driver_sql("DROP TABLE IF EXISTS case_events, frames, cases, schema_version, alembic_version CASCADE")
        c.exec_driver_sql("DROP FUNCTION IF EXISTS case_events_append_only() CASCADE")
    eng.dispose()
    return PG_URL


def test_saved_case_comes_back_with_its_audit_trail(url):
    eng = open_store(url)
    assert db_version(eng) == SCHEMA_VERSION
    results, verdict, data = _case()
    cid = save_case(eng, "LAB-1", "100X", verdict, results, data, PROV, "Grad-CAM", "malignant", "agree")
    listed = list_cases(eng)
    assert listed.iloc[0]["id"] == cid and listed.iloc[0]["verdict"] == verdict.verdict
    assert list(list_cases(eng, verdict="benign")["id"]) == [] and len(list_cases(eng, search="agree")) == 1
    fr = case_frames(eng, cid)
    assert len(fr) == 3 and set(fr["card_sha256"]) == {"b" * 64}
    import hashlib

    assert fr.iloc[0]["file_sha256"] == hashlib.sha256(b"bytes0").hexdigest()
    report = case_report_html(eng, cid, "Research aid only")
    assert "Research aid only" in report and "LAB-1" in report and "aaaaaaaaaaaa" in report
    assert "thumbnail" not in case_csv(eng, cid).splitlines()[0] and "file_sha256" in case_csv(eng, cid)
    assert "heatmap_png" not in case_csv(eng, cid).splitlines()[0]
    import base64

    heats = [b"\x89PNGheat0", None, b"\x89PNGheat2"]
    cid2 = save_case(eng, "LAB-2", "100X", verdict, results, data, PROV, "Grad-CAM", heatmaps=heats)
    assert list(case_frames(eng, cid2)["heatmap_png"]) == heats
    report = case_report_html(eng, cid2, "Research aid only")
    assert base64.b64encode(heats[0]).decode() in report and "no heatmap stored" in report and "blue = little" in report


def _back_to_schema_1(eng, legacy: bool) -> None:
    """Turn a current database back into a schema-1 one: Alembic at 0001, or (legacy) the pre-Alembic schema_version
    table saying 1 and no alembic_version at all."""
    created = list_cases(eng)["created_at"][0]  # read before the schema change locks the tables
    with eng.begin() as c:
        c.exec_driver_sql("DROP TABLE case_events")  # schema 3's audit trail (its triggers go with it)
        if eng.dialect.name == "postgresql":
            c.exec_driver_sql("DROP FUNCTION IF EXISTS case_events_append_only() CASCADE")
        c.exec_driver_sql("ALTER TABLE frames DROP COLUMN heatmap_png")
        c.exec_driver_sql("ALTER TABLE frames DROP COLUMN frame_png")  # schema 4's full-resolution frame and overlay
        c.exec_driver_sql("ALTER TABLE frames DROP COLUMN overlay_jpeg")
        if legacy:
            c.exec_driver_sql("DROP TABLE alembic_version")
            schema_version.create(c)
            c.execute(schema_version.insert().values(version=1, applied_at=created))
        else:
            c.exec_driver_sql("UPDATE alembic_version SET version_num = '0001'")
    eng.dispose()


@pytest.mark.parametrize("legacy", [False, True], ids=["alembic", "pre-alembic"])
def test_a_schema_1_database_is_migrated_and_keeps_its_cases(url, legacy):
    """A database written by the first schema (no heatmaps), with Alembic's stamp or the older schema_version table,
    gains the column and loses nothing."""
    eng = open_store(url)
    results, verdict, data = _case()
    cid = save_case(eng, "OLD", "100X", verdict, results, data, PROV)
    _back_to_schema_1(eng, legacy)
    assert db_version(create_engine(url)) == 1
    eng = open_store(url)
    assert db_version(eng) == SCHEMA_VERSION == 4
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == ["0004"]
    # the case saved before the audit trail existed got its "created" event from the migration
    from app.history import case_events_frame

    assert case_events_frame(eng, cid)["kind"].tolist() == ["created"]
    fr = case_frames(eng, cid)
    assert len(fr) == 3 and fr["heatmap_png"].isna().all() and list_cases(eng)["label"].tolist() == ["OLD"]
    assert fr["frame_png"].isna().all() and fr["overlay_jpeg"].isna().all()  # schema 4's columns, empty for old cases
    new = save_case(eng, "NEW", "100X", verdict, results, data, PROV, heatmaps=[b"h"] * 3, full_frames=[b"F"] * 3,
                    overlays=[b"O", None, b"O"])
    got = case_frames(eng, new)
    assert list(got["heatmap_png"]) == [b"h"] * 3 and list(got["frame_png"]) == [b"F"] * 3
    assert list(got["overlay_jpeg"]) == [b"O", None, b"O"]
    if eng.dialect.name == "sqlite":
        with eng.connect() as c:  # the store is in WAL mode
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_reopening_does_not_migrate_twice_and_a_newer_schema_is_refused(url):
    open_store(url)
    eng = open_store(url)
    with eng.begin() as c:
        assert c.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == ["0004"]
        c.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(RuntimeError, match="newer"):
        open_store(url)


def test_two_sessions_writing_at_once_lose_nothing(url):
    open_store(url)
    errors = []

    def writer(k):
        eng = open_store(url)  # each session its own engine, as two app processes would have
        try:
            for i in range(15):
                results, verdict, data = _case(2)
                save_case(eng, f"S{k}-{i}", "100X", verdict, results, data, PROV)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    eng = open_store(url)
    assert len(list_cases(eng)) == 30 and sum(len(case_frames(eng, int(i))) for i in list_cases(eng)["id"]) == 60


def test_search_treats_percent_and_underscore_literally(tmp_path):
    eng = open_store(f"sqlite:///{tmp_path / 'h.db'}")
    results, verdict, data = _case()
    for label in ("LAB_1", "LABX1", "100% sure", "plain"):
        save_case(eng, label, "100X", verdict, results, data, PROV)
    assert list_cases(eng, search="_")["label"].tolist() == ["LAB_1"]
    assert list_cases(eng, search="%")["label"].tolist() == ["100% sure"]
    assert len(list_cases(eng, search="")) == 4 and list_cases(eng, search="\\").empty


def test_the_audit_trail_is_append_only_and_a_signed_off_case_refuses_edits(url):
    from sqlalchemy.exc import DBAPIError

    from app.history import (AuditError, add_event, case_events_frame, case_state, duplicate_cases, edit_case)

    eng = open_store(url)
    results, verdict, data = _case()
    cid = save_case(eng, "AUDIT-1", "100X", verdict, results, data, PROV, pathologist_call="malignant", note="first",
                    user="dr.a")
    assert duplicate_cases(eng, data) == [cid] and duplicate_cases(eng, data[:2]) == []
    edit_case(eng, cid, "AUDIT-1b")  # before sign-off a reference can be corrected
    with pytest.raises(AuditError, match="user name"):
        add_event(eng, cid, "signed_off", "")
    add_event(eng, cid, "signed_off", "dr.a")
    with pytest.raises(AuditError, match="cannot be edited"):
        edit_case(eng, cid, "changed after sign-off")
    with pytest.raises(AuditError, match="already signed off"):
        add_event(eng, cid, "signed_off", "dr.b")
    with pytest.raises(AuditError, match="needs a reason"):
        add_event(eng, cid, "amended", "dr.b", call="benign")
    add_event(eng, cid, "amended", "dr.b", reason="second opinion", call="benign", note="revised")
    st = case_state(eng, cid)
    assert st["call"] == "benign" and st["note"] == "revised" and st["signed_off_by"] == "dr.a"
    add_event(eng, cid, "withdrawn", "dr.b", reason="wrong patient")
    with pytest.raises(AuditError, match="withdrawn"):
        add_event(eng, cid, "amended", "dr.c", reason="x")
    ev = case_events_frame(eng, cid)
    assert ev["kind"].tolist() == ["created", "signed_off", "amended", "withdrawn"]
    assert ev["app_user"].tolist() == ["dr.a", "dr.a", "dr.b", "dr.b"]
    for sql in ("UPDATE case_events SET note = 'x'", "DELETE FROM case_events"):  # refused by the database itself
        with pytest.raises(DBAPIError, match="append-only"):
            with eng.begin() as c:
                c.exec_driver_sql(sql)
    assert len(case_events_frame(eng, cid)) == 4


def test_the_report_carries_full_hashes_the_models_figures_and_its_provenance(tmp_path, monkeypatch):
    from tests.conftest import ROOT

    monkeypatch.setenv("BREAKHIS_MODELS_DIR", str(ROOT / "magnif_models"))
    eng = open_store(f"sqlite:///{tmp_path / 'h.db'}")
    results, verdict, data = _case()
    for r in results:
        r.model_id = "all/efficientnet_lite2_ensemble"
    cid = save_case(eng, "X" * 190, "100X", verdict, results, data, PROV, user="dr.a")
    report = case_report_html(eng, cid, "Research aid only")
    assert "a" * 64 in report and "b" * 64 in report  # full weights and card sha256, never cut
    assert "AUC 0.679" in report and "referral band p" in report and "benign /" in report
    assert "Report generated" in report and "software commit" in report and "overflow-wrap:anywhere" in report
    assert "created by dr.a" in report


def test_the_pdf_report_says_what_the_html_says_and_wraps_long_text(tmp_path, monkeypatch):
    """The PDF (fpdf2) read back with pypdf: verdict, call, full hashes, the model's AUC with CI and band, commit,
    generation time; a 190-character label without spaces wraps inside the A4 page; Unicode prints as typed."""
    import io

    from pypdf import PdfReader

    from app.history import add_event
    from app.report_pdf import case_report_pdf
    from tests.conftest import ROOT

    monkeypatch.setenv("BREAKHIS_MODELS_DIR", str(ROOT / "magnif_models"))
    eng = open_store(f"sqlite:///{tmp_path / 'h.db'}")
    results, verdict, data = _case()
    for i, r in enumerate(results):
        r.model_id = "all/efficientnet_lite2_ensemble"
        r.thumbnail = _png_bytes((10 * i, 80, 90))
    cid = save_case(eng, "Ł" + "X" * 189, "100X", verdict, results, data, PROV, user="dr.ä", pathologist_call="benign",
                    heatmaps=[_png_bytes((200, 10 * i, 150)) for i in range(3)])
    add_event(eng, cid, "signed_off", "dr.ä")
    pdf = case_report_pdf(eng, cid, "Research aid only, not a diagnosis")
    reader = PdfReader(io.BytesIO(pdf))
    text = " ".join(page.extract_text() for page in reader.pages).replace("\n", " ")
    flat = text.replace(" ", "")
    assert "not a diagnosis" in text and f"Case verdict: {verdict.verdict}" in text
    assert "a" * 64 in flat and "b" * 64 in flat  # full hashes, never cut
    assert "AUC 0.679" in text and "referral band p" in text and "software commit" in text and "Report generated" in text
    assert "signed off by dr.ä" in text and "Pathologist's call: benign" in text and "Ł" + "X" * 189 in flat
    assert all(float(p.mediabox.width) < 600 for p in reader.pages)  # A4 (595 pt): the long label wrapped
    assert sum(len(p.images) for p in reader.pages) >= 6  # each frame's thumbnail and heatmap


def _png_bytes(colour=(200, 100, 150)) -> bytes:
    import io

    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (350, 230), colour).save(b, "PNG")
    return b.getvalue()


def test_the_case_csv_carries_the_case_verdict_and_no_label_on_referred_rows(tmp_path):
    import io

    import pandas as pd

    eng = open_store(f"sqlite:///{tmp_path / 'h.db'}")
    results, verdict, data = _case()
    results[1].decision = "refer"
    cid = save_case(eng, "CSV-1", "100X", verdict, results, data, PROV, pathologist_call="malignant",
                    full_frames=[b"F"] * 3)
    df = pd.read_csv(io.StringIO(case_csv(eng, cid)), keep_default_na=False)
    assert set(df["case_verdict"]) == {verdict.verdict} and set(df["pathologist_call"]) == {"malignant"}
    assert df.loc[1, "decision"] == "refer" and df.loc[1, "label"] == ""
    assert all(df.loc[[0, 2], "label"] == df.loc[[0, 2], "decision"])
    assert not {"frame_png", "overlay_jpeg", "thumbnail_png", "heatmap_png"} & set(df.columns)
