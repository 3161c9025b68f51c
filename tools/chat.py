"""Ask a JanusFlow model about an image; the answer streams to stdout.

    python tools/chat.py --model runs/2to8/export --image shape.png --question "What colour is the circle?"
    python tools/chat.py --model JanusFlow-1.3B --image photo.jpg       # interactive: one question per line

Without --question, questions are read from stdin until end of input or "exit"; each is answered on
its own (single-turn, as the official demo).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from janusflow.pipeline import DTYPES, PipelineError, PrintStreamer, load_image, load_pipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model dir, a run dir with export/, or an official dir")
    p.add_argument("--image", required=True, help="the image to ask about")
    p.add_argument("--question", help="ask once and exit (default: interactive)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="sampling seed (temperature > 0)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 otherwise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if not 0 <= args.temperature < math.inf:
        p.error(f"--temperature must be a number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def fail(message: str) -> None:
    print(f"chat.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def questions(interactive: bool):
    """Lines typed by the user until end of input or "exit"."""
    while True:
        try:
            line = input("question> " if interactive else "").strip()
        except EOFError:
            return
        if line.lower() in ("exit", "quit"):
            return
        if line:
            yield line


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        image = load_image(args.image)
        pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, load_vae=False)
    except (FileNotFoundError, ValueError) as e:  # missing or unreadable files, weights not matching the config
        fail(str(e))
    asked = [args.question] if args.question else questions(sys.stdin.isatty())
    streamer = PrintStreamer(pipe.tokenizer)
    for question in asked:
        try:
            pipe.answer(image, question, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, streamer=streamer, seed=args.seed)
        except PipelineError as e:  # e.g. a question too long: fatal for --question, not for the interactive loop
            if args.question:
                fail(str(e))
            print(f"chat.py: error: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
