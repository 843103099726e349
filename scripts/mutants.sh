#!/usr/bin/env bash
# Fault injection: applies each realistic fault of scripts/mutants.py to the source, one at a time, runs the
# default-run (not slow) tests of the device path, and shows which test failed on each (every fault must be
# caught). The table goes to results/mutants/table.md. Arguments: mutant names, --list, --tests FILES...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
exec python scripts/mutants.py "$@"
