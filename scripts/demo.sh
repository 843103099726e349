#!/usr/bin/env bash
# The main job on the embedded default: make sure the demo draft/target pair is there (shipped
# weights checked against their manifest, or trained from the seed), answer a few held-out
# questions with the target, then print the held-out eval table.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
covspec demo build
covspec demo show --n 6
covspec eval --split heldout "$@"
