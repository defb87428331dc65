"""``hallo3 plan --train`` against what real CPU training steps allocate (issue 20), at small sizes.

    PYTHONPATH=. python bench/bench_training_plan.py

For each preset and stage: the traced forward+backward peak of the plan (float32, DDP: gradients kept) and the
peak RSS of the same step (``training.plan.run_step`` on real random networks, per-block checkpointing in the main
DiT) measured in a fresh process as tests/test_plan_train.py measures it; and the resident parts, which the test
checks byte for byte. ``train-check`` is the test's mid-size preset (2 layers, width 512, 384×576, 9 frames).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_plan_train import CHECK_PRESET, MEASURE  # noqa: E402

from hallo3_cli.training.plan import plan_training  # noqa: E402


def measure(preset: str, env: dict) -> dict[int, int]:
    env = {**env, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-c", MEASURE, preset], env=env, capture_output=True, text=True, timeout=900)
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    return {int(k): v for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        presets = Path(folder) / "presets.toml"
        presets.write_text(CHECK_PRESET)
        os.environ["HALLO3_PRESETS"] = str(presets)
        print("| preset | stage | trainable | traced fwd+bwd MiB | measured RSS MiB | traced / measured | plan s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for preset in ("tiny-random", "train-check"):
            real = measure(preset, dict(os.environ))
            for stage in (1, 2):
                start = time.perf_counter()
                result = plan_training(stage, model=preset, engine="ddp", dtype="float32")
                seconds = time.perf_counter() - start
                traced = result.phase_parts["forward-backward"]["activations and inputs"]
                print(f"| {preset} | {stage} | {result.trainable_parameters:,} | {traced / 2**20:.1f} | "
                      f"{real[stage] / 2**20:.1f} | {traced / real[stage]:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
