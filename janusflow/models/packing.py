"""Attention for packed rows: several samples share a row of the LLM's input, each attending only to itself.

``segments`` [R, L] names the sample of every position (unique in the micro-batch; -1 on padding). Position ids
are the samples' own (they may skip values: a CFG-dropped prompt keeps its length as a gap, see
janusflow.data.batch.collate_packed). What the LLM takes depends on its attention kernel:

- ``sdpa`` / ``eager``: a 4D block-causal mask [R, 1, L, L] (True / 0 where a query may attend a key: same
  sample, key not after query). Padding attends to itself only (no row of the mask is empty).
- ``flash_attention_2``: the rows flattened to one sequence [1, R * L] with the samples' boundaries
  (``cu_seq_lens_q/k``), transformers' variable-length path; the mask is never built.

    kwargs = packed_attention(segments, position_ids, model.config.llm.attn_implementation, dtype)
    out = llm.model(inputs_embeds=embeds.view(kwargs.pop("shape")), **kwargs)
"""

from __future__ import annotations

import torch


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """segments [R, L] -> bool [R, 1, L, L]: query i may attend key j iff same sample and j <= i (padding: i == j)."""
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool, device=segments.device).tril()
    own = torch.eye(segments.shape[1], dtype=torch.bool, device=segments.device)
    return ((same & causal) | own)[:, None]


def segment_boundaries(segments: torch.Tensor) -> torch.Tensor:
    """Cumulative lengths [S + 1] (int32) of the runs of equal segment ids over the flattened rows; every padding
    position is a run of its own."""
    flat = segments.flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = (flat[1:] != flat[:-1]) | (flat[1:] < 0)
    row_starts = torch.arange(0, flat.numel(), segments.shape[1], device=flat.device)
    starts[row_starts] = True
    idx = torch.nonzero(starts).flatten()
    return torch.cat([idx, idx.new_tensor([flat.numel()])]).to(torch.int32)


def packed_attention(segments: torch.Tensor, position_ids: torch.Tensor, attn_implementation: str,
                     dtype: torch.dtype) -> dict:
    """The LLM forward's keyword arguments for packed rows (see the module docstring); ``shape`` is the shape the
    input embeddings take ([R, L, -1], or [1, R * L, -1] for flash attention)."""
    rows, length = segments.shape
    if attn_implementation == "flash_attention_2":
        cu = segment_boundaries(segments)
        longest = int((cu[1:] - cu[:-1]).max())
        return {"shape": (1, rows * length, -1), "position_ids": position_ids.reshape(1, -1),
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    mask = block_causal_mask(segments)
    if attn_implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"shape": (rows, length, -1), "position_ids": position_ids, "attention_mask": mask}
