"""Understanding benchmarks through the chat path of tools/chat.py, batched (janusflow.eval.und_benchmarks).

    python tools/eval_und.py pope --model runs/2to8/export --questions POPE/output/coco/coco_pope_random.json \
        --images coco/val2014 --out pope_random          # accuracy, precision, recall, F1, yes-ratio
    python tools/eval_und.py vqav2 --model JanusFlow-1.3B --questions v2_OpenEnded_mscoco_val2014_questions.json \
        --annotations v2_mscoco_val2014_annotations.json --images coco/val2014 --out vqav2_val

--out is a folder: predictions.jsonl (rerun to continue an interrupted run), scores.json, and for vqav2
results.json, the [{"question_id", "answer"}] list the VQAv2 evaluation server takes (test-dev has no annotations).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from janusflow.eval.cli import format_scores
from janusflow.eval.und_benchmarks import (
    SHORT_ANSWER,
    QuestionFileError,
    answer_questions,
    pope_scores,
    read_pope,
    read_vqav2,
    read_vqav2_answers,
    vqav2_scores,
)
from janusflow.pipeline import DTYPES, PipelineError, load_pipeline


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="benchmark", required=True)
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--model", required=True, help="exported model dir, a run dir with export/, or an official dir")
    parent.add_argument("--questions", required=True, help="the question file")
    parent.add_argument("--images", required=True, help="the folder holding the question files' images")
    parent.add_argument("--out", required=True, help="output folder (rerun with the same one to continue)")
    parent.add_argument("--prompt-suffix", default=SHORT_ANSWER, help="appended to every question")
    parent.add_argument("--batch-size", type=int, default=16)
    parent.add_argument("--limit", type=int, help="only the first N questions (a quick look)")
    parent.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 otherwise")
    parent.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pope = sub.add_parser("pope", parents=[parent], help="POPE (AoiDragon/POPE question files)")
    pope.add_argument("--max-new-tokens", type=int, default=128, help="(lmms-eval's pope: 128)")
    vqa = sub.add_parser("vqav2", parents=[parent], help="VQAv2-format question files")
    vqa.add_argument("--annotations", help="the split's annotation file (omit for test-dev: results.json only)")
    vqa.add_argument("--max-new-tokens", type=int, default=16, help="(lmms-eval's vqav2: 16)")
    args = p.parse_args(argv)
    for name in ("batch_size", "limit", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    """Answer the questions (resuming), write the outputs and return the scores (empty without ground truth)."""
    out = Path(args.out)
    reader = read_pope if args.benchmark == "pope" else read_vqav2
    questions = reader(Path(args.questions), Path(args.images))[:args.limit]
    truth = read_vqav2_answers(Path(args.annotations)) if getattr(args, "annotations", None) else None
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, load_vae=False)
    answers = answer_questions(pipe, questions, out / "predictions.jsonl", batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, prompt_suffix=args.prompt_suffix)
    if args.benchmark == "pope":
        scores = pope_scores([answers[q.qid] for q in questions], [q.label for q in questions])
    else:
        results = [{"question_id": q.qid, "answer": answers[q.qid]} for q in questions]
        (out / "results.json").write_text(json.dumps(results))
        scores = vqav2_scores(questions, answers, truth) if truth is not None else {}
    scores["num_questions"] = len(questions)
    (out / "scores.json").write_text(json.dumps({"scores": scores, "settings": vars(args)}, indent=2))
    return scores


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        scores = evaluate(args)
    except (QuestionFileError, PipelineError, FileNotFoundError, ValueError) as e:
        print(f"eval_und.py: error: {e}", file=sys.stderr)
        return 2
    print(format_scores(scores))
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
