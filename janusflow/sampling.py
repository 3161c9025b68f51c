"""Sampling: text-to-image by solving the rectified-flow ODE with CFG, and text answers for images.

Official procedure (demo/app_janusflow.py): the prompt ends with the begin-of-image tag, which is
dropped and replaced by the t_emb token; conditional and unconditional rows run in one batch (the
unconditional rows keep BOS, their prompt is pad tokens and masked); v = w * v_c - (w - 1) * v_u;
Euler from t = 0 (noise) with t_k = k / N, the model seeing t_k * 1000.

Two options the field uses, off by default (the official behaviour): ``time_shift`` s warps the
fixed-step grid towards the noise end (SD3; ``shift_time``), and ``cfg_interval`` (a, b) applies the
guidance only for t in [a, b], using the conditional velocity alone (w = 1) elsewhere.

``solver="sde"`` integrates instead the stochastic differential equation that has the same marginals
as the ODE (Euler-Maruyama, ``sde_noise`` = eta): fresh noise each step lets an imperfect model correct
errors of earlier steps that the deterministic ODE carries to the end (see ``euler_maruyama``).

The official loop recomputes the whole sequence every step. The prompt prefix does not depend on
t or z under a causal mask, so ``sample_latents`` computes its K/V once into a static cache, and runs the
generation encoder once for both CFG halves (they see the same z_t and t), giving the same result;
``sample_latents_reference`` keeps the full recompute for tests and benchmarks.

    latents = sample_latents(model, input_ids, noise, steps=30, cfg_weight=2.0, pad_id=tok.pad_id)
    images = codec.decode(latents)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import get_args

import torch
from transformers import StaticCache

from janusflow.config import Solver
from janusflow.flow import euler_times
from janusflow.models.llm import CACHE_KWARG

SOLVERS = get_args(Solver)
_TORCHDIFFEQ_NAMES = {"heun": "heun2", "midpoint": "midpoint", "rk4": "rk4", "dopri5": "dopri5", "euler": "euler"}
FULL_INTERVAL = (0.0, 1.0)


def shift_time(t: float, shift: float) -> float:
    """SD3's time shift in JanusFlow's convention (t = 0 noise, t = 1 data): t' = t / (s - (s - 1) t).

    SD3 writes it for sigma = 1 - t (sigma = 1 at noise): sigma' = s sigma / (1 + (s - 1) sigma); substituting
    sigma = 1 - t gives t' = 1 - sigma' = t / (s - (s - 1) t). It keeps t = 0 and t = 1; s > 1 moves every
    step towards the noise end, where the sampler commits to the layout; s = 1 returns t itself, bit for bit.
    """
    return t / (shift - (shift - 1.0) * t)


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """The N + 1 times of a fixed-step solve, shift_time(k / N, s) for k = 0..N (s = 1: exactly k / N).

    The last is 1.0 itself (torchdiffeq checks that the grid ends where the solve does)."""
    return [shift_time(k / steps, shift) for k in range(steps)] + [1.0]


def euler_steps(steps: int, shift: float = 1.0) -> list[tuple[float, float]]:
    """(t_k, dt_k) of the Euler loop: the official (k / N, 1 / N) at s = 1, else steps on the shifted grid."""
    if shift == 1.0:  # dt = 1 / N itself, not a difference of grid points: bit-identical to the official loop
        return [(t, 1.0 / steps) for t in euler_times(steps)]
    grid = time_grid(steps, shift)
    return [(grid[k], grid[k + 1] - grid[k]) for k in range(steps)]


def check_sampler_options(solver: str, time_shift: float, cfg_interval: tuple[float, float]) -> None:
    """ValueError naming the option unless time_shift > 0 (1 for the adaptive dopri5) and 0 <= a <= b <= 1."""
    if not (math.isfinite(time_shift) and time_shift > 0):
        raise ValueError(f"time_shift must be a number > 0, got {time_shift}")
    if time_shift != 1.0 and solver == "dopri5":
        raise ValueError("time_shift warps a fixed-step grid; the adaptive dopri5 chooses its own steps")
    lo, hi = cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval must satisfy 0 <= a <= b <= 1, got ({lo}, {hi})")


def cfg_prefix(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, L] (left-padded, each ending with the begin-of-image tag) ->
    prefix embeddings [2B, L-1, hidden] and mask [2B, L-1]: rows [0, B) conditional, [B, 2B) unconditional.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids, mask = input_ids[:, :-1], attention_mask[:, :-1]
    bos_pos = mask.int().argmax(dim=1)  # first visible token (BOS) of each left-padded row
    rows = torch.arange(ids.shape[0], device=ids.device)
    uncond_ids = torch.full_like(ids, pad_id)
    uncond_ids[rows, bos_pos] = ids[rows, bos_pos]
    uncond_mask = torch.zeros_like(mask)
    uncond_mask[rows, bos_pos] = 1
    all_ids = torch.cat([ids, uncond_ids])
    return model.embed_tokens(all_ids), torch.cat([mask, uncond_mask]).long()


def guide(v: torch.Tensor, cfg_weight: float) -> torch.Tensor:
    """[2B, ...] (cond; uncond) -> w * v_c - (w - 1) * v_u."""
    v_c, v_u = v.chunk(2)
    return cfg_weight * v_c - (cfg_weight - 1.0) * v_u


def weight_at(t: float | torch.Tensor, cfg_weight: float, cfg_interval: tuple[float, float]) -> float:
    """The guidance weight at time t: w inside [a, b], 1 (the conditional velocity alone) outside."""
    return cfg_weight if cfg_interval[0] <= float(t) <= cfg_interval[1] else 1.0


def cfg_velocity(model, cache, mask: torch.Tensor, z: torch.Tensor, t: torch.Tensor, cfg_weight: float
                 ) -> torch.Tensor:
    """One guided velocity [B, C, H, W] at z [B, C, H, W], t [] from the prompts' cached K/V (2B rows; ``mask``
    [2B, P + 1 + N]). Both CFG halves see the same z_t and t, so the generation encoder runs on B rows and its
    outputs serve both. The caller drops this step's 1 + N cache entries afterwards."""
    gen = model.gen_inputs(z, t)
    n = gen.tokens.shape[1]
    embeds = torch.cat([gen.t_emb.unsqueeze(1), gen.tokens], dim=1).to(model.dtype_for_llm).repeat(2, 1, 1)
    out = model.language_model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True,
                                     **{CACHE_KWARG: cache})
    both = dataclasses.replace(gen, t_emb=gen.t_emb.repeat(2, 1), skips=[s.repeat(2, 1, 1, 1) for s in gen.skips])
    return guide(model.velocity_from_hidden(out.last_hidden_state[:, -n:], both), cfg_weight)


@functools.cache
def compiled_cfg_velocity(mode: str) -> Callable:
    """``cfg_velocity`` through torch.compile, one per mode for the process (a later call with the same shapes
    reuses the graph)."""
    return torch.compile(cfg_velocity, mode=mode, dynamic=False)


class CachedVelocity:
    """v(z, t) with CFG from the prompt prefix's K/V, computed once into a static (preallocated) cache of
    P + 1 + N positions at the first call: each call writes its time and image tokens at [P, P + 1 + N) and then
    rewinds. ``compile``: each call through ``compiled_cfg_velocity`` (CUDA graphs on a GPU, inductor on a CPU;
    the first call compiles)."""

    def __init__(self, model, prefix_embeds: torch.Tensor, prefix_mask: torch.Tensor, cfg_weight: float,
                 cfg_interval: tuple[float, float] = FULL_INTERVAL, compile: bool = False):
        self.model, self.cfg_weight, self.cfg_interval = model, cfg_weight, cfg_interval
        self.prefix_embeds, self.prefix_mask = prefix_embeds, prefix_mask
        self.cache = self.mask = None
        self.graphs = compile and prefix_embeds.device.type == "cuda"
        self.step = compiled_cfg_velocity("reduce-overhead" if self.graphs else "default") if compile else cfg_velocity
        self.nfe = 0

    def _prefill(self, num_tokens: int) -> None:
        llm, prefix = self.model.language_model.model, self.prefix_embeds
        self.cache = StaticCache(config=llm.config, max_cache_len=prefix.shape[1] + 1 + num_tokens)
        self.mask = torch.cat([self.prefix_mask, self.prefix_mask.new_ones(prefix.shape[0], 1 + num_tokens)], dim=1)
        llm(inputs_embeds=prefix, attention_mask=self.prefix_mask, use_cache=True, **{CACHE_KWARG: self.cache})

    def __call__(self, t: float | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        num_tokens = self.model.num_gen_tokens(z.shape[-2:])
        if self.cache is None:
            self._prefill(num_tokens)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        weight = weight_at(t, self.cfg_weight, self.cfg_interval)
        v = self.step(self.model, self.cache, self.mask, z, torch.as_tensor(t, dtype=torch.float32, device=z.device),
                      weight)
        self.cache.crop(-(1 + num_tokens))  # keep the prompts' entries only
        return v.clone() if self.graphs else v  # a graph's output buffer is overwritten by its next replay


class RecomputeVelocity:
    """v(z, t) with CFG recomputing the whole sequence every call (the official demo's behaviour)."""

    def __init__(self, model, prefix_embeds: torch.Tensor, prefix_mask: torch.Tensor, cfg_weight: float,
                 cfg_interval: tuple[float, float] = FULL_INTERVAL):
        self.model, self.cfg_weight, self.cfg_interval = model, cfg_weight, cfg_interval
        self.prefix_embeds, self.prefix_mask = prefix_embeds, prefix_mask
        self.nfe = 0

    def __call__(self, t: float | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        t = torch.as_tensor(t, dtype=torch.float32, device=z.device)
        v, _ = self.model.forward_gen(self.prefix_embeds, self.prefix_mask, torch.cat([z, z]), t)
        return guide(v, weight_at(t, self.cfg_weight, self.cfg_interval))


def solve(velocity: Callable, noise: torch.Tensor, steps: int, solver: str = "euler",
          rtol: float = 1e-4, atol: float = 1e-4, progress: Callable | None = None, sde_noise: float = 1.0,
          step_noise: Callable[[int], torch.Tensor] | None = None, time_shift: float = 1.0) -> torch.Tensor:
    """Integrate dz/dt = velocity(t, z) from t = 0 (noise) to t = 1.

    Euler is the official fixed-step loop (t_k = k / N); the others run through torchdiffeq
    (fixed-step ones with step 1 / N, dopri5 adaptive with rtol / atol), except ``sde``
    (``euler_maruyama`` with eta = ``sde_noise`` and the increments ``step_noise(k)``).
    ``time_shift`` s != 1 puts the fixed-step solvers on the grid ``time_grid(steps, s)`` instead.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    check_sampler_options(solver, time_shift, FULL_INTERVAL)
    if solver in ("euler", "sde"):
        eta = sde_noise if solver == "sde" else 0.0
        return euler_maruyama(velocity, noise, steps, eta, step_noise, progress, time_shift)
    from torchdiffeq import odeint

    # torchdiffeq's step-size control underflows in half precision: integrate a float32 state.
    dtype = noise.dtype
    options = {} if solver == "dopri5" else {"step_size": 1.0 / steps}
    if time_shift != 1.0:
        grid = torch.tensor(time_grid(steps, time_shift), device=noise.device)
        options = {"grid_constructor": lambda _func, _y0, _t: grid}
    ts = torch.tensor([0.0, 1.0], device=noise.device)
    z = odeint(lambda t, z: velocity(t, z.to(dtype)).float(), noise.float(), ts, method=_TORCHDIFFEQ_NAMES[solver],
               rtol=rtol, atol=atol, options=options)[-1]
    return z.to(dtype)


def euler_maruyama(velocity: Callable, noise: torch.Tensor, steps: int, eta: float = 0.0,
                   step_noise: Callable[[int], torch.Tensor] | None = None,
                   progress: Callable | None = None, time_shift: float = 1.0) -> torch.Tensor:
    """Fixed steps t_k = k / N (``euler_steps``: on the shifted grid when ``time_shift`` != 1) of the SDE with the
    marginals of the rectified-flow ODE; eta = 0 is the ODE (Euler).

        dz = [v - (w / 2) * x0_hat / (1 - t)] dt + sqrt(w) dW,   w(t) = eta * (1 - t)

    x0_hat = z - t * v is the predicted noise, so -x0_hat / (1 - t) is the score of p_t: the added
    drift and the Brownian term cancel in the marginals (any w), while the noise keeps pulling the path
    back towards where the model was trained. The diffusion w vanishes at the data end, and the last
    step is deterministic. ``step_noise(k)`` gives the standard normal increment of step k (shape of
    ``noise``; default: the global torch RNG).
    """
    if eta < 0:
        raise ValueError(f"the SDE noise scale eta must be >= 0, got {eta}")
    z = noise
    for k, (t, dt) in enumerate(euler_steps(steps, time_shift)):
        v = velocity(t, z)
        if eta > 0 and k < steps - 1:
            w = eta * (1.0 - t)
            dw = step_noise(k) if step_noise is not None else torch.randn_like(z)
            z = z + dt * (v - 0.5 * eta * (z - t * v)) + (w * dt) ** 0.5 * dw.to(z)
        else:
            z = z + dt * v
        if progress:
            progress(k + 1, steps)
    return z


@torch.no_grad()
def sample_latents(model, input_ids: torch.Tensor, noise: torch.Tensor, *, steps: int = 30,
                   cfg_weight: float = 2.0, pad_id: int, attention_mask: torch.Tensor | None = None,
                   solver: str = "euler", use_cache: bool = True, progress: Callable | None = None,
                   rtol: float = 1e-4, atol: float = 1e-4, return_nfe: bool = False, sde_noise: float = 1.0,
                   step_noise: Callable[[int], torch.Tensor] | None = None, time_shift: float = 1.0,
                   cfg_interval: tuple[float, float] = FULL_INTERVAL, compile: bool = False):
    """Text-to-image latents (t = 1) from noise [B, C, H, W] and prompts input_ids [B, L].

    input_ids are left-padded (attention_mask marks real tokens) and end with the begin-of-image tag.
    ``sde_noise`` / ``step_noise``: eta and the Brownian increments of ``solver="sde"`` (see ``euler_maruyama``).
    ``time_shift`` (``shift_time``) and ``cfg_interval`` (``weight_at``): 1.0 and (0, 1) are the official sampler.
    ``compile``: the cached step through torch.compile (CUDA graphs on a GPU): the same latents, faster steps after
    a first one that compiles.
    """
    check_sampler_options(solver, time_shift, cfg_interval)
    if input_ids.shape[0] != noise.shape[0]:
        raise ValueError(f"{input_ids.shape[0]} prompts but {noise.shape[0]} noise samples")
    model.vision_gen_enc_model.check_input(noise)
    max_len = model.config.llm.max_position_embeddings
    n_tokens = model.num_gen_tokens(noise.shape[-2:])
    if input_ids.shape[1] + n_tokens > max_len:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens + {n_tokens} image tokens exceeds the "
                         f"context of {max_len} tokens")
    prefix, mask = cfg_prefix(model, input_ids, attention_mask, pad_id)
    prefix = prefix.to(model.dtype_for_llm)
    if use_cache:
        velocity = CachedVelocity(model, prefix, mask, cfg_weight, cfg_interval, compile)
    else:
        velocity = RecomputeVelocity(model, prefix, mask, cfg_weight, cfg_interval)
    z = solve(velocity, noise.to(model.dtype_for_llm), steps, solver, rtol, atol, progress, sde_noise, step_noise,
              time_shift)
    return (z, velocity.nfe) if return_nfe else z


def sample_latents_reference(model, input_ids: torch.Tensor, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    """The official full-recompute procedure (no KV cache)."""
    return sample_latents(model, input_ids, noise, use_cache=False, **kwargs)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoded images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3], rounded (as the official README's
    save_image; the official demo truncates instead)."""
    x = images.float().clamp(-1, 1).permute(0, 2, 3, 1)
    return ((x + 1) / 2 * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def generate_text(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *, eos_id: int,
                  pad_id: int, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                  streamer=None, generator_seed: int | None = None) -> torch.Tensor:
    """Autoregressive answer tokens [B, <= max_new_tokens] from prepared (image + text) embeddings.

    temperature 0 is greedy; otherwise sampling with temperature and nucleus top_p.
    """
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    sampling = temperature > 0
    return model.language_model.generate(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        do_sample=sampling, temperature=temperature if sampling else None, top_p=top_p if sampling else None,
        top_k=None, eos_token_id=eos_id, pad_token_id=pad_id, streamer=streamer, use_cache=True)
