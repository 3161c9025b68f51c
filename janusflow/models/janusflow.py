"""JanusFlow: one LLM for image understanding (autoregressive text) and generation (rectified flow).

Attribute names are the official ``MultiModalityCausalLM`` ones, so its state dict loads
key-for-key. Conventions: t = 0 is noise, t = 1 is data; the generation encoder sees t * 1000.

Understanding: ``und_inputs_embeds(input_ids, pixel_values, image_seq_mask)`` puts
[beg_of_und_embed, aligner(SigLIP(x))] at the masked positions; the LLM predicts text. The paper's
ablations B and C swap SigLIP for VAE latents through a generation encoder at t = 1 (``und_encoder_kind``,
inputs in janusflow.models.und_inputs): the generation encoder itself (shared) or a second one (separate).
Generation: the sequence is [prompt (without its last tag), t_emb, z tokens]; the LLM output at
the z positions goes through RMSNorm + aligner + decoder (with the encoder's skip) to a velocity.

    model = JanusFlow(model_config("tiny"))
    v, _ = model.forward_gen(prefix_embeds, prefix_mask, z_t, t)     # v: [B, C, h, w]
    model.save_pretrained("out"); JanusFlow.from_pretrained("out")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from janusflow.config import ModelConfig
from janusflow.models import official_format
from janusflow.models.gen_encdec import ShallowUViTDecoder, ShallowUViTEncoder, token_grid
from janusflow.models.llm import build_llm
from janusflow.models.packing import packed_attention
from janusflow.models.und_encoder import SigLIPTower

# Keys that may be absent from a checkpoint without harm (the unused SigLIP pooling head,
# rotary caches that old transformers versions saved).
IGNORABLE_MISSING = ("vision_und_enc_model.vision_tower.attn_pool.",)
IGNORABLE_UNEXPECTED = ("rotary_emb.inv_freq",)


@dataclass
class GenInputs:
    """What the generation encoder produces for one z_t: LLM-width tokens plus decoder state."""

    tokens: torch.Tensor  # [B, N, hidden] image tokens for the LLM
    t_emb: torch.Tensor  # [B, hidden] the time token (no aligner) and the blocks' condition
    skips: list  # [ [B, D, h, w] ] the long skip to the decoder
    grid: tuple[int, int]  # (h, w) of the token grid


class JanusFlow(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        hidden = config.llm.hidden_size
        und, gen = config.und_encoder, config.gen_encoder
        self.vision_und_enc_model = SigLIPTower(und)
        self.vision_und_enc_aligner = nn.Linear(und.width, hidden)
        self.beg_of_und_embed = nn.Parameter(torch.zeros(1, hidden))
        self.vision_gen_enc_model = ShallowUViTEncoder(
            gen.latent_channels, gen.channels, hidden, gen.kernel_size, gen.stride, gen.num_blocks,
            gen.norm_eps, gen.use_bias)
        self.vision_gen_enc_aligner = nn.Linear(gen.channels, hidden)
        self.vision_gen_dec_model = ShallowUViTDecoder(
            gen.channels, gen.latent_channels, hidden, config.gen_decoder.upsamples,
            config.gen_decoder.num_blocks, gen.norm_eps, gen.use_bias)
        self.language_model = build_llm(config.llm)
        self.vision_gen_dec_aligner_norm = LlamaRMSNorm(hidden, eps=config.llm.rms_norm_eps)
        self.vision_gen_dec_aligner = nn.Linear(hidden, gen.channels)
        if config.und_encoder_kind == "separate_gen":  # built last: the default model's init stays unchanged
            self.vision_und_gen_enc_model = ShallowUViTEncoder(
                gen.latent_channels, gen.channels, hidden, gen.kernel_size, gen.stride, gen.num_blocks,
                gen.norm_eps, gen.use_bias)
            self.vision_und_gen_enc_aligner = nn.Linear(gen.channels, hidden)

    # ------------------------------------------------------------------ embeddings

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; negative ids (ignore/placeholder markers) embed as id 0, as official."""
        return self.language_model.get_input_embeddings()(input_ids.clamp(min=0))

    def encode_und_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 1 + N, hidden]: beg_of_und_embed + aligned image tokens.

        pixel_values: SigLIP-normalised pixels [B, 3, S, S], or scaled VAE latents [B, C, h, w] when
        ``und_encoder_kind`` is shared_gen / separate_gen (janusflow.models.und_inputs makes either).
        """
        kind = self.config.und_encoder_kind
        if kind == "siglip":
            feats = self.vision_und_enc_aligner(self.vision_und_enc_model(pixel_values))
        else:
            shared = kind == "shared_gen"
            encoder = self.vision_gen_enc_model if shared else self.vision_und_gen_enc_model
            aligner = self.vision_gen_enc_aligner if shared else self.vision_und_gen_enc_aligner
            # A clean image is the t = 1 end of the flow (t * 1000 into the time embedding, as for generation).
            x, _, _ = encoder(pixel_values, pixel_values.new_full((pixel_values.shape[0],), 1000.0))
            feats = aligner(x.flatten(2).transpose(1, 2))
        beg = self.beg_of_und_embed.to(feats.dtype).expand(feats.shape[0], 1, -1)
        return torch.cat([beg, feats], dim=1)

    def und_inputs_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                          image_seq_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with every image's 1 + N embeddings written at ``image_seq_mask`` positions.

        image_seq_mask [B, L] marks each image's <begin_of_image> and its N placeholders, images in order. Images
        with no mask are training's placeholder for text-only rows: encoded and joined times zero, so that the
        encoder's forward and backward run where real images' would (every ZeRO-3 rank gathers in one order).
        """
        if pixel_values is None or pixel_values.shape[0] == 0:
            return self.embed_tokens(input_ids)
        images = self.encode_und_images(pixel_values)
        embeds = self.embed_tokens(input_ids)
        if image_seq_mask is None:
            return embeds + 0.0 * images.sum().to(embeds.dtype)
        return self.place_und_images(embeds, images.to(embeds.dtype), image_seq_mask)

    @staticmethod
    def place_und_images(embeds: torch.Tensor, images: torch.Tensor, image_seq_mask: torch.Tensor) -> torch.Tensor:
        """Write images [n, 1 + N, hidden] at the True positions of image_seq_mask [B, L] (in order)."""
        if int(image_seq_mask.sum()) != images.shape[0] * images.shape[1]:
            raise ValueError(
                f"image_seq_mask marks {int(image_seq_mask.sum())} positions but {images.shape[0]} images "
                f"need {images.shape[1]} each")
        return embeds.masked_scatter(image_seq_mask.unsqueeze(-1), images.reshape(-1, images.shape[-1]))

    def gen_inputs(self, z_t: torch.Tensor, t: torch.Tensor) -> GenInputs:
        """z_t [B, C, H, W], t [B] or scalar in [0, 1] -> LLM tokens, time token, skips."""
        x, t_emb, skips = self.vision_gen_enc_model(z_t, torch.as_tensor(t, device=z_t.device) * 1000.0)
        grid = (x.shape[2], x.shape[3])
        tokens = self.vision_gen_enc_aligner(x.flatten(2).transpose(1, 2))
        return GenInputs(tokens, t_emb, skips, grid)

    def velocity_from_hidden(self, hidden: torch.Tensor, gen: GenInputs) -> torch.Tensor:
        """LLM output at the image positions [B, N, hidden] -> velocity [B, C, H, W]."""
        h = self.vision_gen_dec_aligner(self.vision_gen_dec_aligner_norm(hidden))
        h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], *gen.grid)
        return self.vision_gen_dec_model(h, list(gen.skips), gen.t_emb)

    @property
    def dtype_for_llm(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    def num_gen_tokens(self, latent_hw: tuple[int, int]) -> int:
        """Number of LLM image tokens for a latent of spatial size latent_hw."""
        gen = self.config.gen_encoder
        h, w = token_grid(latent_hw, gen.kernel_size, gen.stride)
        return h * w

    # ------------------------------------------------------------------ forwards

    def forward_gen(self, prefix_embeds: torch.Tensor, prefix_mask: torch.Tensor, z_t: torch.Tensor,
                    t: torch.Tensor, hidden_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One rectified-flow evaluation with the whole sequence (training, reference sampler).

        prefix_embeds [B, P, hidden] (left-padded prompt, last tag already dropped), prefix_mask [B, P].
        Returns (v_pred [B, C, H, W], hidden state after block ``hidden_layer`` at the image positions
        [B, N, hidden] or None).
        """
        gen = self.gen_inputs(z_t, t)
        n = gen.tokens.shape[1]
        embeds = torch.cat([prefix_embeds, gen.t_emb.unsqueeze(1).to(prefix_embeds.dtype),
                            gen.tokens.to(prefix_embeds.dtype)], dim=1)
        mask = torch.cat([prefix_mask, prefix_mask.new_ones(prefix_mask.shape[0], 1 + n)], dim=1)
        out = self.language_model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                                        output_hidden_states=hidden_layer is not None)
        v = self.velocity_from_hidden(out.last_hidden_state[:, -n:], gen)
        inner = out.hidden_states[hidden_layer][:, -n:] if hidden_layer is not None else None
        return v, inner

    def forward_packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, segments: torch.Tensor,
                       pixel_values: torch.Tensor | None = None, image_seq_mask: torch.Tensor | None = None,
                       gen: GenInputs | None = None, gen_slots: torch.Tensor | None = None,
                       hidden_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One LLM pass over packed rows [R, L] holding samples of every task (janusflow.data.batch.collate_packed).

        Understanding images go to ``image_seq_mask``; each generation sample's [t_emb, image tokens] to its row of
        ``gen_slots`` [G, 1 + N] (flat positions row * L + column); every sample attends only to itself
        (janusflow.models.packing). Generation inputs without slots are training's placeholder, joined times zero
        (as images without a mask: janusflow.train.losses). Returns the last hidden state [R, L, hidden] and the
        one after block ``hidden_layer`` (or None).
        """
        embeds = self.und_inputs_embeds(input_ids, pixel_values, image_seq_mask)
        if gen is not None:
            values = torch.cat([gen.t_emb.unsqueeze(1), gen.tokens], dim=1).to(embeds.dtype)
            if gen_slots is None:
                embeds = embeds + 0.0 * values.sum()
            else:
                flat = embeds.reshape(-1, embeds.shape[-1]).index_put((gen_slots.flatten(),), values.flatten(0, 1))
                embeds = flat.view_as(embeds)
        kwargs = packed_attention(segments, position_ids, self.language_model.config._attn_implementation,
                                  embeds.dtype)
        out = self.language_model.model(inputs_embeds=embeds.reshape(kwargs.pop("shape")), use_cache=False,
                                        output_hidden_states=hidden_layer is not None, **kwargs)
        inner = out.hidden_states[hidden_layer].view_as(embeds) if hidden_layer is not None else None
        return out.last_hidden_state.view_as(embeds), inner

    def forward_und(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    pixel_values: torch.Tensor | None = None, image_seq_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        """Understanding / text forward (training and evaluation): the transformers CausalLMOutput, logits
        [B, L, vocab] (and a loss when ``labels`` are given). Packed rows pass ``position_ids`` restarting per sample
        and no ``attention_mask``: transformers then masks per sample."""
        embeds = self.und_inputs_embeds(input_ids, pixel_values, image_seq_mask)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   labels=labels, use_cache=False)

    # ------------------------------------------------------------------ I/O

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        """Write config.json (official layout), preprocessor_config.json and model.safetensors."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        dtype = next(iter(sd.values())).dtype
        (path / "config.json").write_text(json.dumps(official_format.config_to_official(self.config, dtype), indent=2))
        (path / "preprocessor_config.json").write_text(
            json.dumps(official_format.preprocessor_config(self.config), indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", attn_implementation: str | None = None) -> JanusFlow:
        """Load an official JanusFlow-1.3B directory or one written by ``save_pretrained``."""
        path = Path(path)
        config = official_format.read_model_config(path)
        if attn_implementation:
            config.llm.attn_implementation = attn_implementation
        state = official_format.read_state_dict(path)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype or torch.float32)
        try:
            model = cls(config)
        finally:
            torch.set_default_dtype(default)
        model.load_checked_state_dict(state, source=str(path))
        return model.to(device)

    def load_checked_state_dict(self, state: dict, source: str = "state dict") -> None:
        """Strict load that names the missing/unexpected/mis-shaped keys instead of failing deep in torch."""
        own = self.state_dict()
        state = {k: v for k, v in state.items() if not any(s in k for s in IGNORABLE_UNEXPECTED)}
        missing = [k for k in own if k not in state and not k.startswith(IGNORABLE_MISSING)]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            lines = [f"{source} does not match the model configuration:"]
            sections = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
            for title, items in sections:
                if items:
                    more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                    lines.append(f"  {title} ({len(items)}): {', '.join(items[:10])}{more}")
            raise ValueError("\n".join(lines))
        self.load_state_dict(state, strict=False)
