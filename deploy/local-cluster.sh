#!/bin/sh
# The scale-out topology on one machine: PostgreSQL, two llama-server workers, two Ktulhu
# front-ends and nginx in front of them on port 8080 (docs/scale-out.md). Ctrl-C stops them all.
#   deploy/local-cluster.sh [--port 8080] [--workers 2] [--frontends 2] [--slots 2]
#   deploy/local-cluster.sh down      # stop what a killed run left behind
# Run from the repository root after `make setup model`.
set -eu
cd "$(dirname "$0")/.."
if [ "${1:-}" = "down" ]; then
    shift
    exec .venv/bin/python -m ktulhu cluster down "$@"
fi
exec .venv/bin/python -m ktulhu cluster up "$@"
