"""bench/gpu_check.py skips cleanly (exit 0, a message saying why) on a machine without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs its checks (minutes)")
def test_gpu_check_skips_without_cuda() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert "SKIPPED, no CUDA device" in res.stdout and "--device cpu" in res.stdout
