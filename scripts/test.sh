#!/usr/bin/env bash
# Install safeblend with its test dependencies (torch CPU 2.13.0, triton, transformers, pytest)
# and run the whole test suite. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
python -m pytest -q "$@"
