"""Sampler options off by default: the SD3 time shift and the CFG guidance interval (janusflow.sampling)."""

import numpy as np
import pytest
import torch
from PIL import Image

from janusflow.config import model_config
from janusflow.models.janusflow import JanusFlow
from janusflow.pipeline import PipelineError
from janusflow.sampling import (
    CachedVelocity,
    cfg_prefix,
    euler_steps,
    sample_latents,
    shift_time,
    solve,
    time_grid,
    weight_at,
)
from tests.conftest import randomize
from tests.model_dirs import official_dirs
from tests.test_pipeline import load_tool, model_dir, pipe, pixels  # noqa: F401  (fixtures)
from tests.test_sampling import TOK, batch


@pytest.fixture(scope="module")
def curved_model() -> JanusFlow:
    """Larger random weights than tiny_model's: a velocity that changes with t, so the options show."""
    return randomize(JanusFlow(model_config("tiny")), std=0.1).eval()


def test_shift_one_is_the_official_grid_bit_for_bit():
    for n in (1, 7, 10, 30):
        assert time_grid(n, 1.0) == [k / n for k in range(n + 1)]
        assert euler_steps(n, 1.0) == [(k / n, 1.0 / n) for k in range(n)]


@pytest.mark.parametrize("s", [0.5, 2.0, 3.0, 6.0])
def test_shift_mirrors_sd3(s):
    sigmas = np.linspace(0, 1, 11)
    sd3 = s * sigmas / (1 + (s - 1) * sigmas)  # SD3: sigma = 1 at noise
    ours = [shift_time(1 - sigma, s) for sigma in sigmas]
    np.testing.assert_allclose(ours, 1 - sd3, atol=1e-12)
    grid = time_grid(10, s)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and all(a < b for a, b in zip(grid, grid[1:]))
    assert (grid[5] < 0.5) == (s > 1)  # s > 1 spends more steps near the noise end
    assert sum(dt for _, dt in euler_steps(10, s)) == pytest.approx(1.0)


def field(t, z):
    """dz/dt = 3 t^2 (z-independent): every solver's update is a quadrature of it, computable by hand."""
    return 3 * torch.as_tensor(t, dtype=torch.float64) ** 2 * torch.ones_like(z)


def test_euler_and_heun_step_on_the_shifted_grid():
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    grid = time_grid(6, 3.0)
    euler = sum(3 * grid[k] ** 2 * (grid[k + 1] - grid[k]) for k in range(6))
    heun = sum(1.5 * (grid[k] ** 2 + grid[k + 1] ** 2) * (grid[k + 1] - grid[k]) for k in range(6))
    torch.testing.assert_close(solve(field, z0, 6, "euler", time_shift=3.0), z0 + euler, rtol=0, atol=1e-12)
    torch.testing.assert_close(solve(field, z0, 6, "heun", time_shift=3.0), z0 + heun, rtol=0, atol=1e-6)
    assert abs(euler - (1.0 / 6) * sum(3 * (k / 6) ** 2 for k in range(6))) > 0.05  # the grid did change
    with pytest.raises(ValueError, match="adaptive dopri5"):
        solve(field, z0, 6, "dopri5", time_shift=3.0)
    with pytest.raises(ValueError, match="time_shift must be a number > 0"):
        solve(field, z0, 6, "euler", time_shift=0.0)


@torch.no_grad()
def test_defaults_are_bit_identical_to_the_official_euler_loop(curved_model):
    tiny_model = curved_model
    ids, mask = batch(["a red circle", "two blue squares"])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    prefix, pmask = cfg_prefix(tiny_model, ids, mask, TOK.pad_id)
    velocity, z = CachedVelocity(tiny_model, prefix, pmask, 2.0), noise
    for k in range(5):  # today's loop: t_k = k / N, z += (1 / N) * v
        z = z + (1.0 / 5) * velocity(k / 5, z)
    kw = dict(steps=5, cfg_weight=2.0, pad_id=TOK.pad_id, attention_mask=mask)
    options = sample_latents(tiny_model, ids, noise, time_shift=1.0, cfg_interval=(0.0, 1.0), **kw)
    assert torch.equal(options, z)
    shifted = sample_latents(tiny_model, ids, noise, time_shift=3.0, **kw)
    interval = sample_latents(tiny_model, ids, noise, cfg_interval=(0.4, 1.0), **kw)
    unguided = sample_latents(tiny_model, ids, noise, **{**kw, "cfg_weight": 1.0})
    for other in (shifted, interval):
        assert (other - z).abs().max() > 1e-3
    assert (interval - unguided).abs().max() > 1e-3


@torch.no_grad()
def test_guidance_only_inside_the_interval(curved_model):
    tiny_model = curved_model
    ids, mask = batch(["a green triangle"])
    prefix, pmask = cfg_prefix(tiny_model, ids, mask, TOK.pad_id)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    inside, outside = 0.5, 0.2
    interval = CachedVelocity(tiny_model, prefix, pmask, 3.0, cfg_interval=(0.3, 0.7))
    guided = CachedVelocity(tiny_model, prefix, pmask, 3.0)
    conditional = CachedVelocity(tiny_model, prefix, pmask, 1.0)
    assert torch.equal(interval(inside, z), guided(inside, z))
    assert torch.equal(interval(outside, z), conditional(outside, z))
    assert not torch.allclose(guided(outside, z), conditional(outside, z), atol=1e-4)
    assert weight_at(0.3, 3.0, (0.3, 0.7)) == weight_at(0.7, 3.0, (0.3, 0.7)) == 3.0  # a closed interval
    assert weight_at(torch.tensor(0.71), 3.0, (0.3, 0.7)) == 1.0


def test_pipeline_options_and_noise_indices(pipe):  # noqa: F811
    prompts = ["a red circle", "a blue square", "a green cross"]
    plain = pipe.generate(prompts, seed=2, steps=3)
    assert np.array_equal(pixels(pipe.generate(prompts, seed=2, steps=3, time_shift=1.0, cfg_interval=(0, 1))),
                          pixels(plain))
    third = pipe.generate(prompts[2:], seed=2, steps=3, image_indices=[2])
    assert np.abs(pixels(third) - pixels(plain[2:])).max() <= 1  # the same noise, another batch shape
    shifted = pipe.generate(prompts, seed=2, steps=3, time_shift=3.0, cfg_interval=(0.2, 0.8))
    assert not np.array_equal(pixels(shifted), pixels(plain))  # reaches the sampler (its effect: tests above)
    for kwargs, message in [({"time_shift": -1.0}, "time_shift must be a number > 0"),
                            ({"cfg_interval": (0.8, 0.2)}, "cfg_interval must satisfy"),
                            ({"solver": "dopri5", "time_shift": 2.0}, "adaptive dopri5"),
                            ({"image_indices": [0]}, "1 image indices for 3 prompts")]:
        with pytest.raises(PipelineError, match=message):
            pipe.generate(prompts, steps=1, **kwargs)


def test_sample_cli_takes_the_options(model_dir, tmp_path, capsys):  # noqa: F811
    main = load_tool("sample.py").main
    main(["--model", str(model_dir), "--prompt", "a red circle", "--steps", "2", "--time-shift", "3",
          "--cfg-interval", "0.2", "0.8", "--out", str(tmp_path), "--device", "cpu"])
    assert (tmp_path / "a-red-circle-seed0-000.png").exists()
    official, vae = official_dirs(tmp_path / "official")
    main(["--model", str(official), "--vae", str(vae), "--prompt", "a red circle", "--steps", "2", "--time-shift",
          "3", "--cfg-interval", "0.2", "0.8", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert Image.open(tmp_path / "o" / "a-red-circle-seed0-000.png").size == (384, 384)
    for args, message in [(["--time-shift", "0"], "--time-shift must be a number > 0, got 0.0"),
                          (["--cfg-interval", "0.8", "0.2"], "--cfg-interval must satisfy 0 <= a <= b <= 1"),
                          (["--solver", "dopri5", "--time-shift", "2"], "adaptive dopri5")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(model_dir), "--prompt", "x", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
