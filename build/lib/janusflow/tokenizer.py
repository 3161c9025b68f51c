"""Tokenizers, special tokens and the official prompt templates.

Two tokenizers share one interface (``encode``, ``decode`` and the special ids):
- ``ByteTokenizer``: bytes 0-255 plus the JanusFlow special tokens, for the embedded CPU default;
- ``HFTokenizer``: a local HuggingFace tokenizer directory (the official DeepSeek one).

Templates (official DeepSeek "deepseek" SFT format, roles "User"/"Assistant"):
    generation:    "User: {prompt}\\n\\nAssistant:<begin_of_image>"  (the tag is replaced by t_emb)
    understanding: "{system}\\n\\nUser: <image_placeholder>\\n{question}\\n\\nAssistant:"
where each <image_placeholder> becomes <begin_of_image> + N x <image_placeholder> + <end_of_image>.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image_placeholder>"
BEGIN_OF_IMAGE = "<begin_of_image>"
END_OF_IMAGE = "<end_of_image>"
BEGIN_OF_GENERATION = "<｜begin▁of▁generation｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE, BEGIN_OF_IMAGE, END_OF_IMAGE, BEGIN_OF_GENERATION]

OFFICIAL_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
TOKENIZER_FILE = "janusflow_tokenizer.json"


class _SpecialIds:
    """Named ids of the special tokens, shared by both tokenizers."""

    bos_id: int
    eos_id: int
    pad_id: int
    image_id: int
    boi_id: int
    eoi_id: int
    vocab_size: int

    def _set_ids(self, lookup) -> None:
        self.bos_id, self.eos_id, self.pad_id = lookup(BOS), lookup(EOS), lookup(PAD)
        self.image_id, self.boi_id, self.eoi_id = lookup(IMAGE), lookup(BEGIN_OF_IMAGE), lookup(END_OF_IMAGE)


class ByteTokenizer(_SpecialIds):
    """UTF-8 bytes (ids 0-255) + special tokens (256...). Deterministic, no files needed."""

    def __init__(self, vocab_size: int = 272):
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size {vocab_size} is too small for 256 bytes + {len(SPECIAL_TOKENS)} specials")
        self.vocab_size = vocab_size
        self.special = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.special_by_id = {v: k for k, v in self.special.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        self._set_ids(self.special.__getitem__)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for piece in self._split.split(text):
            if piece in self.special:
                ids.append(self.special[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens and i in self.special_by_id:
                out.append(self.special_by_id[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / TOKENIZER_FILE).write_text(json.dumps({"kind": "byte", "vocab_size": self.vocab_size}))


class HFTokenizer(_SpecialIds):
    """A local HuggingFace tokenizer (e.g. the official JanusFlow one); missing specials are added."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer, PretrainedConfig

        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        # A model directory's config.json (model_type multi_modality) is not a tokenizer's: when the tokenizer
        # names its own class, keep AutoTokenizer from reading it (and warning about it).
        cfg_file = Path(path) / "tokenizer_config.json"
        names_class = cfg_file.exists() and "tokenizer_class" in json.loads(cfg_file.read_text())
        kwargs = {"config": PretrainedConfig()} if names_class else {}
        self.tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
        missing = [t for t in SPECIAL_TOKENS[3:] if t not in self.tok.get_vocab()]
        if missing:
            self.tok.add_special_tokens({"additional_special_tokens": missing})
        self.added_specials = missing
        """Special tokens this directory lacked, added as the official processor does (ids from its length on)."""
        self.vocab_size = len(self.tok)
        self._set_ids(self.tok.get_vocab().get)
        # A tokenizer of another family has its own BOS/EOS; padding falls back to EOS, as officially.
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.bos_id
        self.eos_id = self.eos_id if self.eos_id is not None else self.tok.eos_token_id
        self.pad_id = self.pad_id if self.pad_id is not None else self.eos_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"the tokenizer in {path} has no begin- or end-of-sentence token ({BOS}, {EOS})")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        self.tok.save_pretrained(str(path))


Tokenizer = ByteTokenizer | HFTokenizer


def check_vocab(tok: Tokenizer, vocab_size: int, where: str) -> None:
    """Every id the tokenizer can produce must have an embedding: a clear error instead of an index error in torch."""
    if tok.vocab_size > vocab_size:
        added = getattr(tok, "added_specials", None)
        extra = f", including the special tokens it lacked and that were added ({', '.join(added)})" if added else ""
        raise ValueError(f"the tokenizer {where} has {tok.vocab_size} tokens{extra}, but the model's vocabulary "
                         f"(llm.vocab_size) has {vocab_size}: it is not the tokenizer of this model")


def load_tokenizer(path: str | Path | None = None, kind: str = "byte", vocab_size: int = 272) -> Tokenizer:
    """From a model directory (ours writes janusflow_tokenizer.json; otherwise HF files) or by kind."""
    if path is not None and (Path(path) / TOKENIZER_FILE).exists():
        meta = json.loads((Path(path) / TOKENIZER_FILE).read_text())
        return ByteTokenizer(meta["vocab_size"])
    if path is not None and (kind == "hf" or (Path(path) / "tokenizer_config.json").exists()):
        return HFTokenizer(path)
    if kind == "hf":
        raise ValueError("tokenizer.kind=hf needs tokenizer.path (a local tokenizer directory)")
    return ByteTokenizer(vocab_size)


# ----------------------------------------------------------------------------- templates


def sft_prompt(user_text: str, system_prompt: str = "") -> str:
    """The official single-turn prompt, ready for the assistant's answer."""
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}User: {user_text.strip()}\n\nAssistant:"


def gen_prompt(prompt: str) -> str:
    """Text-to-image prompt: the template plus the begin-of-image tag (dropped, replaced by t_emb)."""
    return sft_prompt(prompt) + BEGIN_OF_IMAGE


def und_prompt(question: str, system_prompt: str = OFFICIAL_SYSTEM_PROMPT) -> str:
    return sft_prompt(f"{IMAGE}\n{question.strip()}", system_prompt)


def expand_image_tokens(ids: list[int], tok: Tokenizer, num_image_tokens: int) -> list[int]:
    """Replace every <image_placeholder> by <begin_of_image> + N placeholders + <end_of_image>."""
    out: list[int] = []
    for i in ids:
        if i == tok.image_id:
            out += [tok.boi_id] + [tok.image_id] * num_image_tokens + [tok.eoi_id]
        else:
            out.append(i)
    return out


def image_seq_mask(ids, tok: Tokenizer):
    """Positions that receive image embeddings: each <begin_of_image> and its placeholders."""
    return (ids == tok.image_id) | (ids == tok.boi_id)


# ----------------------------------------------------------------------------- training a small BPE


def train_bpe_tokenizer(texts, vocab_size: int, path: str | Path) -> HFTokenizer:
    """Train a byte-level BPE (HF ``tokenizers``) on ``texts`` and save it as a HF tokenizer directory.

    The embedded default uses it instead of raw bytes: its prompts become ~4x shorter, so a step of
    the same batch is cheaper, and the model trains through the same HF tokenizer path as a real run.
    Every byte is in the alphabet, so any text still encodes (no unknown token).
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"a byte-level BPE needs vocab_size >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.save_pretrained(str(path))
    return HFTokenizer(path)
