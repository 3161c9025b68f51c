"""A Gradio web demo: text-to-image ("Generate") and questions about an image ("Chat") with one model.

    python tools/demo.py --model runs/2to8/export --port 7860
    python tools/demo.py --model JanusFlow-1.3B --vae sdxl-vae --share
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import gradio as gr
import torch
from PIL import Image

from janusflow.pipeline import DTYPES, Pipeline, PipelineError, load_pipeline


def generate_images(pipe: Pipeline, prompt: str, seed: float, cfg_weight: float, steps: float,
                    num_images: float = 4) -> list[Image.Image]:
    """Gallery handler: ``num_images`` samples of one prompt, enlarged like the official demo for viewing."""
    try:
        images = pipe.generate([prompt] * int(num_images), seed=int(seed), steps=int(steps), cfg_weight=cfg_weight)
    except PipelineError as e:
        raise gr.Error(str(e)) from None
    side = max(images[0].width, 384)
    return [im.resize((side, side), Image.Resampling.LANCZOS) for im in images]


def answer_question(pipe: Pipeline, image: Image.Image | None, question: str, max_new_tokens: float = 256) -> str:
    """Chat handler: the model's answer about the uploaded image."""
    if image is None or not question.strip():
        raise gr.Error("upload an image and type a question")
    try:
        return pipe.answer(image, question, max_new_tokens=int(max_new_tokens))
    except PipelineError as e:
        raise gr.Error(str(e)) from None


def build_demo(pipe: Pipeline) -> gr.Blocks:
    with gr.Blocks(title="JanusFlow") as demo:
        gr.Markdown("# JanusFlow: image generation with rectified flow and image understanding in one LLM")
        with gr.Tab("Generate"):
            prompt = gr.Textbox(label="Prompt", value="a red circle above a blue square")
            with gr.Row():
                seed = gr.Number(label="Seed", value=12345, precision=0, minimum=0)
                cfg = gr.Slider(1, 10, value=2.0, step=0.5, label="CFG weight")
                steps = gr.Slider(1, 50, value=30, step=1, label="Steps")
                num = gr.Slider(1, 8, value=4, step=1, label="Images")
            run = gr.Button("Generate", variant="primary")
            gallery = gr.Gallery(label="Images", columns=4)
            run.click(partial(generate_images, pipe), [prompt, seed, cfg, steps, num], gallery, api_name="generate")
        with gr.Tab("Chat"):
            with gr.Row():
                image = gr.Image(label="Image", type="pil")
                with gr.Column():
                    question = gr.Textbox(label="Question", value="Describe the image.")
                    max_new = gr.Slider(1, 512, value=256, step=1, label="Max new tokens")
                    ask = gr.Button("Ask", variant="primary")
                    answer = gr.Textbox(label="Answer", lines=6)
            ask.click(partial(answer_question, pipe), [image, question, max_new], answer, api_name="chat")
    return demo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model dir, a run dir with export/, or an official dir")
    p.add_argument("--vae", help="AutoencoderKL directory (default: MODEL/vae)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 otherwise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    args = p.parse_args(argv)
    try:
        pipe = load_pipeline(args.model, args.vae, device=args.device, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    build_demo(pipe).launch(server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
