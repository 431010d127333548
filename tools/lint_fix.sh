#!/usr/bin/env bash
# Applies ruff's mechanical fixes (import order, unused imports, pyupgrade) and its formatter
# to the whole tree, once; afterwards `ruff check .` and `ruff format --check .` (run by CI
# and pre-commit) pass. Needs the dev tools: pip install -e ".[dev]".
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check --fix --exit-zero --quiet .
ruff format .
ruff check .
ruff format --check .
