"""POPE and VQAv2 (janusflow.eval.und_benchmarks, vqa_answers, tools/eval_und.py): the scorers' formulas by hand,
the question formats, answers equal to the chat path's, resuming, and the harness adapter for lmms-eval."""

import json

import pytest
from PIL import Image

from janusflow.eval import und_benchmarks as und
from janusflow.eval.runner import answer_batch
from janusflow.eval.vqa_answers import normalize_vqa, process_digit_article, process_punctuation, vqa_accuracy
from janusflow.pipeline import load_pipeline
from tests.model_dirs import exported_dir, official_dirs
from tests.test_pipeline import load_tool

POPE_LINES = [
    {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a red circle in the image?",
     "label": "yes"},
    {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat in the image?", "label": "no"},
    {"question_id": 3, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a square in the image?",
     "label": "yes"},
]
VQA_QUESTIONS = {"data_subtype": "val2014", "questions": [
    {"question_id": 10, "image_id": 1, "question": "What colour is the circle?"},
    {"question_id": 11, "image_id": 2, "question": "How many squares are there?"},
    {"question_id": 12, "image_id": 2, "question": "Is it blue?"}]}


# ----------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("text, expected", [
    ("yes, sir", "yes sir"),            # a mark next to a space goes
    ("black/white", "black white"),     # ... one between words becomes a space
    ("3,000 (approx)", "3000 approx"),  # any mark goes in a text with a comma between digits
    ("3.5 m.", "3.5 m"),                # a period not before a digit goes
])
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_process_digit_article_and_the_official_period_count():
    assert process_digit_article("The Two dogs dont bark at an apple") == "2 dogs don't bark at apple"
    assert process_digit_article("none of them") == "0 of them"
    assert process_punctuation("." * 40) == "." * 8  # the official call removes at most 32
    assert normalize_vqa("  Two Dogs.\n") == "2 dogs"


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_over_the_ten_leave_one_out_subsets(matches, expected):
    # k of 10 humans agree with the prediction: the subsets without one of them see k - 1, the others k
    humans = ["2"] * matches + ["3"] * (10 - matches) if matches < 10 else ["2"] * 10
    assert vqa_accuracy("two.", humans) == pytest.approx(expected)


def test_vqa_humans_are_normalised_only_when_they_disagree():
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0  # the official script leaves ten identical answers as they are
    assert vqa_accuracy("yes", ["Yes"] * 9 + ["no"]) == 1.0


def test_pope_reading_and_scores_by_hand():
    answers = ["Yes, there is.", "No.", "There is not a cat", "yes", "I don't know", "No, there isn't"]
    assert [und.pope_yes_no(a) for a in answers] == ["yes", "no", "no", "yes", "yes", "no"]
    labels = ["yes", "no", "yes", "yes", "no", "yes"]
    # tp: 0, 3; fp: 4; tn: 1; fn: 2, 5
    scores = und.pope_scores(answers, labels)
    assert (scores["tp"], scores["fp"], scores["tn"], scores["fn"]) == (2, 1, 1, 2)
    assert scores["accuracy"] == pytest.approx(3 / 6) and scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4) and scores["f1"] == pytest.approx(4 / 7)
    assert scores["yes_ratio"] == pytest.approx(3 / 6)
    assert und.pope_scores(["no"], ["yes"])["precision"] == 0.0  # nothing predicted "yes"


# ----------------------------------------------------------------------------- the files and the tool


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("und")
    (root / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "images" / "COCO_val2014_000000000001.jpg")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(root / "images" / "COCO_val2014_000000000002.jpg")
    (root / "pope.json").write_text("".join(json.dumps(line) + "\n" for line in POPE_LINES))
    (root / "vqa_questions.json").write_text(json.dumps(VQA_QUESTIONS))
    return root


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return exported_dir(tmp_path_factory.mktemp("export"))


def run(*args) -> int:
    return load_tool("eval_und.py").main([str(a) for a in args])


def test_readers(bench):
    pope = und.read_pope(bench / "pope.json", bench / "images")
    assert [(q.qid, q.image.name, q.label) for q in pope] == [(1, "COCO_val2014_000000000001.jpg", "yes"),
                                                              (2, "COCO_val2014_000000000001.jpg", "no"),
                                                              (3, "COCO_val2014_000000000002.jpg", "yes")]
    vqa = und.read_vqav2(bench / "vqa_questions.json", bench / "images")
    assert [(q.qid, q.image.name, q.text) for q in vqa][1] == (11, "COCO_val2014_000000000002.jpg",
                                                              "How many squares are there?")


def test_pope_tool_answers_as_the_chat_path_scores_and_resumes(bench, export, tmp_path, capsys):
    out = tmp_path / "pope"
    args = ["pope", "--model", export, "--questions", bench / "pope.json", "--images", bench / "images", "--out", out,
            "--batch-size", 2, "--max-new-tokens", 6, "--device", "cpu"]
    assert run(*args) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    answers = {json.loads(x)["question_id"]: json.loads(x)["answer"] for x in lines}
    pipe = load_pipeline(export, load_vae=False)
    for q in POPE_LINES:  # one at a time through Pipeline.answer, as tools/chat.py
        image = Image.open(bench / "images" / q["image"]).convert("RGB")
        assert answers[q["question_id"]] == pipe.answer(image, q["text"] + und.SHORT_ANSWER, max_new_tokens=6)
    scores = json.loads((out / "scores.json").read_text())["scores"]
    expected = und.pope_scores([answers[q["question_id"]] for q in POPE_LINES], [q["label"] for q in POPE_LINES])
    assert scores == {**expected, "num_questions": 3}
    assert "yes_ratio" in capsys.readouterr().out
    (out / "predictions.jsonl").write_text("".join(x + "\n" for x in lines[:2]) + '{"question_id": 3, "ans')
    assert run(*args) == 0  # the torn line of a killed run is dropped and its question answered again
    assert (out / "predictions.jsonl").read_text().splitlines() == lines


def test_vqav2_tool_scores_with_annotations_and_writes_results(bench, export, tmp_path):
    out = tmp_path / "vqa"
    args = ["vqav2", "--model", export, "--questions", bench / "vqa_questions.json", "--images", bench / "images",
            "--out", out, "--max-new-tokens", 4, "--device", "cpu"]
    assert run(*args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["question_id"] for r in results] == [10, 11, 12]
    said = {r["question_id"]: normalize_vqa(r["answer"]) for r in results}
    annotations = {"annotations": [  # humans agreeing with the model: 10, 3 and 0 of 10
        {"question_id": 10, "answer_type": "other", "answers": [{"answer": said[10]}] * 10},
        {"question_id": 11, "answer_type": "number", "answers": [{"answer": said[11]}] * 3 + [{"answer": "zz"}] * 7},
        {"question_id": 12, "answer_type": "yes/no", "answers": [{"answer": "zz"}] * 10}]}
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    assert run(*args, "--annotations", tmp_path / "annotations.json") == 0  # answers come from predictions.jsonl
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert scores["accuracy"] == pytest.approx((1.0 + 0.9 + 0.0) / 3)
    assert (scores["accuracy/other"], scores["accuracy/number"], scores["accuracy/yes/no"]) == pytest.approx(
        (1.0, 0.9, 0.0))


def test_official_layout_model(bench, tmp_path_factory):
    model_dir, _ = official_dirs(tmp_path_factory.mktemp("official"))  # chat needs no VAE
    out = tmp_path_factory.mktemp("out")
    assert run("pope", "--model", model_dir, "--questions", bench / "pope.json", "--images", bench / "images",
               "--out", out, "--limit", 2, "--max-new-tokens", 3, "--device", "cpu") == 0
    assert json.loads((out / "scores.json").read_text())["scores"]["num_questions"] == 2


def test_answer_requests_for_harnesses(bench, export):
    pipe = load_pipeline(export, load_vae=False)
    image = Image.open(bench / "images" / "COCO_val2014_000000000002.jpg")
    plain = answer_batch(pipe, [(image.convert("RGB"), "What is it?")], max_new_tokens=8)[0]
    assert und.answer_requests(pipe, [("<image>\nWhat is it?", [image])], max_new_tokens=8) == [plain]
    assert len(plain) > 1
    cut = und.answer_requests(pipe, [("What is it?", [image])], max_new_tokens=8, until=[plain[1]])
    assert cut == [plain.split(plain[1])[0]]
    with pytest.raises(ValueError, match="one image per question; a request has 2"):
        und.answer_requests(pipe, [("What?", [image, image])])


@pytest.mark.parametrize("benchmark, content, message", [
    ("pope", '{"question_id": 1, "image": "x.jpg", "text": "Is it?"}\n', "pope.json, line 1: not a POPE question"),
    ("pope", '{"question_id": 1, "image": "x.jpg", "text": "Is it?", "label": "maybe"}\n', "label 'maybe'"),
    ("pope", '{"question_id": 1, "image": "missing.jpg", "text": "Is it?", "label": "no"}\n',
     "1 images not found, e.g. "),
    ("vqav2", '{"questions": []}', "expected the VQAv2 layout"),
])
def test_bad_files_name_the_file(bench, export, tmp_path, capsys, benchmark, content, message):
    (tmp_path / "pope.json").write_text(content)
    assert run(benchmark, "--model", export, "--questions", tmp_path / "pope.json", "--images", bench / "images",
               "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("eval_und.py: error: ") and message in err
