#!/usr/bin/env bash
# Run the whole test suite (CPU; 8 simulated devices for the mesh tests), in .venv with the test
# extras, on two worker processes (pytest-xdist). Extra arguments go to pytest, e.g.
# `bash launch/test.sh -k resume`; test paths among them run those tests only
# (`bash launch/test.sh tests/test_launch.py`; without any, pytest runs pyproject's testpaths).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/_venv.sh
. launch/_venv.sh
tjax_venv "test"
# JAX's CUDA plugin (no NVIDIA libraries), kept out of .venv's site-packages: installed there it
# makes every jax process on a machine without CUDA log that it found none. tests/test_aot.py puts
# it on PYTHONPATH to compile for GPU hosts (TJAX_CUDA_AOT names the folder).
export TJAX_CUDA_AOT="$PWD/.venv/cuda_aot"
jax_version="$(python -c 'import jax; print(jax.__version__)')"
if [[ "$(uname -sm)" == "Linux x86_64" && ! -f "$TJAX_CUDA_AOT/.jax-$jax_version" ]]; then
  rm -rf "$TJAX_CUDA_AOT"
  python -m pip install -q --no-deps --target "$TJAX_CUDA_AOT" "jax-cuda12-plugin==$jax_version" \
    "jax-cuda12-pjrt==$jax_version" && touch "$TJAX_CUDA_AOT/.jax-$jax_version"
fi
exec python -m pytest -q -n 2 --dist worksteal "$@"
