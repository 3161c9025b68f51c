"""The LLM: a transformers LlamaForCausalLM built from ``LLMConfig``."""

from __future__ import annotations

import dataclasses
import inspect

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from janusflow.config import LLMConfig

# Recent transformers 5.x releases renamed the KV-cache argument of the forwards from ``past_key_values`` to ``cache``
# (the old name warns, and goes away in 5.40): pass it under the name the installed version takes.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def llama_config(cfg: LLMConfig, **extra) -> LlamaConfig:
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "attn_implementation"}
    return LlamaConfig(**kwargs, tie_word_embeddings=False, **extra)


def build_llm(cfg: LLMConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM._from_config(llama_config(cfg), attn_implementation=cfg.attn_implementation)
