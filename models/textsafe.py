"""Text from users is data: never a spreadsheet formula, Markdown, or invisible control characters.

Written by hand because each rule is a few lines and no maintained library does exactly this: OWASP's CSV-injection
rule (prefix a cell that starts with = + - @ tab or CR with a single quote), Markdown escaping for Streamlit's
renderer, and the removal of C0 control characters (NUL above all: PostgreSQL refuses it in text) with bidirectional
overrides shown escaped so a name cannot display another extension."""
from __future__ import annotations

import re
import unicodedata

import pandas as pd

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#!|<>~$])")  # what makes Markdown of a name: links, images, emphasis, HTML, maths
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 and DEL; tab, LF and CR are kept (said where stored)
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def csv_cell(value):
    """A cell a spreadsheet will show as text: a string starting with = + - @ tab or CR gets a leading quote."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Every text cell of a table neutralised for CSV export (numbers untouched)."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object or pd.api.types.is_string_dtype(out[c]):
            out[c] = out[c].map(csv_cell)
    return out


def md_escape(text: str) -> str:
    """Text shown through a Markdown renderer exactly as typed (no links, images, emphasis or HTML)."""
    return _MD_SPECIAL.sub(r"\\\1", show_bidi(str(text)))


def show_bidi(text: str) -> str:
    """Bidirectional control characters shown as their code points (a right-to-left override cannot disguise a
    name's extension)."""
    return _BIDI.sub(lambda m: f"<U+{ord(m.group()):04X}>", text)


def clean_for_storage(text: str, limit: int | None = None, what: str = "text") -> tuple[str, list[str]]:
    """(text without NUL and other control characters, bidi overrides escaped, cut to `limit`; notes saying what
    was changed). Storage never refuses a case for its text; it says what it changed."""
    notes = []
    text = unicodedata.normalize("NFC", str(text))
    cleaned = _CONTROL.sub("", text)
    if cleaned != text:
        notes.append(f"{what}: {len(text) - len(cleaned)} control character(s) removed")
    shown = show_bidi(cleaned)
    if shown != cleaned:
        notes.append(f"{what}: bidirectional control characters shown as code points")
    if limit is not None and len(shown) > limit:
        notes.append(f"{what}: cut from {len(shown)} to {limit} characters")
        shown = shown[:limit]
    return shown, notes
