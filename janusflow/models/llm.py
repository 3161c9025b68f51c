"""The LLM: a transformers LlamaForCausalLM built from ``LLMConfig``."""

from __future__ import annotations

import dataclasses

from transformers import LlamaConfig, LlamaForCausalLM

from janusflow.config import LLMConfig


def llama_config(cfg: LLMConfig, **extra) -> LlamaConfig:
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "attn_implementation"}
    return LlamaConfig(**kwargs, tie_word_embeddings=False, **extra)


def build_llm(cfg: LLMConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM._from_config(llama_config(cfg), attn_implementation=cfg.attn_implementation)
