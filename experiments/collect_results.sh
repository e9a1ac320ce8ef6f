#!/bin/bash
# collect.sh SRC DST: the small files of a compare output (tables, figures, per-run config/meta/metrics/eval/prior eval) into docs/results
src=$1; dst=$2
mkdir -p $dst
for f in results.md results.json convergence.png reconstructions.png rate_distortion.md rate_distortion.png; do [ -f $src/$f ] && cp $src/$f $dst/; done
for r in $src/runs/*/; do
  n=$(basename $r); mkdir -p $dst/runs/$n
  for f in config.toml meta.json metrics.jsonl eval.json; do [ -f $r/$f ] && cp $r/$f $dst/runs/$n/; done
  [ -f $r/prior/eval.json ] && cp $r/prior/eval.json $dst/runs/$n/prior_eval.json
  [ -f $r/prior/metrics.jsonl ] && cp $r/prior/metrics.jsonl $dst/runs/$n/prior_metrics.jsonl
done
true
