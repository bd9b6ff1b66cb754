#!/usr/bin/env bash
# Installs (once) and starts the dashboard on http://127.0.0.1:8501 (this machine only).
# A shared lab server: BREAKHIS_ADDRESS=0.0.0.0 ./run.sh, behind an authenticating reverse proxy (README).
set -euo pipefail
cd "$(dirname "$0")"
venv=$(scripts/ensure_venv.sh)
exec "$venv/bin/streamlit" run streamlit_app.py --server.address "${BREAKHIS_ADDRESS:-127.0.0.1}" "$@"
