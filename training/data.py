"""Index BreakHis from the official tree, the official archive, or a folder with manifest.csv.

Every source becomes one table with `path, label, subtype, magnification, slide, patient` (+ `source`);
unreadable, truncated or mislabelled files are listed in `skipped` and never crash a run.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import zlib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

COLUMNS = ["path", "label", "subtype", "magnification", "slide", "patient", "source"]
SUBTYPES = {
    "A": "adenosis", "F": "fibroadenoma", "PT": "phyllodes_tumor", "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma", "LC": "lobular_carcinoma", "MC": "mucinous_carcinoma", "PC": "papillary_carcinoma",
}
BENIGN_SUBTYPES = {"adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma"}
# e.g. SOB_B_A-14-22549AB-40-001.png: class, subtype, year, slide, magnification, frame
NAME_RE = re.compile(r"^SOB_(?P<cls>[BM])_(?P<sub>[A-Z]+)-(?P<year>\d+)-(?P<slide>\d+[A-Z]*)-(?P<mag>\d+)-(?P<seq>\d+)$")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
OFFICIAL_URL = "http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz"


@dataclass
class IndexResult:
    frame: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def summary(self) -> str:
        df = self.frame
        lines = [f"{len(df)} images, {df['patient'].nunique() if len(df) else 0} patients indexed; {len(self.skipped)} skipped"]
        if len(df):
            t = df.groupby(["magnification", "label"]).agg(images=("path", "size"), patients=("patient", "nunique"))
            lines.append(t.to_string())
        for p, why in self.skipped[:50]:
            lines.append(f"  skipped {p}: {why}")
        if len(self.skipped) > 50:
            lines.append(f"  ... and {len(self.skipped) - 50} more")
        return "\n".join(lines)


def patient_from_slide(slide: str) -> str:
    """Patient id = numeric stem of the slide id (22549AB, 22549CD, 22549G -> 22549)."""
    m = re.match(r"\d+", str(slide))
    if not m:
        raise ValueError(f"slide id {slide!r} has no numeric stem")
    return m.group(0)


def parse_breakhis_name(filename: str) -> dict | None:
    """Fields of an official BreakHis file name, or None when it is not one."""
    m = NAME_RE.match(Path(filename).stem)
    if not m or m["sub"] not in SUBTYPES:
        return None
    return {
        "label": "benign" if m["cls"] == "B" else "malignant",
        "subtype": SUBTYPES[m["sub"]],
        "magnification": f"{int(m['mag'])}X",
        "slide": m["slide"],
        "patient": patient_from_slide(m["slide"]),
    }


_READABLE_MEMO: dict[tuple, str | None] = {}


def _readable(path: Path) -> str | None:
    """None if the frame decodes completely (the very loader training and inference use), else the reason.

    PIL's verify() reads headers only, so a truncated JPEG used to pass the index and vanish later in training;
    a full decode here makes the index count exactly what training gets. Results are memoised per file version
    (path, size, mtime), so each frame is decoded once per process.
    """
    from models.preprocess import ImageError, load_image

    try:
        st = path.stat()
    except OSError as exc:
        return f"unreadable file ({exc.strerror})"
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _READABLE_MEMO:
        if st.st_size == 0:
            why = "empty file"
        else:
            try:
                load_image(path)
                why = None
            except ImageError as exc:
                why = f"unreadable image ({str(exc).split(': ', 1)[-1]})"
        _READABLE_MEMO[key] = why
    return _READABLE_MEMO[key]


def index_tree(root: str | Path) -> IndexResult:
    """Official layout: every field parsed from the file name, cross-checked against the folders."""
    root = Path(root)
    rows, skipped = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
            continue
        f = parse_breakhis_name(p.name)
        if f is None:
            skipped.append((str(p), "file name is not an official BreakHis name"))
            continue
        parts = {x.lower() for x in p.relative_to(root).parts[:-1]}
        other = ({"benign", "malignant"} - {f["label"]}) & parts
        if other:
            skipped.append((str(p), f"mislabelled: folder says {other.pop()}, file name says {f['label']}"))
            continue
        mag_dirs = {x for x in p.relative_to(root).parts[:-1] if re.fullmatch(r"\d+X", x)}
        if mag_dirs and f["magnification"] not in mag_dirs:
            skipped.append((str(p), f"mislabelled: folder says {mag_dirs.pop()}, file name says {f['magnification']}"))
            continue
        why = _readable(p)
        if why:
            skipped.append((str(p), why))
            continue
        rows.append({"path": str(p.resolve()), **f, "source": "breakhis-tree"})
    return IndexResult(pd.DataFrame(rows, columns=COLUMNS), skipped)


def index_manifest(folder: str | Path) -> IndexResult:
    """A folder with manifest.csv (paths relative to it), as ../shared/data/* comes."""
    folder = Path(folder)
    man = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    missing = {"path", "label", "magnification", "patient"} - set(man.columns)
    if missing:
        raise ValueError(f"{folder}/manifest.csv lacks columns {sorted(missing)}")
    rows, skipped = [], []
    base = folder.resolve()
    for r in man.to_dict("records"):
        rel = Path(r["path"])
        p = folder / rel
        if rel.is_absolute() or not p.resolve().is_relative_to(base):
            skipped.append((r["path"], "path points outside the data folder (absolute or '..'): refused"))
            continue
        if r["label"] not in ("benign", "malignant"):
            skipped.append((str(p), f"label {r['label']!r} is not benign|malignant"))
            continue
        f = parse_breakhis_name(p.name)
        if f and f["label"] != r["label"]:
            skipped.append((str(p), f"mislabelled: manifest says {r['label']}, file name says {f['label']}"))
            continue
        if not p.is_file():
            skipped.append((str(p), "listed in manifest.csv but missing"))
            continue
        slide = r.get("slide", "")
        try:
            patient = patient_from_slide(slide) if slide else r["patient"]
        except ValueError as exc:  # one odd slide id costs its row, never the whole index
            skipped.append((str(p), str(exc)))
            continue
        if not str(patient).strip():
            skipped.append((str(p), "no patient id"))
            continue
        why = _readable(p)
        if why:
            skipped.append((str(p), why))
            continue
        rows.append({"path": str(p.resolve()), "label": r["label"], "subtype": r.get("subtype", ""),
                     "magnification": r["magnification"], "slide": slide, "patient": str(patient),
                     "source": r.get("source", "manifest")})
    return IndexResult(pd.DataFrame(rows, columns=COLUMNS), skipped)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "breakhis_dashboard"


def unpack_archive(archive: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, list[tuple[str, str]]]:
    """Verify (sha256 + a full read) and unpack once; later calls reuse the cache. Returns the folder and the
    members refused as unsafe (absolute paths, '..', links or devices outside it), each by name: the rest of
    the archive is still extracted. A corrupt or truncated archive leaves nothing behind."""
    archive = Path(archive)
    h = hashlib.sha256()
    with open(archive, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    dest = Path(cache_dir or default_cache_dir()) / "archives" / h.hexdigest()[:16]
    done = dest / ".complete"
    if done.is_file():
        return dest, [tuple(x) for x in json.loads((dest / ".refused.json").read_text())] \
            if (dest / ".refused.json").is_file() else []
    if dest.exists():
        shutil.rmtree(dest)  # a partial extraction from an interrupted run
    dest.mkdir(parents=True)
    refused: list[tuple[str, str]] = []
    try:
        with tarfile.open(archive) as tf:
            for member in tf:
                try:
                    tf.extract(member, dest, filter="data")  # 'data' refuses absolute paths and links outside dest
                except tarfile.FilterError as exc:
                    refused.append((f"{archive.name}:{member.name}", f"unsafe archive member refused ({exc})"))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise ValueError(f"{archive}: archive is corrupt or truncated ({exc})") from None
    (dest / ".refused.json").write_text(json.dumps(refused))
    done.write_text(f"sha256 {h.hexdigest()}\nsource {archive}\n")
    return dest, refused


def index_source(src: str | Path, cache_dir: str | Path | None = None) -> IndexResult:
    """Dispatch: archive file, manifest folder, or official tree."""
    src = Path(src)
    if src.is_file() and (src.name.endswith((".tar.gz", ".tgz", ".tar"))):
        dest, refused = unpack_archive(src, cache_dir)
        res = index_tree(dest)
        res.skipped[:0] = refused
        return res
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such data source")
    if (src / "manifest.csv").is_file():
        return index_manifest(src)
    return index_tree(src)


def fetch_breakhis(to: str | Path, url: str = OFFICIAL_URL, timeout: float = 20.0) -> Path:
    """Download the official archive with a progress bar; a clear error where the network does not allow."""
    from tqdm import tqdm

    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    target = to / Path(url).name
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise ConnectionError(
            f"could not download {url} ({exc}). Download BreaKHis_v1.tar.gz by hand from the authors' site "
            f"and pass it with --data PATH/BreaKHis_v1.tar.gz") from None
    tmp.rename(target)
    return target
