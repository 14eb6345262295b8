#!/usr/bin/env bash
# Runs the example service small; it exits non-zero if any of its invariants fails.
set -euo pipefail
binary=$1
shift
exec "$binary" --requests=400 --workers=3 --stale-rate=0.05 --failure-rate=0.1 --quiet "$@"
