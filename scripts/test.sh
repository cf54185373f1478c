#!/usr/bin/env bash
# Sets up the test dependencies and runs the whole suite. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "pytest collected no tests: that is a failure of the suite, not a pass" >&2
    exit 1
fi
exit $rc
