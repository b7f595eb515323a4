#!/usr/bin/env bash
# The whole test suite, in an environment built from the repository's files.
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec python -m pytest -q --durations=15 "$@" tests
