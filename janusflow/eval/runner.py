"""One evaluation of a model on the held-out shapes data: GenEval, FD, SigLIP score, VQA accuracy, RF validation loss.

    results = evaluate_export("runs/2to8/export", "runs/_cache/shapes-...")        # an exported model dir
    results = evaluate_model(model, codec, tokenizer, system_prompt, data_dir)     # in memory (the trainer)

Keys of the result: ``geneval/<category>`` and ``geneval/overall`` (shapes-GenEval accuracies), ``fd`` (Frechet
distance of generated vs held-out real images, in the understanding encoder's mean-pooled feature space),
``vqa_acc`` (exact match on held-out questions, greedy), ``rf_val`` and ``rf_val/t=<t>`` (L_RF at fixed t), and
with a SigLIP judge (janusflow.eval.siglip_score) ``siglip_score`` / ``siglip_cosine`` of the FD images vs their
captions. ``tasks`` limits the evaluation to the generation metrics ("gen": all but VQA) or understanding ("und").

Everything is a function of ``seed``: the GenEval prompts, the starting noise of every image and the RF noise,
so two calls on the same weights give the same numbers. FD generates one image per held-out caption and
compares it with the held-out images themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from janusflow.data.shapes import read_manifest
from janusflow.data.sources import open_source
from janusflow.data.transforms import gen_crop, gen_pixels
from janusflow.eval import metrics, shapes_geneval
from janusflow.eval.siglip_score import SigLIPJudge
from janusflow.pipeline import Pipeline, left_pad, load_pipeline
from janusflow.sampling import generate_text
from janusflow.tokenizer import Tokenizer, expand_image_tokens, image_seq_mask, sft_prompt, und_prompt

VQA_MAX_NEW_TOKENS = 16  # shapes answers are one word or digit
TASKS = ("gen", "und")


@dataclass
class EvalData:
    """Held-out data of a shapes dataset directory, read once (the trainer reuses it between evaluations)."""

    images: list[Image.Image]
    """Held-out generation images, the real side of FD and the RF validation latents."""
    captions: list[str]
    vqa: list[tuple[Image.Image, str, str]]
    """(image, question, answer): every question of the held-out conversations, asked on its own."""
    max_count: int
    """The largest object count of the world, the largest count of the GenEval counting prompts."""


def load_eval_data(data_dir: str | Path, num_images: int, num_vqa: int) -> EvalData:
    """The first ``num_images`` held-out captioned images and ``num_vqa`` questions of a shapes dataset."""
    data_dir = Path(data_dir)
    gen = open_source(data_dir / "gen_val.jsonl", "caption_jsonl")
    records = [r for r in (gen[i] for i in range(min(num_images, len(gen)))) if r is not None]
    vqa: list[tuple[Image.Image, str, str]] = []
    und = open_source(data_dir / "und_val.json", "llava_json")
    for i in range(len(und)):
        rec = und[i]
        if rec is None or rec.image is None:
            continue
        turns = rec.turns
        vqa += [(rec.image, q, a) for (ru, q), (ra, a) in zip(turns[::2], turns[1::2])
                if ru == "user" and ra == "assistant"]
        if len(vqa) >= num_vqa:
            break
    if len(records) < min(num_images, 2) or not vqa:
        raise ValueError(f"{data_dir} has too little held-out data (gen_val.jsonl, und_val.json) to evaluate on")
    manifest = read_manifest(data_dir) or {}
    max_count = max(2, manifest.get("params", {}).get("max_objects", 2))
    return EvalData([r.image for r in records], [r.caption for r in records], vqa[:num_vqa], max_count)


def gen_latents_and_prompts(images: list[Image.Image], captions: list[str], codec, tokenizer: Tokenizer,
                            image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Data latents [N, C, h, w] (centre crop, as the latent cache) and the left-padded training prefixes."""
    pixels = gen_pixels(torch.stack([gen_crop(im, image_size) for im in images]))
    device = next(codec.parameters()).device
    latents = torch.cat([codec.encode(pixels[s:s + 64].to(device)).float().cpu() for s in range(0, len(pixels), 64)])
    ids, mask = left_pad([tokenizer.encode(sft_prompt(c)) for c in captions], tokenizer.pad_id)
    return latents, ids, mask


@torch.no_grad()
def evaluate_model(model, codec, tokenizer: Tokenizer, system_prompt: str, data_dir: str | Path, *,
                   num_geneval_per_category: int = 16, num_fd_images: int = 256, num_vqa: int = 128,
                   num_rf_images: int = 64, steps: int = 30, cfg_weight: float = 2.0, seed: int = 0,
                   batch_size: int = 32, encoder: torch.nn.Module | None = None,
                   data: EvalData | None = None, siglip_judge: SigLIPJudge | None = None,
                   tasks: tuple[str, ...] = TASKS) -> dict[str, float]:
    """Evaluate a JanusFlow model in memory (e.g. the trainer's EMA model); see the module docstring.

    ``encoder`` is the FD feature extractor (default: the model's own SigLIP tower); ``data`` is the held-out
    data when already loaded (``load_eval_data``), else it is read from ``data_dir``.
    """
    if not tasks or set(tasks) - set(TASKS):
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")
    data = data or load_eval_data(data_dir, max(num_fd_images, num_rf_images), num_vqa)
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    try:
        pipe = Pipeline(model, codec, tokenizer, system_prompt)
        if "gen" in tasks:
            results.update(_gen_metrics(pipe, data, num_geneval_per_category, num_fd_images, num_rf_images, steps,
                                        cfg_weight, seed, batch_size, encoder or model.vision_und_enc_model,
                                        siglip_judge))
        if "und" in tasks:
            items = data.vqa[:num_vqa]
            predictions = answer_batch(pipe, [(im, q) for im, q, _ in items], batch_size=batch_size)
            results["vqa_acc"] = metrics.vqa_accuracy(predictions, [a for _, _, a in items])
    finally:
        model.train(was_training)
    return results


@torch.no_grad()
def answer_batch(pipe: Pipeline, questions: list[tuple[Image.Image, str]], batch_size: int = 32,
                 max_new_tokens: int = VQA_MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers to (image, question) pairs, ``batch_size`` at a time: the prompt, preprocessing and
    decoding of ``Pipeline.answer`` with left-padded batches (the same answers, ~10x faster on CPU)."""
    model, tok = pipe.model, pipe.tokenizer
    answers = []
    for s in range(0, len(questions), batch_size):
        chunk = questions[s:s + batch_size]
        seqs = [expand_image_tokens(tok.encode(und_prompt(q, pipe.system_prompt)), tok, pipe.num_und_tokens())
                for _, q in chunk]
        ids, mask = left_pad(seqs, tok.pad_id)
        ids, mask = ids.to(pipe.device), mask.to(pipe.device)
        pixels = pipe.und_encoder_inputs([im for im, _ in chunk])
        embeds = model.und_inputs_embeds(ids, pixels, image_seq_mask(ids, tok))
        out = generate_text(model, embeds, mask, eos_id=tok.eos_id, pad_id=tok.pad_id, max_new_tokens=max_new_tokens)
        answers += [tok.decode(row.tolist(), skip_special_tokens=True).strip() for row in out]
    return answers


def _gen_metrics(pipe: Pipeline, data: EvalData, num_geneval_per_category: int, num_fd_images: int,
                 num_rf_images: int, steps: int, cfg_weight: float, seed: int, batch_size: int,
                 encoder: torch.nn.Module, siglip_judge: SigLIPJudge | None) -> dict[str, float]:
    results = _geneval(pipe, data, num_geneval_per_category, steps, cfg_weight, seed, batch_size)
    n = min(num_fd_images, len(data.images))
    fake = pipe.generate(data.captions[:n], seed=seed, steps=steps, cfg_weight=cfg_weight, batch_size=batch_size)
    results["fd"] = _fd(pipe, fake, data.images[:n], encoder)
    if siglip_judge is not None:
        results.update(siglip_judge.score(fake, data.captions[:n]))
    n = min(num_rf_images, len(data.images))
    latents, ids, mask = gen_latents_and_prompts(data.images[:n], data.captions[:n], pipe.codec, pipe.tokenizer,
                                                 pipe.model.config.gen_image_size)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    results.update(metrics.rf_val_loss(pipe.model, latents, ids, mask, noise, batch_size=batch_size))
    return results


def _geneval(pipe: Pipeline, data: EvalData, n_per_category: int, steps: int, cfg_weight: float, seed: int,
             batch_size: int) -> dict[str, float]:
    specs = shapes_geneval.make_prompts(seed, n_per_category, max_count=data.max_count)
    images = pipe.generate([s.prompt for s in specs], seed=seed, steps=steps, cfg_weight=cfg_weight,
                           batch_size=batch_size)
    return {f"geneval/{k}": v for k, v in shapes_geneval.evaluate(images, specs).items()}


def _fd(pipe: Pipeline, fake: list[Image.Image], real: list[Image.Image], encoder: torch.nn.Module) -> float:
    und = pipe.model.config.und_encoder
    feats = [metrics.encoder_features(encoder, images, und)
             for images in (fake, real)]
    return metrics.frechet_distance_of(*feats)


def evaluate_export(export_dir: str | Path, data_dir: str | Path, *, num_geneval_per_category: int = 16,
                    num_fd_images: int = 256, num_vqa: int = 128, num_rf_images: int = 64, steps: int = 30,
                    cfg_weight: float = 2.0, seed: int = 0, batch_size: int = 32,
                    device: str | torch.device = "cpu", siglip_dir: str | Path | None = None,
                    tasks: tuple[str, ...] = TASKS) -> dict[str, float]:
    """Evaluate an exported model directory (``janusflow.export``; a run directory with ``export/`` works too).

    ``siglip_dir``: the prep's SigLIP folder (both towers) for the SigLIP score; without it the score is left out.
    """
    pipe = load_pipeline(export_dir, device=device, dtype=torch.float32)
    judge = SigLIPJudge.from_dir(siglip_dir).to(device) if siglip_dir is not None else None
    return evaluate_model(pipe.model, pipe.codec, pipe.tokenizer, pipe.system_prompt, data_dir,
                          num_geneval_per_category=num_geneval_per_category, num_fd_images=num_fd_images,
                          num_vqa=num_vqa, num_rf_images=num_rf_images, steps=steps, cfg_weight=cfg_weight,
                          seed=seed, batch_size=batch_size, siglip_judge=judge, tasks=tasks)
