"""Training-step throughput and the cost or gain of each speed option, as ratios measured in one run.

One process, a synthetic batch of the recipe's shape, forward + backward + AdamW through
``TrainModule`` (the trainer's module). The variants of a comparison are timed interleaved
(round-robin, the order rotated every round) after warm-up; the script prints each variant's median
step time and the median over rounds of its ratio to the first variant, so that load from other
processes on a shared machine hits every variant alike.

    python benchmarks/training.py --preset shapes --batch 16                        # REPA: off / live / cached
    python benchmarks/training.py --preset shapes --batch 16 --compare checkpointing
    python benchmarks/training.py --preset shapes --batch 16 --compare compile
    python benchmarks/training.py --preset shapes --batch 16 --compare packing      # und/text rows only
    python benchmarks/training.py --preset janusflow-1.3b --batch 8 --device cuda --dtype bfloat16
    python benchmarks/training.py --preset janusflow-1.3b --compare paper --batch 28 --pack-length 4096 \
        --device cuda --dtype bfloat16 --attn flash_attention_2      # the paper's layout on one GPU: tokens/s, MFU

--compare repa: und + gen rows (2:8); REPA "live" runs the frozen SigLIP on the clean image every step,
"cached" reads its features from the data (janusflow.data.latent_cache, what the trainer does while
SigLIP is frozen). --compare packing: und + text rows of random lengths, one right-padded row each vs
packed rows (data.pack_length); the same tokens, so the step-time ratio is the tokens/s ratio. MFU (GPU
only) counts the LLM's matmul FLOPs (6 N per token for the non-embedding weights, plus attention
12 L d s) against the device's peak bf16 FLOP/s (--peak-tflops, 989 for an H100 SXM dense).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from janusflow.config import load_recipe, model_config
from janusflow.data.batch import (
    ArRows,
    ArSample,
    Batch,
    GenRows,
    GenSample,
    collate_ar,
    collate_gen,
    collate_packed,
    pack_rows,
    sample_length,
)
from janusflow.data.transforms import siglip_view
from janusflow.models.janusflow import JanusFlow
from janusflow.tokenizer import ByteTokenizer
from janusflow.train.losses import TrainModule
from janusflow.train.optim import apply_speed_options

RECIPES = {"shapes": "2to8", "tiny": "tiny", "janusflow-1.3b": "janusflow-1.3b"}


@dataclasses.dataclass
class Variant:
    name: str
    module: TrainModule
    batch: Batch
    times: list[float] = dataclasses.field(default_factory=list)


def synthetic_batch(model: JanusFlow, n_und: int, n_gen: int, n_text: int, prompt_len: int, text_len: int,
                    latent_side: int, device: torch.device, dtype: torch.dtype) -> Batch:
    """Random rows of the trainer's layout: und / text rows of one length, gen rows with live REPA (crops)."""
    cfg = model.config
    vocab, size = cfg.llm.vocab_size, cfg.und_encoder.image_size
    n_img = model.vision_und_enc_model.num_patches + 1
    g = torch.Generator().manual_seed(0)
    batch = Batch(size=n_und + n_gen + n_text)
    rows = n_und + n_text
    if rows:
        width = n_img + text_len
        ids = torch.randint(0, vocab - 16, (rows, width), generator=g)
        mask = torch.zeros(rows, width, dtype=torch.bool)
        mask[:n_und, 1:1 + n_img] = True
        batch.ar = ArRows(ids, ids.clone(), torch.arange(rows)[:, None].expand(rows, width).contiguous(),
                          torch.arange(rows) < n_und, mask, torch.ones_like(ids),
                          images=torch.randn(n_und, 3, size, size, generator=g) if n_und else None)
    if n_gen:
        latents = torch.randn(n_gen, cfg.gen_encoder.latent_channels, latent_side, latent_side, generator=g)
        prompts = torch.randint(0, vocab - 16, (n_gen, prompt_len), generator=g)
        crops = torch.randint(0, 256, (n_gen, 3, size, size), generator=g, dtype=torch.uint8)
        batch.gen = GenRows(torch.rand(n_gen, generator=g), 0, prompts, torch.ones_like(prompts), latents=latents,
                            crops=crops)
    return batch.to_device(device, dtype)


def varied_ar_batches(model: JanusFlow, n_und: int, n_text: int, min_len: int, max_len: int,
                      device: torch.device, dtype: torch.dtype) -> tuple[Batch, Batch, int]:
    """The same und + text samples of random lengths collated unpacked and packed; and their token count."""
    tok = ByteTokenizer()
    n_img = model.vision_und_enc_model.num_patches
    size = model.config.und_encoder.image_size
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n_und + n_text):
        n = int(torch.randint(min_len, max_len + 1, (), generator=g))
        ids = torch.randint(0, 250, (n,), generator=g).tolist()
        if i < n_und:
            ids = [tok.bos_id, tok.boi_id] + [tok.image_id] * n_img + ids
            samples.append(ArSample("und", ids, ids, torch.randn(3, size, size, generator=g)))
        else:
            samples.append(ArSample("text", [tok.bos_id] + ids, [tok.bos_id] + ids))
    tokens = sum(len(s.ids) for s in samples)
    plain = Batch(len(samples), ar=collate_ar(samples, tok)).to_device(device, dtype)
    width = max(len(s.ids) for s in samples)
    ar, _, layout = collate_packed(samples, pack_rows([len(s.ids) for s in samples], width), width, tok, 0, None, 0)
    packed = Batch(len(samples), ar=ar, layout=layout).to_device(device, dtype)
    return plain, packed, tokens


def paper_layout_batches(model: JanusFlow, n: int, pack_length: int, prompt_len: int, text_len: int,
                         latent_side: int, device: torch.device, dtype: torch.dtype) -> tuple[Batch, Batch, int]:
    """The same und / gen / text samples (the paper's stage-2 mix, 14:80:6) one per padded row, and packed into rows
    of ``pack_length`` tokens (all three tasks, as data.pack_length); and their token count."""
    cfg, tok = model.config, ByteTokenizer()
    n_img, size = model.vision_und_enc_model.num_patches, cfg.und_encoder.image_size
    gen_tokens = model.num_gen_tokens((latent_side, latent_side))
    g = torch.Generator().manual_seed(0)
    counts = {"und": round(0.14 * n), "text": round(0.06 * n)}
    counts["gen"] = n - counts["und"] - counts["text"]
    words = lambda k: torch.randint(0, 250, (k,), generator=g).tolist()  # noqa: E731
    samples = [ArSample("und", ids := [tok.bos_id, tok.boi_id] + [tok.image_id] * n_img + words(text_len), ids,
                        torch.randn(3, size, size, generator=g)) for _ in range(counts["und"])]
    samples += [ArSample("text", ids := [tok.bos_id] + words(text_len), ids) for _ in range(counts["text"])]
    latent = (cfg.gen_encoder.latent_channels, latent_side, latent_side)
    gens = [GenSample([tok.bos_id] + words(prompt_len), False, latent=torch.randn(latent, generator=g),
                      crop=torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8))
            for _ in range(counts["gen"])]
    t = torch.rand(len(gens), generator=g)
    plain = Batch(n, ar=collate_ar(samples, tok), gen=collate_gen(gens, tok, t, 0))
    everything = samples + gens
    lengths = [sample_length(x, gen_tokens) for x in everything]
    ar, gen, layout = collate_packed(everything, pack_rows(lengths, pack_length), pack_length, tok, gen_tokens, t, 0)
    packed = Batch(n, ar=ar, gen=gen, layout=layout)
    return plain.to_device(device, dtype), packed.to_device(device, dtype), sum(lengths)


def with_cached_repa(model: JanusFlow, batch: Batch) -> Batch:
    """The batch as the data stream yields it when REPA's targets are cached (features, no crops)."""
    und = model.config.und_encoder
    with torch.no_grad():
        targets = model.vision_und_enc_model(siglip_view(batch.gen.crops, und).to(model.dtype_for_llm))
    return Batch(batch.size, batch.ar, dataclasses.replace(batch.gen, crops=None, repa_targets=targets), batch.counts)


def llm_flops_per_token(model: JanusFlow, seq_len: int) -> float:
    c = model.config.llm
    n = sum(p.numel() for n_, p in model.language_model.named_parameters() if "embed_tokens" not in n_)
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(variants: list[Variant], rounds: int, steps: int, warmup: int, device: torch.device) -> None:
    """Append the mean step time of each round to ``variant.times``; one AdamW over every parameter."""
    params = {id(p): p for v in variants for p in v.module.parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-5, fused=device.type == "cuda")

    def step(v: Variant) -> None:
        v.module(v.batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for v in variants:
        for _ in range(warmup):
            step(v)
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(v)
            _sync(device)
            v.times.append((time.perf_counter() - t0) / steps)


def ratio(v: Variant, base: Variant) -> float:
    return statistics.median(a / b for a, b in zip(v.times, base.times))


def report(variants: list[Variant]) -> None:
    base = variants[0]
    for v in variants:
        print(f"  {v.name:<26} step {statistics.median(v.times):.3f} s (median of {len(v.times)} rounds)   "
              f"time x{ratio(v, base):.3f} vs {base.name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shapes")
    ap.add_argument("--batch", type=int, default=16, help="samples per step, und:gen (or und:text) = 2:8")
    ap.add_argument("--compare", default="repa", choices=["repa", "checkpointing", "compile", "packing", "paper"])
    ap.add_argument("--pack-length", type=int, default=4096, help="--compare paper: packed row length")
    ap.add_argument("--attn", default=None, help="LLM attention kernel: sdpa, eager, flash_attention_2")
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--pack-lengths", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"),
                    help="--compare packing: text lengths drawn uniformly in [MIN, MAX]")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bfloat16 on GPU)")
    ap.add_argument("--recipe", default=None, help="REPA layer and projector width from this recipe "
                    "(default: the preset's own: shapes -> 2to8, tiny -> tiny, janusflow-1.3b -> janusflow-1.3b)")
    ap.add_argument("--repa-hidden", type=int, default=None, help="override the recipe's projector width")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = model_config(args.preset, **({"llm": {"attn_implementation": args.attn}} if args.attn else {}))
    repa = load_recipe(args.recipe or RECIPES.get(args.preset, "janusflow-1.3b")).train.repa
    layer, hidden = min(repa.layer, cfg.llm.num_hidden_layers), args.repa_hidden or repa.hidden_dim

    def model(**speed) -> JanusFlow:
        torch.manual_seed(0)
        m = JanusFlow(cfg).to(device, dtype).train()
        m.vision_und_enc_model.requires_grad_(False)  # stage 2: everything but SigLIP
        apply_speed_options(m, speed.get("checkpointing", False), speed.get("compile", False))
        return m

    def module(m: JanusFlow, weight: float = 1.0) -> TrainModule:
        return TrainModule(m, weight, layer, hidden).to(device, dtype)

    base = model()
    latent_side = cfg.gen_image_size // (8 if args.preset == "janusflow-1.3b" else 4 if args.preset == "shapes" else 2)
    n_und = max(1, round(0.2 * args.batch))
    batch = synthetic_batch(base, n_und, args.batch - n_und, 0, args.prompt_len, args.text_len, latent_side,
                            device, dtype)
    gen_tokens = base.num_gen_tokens((latent_side, latent_side))
    und_tokens = base.vision_und_enc_model.num_patches + 1 + args.text_len
    tokens = (args.batch - n_und) * (args.prompt_len + 1 + gen_tokens) + n_und * und_tokens
    rows = f"{n_und} und + {args.batch - n_und} gen"
    if args.compare == "repa":
        on = module(base)
        variants = [Variant("REPA off", module(base, 0.0), batch), Variant("REPA on, live SigLIP", on, batch),
                    Variant("REPA on, cached targets", on, with_cached_repa(base, batch))]
    elif args.compare in ("checkpointing", "compile"):
        option = {"checkpointing": "activation checkpointing", "compile": "torch.compile gen enc/dec"}[args.compare]
        variants = [Variant("plain", module(base), batch),
                    Variant(option, module(model(**{args.compare: True})), batch)]
    elif args.compare == "paper":
        plain, packed, tokens = paper_layout_batches(base, args.batch, args.pack_length, args.prompt_len,
                                                     args.text_len, latent_side, device, dtype)
        rows = f"und:gen:text 14:80:6 samples, packed into {packed.ar.input_ids.shape[0]} rows of {args.pack_length}"
        m = module(base)
        variants = [Variant("one sample per row", m, plain), Variant("packed, all tasks", m, packed)]
    else:
        plain, packed, tokens = varied_ar_batches(base, n_und, args.batch - n_und, *args.pack_lengths, device, dtype)
        rows = f"{n_und} und + {args.batch - n_und} text, text lengths {args.pack_lengths[0]}-{args.pack_lengths[1]}"
        print(f"packing: {plain.ar.input_ids.numel()} -> {packed.ar.input_ids.numel()} positions "
              f"({plain.ar.input_ids.shape[0]} -> {packed.ar.input_ids.shape[0]} rows) for {tokens} tokens")
        m = module(base)
        variants = [Variant("unpacked", m, plain), Variant("packed", m, packed)]
    print(f"preset {args.preset}, device {device}, {dtype}, batch {args.batch} ({rows}), {tokens} LLM tokens per "
          f"step, REPA layer {layer}, projector {hidden}, {torch.get_num_threads()} threads")
    time_interleaved(variants, args.rounds, args.steps, args.warmup, device)
    report(variants)
    if args.compare == "repa":
        for v in variants[1:]:
            overhead = 100 * (ratio(v, variants[0]) - 1)
            print(f"REPA overhead ({v.name.split(', ')[1]}): {overhead:+.1f}% of the step time")
    else:
        print(f"{variants[1].name} vs {variants[0].name}: tokens/s x{1 / ratio(variants[1], variants[0]):.3f}")
    step = statistics.median(variants[-1].times)
    print(f"{variants[-1].name}: {tokens / step:,.0f} LLM tokens/s, {args.batch / step:.2f} samples/s")
    if device.type == "cuda" and args.compare != "packing":
        seq = args.pack_length if args.compare == "paper" else args.prompt_len + 1 + gen_tokens
        mfu = llm_flops_per_token(base, seq) * tokens / step / (args.peak_tflops * 1e12)
        print(f"MFU (LLM matmuls, peak {args.peak_tflops:.0f} TFLOP/s): {100 * mfu:.1f}%")


if __name__ == "__main__":
    main()
