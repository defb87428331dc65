"""bench/gpu_check.py scaled down (--scale tiny) on CPU: the same phases as on the GPU, in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_scaled_down_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "HALLO3_PRESETS": str(REPO / "tests" / "presets_test.toml")}
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--scale", "tiny", "--preset", "tiny-test",
               "--phases", "eager,cache,drift,offload:none", "--repeats", "1", "--decode-frames", "2", "--device", "cpu"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    phases = report["phases"]
    assert list(phases) == ["eager", "cache", "drift", "offload:none"]
    eager = phases["eager"]
    assert eager["finite"] and eager["step_s"] > 0 and eager["tokens"] == 13 * 4 * 6
    assert any("scaled_dot_product" in op for op in eager["sdpa_ops"])
    assert len(phases["cache"]["step_s_all"]) == 4
    # bf16 rounds at ~4e-3 relative: the drift of one step is visible but small
    assert 1e-4 < phases["drift"]["max_abs_diff_over_max_abs"] < 0.1
    memory = phases["offload:none"]
    assert memory["decoded_latent_frames"] == 2 and memory["denoise_peak_bytes"] is None  # not measured on CPU
    assert 0 < memory["plan_denoise_bytes"] < memory["plan_decode_bytes"]
