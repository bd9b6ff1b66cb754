"""Bind each shipped refer policy to its OOD scorer (issue 28): record ood.npz's sha256 in refer.json and rewrite the
OOD audit with machine keys (models.evidence.OodAudit). Policies written by `python -m training fit-refer` already
carry both; this upgrades folders fitted before. Nothing is refitted: the band, the scorer and the figures are kept.

    python scripts/bind_refer_policies.py magnif_models/*/*/
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.archs import file_sha256  # noqa: E402
from models.evidence import ood_audit  # noqa: E402
from models.refer import OOD_FILE, POLICY_FILE  # noqa: E402


def main(folders: list[str]) -> None:
    for f in map(Path, folders):
        p = f / POLICY_FILE
        if not p.is_file():
            continue
        d = json.loads(p.read_text())
        if (f / OOD_FILE).is_file():
            d["ood_sha256"] = file_sha256(f / OOD_FILE)
        d["ood_auroc"] = ood_audit(d.get("ood_auroc")).model_dump()
        p.write_text(json.dumps(d, indent=1) + "\n")
        print(f"bound: {p}")


if __name__ == "__main__":
    main(sys.argv[1:])
