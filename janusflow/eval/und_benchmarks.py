"""Understanding benchmarks: POPE and VQAv2-format question files, answered through the batched chat path.

POPE (github AoiDragon/POPE, output/coco/coco_pope_{random,popular,adversarial}.json): JSON lines
    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "label": "yes"}
scored as its evaluate.py: an answer is "no" when its first sentence has the word No, no or not, else "yes";
accuracy, precision, recall and F1 of "yes", and the yes-ratio of the predictions.
VQAv2 (visualqa.org): ``{"data_subtype": "val2014", "questions": [{"question_id", "image_id", "question"}]}``, images
``COCO_<data_subtype>_<image_id:012d>.jpg``, optional annotations ``{"annotations": [{"question_id", "answer_type",
"answers": [{"answer": ...} x 10]}]}``, scored with the official accuracy (janusflow.eval.vqa_answers).

    questions = read_pope(Path("coco_pope_random.json"), Path("val2014"))
    answers = answer_questions(pipe, questions, Path("out/predictions.jsonl"))     # {question_id: answer}
    scores = pope_scores([answers[q.qid] for q in questions], [q.label for q in questions])

Answers are greedy, with the question followed by ``prompt_suffix`` (the LLaVA / lmms-eval instruction
"Answer the question using a single word or phrase." by default), and appended to a JSON-lines file after
every batch, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from janusflow.eval.runner import answer_batch
from janusflow.eval.vqa_answers import vqa_accuracy
from janusflow.pipeline import Pipeline, load_image

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


class QuestionFileError(ValueError):
    """A malformed question, annotation or prediction file: the message names it."""


@dataclass(frozen=True)
class Question:
    qid: int | str
    image: Path
    text: str
    label: str = ""
    """POPE: "yes" or "no"."""


# ----------------------------------------------------------------------------- POPE


def read_pope(path: Path, images: Path) -> list[Question]:
    """A POPE question file (JSON lines) with its images folder."""
    out = []
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.append(Question(rec["question_id"], Path(images) / rec["image"], rec["text"], rec["label"].lower()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise QuestionFileError(f"{path}, line {number}: not a POPE question "
                                    '({"question_id", "image", "text", "label"})') from None
        if out[-1].label not in ("yes", "no"):
            raise QuestionFileError(f"{path}, line {number}: label {out[-1].label!r} is not yes or no")
    return out


def pope_yes_no(answer: str) -> str:
    """POPE's reading of a free answer: "no" if the first sentence has the word No, no or not."""
    first = answer.split(".")[0] if "." in answer else answer
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_scores(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class "yes"), yes-ratio of the predictions, and the counts.

    A ratio with nothing to divide is 0 (POPE's script would stop there)."""
    if len(answers) != len(labels) or not labels:
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels (need >= 1)")
    predicted = [pope_yes_no(a) for a in answers]
    pairs = list(zip(predicted, labels))
    tp, fp = pairs.count(("yes", "yes")), pairs.count(("yes", "no"))
    tn, fn = pairs.count(("no", "no")), pairs.count(("no", "yes"))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": predicted.count("yes") / len(predicted), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# ----------------------------------------------------------------------------- VQAv2


def read_vqav2(questions_path: Path, images: Path) -> list[Question]:
    """An official VQAv2 question file; image names follow COCO: COCO_<data_subtype>_<image_id:012d>.jpg."""
    data = _read_json(questions_path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list) or "data_subtype" not in data:
        raise QuestionFileError(f"{questions_path}: expected the VQAv2 layout "
                                '{"data_subtype": ..., "questions": [{"question_id", "image_id", "question"}]}')
    try:
        return [Question(q["question_id"], Path(images) / f"COCO_{data['data_subtype']}_{int(q['image_id']):012d}.jpg",
                         q["question"]) for q in data["questions"]]
    except (KeyError, TypeError, ValueError):
        raise QuestionFileError(f"{questions_path}: a question lacks question_id, image_id or question") from None


def read_vqav2_answers(path: Path) -> dict[int | str, dict]:
    """Annotations -> {question_id: {"answers": [10 strings], "answer_type": ...}}."""
    data = _read_json(path)
    try:
        return {a["question_id"]: {"answers": [x["answer"] for x in a["answers"]], "answer_type": a["answer_type"]}
                for a in data["annotations"]}
    except (KeyError, TypeError):
        raise QuestionFileError(f"{path}: expected {{\"annotations\": [{{\"question_id\", \"answer_type\", "
                                "\"answers\": [{\"answer\"}]}]}") from None


def vqav2_scores(questions: Sequence[Question], answers: dict, truth: dict) -> dict[str, float]:
    """Mean VQA accuracy overall and per answer type ("accuracy/yes/no", "accuracy/number", "accuracy/other")."""
    per_type: dict[str, list[float]] = {}
    for q in questions:
        if q.qid not in truth:
            raise QuestionFileError(f"question {q.qid} has no annotation: is it the annotation file of this split?")
        per_type.setdefault(truth[q.qid]["answer_type"], []).append(vqa_accuracy(answers[q.qid],
                                                                                 truth[q.qid]["answers"]))
    every = [a for accs in per_type.values() for a in accs]
    return {"accuracy": sum(every) / len(every), **{f"accuracy/{t}": sum(a) / len(a) for t, a in per_type.items()}}


# ----------------------------------------------------------------------------- answering


def answer_questions(pipe: Pipeline, questions: Sequence[Question], predictions: Path, *, batch_size: int = 16,
                     max_new_tokens: int = 16, prompt_suffix: str = SHORT_ANSWER) -> dict:
    """{question_id: answer} for every question, answering only those not yet in ``predictions`` (JSON lines)."""
    done = read_predictions(predictions)
    todo = [q for q in questions if q.qid not in done]
    missing = sorted({q.image for q in todo if not q.image.is_file()})
    if missing:
        raise QuestionFileError(f"{len(missing)} images not found, e.g. {missing[0]}: is --images the folder of "
                                "the question file's images?")
    predictions.parent.mkdir(parents=True, exist_ok=True)
    with open(predictions, "a", encoding="utf-8") as out, tqdm(total=len(questions), initial=len(questions) - len(todo),
                                                               unit="question", desc="answering") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            pairs = [(load_image(q.image), q.text + prompt_suffix) for q in chunk]
            texts = answer_batch(pipe, pairs, batch_size=len(pairs), max_new_tokens=max_new_tokens)
            out.write("".join(json.dumps({"question_id": q.qid, "answer": a}) + "\n" for q, a in zip(chunk, texts)))
            out.flush()
            done.update({q.qid: a for q, a in zip(chunk, texts)})
            bar.update(len(chunk))
    return done


def read_predictions(path: Path) -> dict:
    """{question_id: answer} of a predictions file; a torn last line (a killed run) is cut off."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    out = {}
    for number, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
            out[rec["question_id"]] = rec["answer"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number < len(lines):
                raise QuestionFileError(f"{path}, line {number}: not a prediction; pass a fresh --out") from None
            path.write_text("".join(lines[:-1]), encoding="utf-8")
    return out


def answer_requests(pipe: Pipeline, requests: Sequence[tuple[str, Sequence[Image.Image]]], *,
                    max_new_tokens: int = 128, until: Sequence[str] = (), batch_size: int = 16) -> list[str]:
    """Greedy answers to (context, images) requests as evaluation harnesses send them (e.g. lmms-eval).

    "<image>" placeholders are dropped from the context (the chat template places the image), each request
    must carry one image, and an answer is cut at the first ``until`` string."""
    pairs = []
    for context, images in requests:
        if len(images) != 1:
            raise ValueError(f"JanusFlow answers about one image per question; a request has {len(images)}")
        pairs.append((images[0].convert("RGB"), context.replace("<image>", "").strip()))
    answers = answer_batch(pipe, pairs, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return [min((a.split(stop)[0] for stop in until if stop), key=len, default=a) for a in answers]


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QuestionFileError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _read_json(path: Path):
    try:
        return json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise QuestionFileError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
