#!/usr/bin/env bash
# Set up .venv (idempotent) and run the test suite. Extra arguments go to pytest as given. Without arguments the
# slow and corpus tests are left out (-m "not slow and not corpus"), unless DROPE_FULL_TESTS=1.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh" || exit 1
cd "$root"
export QT_QPA_PLATFORM=offscreen MPLBACKEND=Agg
args=("$@")
if [[ $# -eq 0 && "${DROPE_FULL_TESTS:-0}" != 1 ]]; then
    args=(-m "not slow and not corpus")
fi
.venv/bin/python -m pytest "${args[@]}"
rc=$?
if [[ $rc -eq 5 ]]; then
    echo "pytest collected no tests" >&2
fi
exit $rc
