"""Training-step throughput: tokens/s, samples/s, REPA's extra cost, and MFU on a GPU.

One process, a synthetic batch of the recipe's shape (und + gen + text rows), forward + backward +
AdamW through ``TrainModule`` (the trainer's module), timed after warm-up. Every figure printed is
measured in this run; the REPA overhead is a ratio of two timings taken here, side by side.

    python benchmarks/training.py --preset shapes --batch 16
    python benchmarks/training.py --preset janusflow-1.3b --batch 8 --device cuda --dtype bfloat16

MFU counts the LLM's matmul FLOPs (6 N per token for the non-embedding weights, plus attention
12 L d s) against the device's peak bf16 FLOP/s (--peak-tflops, 989 for an H100 SXM dense).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from janusflow.config import model_config  # noqa: E402
from janusflow.data.mixture import Batch  # noqa: E402
from janusflow.models.janusflow import JanusFlow  # noqa: E402
from janusflow.train.trainer import TrainModule  # noqa: E402


def synthetic_batch(model: JanusFlow, n_und: int, n_gen: int, n_text: int, prompt_len: int, text_len: int,
                    latent_side: int, device: torch.device, dtype: torch.dtype) -> Batch:
    cfg = model.config
    vocab = cfg.llm.vocab_size
    n_img = model.vision_und_enc_model.num_patches + 1
    g = torch.Generator().manual_seed(0)
    batch = Batch(size=n_und + n_gen + n_text)
    rows = n_und + n_text
    if rows:
        width = n_img + text_len
        ids = torch.randint(0, vocab - 16, (rows, width), generator=g)
        mask = torch.zeros(rows, width, dtype=torch.bool)
        mask[:n_und, 1:1 + n_img] = True
        size = cfg.und_encoder.image_size
        batch.ar = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
                    "pixel_values": torch.randn(n_und, 3, size, size, generator=g) if n_und else None,
                    "image_seq_mask": mask, "is_und": torch.arange(rows) < n_und}
    if n_gen:
        latents = torch.randn(n_gen, cfg.gen_encoder.latent_channels, latent_side, latent_side, generator=g)
        size = cfg.und_encoder.image_size
        batch.gen = {"prefix_ids": torch.randint(0, vocab - 16, (n_gen, prompt_len), generator=g),
                     "prefix_mask": torch.ones(n_gen, prompt_len, dtype=torch.long), "latents": latents,
                     "noise": torch.randn_like(latents), "t": torch.rand(n_gen, generator=g),
                     "repa_pixels": torch.randn(n_gen, 3, size, size, generator=g)}
    return batch.to(device, dtype)


def llm_flops_per_token(model: JanusFlow, seq_len: int) -> float:
    c = model.config.llm
    n = sum(p.numel() for n_, p in model.language_model.named_parameters() if "embed_tokens" not in n_)
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def time_steps(module: TrainModule, batch: Batch, steps: int, warmup: int, device: torch.device) -> float:
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        module(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shapes")
    ap.add_argument("--batch", type=int, default=16, help="samples per step, split und:gen:text = 2:8:0")
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bfloat16 on GPU)")
    ap.add_argument("--repa-layer", type=int, default=None)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = model_config(args.preset)
    model = JanusFlow(cfg).to(device, dtype).train()
    model.vision_und_enc_model.requires_grad_(False)  # stage 2: everything but SigLIP
    if args.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable()
    latent_side = cfg.gen_image_size // (8 if args.preset == "janusflow-1.3b" else 4 if args.preset == "shapes" else 2)
    n_und = max(1, round(0.2 * args.batch))
    batch = synthetic_batch(model, n_und, args.batch - n_und, 0, args.prompt_len, args.text_len, latent_side,
                            device, dtype)
    layer = args.repa_layer or min(6, cfg.llm.num_hidden_layers)
    results = {}
    for name, weight in (("repa_on", 1.0), ("repa_off", 0.0)):
        module = TrainModule(model, weight, layer, min(2048, 4 * cfg.llm.hidden_size)).to(device, dtype)
        results[name] = time_steps(module, batch, args.steps, args.warmup, device)
    gen_tokens = model.num_gen_tokens((latent_side, latent_side))
    und_tokens = model.vision_und_enc_model.num_patches + 1 + args.text_len
    tokens = (args.batch - n_und) * (args.prompt_len + 1 + gen_tokens) + n_und * und_tokens
    step = results["repa_on"]
    print(f"preset {args.preset}, device {device}, {dtype}, batch {args.batch} ({n_und} und + "
          f"{args.batch - n_und} gen), {tokens} LLM tokens per step")
    print(f"step time (REPA on):  {step:.3f} s  -> {tokens / step:,.0f} tokens/s, {args.batch / step:.2f} samples/s")
    print(f"step time (REPA off): {results['repa_off']:.3f} s")
    print(f"REPA overhead: {100 * (step / results['repa_off'] - 1):+.1f}% of the step time")
    if device.type == "cuda":
        seq = args.prompt_len + 1 + gen_tokens
        mfu = llm_flops_per_token(model, seq) * tokens / step / (args.peak_tflops * 1e12)
        print(f"MFU (LLM matmuls, peak {args.peak_tflops:.0f} TFLOP/s): {100 * mfu:.1f}%")


if __name__ == "__main__":
    main()
