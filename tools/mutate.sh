#!/usr/bin/env bash
# Mutation testing (not run in CI): mutmut breaks the code on purpose, one small change at a
# time, and runs the tests; a mutant the tests do not notice "survives". It runs in a
# throwaway copy of the tree, so the working tree is never touched.
#
#   tools/mutate.sh                              # model.py, logs.py, data.py, callbacks/
#   MUTATE_PATHS=src/torcheras/logs.py MUTATE_TESTS="tests/test_logs.py" tools/mutate.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
paths="${MUTATE_PATHS:-src/torcheras/model.py,src/torcheras/logs.py,src/torcheras/data.py,src/torcheras/callbacks/}"
tests="${MUTATE_TESTS:-tests}"
work="$(mktemp -d)"
trap 'echo "mutants and results kept in $work"' EXIT
git -C "$root" ls-files -z | (cd "$root" && xargs -0 cp --parents -t "$work")
cd "$work"
runner="$python -m pytest -x -q -p no:randomly -p no:cacheprovider $tests"
# PYTHONPATH makes the copy's (mutated) sources the ones imported, not the installed tree's
export PYTHONPATH="$work/src"
"$python" -m mutmut run --paths-to-mutate "$paths" --runner "$runner" --tests-dir tests || true
"$python" -m mutmut results
