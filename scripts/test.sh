#!/usr/bin/env bash
# Sets up the test dependencies and runs the whole suite. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# The suite runs servers, brokers and services side by side on few cores: OpenMP threads
# that spin while they wait take the cores from the rest (torch's demo-model decode ran
# 3 to 10x slower beside them). Passive waiting leaves them to whoever has work.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "pytest collected no tests: that is a failure of the suite, not a pass" >&2
    exit 1
fi
exit $rc
