#!/usr/bin/env bash
# The tests that kill or signal a training at a known point, ROUNDS times in a row (default 10);
# stops at the first failing round. Run it while trainings share the cores to check that none
# of them races the load (tests/trainee.py stops each training where the test means to hit it).
#
#   MEMVAE_DATA_DIR=../shared/data bash tests/rounds/kill_tests.sh [ROUNDS]
#
# Writes tests/rounds/last_result.txt: the machine, the commit, and per round its exit status,
# seconds, the load average and pytest's summary (each round's full log beside it, not committed).
set -u
cd "$(dirname "$0")/../.."
rounds=${1:-10}
result=tests/rounds/last_result.txt
{
  echo "kill tests, $rounds rounds, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$result"
for round in $(seq 1 "$rounds"); do
  start=$(date +%s)
  log=$(mktemp --suffix=-kill-round$round.log)
  python -m pytest -q -p no:cacheprovider --run-slow \
    tests/test_cluster.py tests/test_prior.py tests/test_reliability.py tests/test_repeatability.py \
    -k "killed_job or hint_after_ctrl_c or sigkill_at_random or sigkill_before or sigterm_and_sigint or (sigkill_after_the_first and (memory_discrete or vq_ema_reseed or mixture_pursuit))" \
    > "$log" 2>&1
  rc=$?
  echo "round $round: exit $rc, $(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg), $(tail -1 "$log")" | tee -a "$result"
  [ "$rc" -ne 0 ] && { echo "round $round failed: $log"; exit 1; }
done
