"""Reliability (issue 7): every fault gives a skipped-and-counted record or one clear error naming the problem.

Covered elsewhere: kill -9 and interrupted saves (test_checkpoint.py); non-finite steps, corrupt images in the
stream, an unwritable run dir and resuming on another number of ranks (test_training.py); odd image modes and
broken records of each format (test_sources.py). Here: full disks, bad data in the stream and in the metrics,
bad input at every entry point (recipes, CLIs, model dirs, checkpoints, tokenizers, tensor sizes), and
property tests over random overrides and garbled records.
"""

import errno
import importlib.util
import io
import json
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from janusflow.config import CodecConfig, ConfigError, MixturePhase, Recipe, TimeSamplingConfig, load_recipe, to_dict
from janusflow.data.mixture import DataError, MixtureSchedule, MixtureStream, SampleBuilder
from janusflow.data.sources import (
    CaptionJsonlSource,
    CaptionRecord,
    ConversationRecord,
    LlavaJsonSource,
    TextJsonlSource,
    TextRecord,
    WebDatasetSource,
)
from janusflow.export import export_model
from janusflow.models.codec import LatentCodec
from janusflow.pipeline import load_pipeline
from janusflow.sampling import sample_latents
from janusflow.tokenizer import BOS, EOS, IMAGE, ByteTokenizer, HFTokenizer
from janusflow.train.checkpoint import BYTES_PER_PARAM, CheckpointManager, check_disk_space

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.yaml"
# Derandomized and without an example database: the same examples on every CI run, no files in the repo.
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One prep cache (shapes world, latents) for the module's training runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JANUSFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def run_tiny(run_dir: Path, overrides=(), stop_after=None, resume="auto"):
    from janusflow.train.trainer import Trainer

    return Trainer(load_recipe("tiny", [f"run_dir={run_dir}", *overrides]), resume=resume,
                   stop_after_steps=stop_after).run()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def load_tool(tool: str):
    spec = importlib.util.spec_from_file_location(f"reliability_{tool[:-3]}", ROOT / "tools" / tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(tool: str, argv: list, capsys) -> tuple[int, str]:
    """A CLI's exit code and stderr, in-process."""
    try:
        code = load_tool(tool).main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def image_bytes(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_0x0() -> bytes:
    """A well-formed PNG header that declares a 0 x 0 image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def caption_file(folder: Path, good: int, bad: dict[str, int], caption: str = "a red square") -> Path:
    """A caption JSONL with ``good`` readable images and ``bad`` broken records by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(good):
        Image.new("RGB", (32, 32), (40 * i % 256, 0, 200)).save(folder / f"good{i}.png")
        lines.append(json.dumps({"image": f"good{i}.png", "caption": caption}))
    (folder / "trunc.png").write_bytes(image_bytes(Image.new("RGB", (32, 32), "red"))[:60])
    lines += ['{"image": "good0.png", "caption": '] * bad.get("bad_json", 0)
    lines += [json.dumps({"image": f"missing{i}.png", "caption": "x"}) for i in range(bad.get("missing_file", 0))]
    lines += [json.dumps({"image": "trunc.png", "caption": "x"})] * bad.get("bad_image", 0)
    path = folder / "gen.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def stream_over(sources: dict, phase: MixturePhase, **kwargs) -> MixtureStream:
    cfg = load_recipe("tiny")
    builder = SampleBuilder(ByteTokenizer(), cfg.model, cfg.data, "", 16)
    return MixtureStream(sources, builder, MixtureSchedule([phase]), seed=0, cfg_drop_prob=0.1,
                         time_cfg=TimeSamplingConfig(), **kwargs)


# ----------------------------------------------------------------------------- 6: disk full, run dir


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12 - free, free=free))


def test_disk_space_check_names_the_path_and_the_bytes(tmp_path, monkeypatch):
    _free(monkeypatch, 1000)
    with pytest.raises(OSError) as e:
        check_disk_space(tmp_path, 10**6)
    msg = str(e.value)
    assert f"not enough disk space in {tmp_path}" in msg and "(1000 bytes) free" in msg
    assert f"({BYTES_PER_PARAM * 10**6} bytes)" in msg
    check_disk_space(tmp_path, 1000 // BYTES_PER_PARAM)  # exactly enough


def test_full_disk_stops_the_train_cli_before_training(tmp_path, cache, monkeypatch, capsys):
    _free(monkeypatch, 10**6)  # the tiny model's checkpoint needs ~4 MB
    run = tmp_path / "run"
    code, err = run_main("train.py", ["--recipe", "tiny", f"run_dir={run}"], capsys)
    assert code == 2 and f"train.py: error: not enough disk space in {run}" in err and "Traceback" not in err
    assert not (run / "stages").exists() and not (run / "metrics.jsonl").exists()


class FullDiskEngine:
    """Writes a partial DeepSpeed file, then fails like a full disk (or succeeds)."""

    def __init__(self, full: bool):
        self.full = full

    def save_checkpoint(self, root, tag, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["engine", "state"])
def test_enospc_during_a_checkpoint_keeps_the_previous_one_latest(tmp_path, monkeypatch, where):
    ckpt = CheckpointManager(tmp_path, keep=2)
    with pytest.raises(OSError, match="there is no checkpoint yet"):
        ckpt.save(FullDiskEngine(full=True), 5, {"step": 5})
    ckpt.save(FullDiskEngine(full=False), 10, {"step": 10})
    if where == "state":  # the engine's files fit, our state.pt does not
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as e:
        ckpt.save(FullDiskEngine(full=where == "engine"), 20, {"step": 20})
    msg = str(e.value)
    assert f"writing checkpoint {tmp_path / 'step-000020'} failed (No space left on device)" in msg
    assert f"{tmp_path / 'step-000010'} stays the latest checkpoint" in msg
    assert ckpt.latest() == "step-000010" and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000010"]


def test_full_disk_mid_run_then_foreign_config_then_resume(tmp_path, cache, monkeypatch):
    """ENOSPC at the second checkpoint of a real run; resuming with another model config names the mismatch;
    resuming as before finishes the stage."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "step-000004.tmp" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run, common = tmp_path / "run", ["stages.0.max_steps=4", "train.save_every=2"]
    with pytest.raises(OSError, match=r"step-000004 failed \(No space left on device\).*step-000002 stays the latest"):
        run_tiny(run, common, stop_after=4)
    ckpts = run / "stages" / "1-adaptation" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-000002" and not list(ckpts.glob("*.tmp"))
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"step-000002 does not match the model configuration:\n.*shape mismatches"):
        run_tiny(run, [*common, "model.llm.intermediate_size=96"], stop_after=2)
    run_tiny(run, common, stop_after=2)
    assert (ckpts / "latest").read_text() == "step-000004"
    assert sorted(r["step"] for r in metrics(run) if r["stage"] == "adaptation") == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- 4: bad data


def test_truncated_zero_size_and_odd_mode_images(tmp_path):
    rgb = Image.new("RGB", (16, 16), (200, 30, 30))
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    jpeg = image_bytes(rgb, "JPEG")
    cases = {  # name -> bytes, expected reason (None: used as RGB)
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "bad_image"),
        "truncated_tail.jpg": (jpeg[:-2], "bad_image"),
        "progressive_cut.jpg": (image_bytes(rgb.resize((64, 64)), "JPEG", progressive=True)[:400], "bad_image"),
        "zero_bytes.png": (b"", "bad_image"),
        "zero_size.png": (png_0x0(), "bad_image"),
        "grey.jpg": (image_bytes(Image.new("L", (16, 16), 90), "JPEG"), None),
        "palette.png": (image_bytes(palette), None),
        "cmyk.jpg": (image_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), None),
        "rgba.png": (image_bytes(Image.new("RGBA", (16, 16), (0, 0, 255, 255))), None),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"image": n, "caption": "c"}) + "\n" for n in cases))
    ds = CaptionJsonlSource(tmp_path / "c.jsonl")
    for i, (name, (_, reason)) in enumerate(cases.items()):
        before = dict(ds.stats)
        rec = ds[i]
        if reason is None:
            assert rec is not None and rec.image.mode == "RGB" and rec.image.size == (16, 16), name
        else:
            assert rec is None and ds.stats[reason] == before.get(reason, 0) + 1 and name in ds.last_error[reason]
    assert ds[list(cases).index("palette.png")].image.getpixel((0, 0)) == (10, 200, 30)  # its colour, not an index


def test_long_captions_and_conversations_are_truncated_and_long_texts_chunked():
    cfg = load_recipe("tiny")  # max_text_len 64, max_seq_len 256
    tok = ByteTokenizer()
    builder = SampleBuilder(tok, cfg.model, cfg.data, "", 16)
    img = Image.new("RGB", (32, 32), "red")
    short = builder.gen(CaptionRecord(img, "a red circle"), random.Random(0), center_crop=True, drop_prob=0.0)
    assert builder.stats == {} and tok.decode(short.prompt_ids).endswith("a red circle\n\nAssistant:")
    long = builder.gen(CaptionRecord(img, "x" * 500), random.Random(0), center_crop=True,
                       drop_prob=0.0)
    assert builder.stats == {"truncated_caption": 1} and tok.decode(long.prompt_ids).count("x") == 64
    text = builder.text(TextRecord("y" * 500), random.Random(0), all_chunks=True)  # chunked to the context
    assert builder.stats["text_chunked"] == 1 and [len(t.ids) for t in text] == [256, 500 - 254 + 2]
    conv = builder.und(ConversationRecord(img, [("user", "what?"), ("assistant", "z" * 500)]))
    assert builder.stats["truncated_conversation"] == 1 and len(conv.ids) == len(conv.labels) == 256
    assert conv.ids.count(tok.image_id) == 16 and conv.ids.count(tok.boi_id) == 1  # the image block is whole
    with pytest.raises(ValueError, match="data.max_seq_len=20 is too short: .* 16 image tokens"):
        SampleBuilder(tok, cfg.model, load_recipe("tiny", ["data.max_seq_len=20"]).data, "", 16)


def test_empty_conversations_are_skipped_and_counted_by_reason(tmp_path):
    answer = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    entries = [{"conversations": answer}] * 3 + [{"conversations": []}, {"conversations": answer[:1]},
                                                 {"conversations": [answer[0], {"from": "gpt", "value": "  "}]}]
    (tmp_path / "und.json").write_text(json.dumps(entries))
    stream = stream_over({"und": [LlavaJsonSource(tmp_path / "und.json")]}, MixturePhase(und=1, gen=0, text=0))
    batch = next(stream.micro_batches(0, 8, 8))
    assert batch.ar.input_ids.shape[0] == 8 and stream.stats["und_ok"] == 8
    assert stream.stats["und_skipped"] == stream.stats["und_empty_conversation"] > 0


def test_mostly_broken_data_stops_with_a_clear_error(tmp_path):
    broken = CaptionJsonlSource(caption_file(tmp_path / "a", good=2, bad={"missing_file": 14}))
    stream = stream_over({"gen": [broken]}, MixturePhase(und=0, gen=1, text=0))
    with pytest.raises(DataError) as e:
        for step in range(20):
            list(stream.micro_batches(step, 8, 8))
    msg = str(e.value)
    assert "gen records read so far are broken (more than data.max_bad_fraction=0.5)" in msg
    assert str(tmp_path / "a" / "gen.jsonl") in msg and "missing_file" in msg and "latest: " in msg
    assert stream.stats["gen_ok"] + stream.stats["gen_skipped"] >= 50
    # mostly unparsable JSON lines: counted when drawn, like any other broken record
    lines = stream_over({"gen": [CaptionJsonlSource(caption_file(tmp_path / "b", good=2, bad={"bad_json": 14}))]},
                        MixturePhase(und=0, gen=1, text=0))
    with pytest.raises(DataError, match="bad_json"):
        for step in range(20):
            list(lines.micro_batches(step, 8, 8))
    # the latent cache has read every record: a mostly broken source stops before the first step
    cache = SimpleNamespace(valid=[torch.tensor([True, False, False])])
    with pytest.raises(DataError, match=r"2 of 3 gen records of .*gen.jsonl are broken"):
        stream_over({"gen": [broken]}, MixturePhase(und=0, gen=1, text=0), latent_cache=cache)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="the text source .*empty.jsonl has no records"):
        stream_over({"text": [TextJsonlSource(tmp_path / "empty.jsonl")]}, MixturePhase(und=0, gen=0, text=1))


def test_broken_records_reach_the_metrics(tmp_path, cache):
    gen = caption_file(tmp_path / "gen", good=6, bad={"bad_json": 2, "missing_file": 1, "bad_image": 1},
                       caption="a red square " * 8)  # 104 bytes: over data.max_text_len=64
    run = tmp_path / "run"
    run_tiny(run, [f"data.gen.0.path={gen}", "stages.0.max_steps=2", "stages.0.mixture=[{und: 0, gen: 1, text: 0}]"],
             stop_after=2)
    last = [r for r in metrics(run) if r["stage"] == "adaptation"][-1]
    reasons = {k: v for k, v in last.items() if k.startswith("data/gen_") and k[9:] not in ("ok", "skipped")}
    assert last["data/gen_ok"] == 16 and last["data/truncated_caption"] == 16
    assert last["data/gen_skipped"] > 0 and sum(reasons.values()) == last["data/gen_skipped"]
    assert set(reasons) <= {"data/gen_bad_json", "data/gen_missing_file", "data/gen_bad_image"}


def test_a_mostly_broken_dataset_stops_the_train_cli_early(tmp_path, cache, capsys):
    gen = caption_file(tmp_path / "gen", good=2, bad={"missing_file": 6, "bad_image": 2})
    run = tmp_path / "run"
    code, err = run_main("train.py", ["--recipe", "tiny", f"run_dir={run}", f"data.gen.0.path={gen}"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"train.py: error: 8 of 10 gen records of {gen} are broken (more than data.max_bad_fraction=0.5)" in err
    assert not list(run.glob("stages/*/checkpoints/latest"))


# ----------------------------------------------------------------------------- 5: recipes and the train CLI


@pytest.mark.parametrize("args, message", [
    (["--recipe", "/nonexistent/r.yaml"], "recipe file /nonexistent/r.yaml does not exist"),
    (["--recipe", "no_such_recipe"], "recipe 'no_such_recipe' not found"),
    (["--recipe", "{syntax}"], "is not valid YAML: expected ',' or '}', but got '<stream end>' at line 3"),
    (["--recipe", "{base}", "train.lr_typo=1"], "unknown key train.lr_typo (valid keys for TrainConfig:"),
    (["--recipe", "{base}", "train.seed=abc"], "train.seed: expected an integer, got 'abc'"),
    (["--recipe", "{base}", "train.dtype=fp8"], "train.dtype: 'fp8' is not one of ['auto', 'float32', 'bfloat16']"),
    (["--recipe", "{base}", "stages.0.max_steps=-5"], "stages.0.max_steps: must be >= 1"),
    (["--recipe", "{base}", "train.save_every=0"], "train.save_every: must be >= 1, got 0"),
    (["--recipe", "{base}", "data.max_bad_fraction=1.5"], "data.max_bad_fraction: must be in [0, 1], got 1.5"),
    (["--recipe", "{base}", "train.seed.x=1"], "override train.seed.x: train.seed is 0, not a mapping or a list"),
    (["--recipe", "{base}", "name=["], "override name: '[' is not a valid YAML value"),
    (["--recipe", "{base}", "stages"], "override 'stages' is not of the form key=value"),
    (["--recipe", "{base}", "--resume", "latest"], "--resume must be auto, none or weights, got 'latest'"),
    (["--recipe", "{base}", "--stop-after-steps", "0"], "--stop-after-steps must be >= 1"),
])
def test_train_cli_bad_input_is_one_clear_line(tmp_path, args, message):
    (tmp_path / "syntax.yaml").write_text("name: x\ntrain: {seed: 1\n")
    (tmp_path / "base.yaml").write_text(f"base: {TINY}\ntrain: {{seed: 0}}\n")
    args = [a.format(syntax=tmp_path / "syntax.yaml", base=tmp_path / "base.yaml") for a in args]
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: ") and message in last, r.stderr


def test_start_model_or_tokenizer_of_another_config_fails_before_training(tmp_path, cache):
    from janusflow.config import model_config
    from janusflow.models.janusflow import JanusFlow

    other = tmp_path / "other"
    JanusFlow(model_config("tiny", und_encoder={"image_size": 64})).save_pretrained(other)
    with pytest.raises(ValueError, match=f"{other} has model.und_encoder.image_size=64 but the recipe has "
                                         r"model.und_encoder.image_size=32"):
        run_tiny(tmp_path / "a", [f"stages.0.init_from={other}"])
    with pytest.raises(FileNotFoundError, match="stages.0.init_from: /nonexistent/model does not exist"):
        run_tiny(tmp_path / "b", ["stages.0.init_from=/nonexistent/model"])
    hf = hf_tokenizer_dir(tmp_path / "tok", words=300)
    with pytest.raises(ValueError, match=r"has 307 tokens, including the special tokens it lacked .* "
                                         r"\(llm.vocab_size\) has 272"):
        run_tiny(tmp_path / "c", ["tokenizer.kind=hf", f"tokenizer.path={hf}"])
    assert not (tmp_path / "c" / "stages").exists()


# ----------------------------------------------------------------------------- 5: model dirs and inference CLIs


def hf_tokenizer_dir(path: Path, words: int, specials: bool = True) -> Path:
    """A local HF tokenizer with BOS/EOS (when ``specials``) but none of the image tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **({BOS: 1, EOS: 2} if specials else {}), **{f"w{i}": 3 + i for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    names = {"bos_token": BOS, "eos_token": EOS} if specials else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **names).save_pretrained(str(path))
    return path


@pytest.fixture
def model_dir(tiny_model, tmp_path) -> Path:
    torch.manual_seed(0)
    codec = LatentCodec.from_config(CodecConfig(preset="tiny"))
    return export_model(tmp_path / "export", tiny_model, codec, ByteTokenizer(), "You are a test assistant.")


def broken_copy(model_dir: Path, kind: str) -> Path:
    """A copy of an exported model dir with one fault."""
    from janusflow.config import model_config
    from janusflow.models.janusflow import JanusFlow

    bad = model_dir.parent / kind
    shutil.copytree(model_dir, bad)
    if kind == "no_config":
        (bad / "config.json").unlink()
    elif kind == "no_weights":
        (bad / "model.safetensors").unlink()
    elif kind == "cut_weights":
        (bad / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
    elif kind == "bad_json":
        (bad / "config.json").write_text("{broken")
    elif kind == "other_weights":
        other = JanusFlow(model_config("tiny", llm={"hidden_size": 32}))
        other.save_pretrained(bad / "tmp")
        shutil.move(bad / "tmp" / "model.safetensors", bad / "model.safetensors")
    elif kind == "bad_vae":
        (bad / "vae" / "config.json").write_text("{")
    elif kind == "big_vocab":
        (bad / "janusflow_tokenizer.json").write_text(json.dumps({"kind": "byte", "vocab_size": 4000}))
    return bad


@pytest.mark.parametrize("tool, fault, args, message", [
    ("sample.py", "no_config", ["--prompt", "x"], "has no config.json"),
    ("chat.py", "no_weights", ["--image", "{image}", "--question", "hi"], "has no model.safetensors"),
    ("sample.py", "cut_weights", ["--prompt", "x"], "cannot read the weights"),
    ("sample.py", "bad_json", ["--prompt", "x"], "config.json is not valid JSON"),
    ("sample.py", "other_weights", ["--prompt", "x"], "beg_of_und_embed: checkpoint (1, 32) vs model (1, 64)"),
    ("sample.py", "bad_vae", ["--prompt", "x"], "cannot load the VAE in"),
    ("chat.py", "big_vocab", ["--image", "{image}", "--question", "hi"],
     "has 4000 tokens, but the model's vocabulary (llm.vocab_size) has 272"),
    ("evaluate.py", "cut_weights", ["--data", "{tmp}"], "cannot read the weights"),
    ("evaluate.py", None, ["--data", "{tmp}/nodata"], "data file not found"),
    ("sample.py", None, ["--prompt", "x", "--steps", "0"], "--steps must be >= 1"),
    ("sample.py", None, ["--prompt", "x", "--cfg", "nan"], "--cfg must be a finite number, got nan"),
    ("sample.py", None, ["--prompt", "x", "--num-images", "abc"], "argument --num-images: invalid int value: 'abc'"),
    ("evaluate.py", None, ["--data", "{tmp}", "--cfg", "inf"], "--cfg must be a finite number, got inf"),
    ("chat.py", None, ["--image", "{image}", "--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    ("chat.py", None, ["--image", "{image}", "--temperature", "-1"], "--temperature must be a number >= 0"),
    ("chat.py", None, ["--image", "{image}", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ("chat.py", None, ["--image", "{cut_image}", "--question", "hi"], "not a readable image"),
])
def test_inference_cli_bad_input(model_dir, tmp_path, capsys, tool, fault, args, message):
    Image.new("RGB", (20, 12), "blue").save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    model = broken_copy(model_dir, fault) if fault else model_dir
    fill = {"image": tmp_path / "ok.png", "cut_image": tmp_path / "cut.png", "tmp": tmp_path}
    code, err = run_main(tool, ["--model", model, "--device", "cpu", *(a.format(**fill) for a in args)], capsys)
    assert code == 2 and "Traceback" not in err and message in err, err
    assert any(": error: " in line for line in err.splitlines()), err


def test_hf_tokenizer_faults(model_dir, tmp_path):
    lacking = hf_tokenizer_dir(tmp_path / "tok", words=10)
    tok = HFTokenizer(lacking)  # the image tokens are added, as the official processor does
    assert tok.added_specials == [IMAGE, "<begin_of_image>", "<end_of_image>", "<｜begin▁of▁generation｜>"]
    assert tok.image_id == 13 and tok.pad_id == tok.eos_id == 2
    with pytest.raises(ValueError, match="has no begin- or end-of-sentence token"):
        HFTokenizer(hf_tokenizer_dir(tmp_path / "nospecial", words=10, specials=False))
    model = tmp_path / "hf_model"  # a model dir whose HF tokenizer overflows the vocabulary once they are added
    shutil.copytree(model_dir, model)
    (model / "janusflow_tokenizer.json").unlink()
    hf_tokenizer_dir(model, words=268)
    with pytest.raises(ValueError, match=r"in .*hf_model has 275 tokens, including the special tokens it lacked "
                                         r"and that were added \(<image_placeholder>, .*\), but the model's "
                                         r"vocabulary \(llm.vocab_size\) has 272"):
        load_pipeline(model)


def test_wrong_tensor_sizes_name_expected_and_got(tiny_model):
    ids = torch.ones(1, 5, dtype=torch.long)
    embeds, mask = tiny_model.embed_tokens(ids), torch.ones_like(ids)
    t = torch.tensor([0.5])
    with pytest.raises(ValueError, match=r"latents \[B, 4, H, W\], got \[1, 3, 16, 16\]"):
        tiny_model.forward_gen(embeds, mask, torch.randn(1, 3, 16, 16), t)
    with pytest.raises(ValueError, match=r"latent size \(15, 15\) does not fit .* multiples of 2"):
        tiny_model.forward_gen(embeds, mask, torch.randn(1, 4, 15, 15), t)
    with pytest.raises(ValueError, match=r"latents \[B, 4, H, W\], got \[1, 16, 16\]"):
        sample_latents(tiny_model, ids, torch.randn(1, 16, 16), steps=1, pad_id=0)
    for shape in ((1, 3, 64, 64), (1, 1, 32, 32), (3, 32, 32)):
        with pytest.raises(ValueError, match=rf"images \[B, 3, 32, 32\] \(und_encoder.image_size\), got "
                                             rf"\[{', '.join(map(str, shape))}\]"):
            tiny_model.encode_und_images(torch.randn(shape))
    assert tiny_model.forward_gen(embeds, mask, torch.randn(1, 4, 12, 20), t)[0].shape == (1, 4, 12, 20)


# ----------------------------------------------------------------------------- property tests


def _dotted_paths(node, prefix="") -> list[str]:
    if isinstance(node, dict):
        inner = [p for k, v in node.items() for p in _dotted_paths(v, f"{prefix}{k}.")]
        return [prefix.rstrip(".")] * bool(prefix) + inner
    if isinstance(node, list):
        return [prefix.rstrip(".")] + [p for i, v in enumerate(node) for p in _dotted_paths(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")]


KEYS = _dotted_paths(to_dict(load_recipe(str(TINY))))
VALUES = st.one_of(
    st.sampled_from(["", "null", "true", "0", "-1", "1", "2.5", ".nan", ".inf", "1e400", "9" * 400, "[", "{",
                     "[1, 2]", "{a: 1}", "'x'", "tiny", "shapes", "stage2", "{name}", "{x}", "runs/{name:d}",
                     "[{und: 1, gen: 1}]", "{until_step: -1}", "2020-01-01", "!!binary aGk=", "*alias"]),
    st.text(max_size=12), st.integers().map(str), st.floats().map(repr))
SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=10)
OVERRIDE_KEYS = st.one_of(st.sampled_from(KEYS), st.builds(lambda k, x: f"{k}.{x}", st.sampled_from(KEYS), SAFE_TEXT),
                          SAFE_TEXT)


@FAST
@given(st.lists(st.builds(lambda k, v: f"{k}={v}", OVERRIDE_KEYS, VALUES), min_size=1, max_size=3))
def test_random_overrides_load_or_raise_config_error(overrides):
    try:
        recipe = load_recipe(str(TINY), overrides)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(recipe, Recipe) and recipe.resolved_run_dir and recipe.stages


GOOD_PNG = image_bytes(Image.new("RGB", (8, 8), "red"))
IMAGE_NAMES = st.sampled_from(["good.png", "cut.png", "missing.png", "", " ", "a\x00b", ".", "/", "../good.png",
                               "good.png/x", "dir"])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
ANY_JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                     max_size=3), max_leaves=6)
TEXTS = st.sampled_from(["", " ", "<image>", "<image>\nWhat?", "a caption", "\u00e9\u4e2d"]) | ANY_JSON
TURNS = st.fixed_dictionaries({}, optional={
    "from": st.sampled_from(["human", "gpt", "system", "robot"]) | ANY_JSON, "value": TEXTS,
    "role": st.sampled_from(["user", "assistant", "model"]) | ANY_JSON, "content": TEXTS}) | ANY_JSON
RECORDS = st.fixed_dictionaries({}, optional={
    "image": IMAGE_NAMES | st.lists(IMAGE_NAMES, max_size=2) | ANY_JSON, "caption": TEXTS, "text": TEXTS,
    "conversations": st.lists(TURNS, max_size=4) | ANY_JSON, "messages": st.lists(TURNS, max_size=3)}) | ANY_JSON
LINES = RECORDS.map(lambda r: json.dumps(r).encode()) | st.binary(max_size=24)


def image_folder(root: Path) -> Path:
    (root / "good.png").write_bytes(GOOD_PNG)
    (root / "cut.png").write_bytes(GOOD_PNG[:30])
    (root / "dir").mkdir()
    return root


def read_everything(ds) -> None:
    """Each record is a valid sample or None counted under a foreseen reason; nothing raises."""
    for i in range(len(ds)):
        rec = ds[i]
        if isinstance(rec, CaptionRecord):
            assert rec.image.mode == "RGB" and rec.caption and rec.caption == rec.caption.strip()
        elif isinstance(rec, ConversationRecord):
            assert any(role == "assistant" and text for role, text in rec.turns)
            assert rec.image is None or rec.image.mode == "RGB"
        elif isinstance(rec, TextRecord):
            assert rec.text and rec.text == rec.text.strip()
        else:
            assert rec is None
    assert sum(ds.stats.values()) - ds.stats["bad_shard"] == len(ds)
    assert "unexpected_error" not in ds.stats, ds.last_error


@FAST
@given(st.lists(LINES, max_size=8), st.lists(RECORDS, max_size=6))
def test_garbled_json_records_are_used_or_counted(lines, records):
    with tempfile.TemporaryDirectory() as tmp:
        root = image_folder(Path(tmp))
        (root / "r.jsonl").write_bytes(b"\n".join(lines))
        (root / "r.json").write_text(json.dumps(records))
        for ds in (CaptionJsonlSource(root / "r.jsonl"), TextJsonlSource(root / "r.jsonl"),
                   LlavaJsonSource(root / "r.jsonl"), LlavaJsonSource(root / "r.json")):
            read_everything(ds)


MEMBER_NAMES = st.sampled_from(["a.png", "a.txt", "a.json", "b.jpg", "b.caption", "c.txt", "d.png", "noext",
                                "dir/e.png", "dir/e.txt", ".hidden", "f.PNG", "f.TXT", "g.tar.gz"])
MEMBER_DATA = st.one_of(st.just(GOOD_PNG), st.just(GOOD_PNG[:40]), st.binary(max_size=40),
                        RECORDS.map(lambda r: json.dumps(r).encode()), st.text(max_size=20).map(str.encode))


@FAST
@given(st.lists(st.tuples(MEMBER_NAMES, MEMBER_DATA), max_size=8), st.none() | st.floats(0.0, 1.0))
def test_garbled_webdataset_shards_are_used_or_counted(members, cut):
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "s.tar"
        with tarfile.open(shard, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        if cut is not None:
            shard.write_bytes(shard.read_bytes()[: int(cut * shard.stat().st_size)])
        read_everything(WebDatasetSource(shard))
