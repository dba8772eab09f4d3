#!/usr/bin/env bash
# The Triton kernels under the oldest Triton the `gpu` extra admits (3.6, which torch 2.11
# ships), on the CPU interpreter. Makes a virtual environment that sees this machine's packages
# (torch, the test extra) and replaces only triton in it, then runs the Triton test files.
#
#   bash benchmarks/triton_oldest.sh            # venv in ${TMPDIR:-/tmp}/safeblend-triton-oldest
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRITON_VERSION="${TRITON_VERSION:-3.6.0}"
VENV="${VENV:-${TMPDIR:-/tmp}/safeblend-triton-oldest}"
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q "triton==$TRITON_VERSION"
"$VENV/bin/python" -c "import triton; print('triton', triton.__version__)"
cd "$REPO"
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_triton_kernels.py tests/test_triton_dare.py tests/test_cuda_pipeline.py
