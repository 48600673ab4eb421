"""Tests of examples/gpu_check.py, the one command to run on a GPU machine, in its CPU mode so that it cannot rot.

Beside the example it tests; run by the README's test command (python -m pytest -q) with the rest. Shared
helpers and fixtures are test_dopsd.py's, imported from there."""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dopsd  # noqa: E402
from test_dopsd import ROOT, run_bounded  # noqa: E402


# ---------------------------------------------------------------------------------------------------- GPU check
# examples/gpu_check.py, the one command to run on a GPU machine, in its CPU mode so that it cannot rot.

GPU_CHECK_PASS = ["libraries", "loss fp32 (triton)", "loss bf16 (triton)", "loss float64 (auto)", "loss auto backend",
                  "train zimage tiny", "train klein tiny", "sample zimage", "sample klein"]
GPU_CHECK_SKIP = ["kernel GB/s fp32", "kernel GB/s bf16", "train zimage mid", "memory zimage mid", "train klein mid",
                  "memory klein mid", "2 GPUs: cuda:1", "2 GPUs: nccl",
                  "2 GPUs: nccl --full"]


@pytest.mark.skipif(not dopsd.HAS_TRITON, reason="triton not installed: the fused-loss rows run in its interpreter")
def test_gpu_check_cpu_mode_passes(tmp_path):
    """examples/gpu_check.py --cpu exits 0: every row that applies on a CPU passes, the CUDA-only rows skip.

    A subprocess, so that its TRITON_INTERPRET=1 precedes its own first import of triton; bounded by run_bounded
    (start_new_session, and past the timeout it and everything below it are killed). ~15 s on 2 cores."""
    report = tmp_path / "gpu_check.json"
    assert os.environ["TRITON_INTERPRET"] == "1"               # set at the top of this file; the child inherits it
    code, out, err = run_bounded([sys.executable, str(ROOT / "examples" / "gpu_check.py"), "--cpu",
                                  "--out", str(report)], 180)
    assert code == 0, out[-3000:] + err[-3000:]
    rows = {r["name"]: r for r in json.loads(report.read_text())["checks"]}
    assert {n: rows[n]["status"] for n in GPU_CHECK_PASS} == dict.fromkeys(GPU_CHECK_PASS, "PASS"), out[-3000:]
    assert {n: rows[n]["status"] for n in GPU_CHECK_SKIP} == dict.fromkeys(GPU_CHECK_SKIP, "SKIP"), out[-3000:]
    assert rows["loss fp32 (triton)"]["data"]["kernel"] == "interpreted"          # the kernel ran, not the torch path
    assert all(rows[f"train {f} tiny"]["data"]["checkpointing"] for f in ("zimage", "klein"))
    assert "9 PASS, 0 FAIL, 11 SKIP" in out
