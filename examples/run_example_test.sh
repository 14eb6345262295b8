#!/usr/bin/env bash
# Runs the example service small (serve + load + check over loopback); it exits non-zero
# if any of its invariants fails. Used by Bazel's sh_test targets.
set -euo pipefail
binary=$1
shift
exec "$binary" --requests=600 --workers=3 --connections=6 --quiet "$@"
