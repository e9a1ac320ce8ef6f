"""Peak memory of a quantiser update at a size where an N×K matrix would not fit.

vq_ema at N = 16,384 positions and K = 65,536 slots: a dense N×K one-hot of the
assignments would take 8 GiB as int64 plus 4 GiB as float (what vector-quantize-pytorch
and memvae before issue 13 allocate); the distances alone, held at once, 4 GiB. memvae
computes the distances in chunks and the EMA statistics by bincount/index_add_, so a
training update (forward, EMA write, backward) must stay under 1 GiB above what the
process held before it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

GIB = 2**30

# Runs in a fresh interpreter: its peak resident set is this update's alone. The address
# space is capped (2 GiB above its size at start), so that a regression to an N×K matrix
# fails with an allocation error instead of taking the machine's memory.
SCRIPT = r"""
import json, re, resource, sys
from pathlib import Path
import torch
from memvae.quantizers import VectorQuantizerEMA

def status(key):
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024

torch.manual_seed(0)
torch.set_num_threads(1)
vq = VectorQuantizerEMA(65536, 64).train()
z = torch.randn(256, 64, 8, 8, requires_grad=True)  # N = 256·8·8 = 16,384 positions
upstream = torch.randn(256, 64, 8, 8)
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + 2 * 2**30, resource.RLIM_INFINITY))
Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
base = status("VmRSS")
try:
    out = vq(z)
    ((out.quantized * upstream).sum() + out.loss).backward()
except (RuntimeError, MemoryError) as exc:
    print(json.dumps({"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}))
    sys.exit(0)
print(json.dumps({"peak_extra": status("VmHWM") - base, "slots_used": int(out.codes.unique().numel()),
                  "grad_finite": bool(torch.isfinite(z.grad).all())}))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak-RSS mark")
def test_vq_ema_update_at_16k_positions_and_64k_slots_stays_under_1_gib():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # freed large blocks leave the resident set
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "failed" not in result, result["failed"]
    assert result["grad_finite"] and result["slots_used"] > 1000  # a real update happened
    assert result["peak_extra"] < GIB, f"peak extra memory {result['peak_extra'] / GIB:.2f} GiB"
