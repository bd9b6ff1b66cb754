"""Score an archive on Ray: `python -m models batch --input DIR|manifest.csv --out results.parquet`.

Ray Data reads the list of paths, `map_batches` runs an actor pool of Predictor replicas (each loads and verifies its
model once, models.engine), and the driver writes each finished block as one Parquet part file inside the output
folder (`results.parquet/part-*.parquet`, which pandas and pyarrow read as one table). A part is written to a
temporary name and renamed, so a killed run leaves only whole parts; a rerun reads the paths already there and
scores only the rest: no row lost or duplicated. Local Ray by default (started and stopped here, with an explicit
object-store size so a 24 GB machine is not overcommitted), an existing cluster with `--address`.

Why Ray Data and not a process pool: the same command runs on one laptop or a cluster (`ray start --head`, then
`--address` from any machine), with back-pressure between reading and scoring handled by Ray.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import pandas as pd

from models.card import MAGNIFICATIONS, TASK_KINDS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
PROVENANCE_COLUMNS = ("task", "card_sha256", "weights_sha256", "software", "scored_at")
DEFAULT_OBJECT_STORE_MB = 1024  # frames are paths in the store, not pixels: 1 GB is ample and bounded


def add_batch_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--input", required=True, type=Path, help="a folder (scanned recursively for images) or a manifest "
                   "CSV with a `path` column (and optionally `magnification`)")
    a.add_argument("--out", required=True, type=Path, help="results folder of Parquet parts, e.g. results.parquet")
    a.add_argument("--task", choices=TASK_KINDS, default="malignancy")
    a.add_argument("--magnification", choices=MAGNIFICATIONS, default=None,
                   help="malignancy: for rows whose manifest or file name does not state it")
    a.add_argument("--model", default=None, help="model id under the root (default: the routed one)")
    a.add_argument("--root", type=Path, default=None, help="models root (default magnif_models/)")
    a.add_argument("--address", default=None, help="an existing Ray cluster (e.g. 10.0.0.5:6379); default: local Ray")
    a.add_argument("--workers", type=int, default=1, help="Predictor replicas (actors), one model load each")
    a.add_argument("--batch-size", type=int, default=16, help="inputs per block sent to a replica and per Parquet part")
    a.add_argument("--object-store-mb", type=int, default=DEFAULT_OBJECT_STORE_MB,
                   help="local Ray's object store size (ignored with --address)")
    a.add_argument("--tta", action="store_true", help="average the 8 dihedral views (8x slower)")


def list_inputs(source: Path, task: str, magnification: str | None) -> pd.DataFrame:
    """(path, magnification) per input, sorted and de-duplicated; magnification from the manifest, else the option,
    else the BreakHis file name ("" where none applies)."""
    from models.case import magnification_from_name

    if source.is_dir():
        paths = sorted(str(p) for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        df = pd.DataFrame({"path": paths, "magnification": [""] * len(paths)})
    elif source.is_file():
        df = pd.read_csv(source, dtype=str, keep_default_na=False)
        if "path" not in df:
            raise ValueError(f"{source}: a manifest needs a `path` column (found {list(df.columns)[:6]})")
        base = source.parent
        df["path"] = [p if os.path.isabs(p) else str(base / p) for p in df["path"]]
        df["magnification"] = df["magnification"] if "magnification" in df else ""
        df = df[["path", "magnification"]]
    else:
        raise FileNotFoundError(f"{source}: no such folder or manifest")
    if task == "malignancy":
        df["magnification"] = [m or magnification or magnification_from_name(p) or ""
                               for p, m in zip(df["path"], df["magnification"])]
    else:
        df["magnification"] = ""
    return df.drop_duplicates("path").reset_index(drop=True)


def done_paths(out: Path) -> set[str]:
    """Paths already scored in earlier runs (whole parts only: temporary files of a killed run are ignored)."""
    if not out.is_dir():
        return set()
    done: set[str] = set()
    for part in sorted(out.glob("part-*.parquet")):
        done |= set(pd.read_parquet(part, columns=["path"])["path"])
    return done


def read_results(out: Path) -> pd.DataFrame:
    """Every row of a results folder as one table."""
    parts = sorted(out.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()


def write_part(out: Path, rows: pd.DataFrame) -> Path:
    """One Parquet part, written under a temporary name and renamed: a reader never sees half a part."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = out / f".{final.name}.tmp"
    rows.to_parquet(tmp, index=False)
    os.replace(tmp, final)
    return final


class Scorer:
    """A Predictor replica for Ray's actor pool: loads (and verifies) its model once, then scores blocks of paths."""

    def __init__(self, task: str, model: str | None, root: str | None, tta: bool, threads: int, batch_size: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.task, self.model, self.root, self.tta, self.batch_size = task, model, root, tta, batch_size
        self.predictors: dict = {}
        self.loaded: dict = {}

    def _predictor(self, magnification: str | None):
        from models.engine import load_predictor
        from models.inference import load_model_folder

        key = magnification or ""
        if key not in self.predictors:
            def loader(folder):
                if str(folder) not in self.loaded:
                    self.loaded[str(folder)] = load_model_folder(folder)
                return self.loaded[str(folder)]

            self.predictors[key] = load_predictor(self.task, magnification, model=self.model, root=self.root,
                                                  tta=self.tta, loader=loader, batch_size=self.batch_size)
        return self.predictors[key]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from models.engine import ServeError

        rows: list[dict] = []
        for mag, grp in batch.groupby("magnification", sort=False):
            try:
                pred = self._predictor(mag or None)
            except ServeError as exc:  # this magnification has no model: every row says so, the rest go on
                rows += [_refused_row(p, mag, self.task, str(exc)) for p in grp["path"]]
                continue
            lm = pred.model
            for r in pred.predict(list(grp["path"])):
                row = {**pred.row(r), "task": self.task, "card_sha256": lm.card_sha256,
                       "weights_sha256": lm.card.weights_sha256, "software": _software(),
                       "scored_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")}
                rows.append(row)
        return _normalise(pd.DataFrame(rows))


def _software() -> str:
    from models.config import software_version

    return software_version()


def _refused_row(path: str, mag: str, task: str, why: str) -> dict:
    return {"path": path, "magnification": mag, "model_id": "", "decision": "refer", "decision_kind": "unreadable",
            "reason": "no model serves this input", "warning": why, "task": task}


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Stable column types across parts (probabilities as floats, empty as NaN; text as strings)."""
    for c in ("p_malignant", "p_idc", "p_subtype"):
        if c in df:
            df[c] = pd.to_numeric(df[c].replace("", None), errors="coerce").astype("float64")
    for c in df.columns:
        if c not in ("p_malignant", "p_idc", "p_subtype"):
            df[c] = df[c].fillna("").astype(str)
    return df


def run_batch(source: Path, out: Path, task: str = "malignancy", magnification: str | None = None,
              model: str | None = None, root: Path | None = None, address: str | None = None, workers: int = 1,
              batch_size: int = 16, object_store_mb: int = DEFAULT_OBJECT_STORE_MB, tta: bool = False,
              progress: bool = True, limit_blocks: int | None = None) -> dict:
    """Score every input not yet in `out`; returns counts and timings (Ray start-up apart from scoring)."""
    import ray
    from tqdm import tqdm

    from models.config import models_root

    inputs = list_inputs(source, task, magnification)
    done = done_paths(out)
    todo = inputs[~inputs["path"].isin(done)].reset_index(drop=True)
    stats = {"inputs": len(inputs), "already_done": len(inputs) - len(todo), "scored": 0, "workers": workers,
             "ray_start_s": 0.0, "score_s": 0.0}
    if todo.empty:
        return stats
    t0 = time.perf_counter()
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(workers, 1), object_store_memory=object_store_mb * 2**20, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
    stats["ray_start_s"] = time.perf_counter() - t0
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar, ours, counting rows written
        ctx.print_on_execution_start = False
        threads = max(1, (os.cpu_count() or 1) // max(workers, 1)) if not address else 1
        ds = ray.data.from_items(todo.to_dict("records"), override_num_blocks=max(1, -(-len(todo) // batch_size)))
        ds = ds.map_batches(Scorer, batch_format="pandas", batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=1, fn_constructor_kwargs={"task": task, "model": model,
                                                               "root": str(root or models_root()), "tta": tta,
                                                               "threads": threads, "batch_size": batch_size})
        t1 = time.perf_counter()
        with tqdm(total=len(todo), desc="scored", disable=not progress, file=sys.stderr) as bar:
            for i, block in enumerate(ds.iter_batches(batch_size=None, batch_format="pandas")):
                if len(block):
                    write_part(out, block)
                    stats["scored"] += len(block)
                    bar.update(len(block))
                if limit_blocks is not None and i + 1 >= limit_blocks:
                    break
        stats["score_s"] = time.perf_counter() - t1
    finally:
        if started_here:
            ray.shutdown()
    return stats


def run_batch_command(args) -> int:
    try:
        stats = run_batch(args.input, args.out, args.task, args.magnification, args.model, args.root, args.address,
                          args.workers, args.batch_size, args.object_store_mb, args.tta)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    res = read_results(args.out)
    bad = int((res["decision_kind"] == "unreadable").sum()) if len(res) else 0
    print(f"{stats['scored']} scored now, {stats['already_done']} already in {args.out}; {len(res)} rows in all "
          f"({bad} could not be analysed); Ray start {stats['ray_start_s']:.1f} s, scoring {stats['score_s']:.1f} s",
          file=sys.stderr)
    return 0
