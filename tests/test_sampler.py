"""The exact sampler (docs/model.md §6) against the official schedule numbers and the official 3-step run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hallo3_cli import sampler
from hallo3_cli.sampler import cfg, initial_noise, noise_draws, sample, schedule, v_to_x0


def _max_diff(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape
    return (a - b).abs().max().item()


#: Two float32 ulps of 1.0. The tables hold sqrt(alpha_cumprod) in [0, 1] rescaled by ~1.07; torch's float32
#: sqrt is faithfully but not correctly rounded on some CPUs (one ulp), and the subtraction and product of the
#: rescale round once each: the official numbers themselves differ by up to this much between machines.
TABLE_TOLERANCE = 2 * 2.0**-23


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() / want.abs().max().item()


@pytest.fixture(scope="module")
def reference(official_dir):
    return json.loads((official_dir / "sampler_reference.json").read_text())


@pytest.fixture(scope="module")
def sample3(official_dir):
    with safe_open(str(official_dir / "tiny_sample3.safetensors"), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


# --- schedule -----------------------------------------------------------------------------------


def test_schedule_50_matches_official(reference):
    steps = reference["steps"]
    sched = schedule(50)
    assert sched.num_steps == reference["num_steps"] == 50
    assert sched.timesteps.dtype == torch.float32
    assert sched.timesteps.tolist() == [float(s["network_timestep"]) for s in steps]
    assert sched.denoiser_indices.tolist() == [s["denoiser_quantized_index"] for s in steps]
    # docs/model.md §6: 11 steps (t = 219 … 19) snap to t - 1.
    assert (sched.denoiser_indices != sched.timesteps.long()).sum().item() == 11

    tol = TABLE_TOLERANCE
    assert _max_diff(sched.table, reference["denoiser_full_table_sqrt_alphas_cumprod_1000"]) <= tol
    assert _max_diff(sched.alphas, reference["sampler_alpha_cumprod_sqrt_with_appended_one"]) <= tol
    assert _max_diff(sched.alphas[:-1], [s["alpha_cumprod_sqrt_sampler"] for s in steps]) <= tol
    assert _max_diff(sched.alphas[1:], [s["alpha_cumprod_sqrt_next"] for s in steps]) <= tol
    assert _max_diff(sched.denoiser_alphas, [s["alpha_cumprod_sqrt_denoiser"] for s in steps]) <= tol

    scalings = [sampler.denoiser_scalings(a) for a in sched.denoiser_alphas]
    assert _max_diff(torch.cat([c for c, _ in scalings]), [s["c_skip"] for s in steps]) <= tol
    # c_out = -sqrt(1 - a²) amplifies an error d of a into a·d/sqrt(1 - a²) (plus its own two roundings)
    a = sched.denoiser_alphas.double()
    c_out = torch.cat([c for _, c in scalings]).double()
    allowed = tol * a / (1 - a**2).sqrt() + 2 * 2.0**-24
    assert bool(((c_out - torch.tensor([s["c_out"] for s in steps], dtype=torch.float64)).abs() <= allowed).all())


def test_schedule_3_snaps_off_the_network_timestep(reference, sample3):
    sched = schedule(3)
    assert sched.timesteps.tolist() == [999.0, 666.0, 333.0]
    assert sched.denoiser_indices.tolist() == [999, 660, 317]
    # docs/model.md §8 caution: the fixture records the sampler alphas; the denoiser used the snapped ones.
    assert sched.denoiser_alphas[0].item() == 0.0
    assert sched.denoiser_alphas[1:].tolist() == pytest.approx([0.28186366, 0.73126209], abs=1e-8)
    recorded = torch.cat([sample3[f"step{i}.alpha_cumprod_sqrt_quantized"] for i in range(3)])
    assert _max_diff(sched.alphas[:3], recorded) <= TABLE_TOLERANCE
    assert _max_diff(sched.table, reference["denoiser_full_table_sqrt_alphas_cumprod_1000"]) <= TABLE_TOLERANCE


@pytest.mark.parametrize("num_steps", [3, 50])
def test_official_snaps_have_wide_margins(num_steps):
    """For the release's 50 steps and the 3-step fixture the nearest entry is always far nearer than the
    runner-up (> 64 float32 ulps), so the exact (float64) decision is the official code's on any CPU."""
    table = sampler.zero_snr_table(torch.float64)
    exact = sampler._sampler_alphas(sampler.network_timesteps(num_steps), torch.float64)
    distances = (exact[None] - table[:, None]).abs().sort(dim=0).values
    assert bool((distances[1] - distances[0] > 64 * 2.0**-24).all())


@pytest.mark.parametrize("shift", [-1.0, 1.0])
def test_snapping_does_not_depend_on_the_last_bit(monkeypatch, shift):
    """Another CPU's float32 sqrt moves table and sampler entries by one ulp: the steps snap alike."""
    expected = {n: schedule(n).denoiser_indices for n in (2, 3, 7, 25, 49, 50, 60, 333, 999)}
    original = sampler._zero_snr_sqrt

    def one_ulp_off(values, dtype=torch.float32):
        out = original(values, dtype)
        return torch.nextafter(out, torch.full_like(out, shift)) if dtype == torch.float32 else out

    monkeypatch.setattr(sampler, "_zero_snr_sqrt", one_ulp_off)
    for n, indices in expected.items():
        moved = schedule(n)
        assert not torch.equal(moved.table, original(sampler.alphas_cumprod()))  # the ulp did move
        assert torch.equal(moved.denoiser_indices, indices)


def test_schedule_1000_is_the_full_table():
    sched = schedule(1000)
    assert sched.timesteps.tolist() == [float(t) for t in range(999, -1, -1)]
    assert torch.equal(sched.alphas[:-1], sched.table.flip(0))
    assert torch.equal(sched.denoiser_indices, sched.timesteps.long())


@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 25, 49, 50, 60, 333, 999, 1000])
def test_schedule_is_well_formed(num_steps):
    sched = schedule(num_steps)
    t, a = sched.timesteps, sched.alphas
    assert t.shape == (num_steps,) and a.shape == (num_steps + 1,)
    assert t[0].item() == 999.0 and t.min().item() >= 0
    assert bool((t[1:] < t[:-1]).all()), "timesteps must be distinct and descending"
    assert a[0].item() == 0.0 and a[-1].item() == 1.0
    assert bool((a[1:] > a[:-1]).all()), "alphas must increase towards the data"
    assert torch.equal(sched.denoiser_alphas, sched.table[sched.denoiser_indices])
    # snapping picks the nearest entry of the (monotone) table: no neighbour is closer
    gap = (sched.denoiser_alphas - a[:-1]).abs()
    assert gap.max().item() < 2e-3
    for offset in (-1, 1):
        neighbour = (sched.denoiser_indices + offset).clamp(0, 999)
        assert bool((gap <= (sched.table[neighbour] - a[:-1]).abs()).all())


@pytest.mark.parametrize("bad", [0, -1, 1001])
def test_schedule_rejects_step_counts_out_of_range(bad):
    with pytest.raises(ValueError, match="num_steps"):
        schedule(bad)


def test_schedule_rejects_non_integer_step_counts():
    with pytest.raises(TypeError):
        schedule(2.5)


# --- denoiser helpers -----------------------------------------------------------------------------


def test_v_to_x0_and_cfg_reproduce_the_official_guided_x0(official_dir, sample3):
    with safe_open(str(official_dir / "tiny_official.safetensors"), "pt") as f:
        v_uncond, v_cond = f.get_tensor("main.out_uc_c").chunk(2)
        x = f.get_tensor("input.noisy_latent")
        assert f.get_tensor("input.timestep").item() == 999.0
    alpha = schedule(3).denoiser_alphas[0]
    guided = cfg(v_to_x0(x, v_uncond, alpha), v_to_x0(x, v_cond, alpha), 3.5)
    err = _rel_err(guided, sample3["step0.guided_denoised"])
    assert err <= 1e-6, err  # measured 0.0


def test_v_to_x0_formula_and_dtype():
    x = torch.randn(2, 3, 4)
    v = torch.randn(2, 3, 4).to(torch.bfloat16)
    alpha = 0.6
    got = v_to_x0(x, v, torch.tensor(alpha))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, alpha * x - 0.8 * v.float(), rtol=0, atol=1e-6)


# --- sampling ---------------------------------------------------------------------------------------


def test_replays_the_official_3_step_run(sample3):
    calls = []

    def denoise(x, t, alpha):
        i = len(calls)
        want = sample3[f"step{i}.x_in"]
        calls.append((t, alpha.item(), _rel_err(x, want)))
        return sample3[f"step{i}.guided_denoised"]

    noises = [sample3["noise0"], sample3["noise1"], sample3["noise2"]]
    out = sample(denoise, sample3["step0.x_in"], schedule(3), noise=noises)

    assert [t for t, _, _ in calls] == [999.0, 666.0, 333.0]
    assert [a for _, a, _ in calls] == pytest.approx([0.0, 0.28186366, 0.73126209], abs=1e-8)
    x_errors = [e for _, _, e in calls]
    final_error = _rel_err(out, sample3["final_latent"])
    assert max(x_errors) <= 1e-5, x_errors  # measured [0.0, 0.0, 0.0]
    assert final_error <= 1e-5, final_error  # measured 0.0


def test_the_first_draw_of_a_second_order_step_is_discarded(sample3):
    def run(noises):
        seen = []

        def denoise(x, t, alpha):
            seen.append(x)
            return sample3[f"step{len(seen) - 1}.guided_denoised"]

        sample(denoise, sample3["step0.x_in"], schedule(3), noise=noises)
        return seen[-1]  # the state entering the last step

    noise0, noise1, noise2 = sample3["noise0"], sample3["noise1"], sample3["noise2"]
    base = run([noise0, noise1, noise2])
    assert torch.equal(run([noise0, torch.full_like(noise1, 1e3), noise2]), base)
    assert not torch.allclose(run([noise0, noise1, noise2 + 1.0]), base)
    assert not torch.allclose(run([noise0 + 1.0, noise1, noise2]), base)


def _toy_denoise(x, t, alpha):
    # any smooth deterministic function of (x, t, alpha) will do
    return torch.tanh(x) * (1 - t / 2000) + 0.1 * alpha


@pytest.mark.parametrize("num_steps", [2, 3, 7])
def test_generator_draws_follow_the_official_order(num_steps):
    shape = (1, 3, 2, 4, 5)
    expected_gen = torch.Generator().manual_seed(1234)
    x = initial_noise(shape, expected_gen)
    manual = [torch.randn(shape, generator=expected_gen) for _ in range(noise_draws(num_steps))]

    gen = torch.Generator().manual_seed(1234)
    x_gen = initial_noise(shape, gen)
    assert torch.equal(x_gen, x)
    via_generator = sample(_toy_denoise, x_gen, schedule(num_steps), noise=gen)
    via_list = sample(_toy_denoise, x, schedule(num_steps), noise=manual)
    assert torch.equal(via_generator, via_list)
    # exactly noise_draws(num_steps) draws were consumed
    assert torch.equal(gen.get_state(), expected_gen.get_state())

    # the global RNG (the official source) gives the same stream
    torch.manual_seed(1234)
    x_global = torch.randn(shape)
    assert torch.equal(sample(_toy_denoise, x_global, schedule(num_steps)), via_list)


def _reference_dpmpp_2m_sde(denoise, x, sched, noises, second_order=True):
    """SDE-DPM-Solver++(2M) in float64, written in the paper's form (Lu et al. 2022, data prediction):
    x_t = (σ_t/σ_s)·e^(-h)·x_s + α_t·(1 - e^(-2h))·D + σ_t·sqrt(1 - e^(-2h))·z,
    D = x0_s + (x0_s - x0_prev)/(2r), r = h_prev/h, λ = log(α/σ); the first step is first order."""
    alphas = sched.alphas.double().numpy()
    sigmas = np.sqrt(1 - alphas**2)
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(sigmas)  # -inf at the zero-SNR start, +inf at the end
    noises = iter(noises)
    x = x.double()
    x0_prev = None
    for i in range(sched.num_steps - 1):
        x0 = denoise(x, float(sched.timesteps[i]), sched.denoiser_alphas[i].double())
        h = lambdas[i + 1] - lambdas[i]
        if x0_prev is None:
            d = x0
        else:
            next(noises)  # the official discarded draw
            if not second_order:
                x0_prev = x0
            r = (lambdas[i] - lambdas[i - 1]) / h
            d = x0 + (x0 - x0_prev) / (2 * r)
        decay = 0.0 if np.isinf(h) else sigmas[i + 1] / sigmas[i] * np.exp(-h)
        x = (decay * x + alphas[i + 1] * -np.expm1(-2 * h) * d
             + sigmas[i + 1] * np.sqrt(-np.expm1(-2 * h)) * next(noises).double())
        x0_prev = x0
    return denoise(x, float(sched.timesteps[-1]), sched.denoiser_alphas[-1].double())


@pytest.mark.parametrize("num_steps", [4, 7, 50])
def test_second_order_update_matches_a_float64_reference(num_steps):
    # The 3-step fixture never exercises the 2M correction (its step 1 follows alpha = 0, making it
    # first order, and step 2 returns x0), so check the update against an independent formulation.
    gen = torch.Generator().manual_seed(3)
    shape = (1, 2, 8, 16)
    x = initial_noise(shape, gen)
    noises = [torch.randn(shape, generator=gen) for _ in range(noise_draws(num_steps))]
    sched = schedule(num_steps)

    def denoise(x, t, alpha):  # depends on x and t, so x0 changes between steps
        return torch.tanh(1.5 * x) * (0.5 + t / 1000) + alpha * torch.sin(x)

    got = sample(denoise, x, sched, noise=noises)
    want = _reference_dpmpp_2m_sde(denoise, x, sched, noises)
    assert _rel_err(got, want) <= 1e-4  # float32 vs float64; measured 3e-7 … 1.4e-5
    # the test can tell: without the 2M correction the result is far off
    first_order = _reference_dpmpp_2m_sde(denoise, x, sched, noises, second_order=False)
    assert _rel_err(first_order, want) > 1e-3


def test_noise_draw_counts():
    assert [noise_draws(n) for n in (1, 2, 3, 50)] == [0, 1, 3, 97]  # 97: sampler_reference.json

    for n in (1, 2, 3, 5):
        drawn = []

        def counting(x):
            drawn.append(x.shape)
            return torch.zeros_like(x)

        sample(_toy_denoise, torch.randn(1, 2, 3), schedule(n), noise=counting)
        assert len(drawn) == noise_draws(n)


@pytest.mark.parametrize("num_steps", [1, 2, 7, 60])
def test_same_seed_is_bit_identical_and_finite(num_steps):
    shape = (1, 2, 3, 4, 5)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return sample(_toy_denoise, initial_noise(shape, gen), schedule(num_steps), noise=gen)

    first, second, other = run(7), run(7), run(8)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_one_step_returns_the_first_x0():
    x = torch.randn(1, 2, 3)
    out = sample(lambda x, t, a: x * 2 + t, x, schedule(1), noise=[])
    assert torch.equal(out, x * 2 + 999.0)


@pytest.mark.parametrize("num_steps", [7, 50])
def test_marginals_are_exact_for_a_perfect_denoiser(num_steps):
    # With the true x0 the SDE update keeps x_t ~ N(a·x0, 1 - a²) at every step: this checks the
    # multipliers independently of the fixture (wrong signs or a wrong noise scale fail it).
    target = 0.5
    gen = torch.Generator().manual_seed(0)
    sched = schedule(num_steps)
    states = []

    def denoise(x, t, alpha):
        states.append(x.clone())
        return torch.full_like(x, target)

    out = sample(denoise, initial_noise((1, 100_000), gen), sched, noise=gen)
    assert torch.equal(out, torch.full_like(out, target))
    for x, a in zip(states, sched.alphas[:-1].tolist()):
        assert x.mean().item() == pytest.approx(a * target, abs=0.01)
        assert x.std().item() == pytest.approx((1 - a * a) ** 0.5, abs=0.01)


def test_callback_reports_every_step():
    seen = []
    sample(_toy_denoise, torch.randn(1, 4), schedule(4), noise=torch.Generator().manual_seed(0),
           callback=lambda i, n: seen.append((i, n)))
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_bad_noise_sources_raise():
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="ran out"):
        sample(_toy_denoise, x, schedule(3), noise=[torch.randn(1, 4)])
    with pytest.raises(ValueError, match="shape"):
        sample(_toy_denoise, x, schedule(3), noise=[torch.randn(1, 5)] * 3)
