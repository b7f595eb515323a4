#!/usr/bin/env bash
# The linter CI runs before the suite: ruff (pyproject.toml [tool.ruff]) on the package, tests and benchmarks.
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec ruff check qgalore_dist tests benchmarks "$@"
