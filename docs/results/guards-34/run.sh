#!/bin/bash
# Issue 34 guard: LFQ vs BSQ at 9 bits (K = 512), 2,000 updates, 1 thread, seed 1, the rate sweep's settings.
cd . && . .venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for c in lfq bsq; do
  memvae train --config $c --steps 2000 --train.seed 1 --train.threads 1 --data.eval_images 1000 \
    --train.log_every 100 --train.eval_every 1000 --train.checkpoint_every 1000 \
    --data-dir ../shared/data --run-dir runs/guard34/$c --no-progress > runs/guard34/$c.train.log 2>&1
  memvae eval runs/guard34/$c --data-dir ../shared/data > runs/guard34/$c.eval.log 2>&1
done
echo done > runs/guard34/DONE
