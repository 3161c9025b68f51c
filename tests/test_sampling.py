"""The sampler: cached == official full recompute, CFG rows, solvers, determinism."""

import pytest
import torch

from janusflow.config import model_config
from janusflow.flow import interpolate, sample_t
from janusflow.models.janusflow import JanusFlow
from janusflow.pipeline import left_pad
from janusflow.sampling import cfg_prefix, euler_maruyama, sample_latents, sample_latents_reference, solve
from janusflow.tokenizer import ByteTokenizer, gen_prompt

from .conftest import randomize

TOK = ByteTokenizer()


def batch(prompts):
    return left_pad([TOK.encode(gen_prompt(p)) for p in prompts], TOK.pad_id)


def official_loop(model, input_ids, noise, steps, cfg_weight, pad_id):
    """A direct transcription of the official demo loop (single prompt repeated, full recompute)."""
    b = noise.shape[0]
    tokens = torch.cat([input_ids, input_ids])
    tokens[b:, 1:] = pad_id
    embeds = model.embed_tokens(tokens)[:, :-1]
    p = embeds.shape[1]
    z, dt = noise, 1.0 / steps
    for step in range(steps):
        z_in = torch.cat([z, z])
        t = torch.full((2 * b,), step / steps * 1000.0)
        z_emb, t_emb, hs = model.vision_gen_enc_model(z_in, t)
        z_emb = model.vision_gen_enc_aligner(z_emb.flatten(2).permute(0, 2, 1))
        seq = torch.cat([embeds, t_emb.unsqueeze(1), z_emb], dim=1)
        mask = torch.ones(2 * b, seq.shape[1], dtype=torch.long)
        mask[b:, 1:p] = 0
        h = model.language_model.model(inputs_embeds=seq, attention_mask=mask).last_hidden_state
        n = z_emb.shape[1]
        h = model.vision_gen_dec_aligner(model.vision_gen_dec_aligner_norm(h[:, -n:]))
        side = int(n**0.5)
        h = h.reshape(2 * b, side, side, -1).permute(0, 3, 1, 2)
        v = model.vision_gen_dec_model(h, hs, t_emb)
        v_c, v_u = v.chunk(2)
        z = z + dt * (cfg_weight * v_c - (cfg_weight - 1) * v_u)
    return z


@torch.no_grad()
def test_matches_official_loop(tiny_model):
    ids, _ = batch(["a red circle"])
    ids = ids.repeat(3, 1)
    noise = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = sample_latents(tiny_model, ids, noise, steps=6, cfg_weight=2.0, pad_id=TOK.pad_id)
    ref = official_loop(tiny_model, ids, noise, 6, 2.0, TOK.pad_id)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cached_equals_full_recompute_with_left_padding(tiny_model):
    ids, mask = batch(["a red circle", "two small blue squares above a green triangle"])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(steps=8, cfg_weight=3.0, pad_id=TOK.pad_id, attention_mask=mask)
    cached = sample_latents(tiny_model, ids, noise, **kw)
    full = sample_latents_reference(tiny_model, ids, noise, **kw)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached[0], cached[1], atol=1e-3)


@torch.no_grad()
def test_the_compiled_step_gives_the_plain_latents(tiny_model, monkeypatch):
    """sample_latents(compile=True): the static-cache step through torch.compile (aot_eager here: the graph
    capture without inductor's minutes of C++ builds; CUDA graphs on a GPU) gives the eager latents."""
    import functools

    from janusflow import sampling

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    sampling.compiled_cfg_velocity.cache_clear()
    ids, mask = batch(["a red circle", "two blue squares"])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(steps=4, cfg_weight=2.0, pad_id=TOK.pad_id, attention_mask=mask)
    plain = sample_latents(tiny_model, ids, noise, **kw)
    compiled = sample_latents(tiny_model, ids, noise, compile=True, **kw)
    sampling.compiled_cfg_velocity.cache_clear()
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-5)


def test_cfg_prefix_rows(tiny_model):
    ids, mask = batch(["ab", "abcdef"])
    embeds, pmask = cfg_prefix(tiny_model, ids, mask, TOK.pad_id)
    assert embeds.shape[:2] == (4, ids.shape[1] - 1)
    torch.testing.assert_close(pmask[:2], mask[:, :-1])
    assert pmask[2:].sum(1).tolist() == [1, 1]  # uncond rows: only BOS visible
    bos_cols = mask[:, :-1].int().argmax(1)
    for r in range(2):
        torch.testing.assert_close(embeds[2 + r, bos_cols[r]], tiny_model.embed_tokens(torch.tensor(TOK.bos_id)))


def test_solvers_on_analytic_field():
    # dz/dt = 3 t^2  =>  z(1) = z(0) + 1
    z0 = torch.zeros(2, 3)
    for solver, steps, tol in [("euler", 400, 1e-2), ("heun", 20, 1.3e-3), ("midpoint", 20, 7e-4), ("rk4", 5, 1e-6),
                               ("dopri5", 1, 1e-4)]:
        z1 = solve(lambda t, z: 3 * torch.as_tensor(t) ** 2 * torch.ones_like(z), z0, steps, solver)
        torch.testing.assert_close(z1, z0 + 1, atol=tol, rtol=0)
    with pytest.raises(ValueError, match="unknown solver"):
        solve(lambda t, z: z, z0, 2, "leapfrog")


def gaussian_velocity(mu: float, s: float):
    """The exact rectified-flow velocity E[x1 - x0 | z_t = z] for data x1 ~ N(mu, s^2) (t = 0 is noise)."""

    def v(t, z):
        t = float(t)
        var = t * t * s * s + (1 - t) ** 2
        x1 = mu + t * s * s * (z - t * mu) / var
        x0 = (1 - t) * (z - t * mu) / var
        return x1 - x0

    return v


def test_sde_has_the_ode_marginals_on_gaussian_data():
    mu, s = 1.5, 0.5
    noise = torch.randn(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for eta in (0.0, 1.0, 4.0):
        z = euler_maruyama(gaussian_velocity(mu, s), noise, 200, eta,
                           lambda k: torch.randn(noise.shape, generator=g, dtype=torch.float64))
        assert abs(z.mean().item() - mu) < 0.01 and abs(z.std().item() - s) < 0.01, (eta, z.mean(), z.std())
    # Without the score term the same noise would widen the distribution: the drift correction is what matters.
    z = noise.clone()
    for k in range(200):
        z = z + gaussian_velocity(mu, s)(k / 200, z) / 200 + (4.0 * (1 - k / 200) / 200) ** 0.5 * torch.randn(
            z.shape, generator=g, dtype=torch.float64)
    assert z.std().item() > s + 0.1


def test_sde_noise_zero_is_euler_and_increments_matter():
    v = gaussian_velocity(0.3, 2.0)
    z0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(solve(v, z0, 10, "sde", sde_noise=0.0), solve(v, z0, 10, "euler"))
    a = solve(v, z0, 10, "sde", sde_noise=2.0, step_noise=lambda k: torch.full_like(z0, 0.5))
    b = solve(v, z0, 10, "sde", sde_noise=2.0, step_noise=lambda k: torch.full_like(z0, 0.5))
    c = solve(v, z0, 10, "sde", sde_noise=2.0, step_noise=lambda k: torch.full_like(z0, -0.5))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        solve(v, z0, 10, "sde", sde_noise=-1.0)


@torch.no_grad()
def test_dopri5_agrees_with_fine_euler():
    tiny_model = randomize(JanusFlow(model_config("tiny")), std=0.1).eval()  # a curved velocity field
    ids, _ = batch(["a red circle"])
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    fine = sample_latents(tiny_model, ids, noise, steps=200, pad_id=TOK.pad_id)
    coarse = sample_latents(tiny_model, ids, noise, steps=4, pad_id=TOK.pad_id)
    adaptive, nfe = sample_latents(tiny_model, ids, noise, steps=30, pad_id=TOK.pad_id, solver="dopri5",
                                   rtol=1e-5, atol=1e-5, return_nfe=True)
    assert (adaptive - fine).abs().max() < 0.25 * (coarse - fine).abs().max()
    assert nfe >= 6


@torch.no_grad()
def test_same_seed_same_latents_and_context_check(tiny_model):
    ids, _ = batch(["a blue square"])
    a = sample_latents(tiny_model, ids, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5)),
                       steps=3, pad_id=TOK.pad_id)
    b = sample_latents(tiny_model, ids, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5)),
                       steps=3, pad_id=TOK.pad_id)
    assert torch.equal(a, b)
    long_ids = torch.full((1, 500), 65)
    with pytest.raises(ValueError, match="exceeds the context"):
        sample_latents(tiny_model, long_ids, torch.randn(1, 4, 16, 16), steps=1, pad_id=TOK.pad_id)


def test_flow_path():
    x1, x0 = torch.randn(4, 2), torch.randn(4, 2)
    t = torch.tensor([0.0, 1.0, 0.5, 0.25])
    z, v = interpolate(x1, x0, t)
    torch.testing.assert_close(z[0], x0[0])
    torch.testing.assert_close(z[1], x1[1])
    torch.testing.assert_close(v, x1 - x0)
    ts = sample_t(10000, generator=torch.Generator().manual_seed(0))
    assert 0 < ts.min() and ts.max() < 1 and abs(ts.mean().item() - 0.5) < 0.01
