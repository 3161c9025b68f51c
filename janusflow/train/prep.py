"""Cached preparation steps of the embedded default (run once, reused by every later run).

1. the shapes world written to disk in the real formats (janusflow.data.shapes);
2. a small AutoencoderKL trained on its images (reconstruction + a light KL), with the latent
   scaling factor set to 1 / std of the latents, as for the SD VAEs;
3. a small SigLIP pretrained on image-caption pairs with the sigmoid loss, so that its patch
   features carry meaning (REPA aligns with them; random features would make REPA meaningless);
   its text tower is kept beside it for the SigLIP image-text score of the evaluation;
4. optionally, a byte-level BPE tokenizer trained on its text (shorter sequences than raw bytes);
5. optionally, the LLM pretrained with the next-token loss on its text (captions and the text corpus), the
   stand-in for the pretrained DeepSeek-LLM that JanusFlow starts from: the prompts of stage 1 then already
   mean something to the frozen LLM;
6. the latents of every generation image, encoded once (the latent cache).

Each artefact lives in a cache folder named by a hash of everything it depends on; it is written
to a temporary name and renamed when complete, so an interrupted prep is simply redone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from janusflow.config import CodecConfig, LLMConfig, Recipe, UndEncoderConfig, to_dict
from janusflow.data.transforms import siglip_view
from janusflow.io import build_once, read_jsonl
from janusflow.models.codec import LatentCodec
from janusflow.models.llm import build_llm
from janusflow.models.siglip_text import TEXT_TOWER_FILE, ByteTextTower, save_text_tower, tokenize_captions
from janusflow.models.und_encoder import SigLIPTower
from janusflow.tokenizer import Tokenizer, check_vocab, load_tokenizer

# Part of the SigLIP artefact's cache key: bump it when the folder's contents change, so old ones are rebuilt.
# 2: the text tower and the vision config are kept too (text_tower.pt, prep.json "und_encoder").
SIGLIP_FORMAT = 2
TOKENIZER_FORMAT = 1
LLM_FORMAT = 1


def config_hash(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def shapes_key(recipe: Recipe) -> dict:
    """The shapes world's part of every prep cache key: its settings and the generator's DATASET_VERSION, so that
    a changed world rebuilds the dataset and everything trained or encoded from it, not only the images."""
    from janusflow.data.shapes import DATASET_VERSION

    return {**to_dict(recipe.data.shapes), "dataset_version": DATASET_VERSION}


def cache_root(recipe: Recipe) -> Path:
    return Path(os.environ.get("JANUSFLOW_CACHE", recipe.resolved_run_dir.parent / "_cache"))


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, mininterval=5)


def _step(loss: torch.Tensor, params: list, opt, sched, bar, losses: list[float], clip: float | None = None) -> None:
    """One optimizer step of a prep loop (optionally clipping the gradient norm), recorded and shown on its bar."""
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
    bar.update()
    bar.set_postfix(loss=f"{loss.item():.3f}")


# ----------------------------------------------------------------------------- codec


def train_codec(images: torch.Tensor, cfg: CodecConfig, steps: int, batch_size: int, seed: int = 0,
                lr: float = 2e-3) -> LatentCodec:
    """Fit an AutoencoderKL to images [N, 3, S, S] in [-1, 1]; return it with a fitted scaling factor."""
    torch.manual_seed(seed)
    codec = LatentCodec.from_config(cfg)
    vae = codec.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    bar = _progress(steps, "prep: training the codec")
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch_size,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mode() for i in range(0, min(len(images), 2048), 256)])
    return LatentCodec(vae, scaling_factor=1.0 / z.std().item())


# ----------------------------------------------------------------------------- SigLIP


def train_siglip(pixels: torch.Tensor, captions: list[str], cfg: UndEncoderConfig, steps: int, batch_size: int,
                 seed: int = 0, lr: float = 1e-3
                 ) -> tuple[SigLIPTower, tuple[ByteTextTower, float, float], list[float]]:
    """Sigmoid-loss (SigLIP) pretraining of the vision tower on (normalised pixels [N,3,S,S], captions).

    Returns the vision tower (official ``vision_tower.*`` keys), the text side (tower, logit scale, logit
    bias) and the loss curve.
    """
    torch.manual_seed(seed)
    tower = SigLIPTower(cfg)
    text = ByteTextTower(cfg.width, cfg.width)
    ids, mask = tokenize_captions(captions, text.max_len)
    logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
    logit_bias = nn.Parameter(torch.tensor(-10.0))
    params = [*tower.parameters(), *text.parameters(), logit_scale, logit_bias]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    losses = []
    bar = _progress(steps, "prep: pretraining SigLIP")
    for _ in range(steps):
        idx = torch.randint(len(pixels), (batch_size,), generator=g)
        img = F.normalize(tower.pooled(pixels[idx]), dim=-1)
        txt = F.normalize(text(ids[idx], mask[idx]), dim=-1)
        logits = img @ txt.T * logit_scale.exp() + logit_bias
        # Pairs with the same caption are positives too (the shapes world repeats captions).
        same = torch.tensor([[captions[a] == captions[b] for b in idx.tolist()] for a in idx.tolist()])
        labels = same.float() * 2 - 1
        loss = -F.logsigmoid(labels * logits).sum() / batch_size
        _step(loss, params, opt, sched, bar, losses)
    bar.close()
    return tower.eval(), (text.eval(), logit_scale.item(), logit_bias.item()), losses


def save_siglip(path: Path, tower: SigLIPTower, text_side: tuple[ByteTextTower, float, float],
                und: UndEncoderConfig, losses: list[float]) -> None:
    """The prep's SigLIP folder: siglip.pt (vision tower, official keys), text_tower.pt and prep.json (the vision
    config and the loss), everything janusflow.eval.siglip_score.SigLIPJudge.from_dir reads."""
    torch.save(tower.state_dict(), path / "siglip.pt")
    save_text_tower(path / TEXT_TOWER_FILE, *text_side)
    (path / "prep.json").write_text(json.dumps({"first_loss": losses[0], "last_loss": losses[-1],
                                                "und_encoder": to_dict(und)}))


# ----------------------------------------------------------------------------- LLM


def train_llm(texts: list[list[int]], cfg: LLMConfig, pad_id: int, steps: int, batch_size: int, seed: int = 0,
              lr: float = 2e-3):
    """Next-token pretraining of a fresh LLM on token sequences; returns it (a LlamaForCausalLM) and the losses."""
    torch.manual_seed(seed)
    llm = build_llm(cfg).train()
    params = list(llm.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    losses = []
    bar = _progress(steps, "prep: pretraining the LLM")
    for _ in range(steps):
        rows = [texts[i] for i in torch.randint(len(texts), (batch_size,), generator=g).tolist()]
        ids = torch.full((batch_size, max(map(len, rows))), pad_id)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        mask = torch.arange(ids.shape[1])[None] < torch.tensor([len(r) for r in rows])[:, None]
        loss = llm(input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100)).loss
        _step(loss, params, opt, sched, bar, losses, clip=1.0)
    bar.close()
    return llm.eval(), losses


def lm_corpus(data_dir: Path) -> list[str]:
    """The shapes world's plain text: every training caption and the text corpus."""
    return ([r["caption"] for r in read_jsonl(data_dir / "gen_train.jsonl")]
            + [r["text"] for r in read_jsonl(data_dir / "text_train.jsonl")])


# ----------------------------------------------------------------------------- orchestration


def prepare(recipe: Recipe, log: Callable[[str], None] = print) -> dict:
    """Run the recipe's prep steps (each cached); return paths for the trainer.

    Returns a dict with ``data_dir`` (shapes world or None), ``codec_path`` (a trained codec dir
    or None), ``und_encoder_path`` (SigLIP weights or None), ``siglip_dir`` (the pretrained SigLIP's
    folder, both towers, for janusflow.eval.siglip_score; None unless the prep trained it),
    ``tokenizer_path`` (the trained BPE or None) and ``llm_path`` (an HF LLM directory or None).
    """
    from janusflow.data.shapes import write_shapes_dataset

    root = cache_root(recipe)
    out: dict = {"data_dir": None, "codec_path": recipe.codec.path, "und_encoder_path": recipe.und_encoder_path,
                 "siglip_dir": None, "tokenizer_path": None, "llm_path": recipe.llm_path}
    shapes = recipe.data.shapes
    if shapes.enabled:
        key = config_hash(shapes_key(recipe))
        out["data_dir"] = write_shapes_dataset(root / f"shapes-{key}", num_train=shapes.num_train,
                                               num_val=shapes.num_val, image_size=shapes.image_size,
                                               max_objects=shapes.max_objects, seed=shapes.seed)
        log(f"prep: shapes world in {out['data_dir']}")
    if recipe.prep.tokenizer_vocab_size:
        out["tokenizer_path"] = str(prepare_tokenizer(Path(out["data_dir"]), recipe, root, log))
    if recipe.prep.llm_steps > 0:
        out["llm_path"] = str(prepare_llm(Path(out["data_dir"]), recipe, out["tokenizer_path"], root, log))
    needs_images = recipe.prep.codec_steps > 0 or recipe.prep.siglip_steps > 0
    if not needs_images:
        return out
    if out["data_dir"] is None:
        raise ValueError("prep.codec_steps / prep.siglip_steps need data.shapes.enabled (the prep trains on it)")
    images, captions = _load_train_images(Path(out["data_dir"]), recipe.data.shapes.image_size)
    if recipe.prep.codec_steps > 0:
        key = config_hash(shapes_key(recipe), to_dict(recipe.codec), recipe.prep.codec_steps,
                          recipe.prep.codec_batch_size)

        def build_codec(tmp: Path) -> None:
            codec = train_codec(images, recipe.codec, recipe.prep.codec_steps, recipe.prep.codec_batch_size)
            with torch.no_grad():
                x = images[:256]
                err = F.l1_loss(codec.vae.decode(codec.vae.encode(x).latent_dist.mode()).sample, x).item()
            codec.save_pretrained(tmp)
            (tmp / "prep.json").write_text(json.dumps({"l1_reconstruction": err,
                                                       "scaling_factor": codec.scaling_factor}))
            log(f"prep: codec trained, L1 reconstruction error {err:.4f}, scaling factor {codec.scaling_factor:.4f}")

        out["codec_path"] = str(build_once(root / f"codec-{key}", build_codec))
    if recipe.prep.siglip_steps > 0:
        und = recipe.model.und_encoder
        key = config_hash(shapes_key(recipe), to_dict(und), recipe.prep.siglip_steps, recipe.prep.siglip_batch_size,
                          SIGLIP_FORMAT)

        def build_siglip(tmp: Path) -> None:
            pixels = siglip_view((images + 1) / 2, und)
            tower, text_side, losses = train_siglip(pixels, captions, und, recipe.prep.siglip_steps,
                                                    recipe.prep.siglip_batch_size)
            save_siglip(tmp, tower, text_side, und, losses)
            log(f"prep: SigLIP pretrained, sigmoid loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f}")

        siglip_dir = build_once(root / f"siglip-{key}", build_siglip)
        out["und_encoder_path"], out["siglip_dir"] = str(siglip_dir / "siglip.pt"), str(siglip_dir)
    return out


def prepare_tokenizer(data_dir: Path, recipe: Recipe, root: Path, log: Callable[[str], None]) -> Path:
    """A byte-level BPE trained on the shapes world's training text, in the templates the model sees."""
    from janusflow.tokenizer import OFFICIAL_SYSTEM_PROMPT, gen_prompt, sft_prompt, train_bpe_tokenizer

    size = recipe.prep.tokenizer_vocab_size
    key = config_hash(shapes_key(recipe), size, TOKENIZER_FORMAT)

    def corpus() -> list[str]:
        texts = [gen_prompt(r["caption"]) for r in read_jsonl(data_dir / "gen_train.jsonl")]
        for record in json.loads((data_dir / "und_train.json").read_text()):
            turns = [t["value"].replace("<image>", "").strip() for t in record["conversations"]]
            texts += [sft_prompt(q, recipe.data.und_system_prompt) + f" {a}" for q, a in zip(turns[::2], turns[1::2])]
        texts += [r["text"] for r in read_jsonl(data_dir / "text_train.jsonl")]
        return texts + [OFFICIAL_SYSTEM_PROMPT]

    def build(tmp: Path) -> None:
        tok = train_bpe_tokenizer(corpus(), size, tmp)
        log(f"prep: BPE tokenizer trained, {tok.vocab_size} tokens")

    return build_once(root / f"tokenizer-{key}", build)


def run_tokenizer(recipe: Recipe, prep_tokenizer_path: str | None) -> Tokenizer:
    """The tokenizer a run uses: the prep's BPE when it trained one, else the recipe's ``tokenizer``."""
    path, kind = (prep_tokenizer_path, "hf") if prep_tokenizer_path else (recipe.tokenizer.path, recipe.tokenizer.kind)
    tok = load_tokenizer(path, kind, recipe.model.llm.vocab_size)
    check_vocab(tok, recipe.model.llm.vocab_size, f"({kind}, {path or 'built in'})")
    return tok


def prepare_llm(data_dir: Path, recipe: Recipe, tokenizer_path: str | None, root: Path,
                log: Callable[[str], None]) -> Path:
    """The LLM pretrained on the shapes world's text, saved as an HF LlamaForCausalLM directory."""
    steps, batch_size = recipe.prep.llm_steps, recipe.prep.llm_batch_size
    tok_id = Path(tokenizer_path).name if tokenizer_path else to_dict(recipe.tokenizer)
    key = config_hash(shapes_key(recipe), to_dict(recipe.model.llm), tok_id, steps, batch_size, LLM_FORMAT)

    def build(tmp: Path) -> None:
        tok = run_tokenizer(recipe, tokenizer_path)
        texts = [tok.encode(t) + [tok.eos_id] for t in lm_corpus(data_dir)]
        llm, losses = train_llm(texts, recipe.model.llm, tok.pad_id, steps, batch_size)
        llm.save_pretrained(tmp)
        first, last = losses[0], sum(losses[-20:]) / len(losses[-20:])
        (tmp / "prep.json").write_text(json.dumps({"first_loss": first, "last_loss": last}))
        log(f"prep: LLM pretrained on {len(texts)} texts, next-token loss {first:.3f} -> {last:.3f}")

    return build_once(root / f"llm-{key}", build)


def _load_train_images(data_dir: Path, size: int) -> tuple[torch.Tensor, list[str]]:
    """All training images of the shapes world as [N, 3, S, S] in [-1, 1], with their captions."""
    import numpy as np
    from PIL import Image

    rows = read_jsonl(data_dir / "gen_train.jsonl")
    arr = np.stack([np.asarray(Image.open(data_dir / r["image"]).convert("RGB").resize((size, size)))
                    for r in rows])
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [r["caption"] for r in rows]
