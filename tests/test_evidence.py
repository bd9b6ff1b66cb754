"""Typed evidence (issue 29): machine keys, a model folder's pointers to its evidence files, every pointer resolving."""
from __future__ import annotations

import json

import pytest

from models.card import ModelCard
from models.evidence import EvidenceError, load_evidence, ood_audit, rule1_figure
from tests.conftest import ROOT

RESULTS = ROOT / "benchmarks" / "results"


def test_every_shipped_evidence_pointer_resolves():
    folders = sorted(p.parent for p in (ROOT / "magnif_models").glob("*/*/card.json"))
    pointed = 0
    for f in folders:
        ev = load_evidence(f)
        if ev.rule1 is not None:
            fig = rule1_figure(ev.rule1, RESULTS)  # raises EvidenceError when the file or the recipe is missing
            assert fig.summary["auc"]["value"] == fig.summary["auc"]["value"]
            pointed += 1
        card = ModelCard.from_json(f / "card.json")
        if card.task_kind == "malignancy":  # every shipped malignancy model points to its rule-1 figure
            assert ev.rule1 is not None, f
    assert pointed >= 8


def test_a_broken_pointer_is_refused_with_one_line(tmp_path):
    (tmp_path / "evidence.json").write_text(json.dumps({"rule1": {"file": "../../etc/passwd"}}))
    with pytest.raises(EvidenceError) as e:
        load_evidence(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "evidence.json").write_text(json.dumps({"rule1": {"file": "absent.json"}}))
    with pytest.raises(EvidenceError, match="unreadable"):
        rule1_figure(load_evidence(tmp_path).rule1, RESULTS)
    (tmp_path / "evidence.json").write_text("[" * 100000)
    with pytest.raises(EvidenceError):
        load_evidence(tmp_path)


def test_the_ood_audit_has_machine_keys_and_reads_older_sentence_keys():
    legacy = {"generated non-histology": 0.88, "IDC patches (other-scale histology)": 0.97,
              "referred by QC or the OOD score (the decision rule)": {"generated": 1.0, "IDC patches": 1.0},
              "n": {"held-out training frames": 550, "generated": 48, "IDC patches": 120, "QC failures": 0}}
    a = ood_audit(legacy)
    assert a.generated_auroc == 0.88 and a.idc_auroc == 0.97 and a.referred_by_rule.idc == 1.0 and a.n.held_out == 550
    assert ood_audit(a.model_dump()) == a
    src = (ROOT / "training" / "refer.py").read_text()
    assert "OodAudit(" in src and '"generated non-histology":' not in src  # new files are written with machine keys
    from models.refer import ReferPolicy

    for f in (ROOT / "magnif_models").glob("*/*/refer.json"):
        assert ReferPolicy.load(f.parent).ood_audit.n.held_out > 0
