#!/usr/bin/env bash
# The project's test command: installs what it needs (once), then runs the test suite.
# Slow/browser tests run too when RUN_SLOW=1 (CI sets it when time allows).
set -euo pipefail
cd "$(dirname "$0")"
venv=$(scripts/ensure_venv.sh)
markers="not slow"
[ "${RUN_SLOW:-0}" = "1" ] && markers=""
exec "$venv/bin/python" -m pytest -q --durations=15 ${markers:+-m "$markers"} "$@"
