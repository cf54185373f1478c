#!/usr/bin/env bash
# Sets up everything Vigil needs on a fresh machine, idempotently:
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   runtime and test dependencies
# A virtual environment in .venv gets the CPU build of torch (pinned: a loose torch
# requirement would pull a CUDA build of several GB), then this project, editable.
# Set VIGIL_TORCH_INDEX to a PyTorch CPU wheel index where torch==2.13.0 is not local.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

stamp=".venv/.vigil-setup${extras:+-test}"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || scripts/setup.sh -nt "$stamp" ]]; then
    torch_index=()
    [[ -n "${VIGIL_TORCH_INDEX:-}" ]] && torch_index=(--index-url "$VIGIL_TORCH_INDEX")
    "${pip[@]}" install "${torch_index[@]}" "torch==2.13.0"
    "${pip[@]}" install -e ".${extras}"
    touch "$stamp"
fi

# Test tools from Debian: promtool and amtool check deploy/ (prometheus, prometheus-alertmanager);
# the page's browser test drives headless Chromium through its chromedriver (chromium, chromium-driver).
if [[ -n "$extras" ]] && ! { command -v promtool && command -v amtool && command -v chromium \
                               && command -v chromedriver; } >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get -qq update >/dev/null
        apt-get -qq install -y --no-install-recommends prometheus prometheus-alertmanager \
            chromium chromium-driver >/dev/null
    else
        echo "setup: promtool/amtool/chromium missing; as root: apt-get install prometheus" \
             "prometheus-alertmanager chromium chromium-driver" >&2
    fi
fi

# Tool environments: the protoc that makes protos/*_pb2.py, and protobuf 5 and 6 runtimes
# the tests decode events with (scripts/gen_protos.py says why).
if [[ -n "$extras" ]]; then
    .venv/bin/python scripts/gen_protos.py --envs-only >/dev/null
fi

# The demo model (about 100 MB), fetched once into ~/.cache/vigil (or $VIGIL_CACHE_DIR).
.venv/bin/vigil fetch-demo
