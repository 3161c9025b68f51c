"""The procedural shapes world: determinism, scene constraints, rendering, language consistency, on-disk dataset."""

import json
import random
import re
import socket
import tarfile
import time
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from janusflow.data import shapes as S


def scenes(seed: int, n: int, max_objects: int) -> list[S.Scene]:
    rng = random.Random(seed)
    return [S.sample_scene(rng, max_objects) for _ in range(n)]


def test_samples_are_deterministic_by_seed_and_index():
    a = S.make_sample(7, "train", 3, 32, 3)
    b = S.make_sample(7, "train", 3, 32, 3)
    assert a.scene == b.scene and a.caption == b.caption and a.qa == b.qa and a.text == b.text
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    others = [
        S.make_sample(8, "train", 3, 32, 3),
        S.make_sample(7, "val", 3, 32, 3),
        S.make_sample(7, "train", 4, 32, 3),
    ]
    assert all(o.scene != a.scene for o in others)


def test_scenes_respect_counts_sizes_and_spacing():
    all_scenes = scenes(0, 400, 4)
    counts = Counter(len(s.objects) for s in all_scenes)
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) > 60
    with_repeat = 0
    for s in all_scenes:
        lo, hi = S.size_range(len(s.objects))
        for o in s.objects:
            assert o.kind in S.KINDS and o.color in S.COLORS
            assert lo - 1e-4 <= o.size <= hi + 1e-4
            assert S.MARGIN - 1e-3 <= o.cx - o.size / 2 and o.cx + o.size / 2 <= 1 - S.MARGIN + 1e-3
            assert S.MARGIN - 1e-3 <= o.cy - o.size / 2 and o.cy + o.size / 2 <= 1 - S.MARGIN + 1e-3
        for a, b in combinations(s.objects, 2):
            need = (a.size + b.size) / 2 + S.GAP - 1e-3
            assert abs(a.cx - b.cx) >= need or abs(a.cy - b.cy) >= need
        keys = Counter((o.kind, o.color) for o in s.objects)
        with_repeat += max(keys.values()) > 1
    multi = sum(len(s.objects) > 1 for s in all_scenes)
    assert 0.2 < with_repeat / multi < 0.7  # repeats exist (counting is meaningful) but are not the norm


def test_render_draws_the_palette_colours_with_the_right_areas():
    size = 64
    for kind, area in (("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5), ("cross", 2 * 0.36 - 0.36**2)):
        obj = S.ShapeObject(kind, "blue", 0.503, 0.507, 0.5)  # off the pixel grid
        img = S.render(S.Scene([obj]), size)
        assert img.mode == "RGB" and img.size == (size, size)
        a = np.asarray(img).astype(float)
        assert tuple(a[32, 32]) == S.PALETTE["blue"]
        assert tuple(a[1, 1]) == S.BACKGROUND
        # anti-aliased coverage: fraction of the way from background to blue, summed, is the shape's area
        blue, bg = np.array(S.PALETTE["blue"], float), np.array(S.BACKGROUND, float)
        cover = ((a - bg) @ (blue - bg)) / ((blue - bg) @ (blue - bg))
        assert cover.sum() / (size * 0.5) ** 2 == pytest.approx(area, rel=0.03)
        assert 0 < np.mean((cover > 0.05) & (cover < 0.95))  # there are anti-aliased edge pixels


def test_relations_follow_geneval_geometry():
    a = S.ShapeObject("circle", "red", 0.2, 0.5, 0.3)
    b = S.ShapeObject("square", "blue", 0.8, 0.5, 0.3)
    assert S.relations(a, b) == {"left of"} and S.relations(b, a) == {"right of"}
    c = S.ShapeObject("cross", "green", 0.5, 0.15, 0.2)
    d = S.ShapeObject("cross", "green", 0.5, 0.85, 0.2)
    assert S.relations(c, d) == {"above"} and S.relations(d, c) == {"below"}
    # close horizontally: the 0.1 * (w_a + w_b) margin eats the offset
    g, h = S.ShapeObject("circle", "red", 0.45, 0.5, 0.3), S.ShapeObject("circle", "red", 0.5, 0.5, 0.3)
    assert S.relations(g, h) == set()
    # diagonal: both relations hold
    e, f = S.ShapeObject("circle", "red", 0.2, 0.2, 0.2), S.ShapeObject("square", "red", 0.8, 0.8, 0.2)
    assert S.relations(e, f) == {"left of", "above"}


PHRASE = re.compile(r"\b(a|an|one|two|three|four|five|six) (red|orange|yellow|green|blue|purple) (\w+)")
PLURAL_TO_KIND = {p: k for k, p in S.PLURALS.items()} | {k: k for k in S.KINDS}


def test_captions_state_every_object_and_true_relations():
    used_relation = used_prefix = 0
    for i, scene in enumerate(scenes(1, 500, 4)):
        cap = S.caption(scene, random.Random(i))
        assert len(cap) <= 80, cap
        mentioned = Counter()
        for count, color, noun in PHRASE.findall(cap):
            n = {"a": 1, "an": 1}.get(count) or S.NUMBER_WORDS.index(count)
            mentioned[(PLURAL_TO_KIND[noun], color)] += n
        assert mentioned == Counter((o.kind, o.color) for o in scene.objects), cap
        rel = next((r for r in ("left of", "right of", "above", "below") if f" {r} " in cap), None)
        if rel is not None:
            used_relation += 1
            left, right = cap.split(f" {rel} ")
            (_, ca, ka), (_, cb, kb) = PHRASE.findall(left)[0], PHRASE.findall(right)[0]
            a = next(o for o in scene.objects if (o.kind, o.color) == (ka, ca))
            b = next(o for o in scene.objects if (o.kind, o.color) == (kb, cb))
            assert rel in S.relations(a, b), (cap, scene)
        used_prefix += cap.startswith(("a photo of", "an image of", "a picture of"))
    assert used_relation > 40 and used_prefix > 50  # two-object scenes are ~1/4; 60% of those state a relation


def answer_of(question: str, scene: S.Scene) -> str:
    """Independent re-derivation of the answer to each question form vqa() asks."""
    objs = scene.objects
    if m := re.fullmatch(r"How many (objects|shapes) (are there|are in the image)\?", question):
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(sum(o.kind == PLURAL_TO_KIND[m[1]] for o in objs))
    if m := re.fullmatch(r"What color (is|are) the (\w+)\?", question):
        colors = {o.color for o in objs if o.kind == PLURAL_TO_KIND[m[2]]}
        assert len(colors) == 1, question
        return colors.pop()
    if m := re.fullmatch(r"What shape (is|are) the (\w+) objects?\?", question):
        kinds = {o.kind for o in objs if o.color == m[2]}
        assert len(kinds) == 1, question
        return kinds.pop()
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o.color, o.kind) == (m[1], m[2]) for o in objs) else "no"
    two = r"the (\w+) (\w+)"
    if m := re.fullmatch(rf"Is {two} (left of|right of|above|below) {two}\?", question):
        (a,) = [o for o in objs if (o.color, o.kind) == (m[1], m[2])]
        (b,) = [o for o in objs if (o.color, o.kind) == (m[4], m[5])]
        return "yes" if m[3] in S.relations(a, b) else "no"
    if m := re.fullmatch(rf"Where is {two} relative to {two}\?", question):
        (a,) = [o for o in objs if (o.color, o.kind) == (m[1], m[2])]
        (b,) = [o for o in objs if (o.color, o.kind) == (m[3], m[4])]
        (rel,) = S.relations(a, b)
        return rel.split()[0]
    raise AssertionError(f"unexpected question form: {question}")


def test_vqa_answers_are_consistent_with_the_scene():
    kinds = Counter()
    answers = Counter()
    for i, scene in enumerate(scenes(2, 400, 3)):
        qa = S.vqa(scene, random.Random(i))
        assert len(qa) >= 4 and len({q for q, _ in qa}) == len(qa)
        for q, a in qa:
            assert a == answer_of(q, scene), (q, a, scene)
            assert " " not in a
            kinds[q.split()[0] + " " + q.split()[1]] += 1
            answers[a] += 1
    assert {"How many", "What color", "What shape", "Is there", "Is the", "Where is"} <= set(kinds)
    assert answers["yes"] > 100 and answers["no"] > 100 and answers["0"] > 50


def test_text_lines_are_true_sentences():
    lines = [S.text_line(random.Random(i)) for i in range(300)]
    assert lines == [S.text_line(random.Random(i)) for i in range(300)]
    assert len(set(lines)) > 100
    for line in lines:
        assert line.endswith(".") and len(line) <= 80
        if m := re.fullmatch(r"(\w+) plus (\w+) is (\w+)\.", line):
            a, b, c = (S.NUMBER_WORDS.index(w) for w in m.groups())
            assert a + b == c


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_written_dataset_has_every_format(tmp_path):
    root = S.write_shapes_dataset(tmp_path / "shapes", 25, 7, 32, 2, seed=3, shard_size=10)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["params"]["num_train"] == 25 and manifest["splits"]["train"]["gen_tar"] == [
        "gen_train-00000.tar",
        "gen_train-00001.tar",
        "gen_train-00002.tar",
    ]
    for split, n in (("train", 25), ("val", 7)):
        gen = read_jsonl(root / f"gen_{split}.jsonl")
        und = json.loads((root / f"und_{split}.json").read_text())
        text = read_jsonl(root / f"text_{split}.jsonl")
        truth = read_jsonl(root / f"scenes_{split}.jsonl")
        assert len(gen) == len(und) == len(text) == len(truth) == n
        assert len(list((root / "images" / split).glob("*.png"))) == n
        for i in range(n):
            rel = f"images/{split}/{i:06d}.png"
            assert gen[i]["image"] == und[i]["image"] == truth[i]["image"] == rel
            scene = S.Scene.from_dict(truth[i])
            # the PNG on disk is exactly the render of the recorded scene
            assert np.array_equal(np.asarray(Image.open(root / rel)), np.asarray(S.render(scene, 32)))
            assert gen[i]["caption"] == truth[i]["caption"]
            conv = und[i]["conversations"]
            assert len(conv) in (2, 4) and [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n") and "<image>" not in "".join(t["value"] for t in conv[1:])
            for q, a in zip(conv[::2], conv[1::2]):
                assert a["value"] == answer_of(q["value"].removeprefix("<image>\n"), scene)
            assert text[i]["text"].endswith(".")
        members = {}
        for shard in sorted(root.glob(f"gen_{split}-*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    members[m.name] = tar.extractfile(m).read()
        assert len(members) == 2 * n
        for i in range(n):
            assert members[f"{i:06d}.png"] == (root / f"images/{split}/{i:06d}.png").read_bytes()
            assert members[f"{i:06d}.txt"].decode() == gen[i]["caption"]


def test_dataset_is_reused_replaced_and_reproducible(tmp_path):
    out = tmp_path / "shapes"
    S.write_shapes_dataset(out, 12, 4, 32, 2, seed=0)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert S.write_shapes_dataset(out, 12, 4, 32, 2, seed=0) == out
    assert time.perf_counter() - t0 < 0.05 and (out / "manifest.json").stat().st_mtime_ns == stamp
    # other parameters: replaced in place, no temporary folders left over
    S.write_shapes_dataset(out, 9, 4, 32, 2, seed=0)
    assert len(read_jsonl(out / "gen_train.jsonl")) == 9 and len(list((out / "images/train").iterdir())) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
    # byte-identical when written again elsewhere (shard mtimes are fixed)
    other = S.write_shapes_dataset(tmp_path / "again", 9, 4, 32, 2, seed=0)
    for name in ("gen_train-00000.tar", "und_train.json", "text_val.jsonl", "scenes_train.jsonl"):
        assert (out / name).read_bytes() == (other / name).read_bytes()


def test_val_is_a_different_stream_than_train(tmp_path):
    root = S.write_shapes_dataset(tmp_path / "shapes", 50, 50, 32, 2, seed=0)
    train = read_jsonl(root / "scenes_train.jsonl")
    val = read_jsonl(root / "scenes_val.jsonl")
    train_objects = {json.dumps(t["objects"]) for t in train}
    assert not any(json.dumps(v["objects"]) in train_objects for v in val)
    assert (root / "images/train/000000.png").read_bytes() != (root / "images/val/000000.png").read_bytes()


def test_interrupted_or_foreign_output_is_never_taken_for_a_dataset(tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        S.write_shapes_dataset(foreign, 4, 2, 32, 2, seed=0)
    assert (foreign / "notes.txt").read_text() == "keep me"

    # a writer killed earlier left a temporary folder (its process is gone): it is cleaned up
    stale = tmp_path / f".shapes.tmp-999999999-deadbeef-{socket.gethostname()}"
    (stale / "images").mkdir(parents=True)

    real = S._write_split

    def dies_on_val(root, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return real(root, split, *args)

    monkeypatch.setattr(S, "_write_split", dies_on_val)
    with pytest.raises(KeyboardInterrupt):
        S.write_shapes_dataset(tmp_path / "shapes", 4, 2, 32, 2, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    monkeypatch.setattr(S, "_write_split", real)
    root = S.write_shapes_dataset(tmp_path / "shapes", 4, 2, 32, 2, seed=0)
    assert S.read_manifest(root)["params"]["num_train"] == 4


def test_preview_tool_writes_a_grid(tmp_path):
    from tools.make_shapes import main

    main(
        ["--out", str(tmp_path / "d"), "--num-train", "16", "--num-val", "2", "--image-size", "32"]
        + ["--preview", str(tmp_path / "p.png")]
    )
    grid = Image.open(tmp_path / "p.png")
    assert grid.size[0] >= 4 * 128 and S.read_manifest(tmp_path / "d")["params"]["num_train"] == 16
