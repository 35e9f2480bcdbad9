#!/usr/bin/env bash
# Installs speechbrain-spg with its test extra, then runs the whole suite
# (unit tests, doctests of every public function, recipe end-to-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest "$@"
