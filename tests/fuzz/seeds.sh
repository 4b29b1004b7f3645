#!/usr/bin/env bash
# Regenerates the seed corpora (tests/fuzz/corpus/) from real CA answers: runs the CA
# emulator's own test suite with ENROLL_EMULATOR_DUMP set, so every request and answer it
# serves is recorded, then sorts them into one corpus per target (seeds.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
dump=$(mktemp -d)
trap 'rm -rf "$dump"' EXIT
ENROLL_EMULATOR_DUMP=$dump cargo test -p enroll-tests --lib -- --test-threads=2
python3 tests/fuzz/seeds.py "$dump"
