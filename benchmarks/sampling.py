"""Sampler benchmark on a random model: janusflow's sampler vs the official full recompute, and ODE solvers.

1. Times ``sample_latents`` (the prompt's K/V computed once into a static cache, the generation encoder run once
   for both CFG halves; optionally the step through torch.compile) against ``sample_latents_reference`` (the
   whole sequence every step, as the official demo) on the same prompts and noise, checks that both give the
   same latents, and prints images/s and the speed-up. ``--geometry both`` (the default) measures it twice in one
   run: on the toy (the shapes preset, its long byte prompts) and at the release's geometry (official widths,
   ``--llm-layers`` LLM blocks, 48 x 48 latents = 576 image tokens, a typical 26-token prompt, 2 images).
2. ``--solvers``: each solver's error against a fine-step Euler solution for a number of function evaluations
   (NFE): Euler vs heun / midpoint (2 NFE per step) and adaptive dopri5.

    python benchmarks/sampling.py --threads 2                                   # toy and release geometry, CPU
    python benchmarks/sampling.py --geometry release --llm-layers 24 --device cuda --dtype bfloat16 --compile
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from janusflow.config import CodecConfig, model_config
from janusflow.models.codec import LatentCodec
from janusflow.models.janusflow import JanusFlow
from janusflow.pipeline import DTYPES, image_noise, left_pad
from janusflow.sampling import sample_latents, sample_latents_reference
from janusflow.tokenizer import ByteTokenizer, gen_prompt

PROMPTS = ["a red circle left of a blue square", "two green triangles", "a small yellow star above a purple circle"]
CODEC_PRESET = {"tiny": "tiny", "shapes": "shapes", "janusflow-1.3b": "sdxl"}


def random_model(preset: str, device: str, dtype: torch.dtype, std: float = 0.05, max_rad_per_t: float = 10.0,
                 llm_layers: int | None = None) -> JanusFlow:
    """Random weights (perturbed: the default init zeroes the decoder output) with a velocity smooth in t.

    The time embedding holds sinusoids of t * 1000 up to 1000 rad per unit t; random weights on the
    fast ones make the field oscillate ~160 times along the path, which a trained model (sampled well
    in 30 Euler steps) does not, so the columns reading sinusoids faster than ``max_rad_per_t`` are zeroed.
    """
    torch.manual_seed(0)
    model = JanusFlow(model_config(preset, **({"llm": {"num_hidden_layers": llm_layers}} if llm_layers else {})))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
        proj, linear = model.vision_gen_enc_model.time_proj, model.vision_gen_enc_model.time_embed.linear_1
        half = proj.num_channels // 2
        # diffusers' get_timestep_embedding frequencies (max_period 10000), per unit of t rather than t * 1000
        rad_per_t = 1000.0 * torch.exp(-math.log(10000) * torch.arange(half) / (half - proj.downscale_freq_shift))
        linear.weight[:, (rad_per_t > max_rad_per_t).repeat(2)] = 0.0  # [cos | sin] halves
    return model.eval().to(device, dtype)


def inputs(model: JanusFlow, preset: str, batch: int, device: str, prompt_tokens: int | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [B, L], their mask and noise [B, C, H, W] of the preset's image size; prompts of
    exactly ``prompt_tokens`` tokens (BOS ... begin-of-image) when given, else the byte-encoded PROMPTS."""
    tok = ByteTokenizer()
    if prompt_tokens:
        words = [[tok.bos_id, *(97 + (7 * i + j) % 26 for j in range(prompt_tokens - 2)), tok.boi_id]
                 for i in range(batch)]
    else:
        words = [tok.encode(gen_prompt(PROMPTS[i % len(PROMPTS)])) for i in range(batch)]
    ids, mask = left_pad(words, tok.pad_id)
    codec = LatentCodec.from_config(CodecConfig(preset=CODEC_PRESET[preset]))
    shape = codec.latent_shape(model.config.gen_image_size)
    noise = torch.stack([image_noise(0, i, shape) for i in range(batch)])
    return ids.to(device), mask.to(device), noise.to(device)


def seconds(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def rel_error(z: torch.Tensor, ref: torch.Tensor) -> float:
    return ((z.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_cache(model, ids, mask, noise, pad_id: int, steps: int, repeats: int, compile: bool = False) -> float:
    """Best-of-``repeats`` times, interleaved so that load from other processes hits every variant alike; returns
    the speed-up of janusflow's sampler over the full recompute."""
    kw = dict(steps=steps, cfg_weight=2.0, pad_id=pad_id, attention_mask=mask)
    variants = {"full recompute (official)": lambda: sample_latents_reference(model, ids, noise, **kw),
                "janusflow (static cache)": lambda: sample_latents(model, ids, noise, **kw)}
    if compile:
        variants["janusflow + torch.compile"] = lambda: sample_latents(model, ids, noise, compile=True, **kw)
    outputs = {name: run() for name, run in variants.items()}  # also the warm-up (and the compile)
    times = {name: min(seconds(run) for _ in range(repeats)) for name, run in variants.items()}
    b, full = noise.shape[0], "full recompute (official)"
    print(f"== {steps} Euler steps, batch {b} (CFG: {2 * b} rows), best of {repeats}")
    for name, t in times.items():
        diff = (outputs[name].float() - outputs[full].float()).abs().max().item()
        print(f"{name:<28}{t:9.3f} s {b / t:8.3f} images/s  x{times[full] / t:5.2f}  max |dz| vs official {diff:.1e}")
    return times[full] / times["janusflow (static cache)"]


def bench_solvers(model, ids, mask, noise, pad_id: int, ref_steps: int, budgets: list[int]) -> None:
    kw = dict(cfg_weight=2.0, pad_id=pad_id, attention_mask=mask, return_nfe=True)
    # Richardson extrapolation of Euler (error ~ c / N): 2 E(2N) - E(N) is second-order accurate.
    fine = [sample_latents(model, ids, noise, steps=n, **kw)[0] for n in (ref_steps, 2 * ref_steps)]
    ref = 2 * fine[1].float() - fine[0].float()
    print(f"\n== solver error vs Euler with {ref_steps} and {2 * ref_steps} steps, Richardson-extrapolated "
          f"(relative L2 of the final latents; Euler {2 * ref_steps} itself: {rel_error(fine[1], ref):.1e})")
    print(f"{'solver':<10}{'setting':>14}{'NFE':>6}{'rel. error':>14}")
    for nfe in budgets:
        for solver, steps in (("euler", nfe), ("heun", nfe // 2), ("midpoint", nfe // 2)):
            z, used = sample_latents(model, ids, noise, steps=steps, solver=solver, **kw)
            print(f"{solver:<10}{f'{steps} steps':>14}{used:>6}{rel_error(z, ref):>14.2e}")
    for tol in (1e-2, 1e-3, 1e-4):
        z, used = sample_latents(model, ids, noise, steps=1, solver="dopri5", rtol=tol, atol=tol, **kw)
        print(f"{'dopri5':<10}{f'tol {tol:g}':>14}{used:>6}{rel_error(z, ref):>14.2e}")


GEOMETRIES = {"toy": dict(preset="shapes", llm_layers=None, prompt_tokens=None, batch=4),
              "release": dict(preset="janusflow-1.3b", llm_layers=2, prompt_tokens=26, batch=2)}


def run_geometry(name: str, args: argparse.Namespace) -> float:
    g = dict(GEOMETRIES[name])
    if name == "release":
        g.update(llm_layers=args.llm_layers, batch=args.release_batch)
    model = random_model(g["preset"], args.device, DTYPES[args.dtype], llm_layers=g["llm_layers"])
    ids, mask, noise = inputs(model, g["preset"], g["batch"], args.device, g["prompt_tokens"])
    steps = args.steps if name == "toy" else args.release_steps
    print(f"\n[{name}] preset {g['preset']}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"({model.config.llm.num_hidden_layers} LLM blocks), {args.device} {args.dtype}, threads "
          f"{torch.get_num_threads()}; prompt {ids.shape[1] - 1} tokens + 1 time token + "
          f"{model.num_gen_tokens(noise.shape[-2:])} image tokens")
    speedup = bench_cache(model, ids, mask, noise, ByteTokenizer().pad_id, steps, args.repeats, args.compile)
    if args.solvers and name == "toy":
        bench_solvers(model, ids[:1], mask[:1], noise[:1], ByteTokenizer().pad_id, args.ref_steps, args.budgets)
    return speedup


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="both", choices=["toy", "release", "both"])
    p.add_argument("--steps", type=int, default=30, help="Euler steps on the toy")
    p.add_argument("--release-steps", type=int, default=4, help="Euler steps at the release's geometry")
    p.add_argument("--llm-layers", type=int, default=2, help="LLM blocks at the release's geometry (24: the real)")
    p.add_argument("--release-batch", type=int, default=2, help="images at the release's geometry")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time the step through torch.compile")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 avoids stalls when other jobs share the cores)")
    p.add_argument("--solvers", action="store_true", help="also print the solver-error table (toy)")
    p.add_argument("--ref-steps", type=int, default=500, help="Euler steps (and 2x) of the solvers' reference")
    p.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32], help="NFE budgets for the solver table")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["toy", "release"] if args.geometry == "both" else [args.geometry]
    ratios = {name: run_geometry(name, args) for name in names}
    print("\nspeed-up of janusflow's sampler over the official full recompute: " +
          ", ".join(f"{name} x{r:.2f}" for name, r in ratios.items()))


if __name__ == "__main__":
    main()
