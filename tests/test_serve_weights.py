"""``hallo3 serve`` checks every weight a render needs before the page starts (not at the first render)."""

from __future__ import annotations

import os
import subprocess
import sys

from hallo3_cli import stages
from hallo3_cli.presets import get_preset
from hallo3_cli.store import write_marker


def test_serve_refuses_to_start_without_the_face_models(tmp_path):
    env = {**os.environ, "HALLO3_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    preset = get_preset("hallo3")
    needed = {c for kind in (stages.AUDIO, stages.REFERENCE, stages.CLIPS) for c in stages.weights_components(kind, preset)}
    assert "face_analysis" in needed and "text_encoder" in needed and "reference" in needed
    for component in needed - {"face_analysis"}:  # everything else looks installed (markers over stand-in files)
        folder = tmp_path / "home" / "hallo3" / component
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(b"x")
        write_marker(folder, component=component)
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", "serve", "--model", "hallo3", "--port", "7999"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 5, result.stderr
    assert "face_analysis" in result.stderr and "hallo3 download --model hallo3" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""  # no URL: the page never started
