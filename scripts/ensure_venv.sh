#!/usr/bin/env bash
# Prints the path of a virtualenv built from requirements.txt, building it first when absent.
# The venv lives outside the clone, keyed by a hash of requirements.txt, so later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
hash=$(sha256sum requirements.txt | cut -c1-16)
venv="${BREAKHIS_VENV_ROOT:-$HOME/.cache/breakhis_dashboard}/venv-$hash"
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --upgrade pip >&2 || true
  "$venv/bin/pip" install --quiet -r requirements.txt >&2
  touch "$venv/.complete"
fi
echo "$venv"
