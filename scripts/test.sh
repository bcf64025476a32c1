#!/usr/bin/env bash
# The whole test suite: lint, then pytest (real Ray, real DeepSpeed, tiny assets).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
ruff check elastic_ft tests benchmarks scripts
# DeepSpeed JIT-compiles its CPU comm op on first use (~30 s): pay it once here, not per test.
python -m elastic_ft.core.warmup
# Token auth is for real clusters; the tests' local clusters run without it.
export RAY_AUTH_MODE=disabled
python -m pytest -q -x --durations=15 "$@"
