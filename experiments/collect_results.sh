#!/bin/bash
# collect_results.sh SRC DST: the small files of a compare output into docs/results: its tables and
# figures, and per finished run (one with eval.json) config.toml, meta.json, metrics.jsonl,
# eval.json, bits_per_dim.json (memvae bpd) and its prior's eval.json/metrics.jsonl, in a run's own layout, so that
# `memvae compare ... --report-only --out DST` tabulates them again without the checkpoints.
set -euo pipefail
src=$1; dst=$2
mkdir -p "$dst"
for f in results.json convergence.png reconstructions.png rate_distortion.md rate_distortion.png; do
  if [ -f "$src/$f" ]; then cp "$src/$f" "$dst/"; fi
done
for r in "$src"/runs/*/; do
  [ -f "$r/eval.json" ] || continue
  n=$(basename "$r"); mkdir -p "$dst/runs/$n"
  for f in config.toml meta.json metrics.jsonl eval.json; do cp "$r/$f" "$dst/runs/$n/"; done
  if [ -f "$r/bits_per_dim.json" ]; then cp "$r/bits_per_dim.json" "$dst/runs/$n/"; fi
  if [ -f "$r/prior/eval.json" ]; then
    mkdir -p "$dst/runs/$n/prior"
    cp "$r/prior/eval.json" "$r/prior/metrics.jsonl" "$dst/runs/$n/prior/"
  fi
done
