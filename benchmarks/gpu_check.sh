#!/usr/bin/env bash
# The GPU check (issue 20), for a CUDA machine, within 10 minutes, writing one JSON:
#   1. the op-recording and top-k tests on CUDA (tests/test_no_host_sync.py, tests/test_top_k.py),
#   2. benchmarks/gpu_check.py: one update of every packaged config and 1,000 updates of the
#      discrete memory (dense, top-k) and vq_ema_reseed at batch 32 and 256, all under
#      torch.cuda.set_sync_debug_mode("error"),
#   3. the whole test suite on CUDA, in the time left,
# then folds the pytest results into the JSON (their logs are copied beside it).
#
#   bash benchmarks/gpu_check.sh [OUT.json]        (default benchmarks/results/gpu_check.json)
#
# It installs nothing beyond the README's install line, and only when no Python here has
# a CUDA torch and memvae's dependencies with pytest: it uses $PYTHON, else python3, else .venv/bin/python, the
# first whose torch sees a GPU, with this checkout's src/ on PYTHONPATH (memvae need not be
# installed). CIFAR-10 comes from $MEMVAE_DATA_DIR (default ../shared/data); without it the
# timings use random images and the tests that need CIFAR-10 fail, saying so.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu_check.json}
LOGS=$(mktemp -d)
START=$(date +%s)
BUDGET=${GPU_CHECK_SECONDS:-570}   # everything, in seconds; the runner's limit is 600
# GPU_CHECK_DEVICE=cpu: a dry run of this script on a machine without a GPU (no sync check,
# no measurement); GPU_CHECK_ARGS: more arguments for gpu_check.py (e.g. fewer updates).
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export MEMVAE_DATA_DIR=${MEMVAE_DATA_DIR:-../shared/data}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

pick_python() {
    for candidate in "${PYTHON:-}" python3 .venv/bin/python; do
        [ -n "$candidate" ] || continue
        if "$candidate" -c "import torch, numpy, PIL, matplotlib, tqdm, tensorboard, pytest, hypothesis
assert '$DEVICE' == 'cpu' or torch.cuda.is_available()" 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

if [ "$DEVICE" != cpu ] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: gpu_check needs a CUDA GPU; nvidia-smi finds none here" >&2
    exit 2
fi
if ! PY=$(pick_python); then
    if [ -e .venv ]; then  # an environment someone made: not ours to reinstall
        echo "error: a GPU is here, but neither \$PYTHON, python3 nor .venv/bin/python has a CUDA torch with memvae's dependencies" >&2
        exit 2
    fi
    echo "no Python here has a CUDA torch with memvae's dependencies; running the README's install line" >&2
    python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e '.[test]' >&2
    if ! PY=$(pick_python); then
        echo "error: after the README's install, torch still sees no CUDA device (a CPU build of torch?)" >&2
        exit 2
    fi
fi
echo "python: $PY ($("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'))"

run_pytest() {  # NAME SECONDS ARGS...: a pytest run, its log ending in 'exit N' and 'seconds S'
    local name=$1 limit=$2; shift 2
    local log="$LOGS/$name.log" t0=$(date +%s)
    if [ "$limit" -le 10 ]; then
        echo "not run: no time left" > "$log"; echo "exit 124" >> "$log"; echo "seconds 0" >> "$log"; return
    fi
    timeout --signal=INT --kill-after=15 "$limit" "$PY" -m pytest -q -p no:cacheprovider "$@" > "$log" 2>&1
    local rc=$?
    echo "exit $rc" >> "$log"; echo "seconds $(( $(date +%s) - t0 ))" >> "$log"
    echo "pytest $name: exit $rc, $(grep -E ' (passed|failed|error)' "$log" | tail -1)"
}

run_pytest focused 150 tests/test_no_host_sync.py tests/test_top_k.py
"$PY" benchmarks/gpu_check.py --out "$OUT" --device "$DEVICE" --budget $(( $(left) > 300 ? 240 : $(left) - 60 )) ${GPU_CHECK_ARGS:-}
RC=$?
if [ "$DEVICE" = cpu ]; then  # a dry run does not run the whole suite on the CPU
    printf 'not run: dry run on the CPU\nexit 0\nseconds 0\n' > "$LOGS/suite.log"
else
    run_pytest suite $(( $(left) - 20 ))
fi
# Fold the pytest results into the one JSON (gpu_check.py wrote the timings).
if [ -f "$OUT" ]; then
    "$PY" - "$OUT" "$LOGS" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from gpu_check import pytest_result
out, logs = Path(sys.argv[1]), Path(sys.argv[2])
report = json.loads(out.read_text())
report["pytest"] = [pytest_result(f"{name}={logs / (name + '.log')}") for name in ("focused", "suite")]
out.write_text(json.dumps(report, indent=1))
EOF
fi
for log in "$LOGS"/*.log; do cp "$log" "$(dirname "$OUT")/gpu_check_$(basename "$log")"; done
echo "total $(( $(date +%s) - START )) s; wrote $OUT"
exit $RC
