#!/usr/bin/env bash
# The GPU check in one command: the CUDA tests, then the GPU suite, each under its own time
# limit so that a hang in one still leaves the other's results; logs and every *_cuda* result
# file are packed into one archive.
#
#   bash benchmarks/gpu_check.sh [ARCHIVE]      # default: gpu_check.tgz in the repository root
#
# TESTS_TIMEOUT and SUITE_TIMEOUT (seconds; default 120 and 420) fit it into a shorter lease;
# BENCH_COMMIT names the commit measured when the tree was copied without its git metadata.
#
# Needs a CUDA GPU and torch, torchdeq, mlxtend, matplotlib, tqdm and pytest importable (with
# the repository root on PYTHONPATH when the package is not installed). About 5 minutes on one
# H200; the suite's summary (benchmarks/results/suite_cuda.json) is written after every run.
set -uo pipefail
cd "$(dirname "$0")/.."
archive=${1:-gpu_check.tgz}
logs=$(mktemp -d)
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# torchdeq 0.1.0's docstrings hold invalid escapes: Python 3.12 warns at every import
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::SyntaxWarning}
python=${PYTHON:-python3}

nvidia-smi >"$logs/nvidia-smi.txt" 2>&1
# the smoke suite is covered by the full one below
timeout "${TESTS_TIMEOUT:-120}" "$python" -m pytest -q -p no:cacheprovider -m cuda -k "not gpu_suite_smoke" tests \
    >"$logs/pytest_cuda.log" 2>&1
tests=$?
timeout "${SUITE_TIMEOUT:-420}" "$python" -m benchmarks.suite --device cuda >"$logs/suite.log" 2>&1
suite=$?
tail -n 3 "$logs/pytest_cuda.log"
grep -Ev '^  [a-z_]+ epoch ' "$logs/suite.log" | tail -n 60
tar czf "$archive" -C "$logs" . -C "$PWD" $(ls benchmarks/results/*_cuda* 2>/dev/null)
echo "cuda tests: exit $tests; suite: exit $suite (124: time limit); archive: $archive"
[ "$tests" -eq 0 ] && [ "$suite" -eq 0 ]
