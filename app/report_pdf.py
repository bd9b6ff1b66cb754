"""The case report as PDF (fpdf2), with the same content as the HTML report (app.history.case_report_content).

fpdf2 is a maintained pure-Python PDF writer; text is set in DejaVu Sans (shipped with matplotlib, which grad-cam
already installs), so any Unicode a user typed prints as typed. User text is written as plain text (fpdf2's markdown
off), and long words (file names, hashes) break at characters rather than widening the page.
"""
from __future__ import annotations

import io
from pathlib import Path

from sqlalchemy.engine import Engine

from app.dashboard import readable_png
from app.history import case_report_content, p_text


class PdfUnavailable(RuntimeError):
    """No Unicode font to set the report in (said on the page instead of a PDF)."""


def _font_dir() -> Path:
    """DejaVu Sans from matplotlib's data, else the system's fonts-dejavu."""
    candidates = []
    try:
        import matplotlib

        candidates.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
    except ImportError:
        pass
    candidates.append(Path("/usr/share/fonts/truetype/dejavu"))
    for d in candidates:
        if (d / "DejaVuSans.ttf").is_file() and (d / "DejaVuSans-Bold.ttf").is_file():
            return d
    raise PdfUnavailable("no DejaVu Sans font found (matplotlib's or fonts-dejavu): the PDF cannot be set; the HTML "
                         "report has the same content")


def case_report_pdf(engine: Engine, case_id: int, disclaimer: str) -> bytes:
    """The case report as PDF bytes: disclaimer, verdict and reason, the pathologist's call and status, audit trail,
    models' AUC with CI and referral band, each frame's image, heatmap, decision and full hashes, commit and time."""
    from fpdf import FPDF
    from fpdf.enums import WrapMode, XPos, YPos

    rep = case_report_content(engine, case_id)
    fonts = _font_dir()
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_font("DejaVu", "", str(fonts / "DejaVuSans.ttf"))
    pdf.add_font("DejaVu", "B", str(fonts / "DejaVuSans-Bold.ttf"))
    pdf.set_title(f"Case {case_id}")
    pdf.set_creator(f"breakhis dashboard {rep.commit}")
    pdf.add_page()
    width = pdf.epw

    def para(text: str, size: float = 9.5, bold: bool = False, fill: tuple[int, int, int] | None = None) -> None:
        pdf.set_font("DejaVu", "B" if bold else "", size)
        if fill:
            pdf.set_fill_color(*fill)
        pdf.multi_cell(width, size * 0.5, str(text), fill=bool(fill), wrapmode=WrapMode.CHAR,
                       new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.ln(1)

    case, state = rep.case, rep.state
    para(disclaimer, 9, fill=(255, 243, 205))
    para(f"Case {case_id}: {case['label']}", 15, bold=True)
    para(f"Case verdict: {case['verdict']} ({case['verdict_reason']})", 11, bold=True)
    para(f"{case['n_frames']} frames, {case['n_referred']} referred · magnification {case['magnification']} · saved "
         f"{case['created_at']:%Y-%m-%d %H:%M} UTC")
    para(f"Pathologist's call: {state['call'] or 'not recorded'} · status: {rep.status}. Note: {state['note']}")
    para("Audit trail", 12, bold=True)
    for ev in rep.events:
        para(f"{ev['at']:%Y-%m-%d %H:%M} UTC · {ev['kind']} by {ev['app_user']}"
             + (f" · call {ev['pathologist_call']}" if ev["pathologist_call"] else "")
             + (f" · reason: {ev['reason']}" if ev["reason"] else ""), 9)
    para("Models", 12, bold=True)
    for line in rep.model_lines:
        para(line, 9)
    para("Heatmaps show where the model looked for the class 'malignant' (blue = little, red = much; each map is "
         "scaled to its own maximum, so compare regions within a frame, not across frames).", 8)
    para("Frames", 12, bold=True)
    img_w = (width - 4) / 2
    for r in rep.frames:
        shown = [b for b in (readable_png(r["thumbnail_png"]), readable_png(r["heatmap_png"])) if b]  # damaged: skipped
        if shown:
            if pdf.will_page_break(img_w * 0.75):
                pdf.add_page()
            y = pdf.get_y()
            heights = []
            for i, png in enumerate(shown):
                info = pdf.image(io.BytesIO(png), x=pdf.l_margin + i * (img_w + 4), y=y, w=img_w)
                heights.append(info.rendered_height)
            pdf.set_y(y + max(heights) + 1)
        para(f"{r['file_name']}", 9.5, bold=True)
        para(f"{r['decision']}" + (f", p(malignant) {p_text(r['p_malignant'])}" if p_text(r["p_malignant"]) else "")
             + f": {r['reason']}" + ("" if r["heatmap_png"] else " · no heatmap stored"), 9)
        para(f"file sha256 {r['file_sha256']}\nmodel {r['model_id']} · TTA {r['tta']}\nweights sha256 "
             f"{r['weights_sha256']}\ncard sha256 {r['card_sha256']}", 7.5)
        pdf.ln(2)
    para(f"Report generated {rep.generated_at:%Y-%m-%d %H:%M:%S} UTC by software commit {rep.commit}.", 8)
    return bytes(pdf.output())
