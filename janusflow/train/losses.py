"""The training objective (paper §3.4) of one micro-batch of n samples (n_und + n_text + n_gen = n):

    loss = (n_und * CE_und + n_text * CE_text + n_gen * (L_RF + lambda * L_REPA)) / n

CE is the next-token cross-entropy on answer tokens (understanding) or every token (text), averaged per sample
first; L_RF is the velocity MSE; L_REPA the negative cosine between the projected hidden state after block K at
the image positions and the frozen SigLIP's patch features of the clean image (janusflow.models.repa). So the
mixture ratio is also the weighting of the objectives.

``TrainModule`` is what DeepSpeed trains: JanusFlow plus the training-only REPA projector. Its forward always runs
the same sequence of modules whatever tasks the micro-batch holds: an absent part runs on a one-row placeholder
(``ArRows.placeholder``, ``GenRows.placeholder``) whose loss is multiplied by zero, and text-only rows still run
the understanding encoder on a placeholder image joined to the LLM's input times zero, because ZeRO-2 reduces
gradients in the order they become ready and ZeRO-3 gathers parameters collectively in forward and backward, both
the same on every rank. For the same reason nothing here reads a parameter outside its module's forward.

    module = TrainModule(model, repa_weight=1.0, repa_layer=6, repa_hidden=2048)
    losses = module(batch.to_device(device, dtype, codec, cfg))    # {"loss", "loss_rf", "loss_repa", ...}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from janusflow.data.batch import IGNORE, ArRows, Batch, GenRows
from janusflow.data.transforms import siglip_view
from janusflow.flow import noisy_latents, rf_loss
from janusflow.models.janusflow import JanusFlow
from janusflow.models.repa import build_projector, match_grid, repa_loss


def per_sample_mean(values: torch.Tensor, valid: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of ``values`` [R, L] over the ``valid`` positions of each sample (``index`` [R, L]: its number) -> [n]."""
    sums = values.new_zeros(n).index_add(0, index[valid], values[valid])
    counts = values.new_zeros(n).index_add(0, index[valid], valid[valid].to(values.dtype))
    return sums / counts.clamp(min=1)


def next_token_ce(logits: torch.Tensor, rows: ArRows) -> torch.Tensor:
    """Per-sample mean cross-entropy [n] of next-token prediction (positions with IGNORE labels excluded)."""
    labels = rows.labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return per_sample_mean(ce, labels != IGNORE, rows.sample_index[:, 1:], rows.is_und.shape[0])


class TrainModule(nn.Module):
    """JanusFlow plus the training-only REPA projector; ``forward(batch)`` returns the losses."""

    def __init__(self, model: JanusFlow, repa_weight: float, repa_layer: int, repa_hidden: int,
                 repa_cached: bool = False):
        """``repa_cached``: the batches carry REPA's targets instead of crops for a live SigLIP pass."""
        super().__init__()
        self.model = model
        self.repa_weight, self.repa_layer, self.repa_cached = repa_weight, repa_layer, repa_cached
        self.repa_projector_only = False
        """REPA's warm-up: its gradient reaches the projector only (the hidden state is detached)."""
        # Device and LLM dtype without touching a parameter: under ZeRO-3 reading a partitioned parameter outside
        # its module's forward all-gathers it, a collective that would hang when only some ranks take a branch.
        ref = model.language_model.get_input_embeddings().weight
        self.register_buffer("anchor", ref.new_zeros(0), persistent=False)
        self.projector = None
        if repa_weight > 0:
            cfg = model.config
            if not 1 <= repa_layer <= cfg.llm.num_hidden_layers:
                raise ValueError(f"train.repa.layer={repa_layer} is outside the LLM's 1..{cfg.llm.num_hidden_layers}")
            self.projector = build_projector(cfg.llm.hidden_size, repa_hidden, cfg.und_encoder.width)

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def llm_dtype(self) -> torch.dtype:
        """The dtype of the LLM's inputs (the model's after DeepSpeed casts it)."""
        return self.anchor.dtype

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.layout is not None:
            return self._packed_losses(batch)
        losses: dict[str, torch.Tensor] = {}
        ar = batch.ar if batch.ar is not None else ArRows.placeholder(self.device)
        gen = batch.gen if batch.gen is not None else GenRows.placeholder(
            self.model.config, self.device, self.repa_cached, self.model.vision_und_enc_model.num_patches)
        total = self._ar_loss(ar, batch.size, losses, real=batch.ar is not None)
        losses["loss"] = total + self._gen_loss(gen, batch.size, losses, real=batch.gen is not None)
        return losses

    def _und_encoder_placeholder(self) -> torch.Tensor:
        """A one-image input of the understanding encoder (SigLIP pixels, or VAE latents for the VAE kinds)."""
        cfg, ref = self.model.config, self.anchor
        if not cfg.und_uses_vae:
            return ref.new_zeros(1, 3, cfg.und_encoder.image_size, cfg.und_encoder.image_size)
        gen = cfg.gen_encoder
        return ref.new_zeros(1, gen.latent_channels, 2 * gen.stride, 2 * gen.stride)

    def _und_images(self, rows: ArRows) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder inputs and image mask of the rows; text-only rows get a placeholder image and no mask
        (JanusFlow.und_inputs_embeds joins it times zero)."""
        if rows.encoder_inputs is not None:
            return rows.encoder_inputs, rows.image_mask
        return self._und_encoder_placeholder(), None

    def _ar_loss(self, rows: ArRows, n: int, losses: dict, real: bool) -> torch.Tensor:
        logits = self.model.forward_und(rows.input_ids, rows.attention_mask, *self._und_images(rows),
                                        position_ids=rows.position_ids).logits
        if not real:
            return 0.0 * logits.sum()
        return self._task_losses(next_token_ce(logits, rows), rows, n, losses)

    @staticmethod
    def _task_losses(per_sample: torch.Tensor, rows: ArRows, n: int, losses: dict) -> torch.Tensor:
        """sum over tasks of (task's samples / n) * (the task's mean per-sample CE)."""
        total = per_sample.new_zeros(())
        for task, mask in (("und", rows.is_und), ("text", ~rows.is_und)):
            if mask.any():
                loss = per_sample[mask].mean()
                losses[f"loss_{task}"] = loss.detach()
                total = total + mask.sum() / n * loss
        return total

    def _gen_loss(self, rows: GenRows, n: int, losses: dict, real: bool) -> torch.Tensor:
        z_t, target = noisy_latents(rows.latents, rows.t, rows.noise_seed)
        m = self.model
        layer = self.repa_layer if self.projector is not None else None
        v, inner = m.forward_gen(m.embed_tokens(rows.prompt_ids), rows.prompt_mask, z_t.to(self.llm_dtype), rows.t,
                                 hidden_layer=layer)
        loss = self._flow_losses(v, inner, rows, target, losses if real else {})
        return rows.latents.shape[0] / n * loss if real else 0.0 * loss

    def _packed_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Packed rows (data.pack_length): one LLM pass over every sample of every task, each attending only to
        itself; the velocity and REPA read each generation sample's own image positions."""
        m, rows, layout, losses = self.model, batch.ar, batch.layout, {}
        real_gen = batch.gen is not None
        gen = batch.gen if real_gen else GenRows.placeholder(m.config, self.device, self.repa_cached,
                                                              m.vision_und_enc_model.num_patches)
        z_t, target = noisy_latents(gen.latents, gen.t, gen.noise_seed)
        gen_in = m.gen_inputs(z_t.to(self.llm_dtype), gen.t)
        layer = self.repa_layer if self.projector is not None else None
        slots = layout.gen_slots if real_gen else None
        hidden, inner = m.forward_packed(rows.input_ids, rows.position_ids, layout.segments, *self._und_images(rows),
                                         gen_in, slots, layer)
        logits = m.language_model.lm_head(hidden)
        has_ar = rows.is_und.numel() > 0
        ar = self._task_losses(next_token_ce(logits, rows), rows, batch.size, losses) if has_ar else 0.0 * logits.sum()
        v, image_inner = self._image_states(hidden, inner, gen_in, slots)
        flow = self._flow_losses(v, image_inner, gen, target, losses if real_gen else {})
        losses["loss"] = ar + (gen.t.shape[0] / batch.size * flow if real_gen else 0.0 * flow)
        return losses

    def _image_states(self, hidden: torch.Tensor, inner: torch.Tensor | None, gen_in, gen_slots: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The velocity [G, C, h, w] from each generation sample's states at its image positions, and the REPA
        block's states there [G, N, hidden]. The placeholder (no slots) reads any N positions, so that the generation
        modules' backward runs after the LLM's on every rank."""
        if gen_slots is not None:
            image = gen_slots[:, 1:]
        else:
            n = gen_in.tokens.shape[1]
            image = torch.arange(n, device=hidden.device).remainder(hidden.shape[0] * hidden.shape[1]).unsqueeze(0)
        v = self.model.velocity_from_hidden(hidden.flatten(0, 1)[image], gen_in)
        return v, inner.flatten(0, 1)[image] if inner is not None else None

    def _flow_losses(self, v: torch.Tensor, inner: torch.Tensor | None, rows: GenRows, target: torch.Tensor,
                     losses: dict) -> torch.Tensor:
        """L_RF + lambda L_REPA of generation samples: the velocity [G, C, h, w] and the hidden state after the
        REPA block at their image positions [G, N, hidden] (None with REPA off)."""
        loss = rf_loss(v, target)
        losses["loss_rf"] = loss.detach()
        if self.projector is not None:
            side = int(round(inner.shape[1] ** 0.5))
            inner = inner.detach() if self.repa_projector_only else inner
            align = repa_loss(self.projector(inner), match_grid(self._repa_target(rows), (side, side)))
            losses["loss_repa"] = align.detach()
            loss = loss + self.repa_weight * align
        return loss

    def _repa_target(self, rows: GenRows) -> torch.Tensor:
        """The cached targets, or the frozen SigLIP's features of the crops (no gradient into SigLIP)."""
        if rows.repa_targets is not None:
            return rows.repa_targets
        tower = self.model.vision_und_enc_model
        with torch.no_grad():
            return tower(siglip_view(rows.crops, self.model.config.und_encoder).to(self.llm_dtype))
