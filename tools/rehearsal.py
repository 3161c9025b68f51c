"""A rehearsal of the real run on CPU: the 1.3B recipe at official widths and reduced depth, end to end.

    python tools/rehearsal.py [--out runs/rehearsal] [--steps 2] [--pack-length 1024] [--ranks 2]
    make rehearsal

1. An official-layout model directory at the release's widths (LLM 2048 wide with 2 blocks; SigLIP 1024 wide with
   2 blocks at 384 px; generation encoder/decoder 768), random weights, with a BPE tokenizer; an SDXL-geometry
   AutoencoderKL with tiny widths (384 px -> 48 x 48 x 4 latents: 576 image tokens). The vocabulary is
   ``--vocab`` (32,000): the release's 102,400 makes the embedding and head 420M of the model's 630M parameters,
   and two fp32 ranks with AdamW states and an EMA copy then need ~30 GB (``--vocab 102400`` on a larger machine).
2. Data in the real formats on disk: LLaVA JSON with JPEG images, WebDataset shards of JPEG + caption, text JSONL.
3. ``recipes/janusflow-1.3b.yaml``'s three stages, starting from that directory, with packing (rows of
   ``--pack-length`` tokens, the rehearsal's context), ZeRO-3 on ``--ranks`` CPU ranks and activation
   checkpointing; a few steps per stage, then the export.
4. One image sampled from the export with ``tools/sample.py``.

It prints each rank's peak memory and step time, and DeepSpeed's estimate of the model-state memory of the real
1.3B model under ZeRO-1/2/3 on one node of 8 GPUs. Nothing is downloaded. Like the real run it keeps every stage's
final weights, EMA and last checkpoints (optimizer states included): about 25 GB under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from janusflow.config import model_config
from janusflow.data.shapes import write_shapes_dataset
from janusflow.io import read_jsonl_records

ROOT = Path(__file__).resolve().parents[1]
RELEASE_VOCAB = 102400
SDXL_GEOMETRY_TINY = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                          block_out_channels=[8, 16, 16, 16], act_fn="silu", sample_size=384, scaling_factor=0.13025,
                          down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def write_data(out: Path, num: int) -> dict[str, str]:
    """The shapes world at 384 px, its generation images as JPEG WebDataset shards, its conversations with JPEGs."""
    import tarfile
    from io import BytesIO

    from PIL import Image

    shapes = write_shapes_dataset(out / "shapes", num_train=num, num_val=4, image_size=384, max_objects=2, seed=0)
    jpegs = out / "jpeg"
    jpegs.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "gen-00000.tar", "w") as tar:
        for i, row in enumerate(read_jsonl_records(shapes / "gen_train.jsonl")):
            buf = BytesIO()
            Image.open(shapes / row["image"]).convert("RGB").save(buf, "JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("txt", row["caption"].encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, BytesIO(data))
            (jpegs / f"{i:06d}.jpg").write_bytes(buf.getvalue())
    records = json.loads((shapes / "und_train.json").read_text())
    for i, r in enumerate(records):
        r["image"] = f"jpeg/{i % num:06d}.jpg"  # the conversations' own scenes are not needed: any JPEG will do
    (out / "und.json").write_text(json.dumps(records))
    return {"und": str(out / "und.json"), "gen": str(out / "gen-00000.tar"), "text": str(shapes / "text_train.jsonl")}


def shape(vocab: int) -> dict:
    """The model overrides of the rehearsal: 2 LLM and 2 SigLIP blocks, and the vocabulary."""
    return {"llm": {"num_hidden_layers": 2, "vocab_size": vocab}, "und_encoder": {"layers": 2}}


def write_model(out: Path, corpus: list[str], vocab: int) -> tuple[Path, Path]:
    """The official-layout model directory (random weights, the tokenizer beside them) and the VAE directory."""
    from diffusers import AutoencoderKL

    from janusflow.models.janusflow import JanusFlow
    from janusflow.tokenizer import train_bpe_tokenizer

    model_dir, vae_dir = out / f"JanusFlow-rehearsal-vocab{vocab}", out / "sdxl-vae-tiny"
    if not (model_dir / "model.safetensors").exists():
        torch.manual_seed(0)
        JanusFlow(model_config("janusflow-1.3b", **shape(vocab))).save_pretrained(model_dir)
        train_bpe_tokenizer(corpus, 1024, model_dir)
    if not (vae_dir / "config.json").exists():
        torch.manual_seed(0)
        AutoencoderKL.from_config(SDXL_GEOMETRY_TINY).save_pretrained(str(vae_dir))
    return model_dir, vae_dir


def write_recipe(out: Path, data: dict, model_dir: Path, vae_dir: Path, steps: int, pack_length: int,
                 ranks: int, vocab: int) -> Path:
    """recipes/janusflow-1.3b.yaml with the rehearsal's paths, depth, context and step counts."""
    stage = {"max_steps": steps, "warmup_steps": 1, "batch_size": ranks, "micro_batch_size": 1}
    recipe = {
        "base": str(ROOT / "recipes" / "janusflow-1.3b.yaml"), "name": "rehearsal", "run_dir": str(out / "run"),
        "model": shape(vocab), "codec": {"path": str(vae_dir)}, "tokenizer": {"kind": "hf", "path": str(model_dir)},
        "llm_path": None, "und_encoder_path": None,
        "data": {"und": [{"path": data["und"], "format": "llava_json"},
                         {"path": data["gen"], "format": "webdataset", "template": "caption"}],
                 "gen": [{"path": data["gen"], "format": "webdataset", "template": "raw"}],
                 "text": [{"path": data["text"], "format": "text_jsonl"}],
                 "max_seq_len": pack_length, "pack_length": pack_length, "latent_crops": 2},
        "train": {"zero_stage": 3, "deepspeed_config": str(ROOT / "recipes" / "deepspeed" / "zero3.json"),
                  "repa": {"layer": 2}},
        "stages": [{**stage, "name": "adaptation", "policy": "stage1", "batch_unit": "sequences",
                    "init_from": str(model_dir), "mixture": [{"und": 50, "gen": 50, "text": 0}]},
                   {**stage, "name": "pretrain", "policy": "stage2", "batch_unit": "sequences",
                    "mixture": [{"und": 30, "gen": 50, "text": 20}]},
                   {**stage, "name": "sft", "policy": "stage3", "batch_unit": "sequences", "lr": 2.0e-5,
                    "mixture": [{"und": 21, "gen": 70, "text": 9}]}],
        "logging": {"log_every": 1, "sample_prompts": [], "wandb_mode": "disabled"},
    }
    path = out / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def model_state_estimates(gpus: int = 8) -> list[str]:
    """DeepSpeed's model-state memory estimates of the real JanusFlow-1.3B (all parameters trained, stage 3)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from janusflow.models.janusflow import JanusFlow

    with torch.device("meta"):
        model = JanusFlow(model_config("janusflow-1.3b"))
    total = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    # ZeRO-1 (no estimator in DeepSpeed): zero2's terms with the 16-bit gradients whole instead of partitioned.
    zero1 = 2 * total + 2 * total + int(16 * total / gpus)
    _, zero2 = estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, 1, cpu_offload=False,
                                                        cpu_offload_params=False)
    return [f"real JanusFlow-1.3B: {total / 1e9:.2f}B parameters (largest tensor {largest / 1e6:.0f}M); DeepSpeed's "
            f"model-state estimate per GPU on {gpus} GPUs (bf16, AdamW, no offload):",
            f"  ZeRO-1 {zero1 / 2**30:.1f} GiB, ZeRO-2 {zero2 / 2**30:.1f} GiB, ZeRO-3 {zero3 / 2**30:.1f} GiB "
            f"(activations come on top: checkpointing keeps them to a layer's inputs)"]


def run(cmd: list[str], env: dict) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/rehearsal", help="output folder (model, data, run)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per stage")
    p.add_argument("--pack-length", type=int, default=1024, help="packed row length (the rehearsal's context)")
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks (ZeRO-3)")
    p.add_argument("--num-images", type=int, default=24, help="training images of the data")
    p.add_argument("--vocab", type=int, default=32000, help=f"LLM vocabulary (the release's: {RELEASE_VOCAB})")
    args = p.parse_args(argv)
    start, out = time.time(), Path(args.out).resolve()
    data = write_data(out / "data", args.num_images)
    corpus = [r["caption"] for r in read_jsonl_records(Path(data["text"]).parent / "gen_train.jsonl")]
    model_dir, vae_dir = write_model(out, corpus + [r["text"] for r in read_jsonl_records(data["text"])], args.vocab)
    recipe = write_recipe(out, data, model_dir, vae_dir, args.steps, args.pack_length, args.ranks, args.vocab)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1",
           "JANUSFLOW_CACHE": str(out / "_cache"), "HF_HUB_OFFLINE": "1"}
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
         str(ROOT / "tools" / "train.py"), "--recipe", str(recipe)], env)
    run([sys.executable, str(ROOT / "tools" / "sample.py"), "--model", str(out / "run" / "export"), "--prompt",
         "a red circle", "--steps", "2", "--out", str(out / "samples")], env)
    for line in model_state_estimates():
        print(line)
    print(f"rehearsal done in {time.time() - start:.0f} s: {out / 'run' / 'export'}, {out / 'samples'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
