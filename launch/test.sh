#!/usr/bin/env bash
# Run the whole test suite (CPU; 8 simulated devices for the mesh tests), in .venv with the test
# extras, on two worker processes (pytest-xdist). Extra arguments go to pytest, e.g.
# `bash launch/test.sh -k resume`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/_venv.sh
. launch/_venv.sh
tjax_venv "test"
exec python -m pytest tests -q -n 2 --dist worksteal "$@"
