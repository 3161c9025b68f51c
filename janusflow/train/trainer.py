"""The training loop: stages of a recipe on a DeepSpeed engine (ZeRO 0-3, CPU or GPU).

Per stage: build the model (fresh, from the previous stage, or from a model directory), apply
the stage's freeze policy, wrap it with the REPA projector in ``TrainModule``, and run
``deepspeed.initialize`` with a torch AdamW, warm-up + constant LR, gradient clipping and
accumulation. Each optimizer step consumes one deterministic global batch (janusflow.data.mixture),
updates the EMA, logs, and now and then writes a sample grid and an atomic checkpoint.

Losses of a micro-batch of n samples (n_und + n_text + n_gen = n):
    loss = (n_und * CE_und + n_text * CE_text + n_gen * (L_RF + lambda * L_REPA)) / n
so the mixture ratio is also the weighting of the objectives.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from janusflow.config import Recipe, StageConfig, to_dict
from janusflow.data.mixture import Batch, MixtureSchedule, MixtureStream, SampleBuilder
from janusflow.export import export_model
from janusflow.flow import interpolate, rf_loss
from janusflow.imaging import save_grid
from janusflow.models.codec import LatentCodec
from janusflow.models.janusflow import JanusFlow
from janusflow.models.repa import build_projector, match_grid, repa_loss
from janusflow.models.und_inputs import num_und_tokens, und_encoder_inputs, uses_vae
from janusflow.tokenizer import gen_prompt
from janusflow.train.checkpoint import (
    CheckpointManager,
    check_disk_space,
    rng_state,
    set_rng_state,
    write_dir_atomic,
)
from janusflow.train.logging import RunLogger, print0
from janusflow.train.stages import apply_freeze_policy


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients it cannot recover from."""


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed as asked (e.g. it was written by another number of ranks)."""


class TrainModule(nn.Module):
    """JanusFlow plus the training-only REPA projector; ``forward(batch)`` returns the losses."""

    def __init__(self, model: JanusFlow, repa_weight: float, repa_layer: int, repa_hidden: int,
                 repa_cached: bool = False):
        """``repa_cached``: the batches carry REPA's targets (``repa_feats``) instead of pixels for SigLIP."""
        super().__init__()
        self.model = model
        self.repa_weight, self.repa_layer, self.repa_cached = repa_weight, repa_layer, repa_cached
        self.projector = None
        if repa_weight > 0:
            cfg = model.config
            if not 1 <= repa_layer <= cfg.llm.num_hidden_layers:
                raise ValueError(f"train.repa.layer={repa_layer} is outside the LLM's 1..{cfg.llm.num_hidden_layers}")
            self.projector = build_projector(cfg.llm.hidden_size, repa_hidden, cfg.und_encoder.width)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Always runs the same sequence of modules, whatever tasks the micro-batch holds: absent
        parts run on a one-row placeholder whose loss is multiplied by zero. ZeRO-2 reduces gradients
        in the order they become ready, which must therefore be the same on every rank."""
        losses: dict[str, torch.Tensor] = {}
        ar = batch.ar if batch.ar is not None else self._placeholder_ar()
        gen = batch.gen if batch.gen is not None else self._placeholder_gen()
        total = self._ar_losses(ar, batch.size, losses, real=batch.ar is not None)
        total = total + self._gen_losses(gen, batch.size, losses, real=batch.gen is not None)
        losses["loss"] = total
        return losses

    def _ref(self) -> torch.Tensor:
        return self.model.vision_gen_dec_aligner.weight

    def _placeholder_pixels(self) -> torch.Tensor:
        size = self.model.config.und_encoder.image_size
        return self._ref().new_zeros(1, 3, size, size)

    def _placeholder_und_input(self) -> torch.Tensor:
        if not uses_vae(self.model.config):
            return self._placeholder_pixels()
        cfg = self.model.config.gen_encoder
        return self._ref().new_zeros(1, cfg.latent_channels, 2 * cfg.stride, 2 * cfg.stride)

    def _placeholder_ar(self) -> dict:
        ids = torch.zeros(1, 1, dtype=torch.long, device=self._ref().device)
        return {"input_ids": ids, "labels": ids - 100, "attention_mask": torch.ones_like(ids), "sample_index": ids,
                "pixel_values": None, "image_seq_mask": torch.zeros_like(ids, dtype=torch.bool),
                "is_und": torch.zeros(1, dtype=torch.bool, device=ids.device)}

    def _placeholder_gen(self) -> dict:
        cfg = self.model.config.gen_encoder
        ref = self._ref()
        side = 2 * cfg.stride
        latents = ref.new_zeros(1, cfg.latent_channels, side, side)
        ids = torch.zeros(1, 1, dtype=torch.long, device=ref.device)
        return {"latents": latents, "noise": latents, "t": ref.new_zeros(1), "prefix_ids": ids,
                "prefix_mask": torch.ones_like(ids), **self._placeholder_repa_target()}

    def _placeholder_repa_target(self) -> dict:
        """Like the real rows': cached features, or pixels for a live SigLIP pass (ZeRO-3 gathers its weights
        collectively, so every rank must call it alike)."""
        if not self.repa_cached:
            return {"repa_pixels": self._placeholder_pixels()}
        tower = self.model.vision_und_enc_model
        return {"repa_feats": self._ref().new_zeros(1, tower.num_patches, self.model.config.und_encoder.width)}

    def _ar_losses(self, ar: dict, n: int, losses: dict, real: bool) -> torch.Tensor:
        m = self.model
        has_images = ar["pixel_values"] is not None
        images = m.encode_und_images(ar["pixel_values"] if has_images else self._placeholder_und_input())
        embeds = m.embed_tokens(ar["input_ids"])
        if has_images:
            embeds = m.place_und_images(embeds, images.to(embeds.dtype), ar["image_seq_mask"])
        # Packed rows (data.packing) carry position_ids and no 2D mask: transformers masks per sample.
        logits = m.language_model(inputs_embeds=embeds, attention_mask=ar["attention_mask"],
                                  position_ids=ar.get("position_ids"), use_cache=False).logits
        placeholder = 0.0 * images.sum() if not has_images else 0.0
        if not real:
            return placeholder + 0.0 * logits.sum()
        labels = ar["labels"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        per_sample = per_sample_mean(ce, labels != -100, ar["sample_index"][:, 1:], ar["is_und"].shape[0])
        total = per_sample.new_zeros(()) + placeholder
        for task, rows in (("und", ar["is_und"]), ("text", ~ar["is_und"])):
            if rows.any():
                loss = per_sample[rows].mean()
                losses[f"loss_{task}"] = loss.detach()
                total = total + rows.sum() / n * loss
        return total

    def _gen_losses(self, gen: dict, n: int, losses: dict, real: bool) -> torch.Tensor:
        z_t, target = interpolate(gen["latents"], gen["noise"], gen["t"])
        prefix = self.model.embed_tokens(gen["prefix_ids"])
        layer = self.repa_layer if self.projector is not None else None
        v, hidden = self.model.forward_gen(prefix, gen["prefix_mask"], z_t, gen["t"], hidden_layer=layer)
        loss = rf_loss(v, target)
        if real:
            losses["loss_rf"] = loss.detach()
        if self.projector is not None:
            feats = gen.get("repa_feats")  # cached by the data stream while SigLIP is frozen
            if feats is None:
                with torch.no_grad():
                    feats = self.model.vision_und_enc_model(gen["repa_pixels"])
            side = int(round(hidden.shape[1] ** 0.5))
            align = repa_loss(self.projector(hidden), match_grid(feats, (side, side)))
            if real:
                losses["loss_repa"] = align.detach()
            loss = loss + self.repa_weight * align
        return gen["latents"].shape[0] / n * loss if real else 0.0 * loss


def per_sample_mean(values: torch.Tensor, valid: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of ``values`` [R, L] over the ``valid`` positions of each sample (``index`` [R, L]: its number) -> [n]."""
    sums = values.new_zeros(n).index_add(0, index[valid], values[valid])
    counts = values.new_zeros(n).index_add(0, index[valid], valid[valid].to(values.dtype))
    return sums / counts.clamp(min=1)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients to a total norm of at most ``max_norm`` (0: leave them); return the norm before."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def lr_factor(stage: StageConfig, step: int) -> float:
    """The LR multiplier for optimizer step ``step`` (0-based): linear warm-up, constant, then linear decay
    over the last ``decay_steps`` steps, reaching 1 / decay_steps on the final step."""
    warmup = min(1.0, (step + 1) / max(stage.warmup_steps, 1))
    if stage.decay_steps == 0:
        return warmup
    return min(warmup, (stage.max_steps - step) / stage.decay_steps)


def apply_speed_options(model: JanusFlow, activation_checkpointing: bool, compile: bool) -> None:
    """Training-only switches that leave the maths unchanged (in place; the state-dict keys stay the same).

    activation_checkpointing: the LLM's decoder layers (transformers) and SigLIP's blocks (timm) keep only
    their inputs and recompute the rest in the backward pass, non-reentrant, so frozen inputs and the REPA
    hidden state of any layer still get their gradients. compile: torch.compile the generation encoder and
    decoder, one static graph per input shape (the number of gen rows in a micro-batch varies, so up to
    micro_batch_size + 1 graphs; beyond torch's recompile limit, 8, a new shape runs eagerly). Static because
    inductor's CPU backend fails on dynamic spatial sizes (torch 2.14), which the one-row placeholder brings.
    """
    if activation_checkpointing:
        model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.vision_und_enc_model.vision_tower.set_grad_checkpointing(True)
    if compile:
        model.vision_gen_enc_model.compile(dynamic=False)
        model.vision_gen_dec_model.compile(dynamic=False)


class EMA:
    """Exponential moving average of the model weights (fp32). Every rank keeps one (under ZeRO-3
    the parameter gather is collective); rank 0 saves it."""

    def __init__(self, model: JanusFlow, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: JanusFlow, names: list[str]) -> None:
        params = dict(model.named_parameters())
        own = dict(self.model.named_parameters())
        gathered = [params[n] for n in names]
        with _gathered(gathered):
            targets = [own[n] for n in names]
            sources = [p.detach().to(t.device, torch.float32) for p, t in zip(gathered, targets)]
            torch._foreach_lerp_(targets, sources, 1.0 - self.decay)  # one call instead of one per tensor


def _gathered(params):
    """ZeRO-3 partitions parameters; gather them for reading (a no-op context otherwise)."""
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    import contextlib

    return contextlib.nullcontext()


def _load_part(module: nn.Module, state: dict, source: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # torch's message lists the missing, unexpected and mis-shaped keys
        raise ValueError(f"{source} does not fit the recipe's model: {e}") from None


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A complete CPU state dict, also under ZeRO-3 (collective: call on every rank)."""
    with _gathered(list(model.parameters())):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- distributed


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed, also for a plain single `python` process."""
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the module; the name itself resolves to the torch package)
    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        # DeepSpeed's shared-memory allreduce is JIT-compiled (~2 min on 2 cores) for little gain here;
        # gloo does the collectives instead.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu") if on_cpu else torch.device(get_accelerator().device_name(local))
    if not on_cpu:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class StageResult:
    name: str
    dir: Path
    steps: int
    last_metrics: dict


class Trainer:
    def __init__(self, recipe: Recipe, resume: str = "auto", group: str | None = None, run_name: str | None = None,
                 stop_after_steps: int | None = None):
        self.recipe = recipe
        self.resume = resume
        self.steps_left = stop_after_steps  # optimizer steps this invocation may run (time-limited jobs)
        self.run_dir = recipe.resolved_run_dir
        self.rank, self.world, self.device = init_distributed()
        self.dtype = self._dtype()
        self.group, self.run_name = group, run_name or recipe.name
        self.skipped_steps = 0

    def _dtype(self) -> torch.dtype:
        want = self.recipe.train.dtype
        if want == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return getattr(torch, want)

    # -------------------------------------------------------------- set-up

    def setup(self) -> None:
        from janusflow.data.latent_cache import build_latent_cache
        from janusflow.train.prep import cache_root, config_hash, prepare, run_tokenizer

        r = self.recipe
        self._check_paths()
        self._check_run_dir()
        if self.rank == 0:
            self.prep = prepare(r, print0)
        _barrier()
        if self.rank != 0:
            self.prep = prepare(r, lambda *_: None)  # every artefact exists now: just reads the paths
        self.tokenizer = run_tokenizer(r, self.prep["tokenizer_path"])
        codec_cfg = dataclasses.replace(r.codec, path=self.prep["codec_path"])
        torch.manual_seed(r.train.seed)  # an untrained codec (tests) must be the same on every rank
        self.codec = LatentCodec.from_config(codec_cfg).to(self.device)
        self.source_cfgs = source_cfgs = self._source_cfgs()
        self.sources = self._open_sources(source_cfgs)
        self.latent_cache = None
        if r.data.cache_latents and self.sources.get("gen"):
            key = config_hash(str(self.prep["codec_path"]), to_dict(r.codec), r.model.gen_image_size)
            paths = [cache_root(r) / f"latents-{key}-{config_hash(s.path)}.pt" for s in source_cfgs["gen"]]
            if self.rank == 0:
                build_latent_cache(self.sources["gen"], self.codec, r.model.gen_image_size, paths)
            _barrier()
            self.latent_cache = build_latent_cache(self.sources["gen"], self.codec, r.model.gen_image_size, paths)
        self.logger = RunLogger(self.run_dir, r.logging, to_dict(r), enabled=self.rank == 0,
                                run_name=self.run_name, group=self.group)
        if self.rank == 0:
            (self.run_dir / "recipe.json").write_text(json.dumps(to_dict(r), indent=2))

    def _check_run_dir(self) -> None:
        stages_dir = self.run_dir / "stages"
        if self.resume == "none" and stages_dir.exists() and any(stages_dir.iterdir()):
            raise FileExistsError(f"{self.run_dir} already holds a run; use --resume auto to continue it, or "
                                  f"another run_dir")
        if self.rank == 0:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                probe = self.run_dir / ".write-test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise OSError(f"the run directory {self.run_dir} is not writable: {e}") from None
            with torch.device("meta"):  # the parameter count without allocating the model
                num_params = sum(p.numel() for p in JanusFlow(self.recipe.model).parameters())
            check_disk_space(self.run_dir, num_params)

    def _check_paths(self) -> None:
        """Files and folders the recipe names, checked before any work (prep alone can take minutes)."""
        r = self.recipe
        paths = {"llm_path": r.llm_path, "und_encoder_path": r.und_encoder_path, "codec.path": r.codec.path,
                 "tokenizer.path": r.tokenizer.path, "train.deepspeed_config": r.train.deepspeed_config}
        paths |= {f"stages.{i}.init_from": s.init_from for i, s in enumerate(r.stages) if s.init_from != "previous"}
        for key, path in paths.items():
            if path and not Path(path).exists():
                raise FileNotFoundError(f"{key}: {path} does not exist")

    def _source_cfgs(self) -> dict:
        """The recipe's sources per task, with ``{shapes}`` replaced by the prepared dataset folder."""
        data = self.recipe.data
        shapes = self.prep.get("data_dir")

        def resolve(s):
            if shapes is None or "{shapes}" not in s.path:
                return s
            return dataclasses.replace(s, path=s.path.replace("{shapes}", str(shapes)))

        return {task: [resolve(s) for s in getattr(data, task)] for task in ("und", "gen", "text")}

    def _open_sources(self, source_cfgs: dict) -> dict:
        from janusflow.data.sources import open_source

        out = {}
        for task, cfgs in source_cfgs.items():
            out[task] = []
            for s in cfgs:
                src = open_source(s.path, s.format, s.image_root)
                src.weight = s.weight
                out[task].append(src)
        return out

    # -------------------------------------------------------------- model

    def build_model(self, index: int, stage: StageConfig) -> tuple[JanusFlow, JanusFlow | None]:
        """The stage's starting weights, and the EMA weights to continue from (or None)."""
        r = self.recipe
        init = stage.init_from
        if index > 0 and init == "previous":
            prev = self.stage_dir(index - 1)
            model = self._check_start(JanusFlow.from_pretrained(prev / "final"), prev / "final")
            ema = JanusFlow.from_pretrained(prev / "final_ema") if (prev / "final_ema").exists() else None
            return model, ema
        if init not in (None, "previous"):
            return self._check_start(JanusFlow.from_pretrained(init), init), None
        torch.manual_seed(r.train.seed)
        model = JanusFlow(r.model)
        llm_path = self.prep.get("llm_path")  # the recipe's llm_path, or the prep's pretrained LLM
        if llm_path:
            from transformers import LlamaForCausalLM

            llm = LlamaForCausalLM.from_pretrained(llm_path)
            _load_part(model.language_model, llm.state_dict(), f"llm_path {llm_path}")
        if self.prep.get("und_encoder_path"):
            state = torch.load(self.prep["und_encoder_path"], map_location="cpu", weights_only=True)
            _load_part(model.vision_und_enc_model, state, f"und_encoder_path {self.prep['und_encoder_path']}")
        return model, None

    def _check_start(self, model: JanusFlow, source: str | Path) -> JanusFlow:
        """A start model must fit the data pipeline, which follows the recipe's model config."""
        want, got = to_dict(self.recipe.model), to_dict(model.config)
        for key in ("gen_image_size", "und_encoder_kind", "llm.vocab_size", "und_encoder.image_size",
                    "und_encoder.patch_size", "gen_encoder.latent_channels"):
            a, b = want, got
            for part in key.split("."):
                a, b = a.get(part), b.get(part)
            if a != b:
                raise ValueError(f"{source} has model.{key}={b} but the recipe has model.{key}={a}: start from a "
                                 f"model made with this configuration, or change the recipe to match")
        return model

    def stage_dir(self, index: int) -> Path:
        return self.run_dir / "stages" / f"{index + 1}-{self.recipe.stages[index].name}"

    def _ds_config(self, stage: StageConfig) -> dict:
        r = self.recipe
        per_step = stage.micro_batch_size * self.world
        if stage.batch_size % per_step:
            raise ValueError(f"stage {stage.name}: batch_size {stage.batch_size} is not divisible by "
                             f"micro_batch_size {stage.micro_batch_size} x {self.world} ranks")
        cfg = copy.deepcopy(self.user_ds_config)
        cfg.update({
            "train_batch_size": stage.batch_size,
            "train_micro_batch_size_per_gpu": stage.micro_batch_size,
            "gradient_accumulation_steps": stage.batch_size // per_step,
            "gradient_clipping": 0.0 if self.clips_itself else r.train.grad_clip,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
        })
        cfg.setdefault("zero_optimization", {})["stage"] = self.zero_stage
        return cfg

    @functools.cached_property
    def user_ds_config(self) -> dict:
        """The recipe's DeepSpeed JSON (``train.deepspeed_config``), read once, after setup has checked the path."""
        path = self.recipe.train.deepspeed_config
        return json.loads(Path(path).read_text()) if path else {}

    @functools.cached_property
    def zero_stage(self) -> int:
        """The ZeRO stage the engine runs: the recipe's, except for one fp32 rank without offloading, where
        ZeRO has nothing to partition and its gradient buckets and flat copies only cost time (engine step
        25 -> 14 ms of a ~0.36 s CPU step, with the fused AdamW); DeepSpeed's plain engine (stage 0) does the
        same maths there. (bf16 keeps the recipe's stage: DeepSpeed's bf16 stage-0 optimizer is another code
        path, untested here.)"""
        zero = self.user_ds_config.get("zero_optimization", {})
        offload = any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
        return self.recipe.train.zero_stage if self.world > 1 or offload or self.dtype != torch.float32 else 0

    @property
    def clips_itself(self) -> bool:
        """Whether the trainer clips the gradients instead of DeepSpeed: on the plain fp32 engine, which would
        compute the norm a second time to clip (bf16 stage 0 clips its own fp32 copies, so it keeps DeepSpeed's)."""
        return self.zero_stage == 0 and self.dtype == torch.float32

    # -------------------------------------------------------------- the loop

    def run(self) -> list[StageResult]:
        self.setup()
        results = []
        for i, stage in enumerate(self.recipe.stages):
            results.append(self.run_stage(i, stage))
            if self.steps_left == 0:
                print0(f"stopped after the requested number of steps; resume with --resume auto ({self.run_dir})")
                self.logger.finish()
                return results
        if self.rank == 0:
            last = self.stage_dir(len(self.recipe.stages) - 1)
            model = JanusFlow.from_pretrained(last / "final_ema")
            out = write_dir_atomic(self.run_dir / "export", lambda d: export_model(
                d, model, self.codec.cpu(), self.tokenizer, self.recipe.data.und_system_prompt))
            self.codec.to(self.device)
            print0(f"exported the EMA model to {out}")
        _barrier()
        self.logger.finish()
        return results

    def global_step_offset(self, index: int) -> int:
        return sum(s.max_steps for s in self.recipe.stages[:index])

    def run_stage(self, index: int, stage: StageConfig) -> StageResult:
        import deepspeed

        r = self.recipe
        sdir = self.stage_dir(index)
        if (sdir / "final_ema" / "model.safetensors").exists():
            print0(f"stage {stage.name}: already complete ({sdir}), skipping")
            return StageResult(stage.name, sdir, stage.max_steps, {})
        model, ema_init = self.build_model(index, stage)
        trainable = apply_freeze_policy(model, stage.policy)
        repa_weight = r.train.repa.weight if stage.repa_weight is None else stage.repa_weight
        repa_targets = self.repa_cache(model) if repa_weight > 0 else None
        module = TrainModule(model, repa_weight, r.train.repa.layer, r.train.repa.hidden_dim,
                             repa_cached=repa_targets is not None)
        ema = EMA(ema_init if ema_init is not None else model, r.train.ema_decay)
        ema.model.to(self.device)
        apply_speed_options(model, r.train.activation_checkpointing, r.train.compile)
        params = [p for p in module.parameters() if p.requires_grad]
        # The fused kernel: one pass over each tensor instead of a dozen elementwise ops (~10 ms of a CPU step).
        optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=tuple(r.train.betas),
                                      weight_decay=r.train.weight_decay, fused=self.device.type in ("cpu", "cuda"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, stage))
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=self._ds_config(stage))
        if self.zero_stage == 3:
            # A parameter of JanusFlow itself (whose forward is never called): gather it for ours.
            deepspeed.zero.register_external_parameter(engine.module, model.beg_of_und_embed)
        ckpt = CheckpointManager(sdir / "checkpoints", keep=r.train.keep_checkpoints)
        ckpt.clean_incomplete()
        stream = self._stream(stage, index, repa_targets, repa=repa_weight > 0)
        start = 0
        tag = ckpt.latest() if self.resume != "none" else None
        if tag is not None:
            module_only = self._check_resumable(ckpt, tag, ema)
            state = ckpt.load(engine, tag, module_only=module_only)
            start = state["step"]
            set_rng_state(state["rng"])
            stream.stats.update(state.get("data_stats", {}))
            ema.model.load_state_dict(state["ema"])
            print0(f"stage {stage.name}: resumed from {sdir / 'checkpoints' / tag} at step {start}")
        self.logger.truncate_after(stage.name, start)  # rows a killed run logged past its last checkpoint
        print0(f"stage {stage.name}: {len(trainable)} trainable tensors "
               f"({sum(p.numel() for p in params) / 1e6:.2f}M parameters), {stage.max_steps} steps, "
               f"batch {stage.batch_size}, REPA weight {repa_weight}, world {self.world}, ZeRO stage "
               f"{self.zero_stage}, {self.dtype}")
        self.logger.start_bar(stage.name, start, stage.max_steps)
        metrics: dict = {}
        bad_streak = 0
        stop = stage.max_steps if self.steps_left is None else min(stage.max_steps, start + self.steps_left)
        batches = stream.batches(start, stop, stage.batch_size, stage.micro_batch_size, self.rank, self.world,
                                 num_workers=r.data.num_workers, pin_memory=self.device.type == "cuda")
        for step in range(start, stage.max_steps):
            t0 = time.time()
            lr = scheduler.get_last_lr()[0]  # this step's (the scheduler steps inside the engine's step)
            sums, skipped, grad_norm = self._optimizer_step(engine, next(batches), step)
            done = step + 1
            if skipped:
                self.skipped_steps += 1
                bad_streak += 1
                if bad_streak >= r.train.max_bad_steps:
                    self.save(ckpt, engine, done, ema, stream)
                    raise NonFiniteError(
                        f"stage {stage.name}: {bad_streak} consecutive steps had a non-finite loss (last: step "
                        f"{done}); the weights were not updated by them and a checkpoint was written to "
                        f"{ckpt.root}. Lower the learning rate or check the data, then resume.")
            else:
                bad_streak = 0
                ema.update(engine.module.model, trainable)
            metrics = self._reduce_metrics(sums)
            metrics.update(step_time=time.time() - t0, lr=lr, skipped_steps=self.skipped_steps)
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            if done % r.logging.log_every == 0 or done == stage.max_steps:
                metrics.update({f"data/{k}": v for k, v in (stream.stats | stream.builder.stats).items()})
                self.logger.log(stage.name, done, self.global_step_offset(index) + done, metrics)
            self.logger.update_bar(done, metrics)
            if r.logging.sample_every and done % r.logging.sample_every == 0 and done != stage.max_steps:
                self.sample_grid(ema, stage.name, done, index)
            if self.steps_left is not None:
                self.steps_left -= 1
            if done % r.train.save_every == 0 or done == stage.max_steps or self.steps_left == 0:
                self.save(ckpt, engine, done, ema, stream)
            if self.steps_left == 0:
                self.logger.close_bar()
                return StageResult(stage.name, sdir, done, metrics)
        self.logger.close_bar()
        self.sample_grid(ema, stage.name, stage.max_steps, index)
        final_model = engine.module.model
        raw = full_state_dict(final_model)
        if self.rank == 0:
            write_dir_atomic(sdir / "final", lambda d: final_model.save_pretrained(d, state_dict=raw))

            def write_ema(d: Path) -> None:  # final_ema marks the stage complete, so it is written last
                ema.model.save_pretrained(d)
                (d / "stage.json").write_text(json.dumps({"steps": stage.max_steps, **metrics}))

            write_dir_atomic(sdir / "final_ema", write_ema)
        _barrier()
        del engine
        return StageResult(stage.name, sdir, stage.max_steps, metrics)

    def _check_resumable(self, ckpt: CheckpointManager, tag: str, ema: EMA) -> bool:
        """True when only the weights can be resumed (another number of ranks and --resume weights).
        A checkpoint of another model configuration fails here, naming the keys, before DeepSpeed loads it."""
        saved = torch.load(ckpt.root / tag / "state.pt", map_location="cpu", weights_only=False)
        ema.model.load_checked_state_dict(saved["ema"], source=f"checkpoint {ckpt.root / tag}")
        world, zero = saved.get("world_size", self.world), saved.get("zero_stage", self.recipe.train.zero_stage)
        if (world == self.world and zero == self.zero_stage) or zero == self.zero_stage == 0:
            return False
        if self.resume == "weights":
            print0(f"resuming {ckpt.root / tag} (written by {world} ranks, ZeRO stage {zero}) on {self.world} "
                   f"(stage {self.zero_stage}): weights, EMA and data position continue, the optimizer state "
                   f"starts afresh")
            return True
        raise ResumeError(
            f"{ckpt.root / tag} was written by {world} ranks (ZeRO stage {zero}) and this run has {self.world} "
            f"(stage {self.zero_stage}): DeepSpeed's optimizer state only reloads on the same number of ranks "
            f"and ZeRO stage. Resume with {world} ranks, or pass --resume weights to continue from its weights, "
            f"EMA and data position with a fresh optimizer state.")

    def _optimizer_step(self, engine, micros: list[Batch], step: int
                        ) -> tuple[dict[str, list[float]], bool, float | None]:
        """Forward/backward every micro-batch of this rank, then the optimizer step; returns the losses, whether
        the step was skipped and the gradient norm before clipping.

        A non-finite loss on any rank skips the whole step: that micro-batch's backward is replaced by
        an all-placeholder one (zero gradients, the same graph on every rank) and the learning rate is
        0 for this update, so the weights do not change. A non-finite gradient norm cannot be undone
        (DeepSpeed has applied it) and stops the run before anything is saved.
        """
        sums: dict[str, list[float]] = {}
        bad = False
        for i, micro in enumerate(micros):
            losses = engine(self._prepare_batch(micro))
            flag = torch.tensor(0.0 if torch.isfinite(losses["loss"]).item() else 1.0)
            if self.world > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                bad = True
                losses = engine(Batch(size=1))
            if bad and i == len(micros) - 1:
                for group in engine.optimizer.param_groups:
                    group["lr"] = 0.0  # the LR scheduler sets it again after this step
            engine.backward(losses["loss"])
            if i == len(micros) - 1 and self.clips_itself:
                own_norm = clip_gradients([p for p in engine.module.parameters() if p.grad is not None],
                                          self.recipe.train.grad_clip)
            engine.step()
            if not bad:
                for k, v in losses.items():
                    sums.setdefault(k, []).append(float(v.detach()))
        norm = own_norm if self.clips_itself else engine.get_global_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):
            raise NonFiniteError(f"step {step + 1}: the gradient norm is {norm}; the weights are no longer valid, "
                                 f"so nothing was saved. Resume from the last checkpoint with a lower learning rate.")
        return sums, bad, None if norm is None else float(norm)

    def repa_cache(self, model: JanusFlow):
        """REPA's targets for every gen image, cached when SigLIP is frozen this stage (else None: computed live).
        Keyed by SigLIP's weights, so stages 1 and 2 (the same frozen tower) share one cache."""
        from janusflow.data.latent_cache import build_repa_cache, weights_digest
        from janusflow.train.prep import cache_root, config_hash

        r, encoder = self.recipe, model.vision_und_enc_model
        if self.latent_cache is None or not r.data.cache_repa_features or any(
                p.requires_grad for p in encoder.parameters()):
            return None
        key = config_hash(weights_digest(encoder), to_dict(r.model.und_encoder), r.model.gen_image_size)
        paths = [cache_root(r) / f"repa-{key}-{config_hash(s.path)}.pt" for s in self.source_cfgs["gen"]]
        encoder.to(self.device)
        if self.rank == 0:
            build_repa_cache(self.sources["gen"], encoder, r.model.und_encoder, r.model.gen_image_size, paths)
        _barrier()
        return build_repa_cache(self.sources["gen"], encoder, r.model.und_encoder, r.model.gen_image_size, paths)

    def _stream(self, stage: StageConfig, index: int, repa_cache=None, repa: bool = True) -> MixtureStream:
        r = self.recipe
        num_tokens = num_und_tokens(r.model, self.codec.latent_shape(r.model.gen_image_size)[1:])
        builder = SampleBuilder(self.tokenizer, r.model, r.data, r.data.und_system_prompt, num_tokens)
        return MixtureStream(self.sources, builder, MixtureSchedule(stage.mixture), seed=r.train.seed + 1000 * index,
                             cfg_drop_prob=r.data.cfg_drop_prob, time_cfg=r.train.time_sampling,
                             latent_cache=self.latent_cache, repa_cache=repa_cache,
                             max_bad_fraction=r.data.max_bad_fraction, packing=r.data.packing, repa=repa)

    def _prepare_batch(self, batch: Batch) -> Batch:
        gen = batch.gen
        if gen is not None:
            if "latents" not in gen:
                gen["latents"] = self.codec.encode(gen.pop("images").to(self.device)).float().cpu()
            g = torch.Generator().manual_seed(gen["noise_seed"])
            gen["noise"] = torch.randn(gen["latents"].shape, generator=g)
        ar = batch.ar
        if ar is not None and ar["pixel_values"] is not None:
            ar["pixel_values"] = und_encoder_inputs(ar["pixel_values"], self.recipe.model, self.codec)
        return batch.to(self.device, self.dtype)

    def _reduce_metrics(self, sums: dict[str, list[float]]) -> dict[str, float]:
        """Mean over this step's micro-batches and ranks, per loss."""
        keys = sorted(sums)
        local = torch.tensor([[sum(sums[k]), len(sums[k])] for k in keys], dtype=torch.float64)
        if self.world > 1:
            names = [None] * self.world
            dist.all_gather_object(names, keys)
            keys = sorted(set().union(*names))
            local = torch.tensor([[sum(sums.get(k, [])), len(sums.get(k, []))] for k in keys], dtype=torch.float64)
            dist.all_reduce(local)
        return {k: (local[i, 0] / local[i, 1]).item() for i, k in enumerate(keys) if local[i, 1] > 0}

    def save(self, ckpt: CheckpointManager, engine, step: int, ema: EMA, stream: MixtureStream) -> None:
        state = {"step": step, "rng": rng_state(), "data_stats": dict(stream.stats), "ema": ema.model.state_dict(),
                 "world_size": self.world, "zero_stage": self.zero_stage}
        ckpt.save(engine, step, state)

    @torch.no_grad()
    def sample_grid(self, ema: EMA, stage: str, step: int, index: int) -> Path | None:
        from janusflow.pipeline import left_pad
        from janusflow.sampling import sample_latents, to_uint8

        prompts = self.recipe.logging.sample_prompts
        if self.rank != 0 or not prompts:
            return None
        from PIL import Image

        r, tok, model = self.recipe, self.tokenizer, ema.model
        input_ids, mask = left_pad([tok.encode(gen_prompt(p)) for p in prompts], tok.pad_id)
        shape = self.codec.latent_shape(r.model.gen_image_size)
        gen = torch.Generator().manual_seed(r.train.seed)
        noise = torch.randn(len(prompts), *shape, generator=gen)
        latents = sample_latents(model, input_ids.to(self.device), noise.to(self.device), steps=r.logging.sample_steps,
                                 cfg_weight=r.logging.sample_cfg, pad_id=tok.pad_id,
                                 attention_mask=mask.to(self.device), solver=r.logging.sample_solver,
                                 sde_noise=r.logging.sample_sde_noise,
                                 step_noise=lambda _k: torch.randn(noise.shape, generator=gen))
        images = [Image.fromarray(a.numpy()) for a in to_uint8(self.codec.decode(latents.float()))]
        path = save_grid(images, self.run_dir / "samples" / f"{index + 1}-{stage}-step{step:06d}.png", prompts)
        self.logger.log_image("samples", path, f"{stage} step {step}", self.global_step_offset(index) + step)
        return path

