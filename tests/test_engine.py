"""One serving engine (issue 29): a Predictor per task kind, reached by every entry point; routing in one place;
no import cycle in models/; a CLI that is a table of commands."""
from __future__ import annotations

import ast
import io
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT


def _png(colour=(200, 120, 190), size=(700, 460)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, "PNG")
    return b.getvalue()


def test_one_predictor_per_task_kind_is_registered():
    from models.card import TASK_KINDS
    from models.engine import PREDICTORS, Predictor, register_predictor

    assert set(PREDICTORS) == set(TASK_KINDS)
    assert all(issubclass(c, Predictor) and c.task_kind == k for k, c in PREDICTORS.items())

    class Again(PREDICTORS["idc"]):  # a second predictor for a task is refused, not silently swapped in
        task_kind = "idc"

    with pytest.raises(ValueError, match="already registered"):
        register_predictor(Again)


def test_a_bad_input_is_a_result_with_its_reason_and_the_batch_goes_on(tiny_models_root):
    from models.engine import load_predictor

    pred = load_predictor("malignancy", "100X", root=tiny_models_root)
    res = pred.predict([("broken.png", b"not an image"), ("ok.png", _png((160, 90, 170)))])
    assert [r.name for r in res] == ["broken.png", "ok.png"]
    assert res[0].probability is None and res[0].decision == "refer" and res[0].decision_kind == "unreadable"
    assert res[0].error and "\n" not in res[0].error
    assert res[1].probability is not None and res[1].model_id == pred.model_id and len(res[1].card_sha256) == 64
    row = pred.row(res[0])
    assert list(row) == list(pred.csv_columns) and row["p_malignant"] == ""


def test_a_predictor_refuses_a_model_of_another_task(tiny_models_root):
    from models.engine import IdcPredictor
    from models.inference import load_model_folder

    with pytest.raises(ValueError, match="not a idc model"):
        IdcPredictor(load_model_folder(tiny_models_root / "100X" / "efficientnet_lite2"))


def test_every_entry_point_reaches_the_same_predictor(tiny_models_root, monkeypatch, tmp_path, capsys):
    """The CLI, the pages' analysis, the batch replicas and evaluation all run MalignancyPredictor.predict."""
    from models.engine import MalignancyPredictor

    calls: list[str] = []
    real = MalignancyPredictor.predict

    def spy(self, items, each=None):
        calls.append(sys._getframe(1).f_code.co_filename)
        return real(self, items, each)

    monkeypatch.setattr(MalignancyPredictor, "predict", spy)
    frame = tmp_path / "SOB_B_A-14-22549AB-100-001.png"
    frame.write_bytes(_png((170, 100, 180)))

    from models.__main__ import main as models_cli

    assert models_cli(["predict", "--magnification", "100X", "--root", str(tiny_models_root), "--no-subtype",
                       str(frame)]) == 0
    assert models_cli(["case", "--root", str(tiny_models_root), str(frame)]) == 0
    from app.dashboard import analyse_uploads
    from models.inference import load_model_folder

    analyse_uploads(MalignancyPredictor(load_model_folder(tiny_models_root / "100X" / "efficientnet_lite2"),
                                        magnification="100X"), [("f.png", frame.read_bytes())])
    import pandas as pd

    from models.batch import Scorer

    out = Scorer("malignancy", None, str(tiny_models_root), False, 1, 4)(
        pd.DataFrame({"path": [str(frame)], "magnification": ["100X"]}))
    assert out["p_malignant"].notna().all()
    capsys.readouterr()
    assert len(calls) >= 4
    # evaluation: the held-out scoring loop is the engine's (read from the source: it needs a data folder to run)
    src = (ROOT / "training" / "evaluate.py").read_text()
    assert "MalignancyPredictor(" in src and "predict_images" not in src


def test_the_pages_and_scripts_do_not_predict_by_hand():
    """The old per-place prediction paths are gone: nothing outside the engine decodes-and-decides by itself."""
    gone = ("analyse_upload(", "predict_files(", "predict_patches(", "lm.decide(", "default_model_id(m")
    hits = []
    for f in [*ROOT.glob("app/*.py"), *ROOT.glob("pages/*.py"), *ROOT.glob("models/**/*.py"),
              *ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("training/*.py")]:
        text = f.read_text()
        hits += [f"{f.relative_to(ROOT)}: {g}" for g in gone if g in text]
    assert not hits, hits


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """Every models.* module a file imports, at the top or inside functions (a lazy import is still a cycle)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("models"):
            out.add(node.module)
            for a in node.names:  # `from models.engine import base` imports a module
                if (package_root / (node.module.replace(".", "/") + f"/{a.name}.py")).is_file():
                    out.add(f"{node.module}.{a.name}")
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("models")}
    return out


def test_no_import_cycle_in_models():
    files = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
             for f in ROOT.glob("models/**/*.py")}
    graph = {m: {i for i in _module_imports(f, ROOT) if i in files and i != m and i != "models"}
             for m, f in files.items()}
    # a package's own __init__ imports its modules; a module importing its package (not itself) is the edge back
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]) if n in stack else f"{m} -> {n}")
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    assert "models.inference" not in graph["models.refer"] and "models.refer" in graph["models.inference"]


def test_thresholds_are_defined_once_and_routing_lives_in_models():
    assert not (ROOT / "training" / "routing.py").exists()
    pattern = re.compile(r"^\s*(FEW_PATIENTS|WEAK_AUC|MIN_PATIENTS_PER_CLASS)\s*=", re.M)
    defined = [str(f.relative_to(ROOT)) for d in ("models", "app", "training", "pages", "scripts", "benchmarks")
               for f in ROOT.glob(f"{d}/**/*.py") if pattern.search(f.read_text())]
    assert defined == ["models/routing/thresholds.py"], defined
    weak = re.compile(r"auc[\]'\"]*\)?\s*<\s*0\.7\d")  # a hand-written weak-AUC cut-off anywhere else
    bad = [str(f.relative_to(ROOT)) for d in ("app", "pages", "models")
           for f in ROOT.glob(f"{d}/**/*.py") if weak.search(f.read_text())]
    assert not bad, bad


def test_resolve_gives_the_route_and_its_notes(tiny_models_root):
    from models.routing import WEAK_AUC, resolve

    r = resolve("malignancy", "100X", tiny_models_root)
    assert r.model_id and r.key == "100X"
    from models.routing import few_patients

    assert few_patients(r.entry["n_patients"]) == any("few patients" in n for n in r.notes)
    assert few_patients({"benign": 3, "malignant": 30}) and not few_patients({"benign": 10, "malignant": 12})
    assert (r.entry["auc"] < WEAK_AUC) == any("weak model" in n for n in r.notes)
    none = resolve("malignancy", "400X", tiny_models_root)
    assert none.model_id is None and "No model is trained for 400X" in none.notes[0] and none.train_command
    assert resolve("idc", root=tiny_models_root).model_id.startswith("idc/")
    with pytest.raises(ValueError):
        resolve("malignancy", "37X", tiny_models_root)


def test_the_cli_is_a_table_and_help_lists_every_command(capsys):
    from models.__main__ import COMMANDS as MODEL_COMMANDS
    from training.__main__ import COMMANDS as TRAINING_COMMANDS

    for prog, mod, commands in (("models", "models.__main__", MODEL_COMMANDS),
                                ("training", "training.__main__", TRAINING_COMMANDS)):
        main = sys.modules[mod].main
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        for c in commands:
            assert c.name in text and "\n" not in c.help.strip(), c.name
    assert {"predict", "case", "batch", "check-card"} <= {c.name for c in MODEL_COMMANDS}
    assert len((ROOT / "training" / "__main__.py").read_text().split("elif args.cmd")) == 1  # no if/elif chain


def test_model_ids_are_never_taken_from_the_working_directory(tiny_models_root, tmp_path, monkeypatch):
    """A folder in the current directory named like the routed model id must not shadow the models root."""
    from models.engine import model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "100X" / "efficientnet_lite2").mkdir(parents=True)
    (tmp_path / "100X" / "efficientnet_lite2" / "card.json").write_text("{}")
    assert model_path("100X/efficientnet_lite2", tiny_models_root) == tiny_models_root / "100X" / "efficientnet_lite2"
    assert model_path("./100X/efficientnet_lite2", tiny_models_root) == Path("./100X/efficientnet_lite2")
