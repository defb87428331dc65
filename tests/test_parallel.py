"""CFG × sequence parallelism of one denoiser call (issue 11): degrees, layout, cost model, and torchrun
runs on CPU/gloo whose batch-2 CFG output must equal the single-process one (fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hallo3_cli.parallel import (
    Degrees,
    ParallelConfig,
    ParallelUsageError,
    SequenceLayout,
    choose_degrees,
    init_parallel,
    parallel_cost,
    parallelize_transformer,
    setup_parallel,
    split_cfg_inputs,
    valid_degrees,
)

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # × max|single-process output| (issue 11, fp32)


# -- degrees ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "expected"), [
    (1, Degrees(1, 1, 1)), (2, Degrees(2, 1, 1)), (3, Degrees(1, 3, 1)), (4, Degrees(2, 2, 1)),
    (5, Degrees(1, 1, 5)), (6, Degrees(2, 3, 1)), (8, Degrees(2, 4, 1)), (16, Degrees(2, 8, 1)),
])
def test_automatic_degrees_prefer_cfg_then_ulysses(world, expected):
    assert choose_degrees(world, 48) == expected


def test_overrides_pick_the_matching_split():
    assert choose_degrees(2, 48, cfg_parallel=False) == Degrees(1, 2, 1)
    assert choose_degrees(4, 48, cfg_parallel=False) == Degrees(1, 4, 1)
    assert choose_degrees(4, 48, ring=2) == Degrees(2, 1, 2)
    assert choose_degrees(8, 48, ulysses=2, ring=2) == Degrees(2, 2, 2)
    assert choose_degrees(8, 48, ulysses=8) == Degrees(1, 8, 1)
    assert choose_degrees(3, 2) == Degrees(1, 1, 3)  # 3 does not divide 2 heads: ring


@pytest.mark.parametrize(("world", "heads", "options", "names"), [
    (3, 48, {"cfg_parallel": True}, "--cfg-parallel"),
    (8, 48, {"ulysses": 5}, "--ulysses 5"),
    (4, 2, {"ulysses": 4}, "--ulysses 4"),
    (4, 48, {"ulysses": 2, "ring": 4}, "--ring 4"),
    (4, 48, {"ring": 0}, "--ring must be at least 1"),
])
def test_impossible_splits_name_the_valid_ones(world, heads, options, names):
    with pytest.raises(ParallelUsageError) as err:
        choose_degrees(world, heads, **options)
    message = str(err.value)
    assert "\n" not in message and names in message and err.value.exit_code == 2
    if "valid:" in message:
        for d in valid_degrees(world, heads):
            assert str(d) in message


def test_valid_degrees_are_exactly_the_possible_splits():
    for world in range(1, 13):
        for heads in (2, 4, 48):
            valid = valid_degrees(world, heads)
            assert len(set(valid)) == len(valid)
            assert all(d.world == world and d.cfg in (1, 2) and heads % d.ulysses == 0 for d in valid)
            count = sum(1 for c in (1, 2) if world % c == 0 for u in range(1, world + 1)
                        if (world // c) % u == 0 and heads % u == 0)
            assert len(valid) == count


def test_init_parallel_without_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = init_parallel(Degrees())
    assert not single.enabled and single.is_main and single.sequence_rank == 0
    with pytest.raises(ParallelUsageError, match="torchrun --nproc-per-node 4"):
        init_parallel(Degrees(2, 2, 1))
    with pytest.raises(ParallelUsageError, match="torchrun --nproc-per-node N .*--parallel video"):
        setup_parallel(48)


def test_setup_parallel_checks_degrees_before_joining(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ParallelUsageError, match="valid: cfg 1 × ulysses 3 × ring 1; cfg 1 × ulysses 1 × ring 3"):
        setup_parallel(48, cfg_parallel=True)


# -- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", [2, 3, 4, 8])
def test_layout_covers_every_token_once_with_its_frame(parts):
    """Production sizes (226 text + 13·1350 video, 1350 reference tokens), uneven shards."""
    layout = SequenceLayout(text=226, video=13 * 1350, ref=1350, tokens_per_frame=1350, parts=parts)
    assert max(layout.query_counts) - min(layout.query_counts) <= 1
    assert sum(layout.ref_counts) == 1350
    text, video, frames_of = [], [], []
    for rank in range(parts):
        t0, t1 = layout.text_range(rank)
        v0, v1 = layout.video_range(rank)
        assert (t1 - t0) + (v1 - v0) == layout.query_counts[rank]
        text += range(t0, t1)
        video += range(v0, v1)
        first, _ = layout.frames(rank)
        covered = []
        for start, stop, frame in layout.segments(rank):
            covered += range(start, stop)
            frames_of += [(v0 + i) // 1350 for i in range(start, stop)]
            assert all((v0 + i) // 1350 == first + frame for i in range(start, stop))
        assert covered == list(range(v1 - v0))
    assert text == list(range(226)) and video == list(range(13 * 1350))
    assert frames_of == [i // 1350 for i in range(13 * 1350)]


def test_cfg_split_keeps_shared_inputs():
    kwargs = {"hidden_states": torch.arange(2.0).view(2, 1), "encoder_hidden_states": torch.ones(2, 3, 1),
              "timestep": torch.tensor([7.0, 9.0]), "audio_tokens": torch.arange(4.0).view(2, 2),
              "face_tokens": torch.ones(2, 4), "ref_states": [torch.zeros(1, 5), torch.arange(2.0).view(2, 1)]}
    half = split_cfg_inputs(kwargs, 1)
    assert half["hidden_states"].tolist() == [[1.0]] and half["timestep"].tolist() == [9.0]
    assert half["audio_tokens"].tolist() == [[2.0, 3.0]]
    assert half["ref_states"][0].shape == (1, 5) and half["ref_states"][1].tolist() == [[1.0]]
    with pytest.raises(ValueError, match="batch-2"):
        split_cfg_inputs({**kwargs, "hidden_states": torch.zeros(1, 1)}, 0)


# -- cost model ------------------------------------------------------------------------------


FLOPS = 700e12  # one batch-2 CFG call at production size (docs/model.md §9)


def test_cost_of_one_gpu_is_the_compute_alone():
    one = parallel_cost(Degrees(), flops_per_step=FLOPS)
    assert one.comm_bytes_per_step == 0 and one.flops_fraction == 1.0
    assert one.predicted_speedup == pytest.approx(1.0) and one.step_s == pytest.approx(FLOPS / 800e12)


def test_cfg_parallel_halves_compute_and_moves_only_the_output():
    cost = parallel_cost(Degrees(2, 1, 1), flops_per_step=FLOPS)
    assert cost.flops_fraction == 0.5
    assert cost.comm_bytes_per_step == 17550 * 64 * 2  # one half's v-prediction, bf16
    assert 1.9 < cost.predicted_speedup < 2.0


def test_ulysses_and_ring_bytes_follow_the_stated_model():
    u4 = parallel_cost(Degrees(1, 4, 1), flops_per_step=FLOPS, layers=1)
    n, k = 17776 // 4, 17776 // 4 + (1350 + 3) // 4  # largest query shard, largest key shard
    assert u4.comm_bytes_per_step == int((2 * (2 * n + 2 * k) * 3072 * 3 / 4 + 2 * 4444 * 64 * 3) * 2)
    r2 = parallel_cost(Degrees(1, 1, 2), flops_per_step=FLOPS, layers=1)
    assert r2.comm_bytes_per_step == int((2 * 2 * (8888 + 675) * 3072 + 2 * 8888 * 64) * 2)
    # Ulysses moves less than gathering every key everywhere; PCIe predicts less than NVLink.
    eight = dict(flops_per_step=FLOPS)
    assert parallel_cost(Degrees(1, 8, 1), **eight).comm_bytes_per_step < parallel_cost(Degrees(1, 1, 8), **eight).comm_bytes_per_step
    nvlink = parallel_cost(Degrees(2, 4, 1), bandwidth="nvlink", **eight)
    pcie = parallel_cost(Degrees(2, 4, 1), bandwidth="pcie", **eight)
    assert 1 < pcie.predicted_speedup < nvlink.predicted_speedup <= 8
    overlapped = parallel_cost(Degrees(2, 4, 1), bandwidth="pcie", overlap=1.0, **eight)
    assert overlapped.step_s == pytest.approx(max(overlapped.compute_s, overlapped.comm_s))
    with pytest.raises(ParallelUsageError, match="interconnect"):
        parallel_cost(Degrees(2, 1, 1), flops_per_step=FLOPS, bandwidth="carrier pigeon")


# -- the transformer under torchrun ---------------------------------------------------------------


def test_first_block_cache_is_refused():
    from diffusers.hooks import FirstBlockCacheConfig

    sys.path.insert(0, str(REPO / "tests"))
    from parallel_worker import tiny_model

    model = tiny_model()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(Exception, match="First Block Cache"):
        parallelize_transformer(model, ParallelConfig(Degrees(2, 1, 1), None, torch.device("cpu")))


@pytest.mark.parametrize(("ranks", "splits"), [
    (2, ["2,1,1", "1,2,1", "1,1,2"]),  # CFG; sequence only (Ulysses, ring)
    (3, ["1,1,3"]),  # cfg 1 × sequence 3 (uneven shards)
    (4, ["2,2,1", "2,1,2", "1,2,2", "1,4,1"]),  # CFG 2 × sequence 2; sequence 4
], ids=["2-ranks", "3-ranks", "4-ranks"])
def test_parallel_call_equals_single_process(ranks, splits, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HALLO3_PRESETS": str(REPO / "tests" / "presets_test.toml")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--standalone", str(REPO / "tests" / "parallel_worker.py"), str(tmp_path), *splits]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    digests = set()
    for rank in range(ranks):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        digests.add(tuple(results[split]["sha256"] for split in splits))
        assert sorted(results) == sorted(splits)
        for split, r in results.items():
            assert r["shape_ok"], (rank, split)
            assert r["rel"] <= TOLERANCE and r["rel_return_dict"] <= TOLERANCE, (rank, split, r)
            assert r["projection_equal"] and r["restored_equal"], (rank, split, r)
    assert len(digests) == 1  # identical v-prediction on every rank: their sampler steps cannot diverge


# -- plan --gpus ----------------------------------------------------------------------------------


def test_plan_gpus_is_per_rank_and_follows_the_cost_model():
    from hallo3_cli.plan import plan, plan_parallel

    single = plan("tiny-random", device_kind="cuda")
    one = plan_parallel(single, 1)
    assert one.peak_device_bytes == single.peak_device_bytes and one.comm_bytes_per_step == 0
    assert one.predicted_speedup == pytest.approx(1.0) and one.flops_per_clip == single.flops_per_clip
    four = plan_parallel(single, 4, interconnect="pcie")
    assert four.parallel["cfg"] == 2 and four.parallel["ulysses"] == 2  # tiny-random: 2 heads
    denoise, alone = four.step("clip", "denoise"), single.step("clip", "denoise")
    assert denoise.weights_on_device_bytes == alone.weights_on_device_bytes  # the DiT stays whole on every rank
    assert denoise.tensors_bytes < alone.tensors_bytes and denoise.flops < alone.flops
    assert four.peak_device_bytes <= single.peak_device_bytes
    assert four.flops_per_clip == int(single.flops_per_clip - single.flops_per_forward * single.steps * (1 - four.parallel["flops_fraction"]))
    # PCIe below NVLink (a tiny model computes so little that sending costs more: below 1 here)
    assert 0 < four.predicted_speedup < plan_parallel(single, 4).predicted_speedup
    data = json.loads(four.to_json())
    assert data["gpus"] == 4 and data["comm_bytes_per_step"] == four.comm_bytes_per_step > 0
    assert data["predicted_speedup"] == four.predicted_speedup
    assert "gpus" not in json.loads(single.to_json())
    with pytest.raises(ParallelUsageError, match="valid:"):
        plan_parallel(single, 3, cfg_parallel=True)


def test_plan_command_with_gpus_prints_the_parallel_keys(capsys):
    from hallo3_cli import cli

    cli.main(["plan", "--model", "tiny-random", "--gpus", "2", "--interconnect", "100", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert {"gpus", "comm_bytes_per_step", "predicted_speedup", "peak_device_bytes", "flops_per_clip"} <= data.keys()
    assert data["parallel"]["bandwidth_bytes_per_s"] == 100e9 and data["parallel"]["cfg"] == 2
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", "--model", "tiny-random", "--interconnect", "pcie"])
    assert exit_.value.code == 2 and "need --gpus" in capsys.readouterr().err


def test_one_rank_speaks_for_a_parallel_render(monkeypatch):
    """Who prints a failure (``hallo3 render --parallel video``): see ``session.reports_failure``."""
    from hallo3_cli.jobs import parallel_session as session

    monkeypatch.setitem(session._active, "stage", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    peer = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:4084")
    own = RuntimeError("CUDA out of memory")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setitem(session._active, "stage", "none")
        assert session.reports_failure(own) and session.prints_results()  # not a --parallel video render
        monkeypatch.setitem(session._active, "stage", "preflight")  # checks every rank makes alike
        assert session.reports_failure(ParallelUsageError("bad split")) == (rank == "0")
        monkeypatch.setitem(session._active, "stage", "render")
        assert session.reports_failure(own)  # this rank's own failure
        assert not session.reports_failure(peer) and not session.reports_failure(session.PeerStopped("x"))
        assert not session.reports_failure(SystemExit(143))  # torchrun's SIGTERM after another rank failed
        assert session.reports_failure(KeyboardInterrupt()) == (rank == "0")
        assert session.prints_results() == (rank == "0")
    monkeypatch.delenv("RANK")
    assert session.reports_failure(peer) and session.prints_results()  # outside torchrun: everything
