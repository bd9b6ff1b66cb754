#!/usr/bin/env bash
# Installs (once) and starts the dashboard on http://localhost:8501
set -euo pipefail
cd "$(dirname "$0")"
venv=$(scripts/ensure_venv.sh)
exec "$venv/bin/streamlit" run streamlit_app.py "$@"
