"""Readers of real dataset formats: the shapes dataset through every reader, broken data skipped and counted,
image modes converted, and the generation / understanding transforms."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from janusflow.data import shapes as S
from janusflow.data.sources import (
    CaptionJsonlSource,
    CaptionRecord,
    ConversationRecord,
    LlavaJsonSource,
    TextJsonlSource,
    TextRecord,
    WebDatasetSource,
    expand_braces,
    open_source,
)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return S.write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", 30, 5, 32, 2, seed=1, shard_size=10)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def read_all(ds):
    records = [ds[i] for i in range(len(ds))]
    return records


# ----------------------------------------------------------------------------- the shapes dataset, every format


def test_every_format_reads_the_shapes_dataset(shapes_root):
    truth = [json.loads(line) for line in (shapes_root / "scenes_train.jsonl").read_text().splitlines()]
    und_json = json.loads((shapes_root / "und_train.json").read_text())

    und = open_source(shapes_root / "und_train.json", "llava_json")
    caps = open_source(shapes_root / "gen_train.jsonl", "caption_jsonl")
    wds = open_source(shapes_root / "gen_train-{00000..00002}.tar", "webdataset")
    text = open_source(str(shapes_root / "text_train.jsonl"), "text_jsonl")
    assert len(und) == len(caps) == len(wds) == len(text) == 30

    for i in range(30):
        scene = S.Scene.from_dict(truth[i])
        u, c, w, t = und[i], caps[i], wds[i], text[i]
        assert isinstance(u, ConversationRecord) and isinstance(c, CaptionRecord) and isinstance(w, CaptionRecord)
        assert isinstance(t, TextRecord) and t.text.endswith(".")
        for img in (u.image, c.image, w.image):
            assert img.mode == "RGB" and np.array_equal(pixels(img), pixels(S.render(scene, 32)))
        assert c.caption == w.caption == truth[i]["caption"]
        conv = und_json[i]["conversations"]
        assert u.turns == [
            ("user" if t["from"] == "human" else "assistant", t["value"].replace("<image>\n", "")) for t in conv
        ]
        assert [r for r, _ in u.turns] == ["user", "assistant"] * (len(conv) // 2)
        assert not any("<image>" in text for _, text in u.turns)
    for ds in (und, caps, wds, text):
        assert ds.stats == {"ok": 30}


def test_webdataset_accepts_globs_folders_and_lists(shapes_root):
    shards = sorted(shapes_root.glob("gen_train-*.tar"))
    assert len(WebDatasetSource(str(shapes_root / "gen_train-*.tar"))) == 30
    assert len(WebDatasetSource(shards[:2])) == 20
    assert len(WebDatasetSource(shards[2])) == 10
    folder = shapes_root.parent / "only_shards"
    folder.mkdir()
    for s in shards:
        (folder / s.name).write_bytes(s.read_bytes())
    assert len(open_source(folder, "webdataset")) == 30
    assert expand_braces("a-{08..10}-{x,y}.tar") == [
        "a-08-x.tar",
        "a-08-y.tar",
        "a-09-x.tar",
        "a-09-y.tar",
        "a-10-x.tar",
        "a-10-y.tar",
    ]


def test_open_source_names_the_problem(tmp_path, shapes_root):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        open_source(tmp_path / "nope.json", "llava_json")
    with pytest.raises(ValueError, match="parquet.*gen_train.jsonl"):
        open_source(shapes_root / "gen_train.jsonl", "parquet")
    with pytest.raises(FileNotFoundError, match="missing-"):
        open_source(tmp_path / "missing-{000..002}.tar", "webdataset")
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        open_source(shapes_root / "gen_train.jsonl", "caption_jsonl", image_root=str(tmp_path / "no_such_root"))
    (tmp_path / "broken.json").write_text('[{"image": "a.png", ')
    with pytest.raises(ValueError, match="broken.json"):
        open_source(tmp_path / "broken.json", "llava_json")


# ----------------------------------------------------------------------------- broken and unusual images


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def odd_images() -> dict[str, tuple[bytes | None, tuple[int, int, int] | None]]:
    """name -> (file bytes or None for a missing file, expected RGB of pixel (0, 0) or None when it must fail)."""
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: white after compositing
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    half = Image.new("RGBA", (8, 8), (0, 0, 255, 128))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((0, 0), 0)
    grey16 = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))
    good = png_bytes(S.render(S.Scene([S.ShapeObject("circle", "red", 0.5, 0.5, 0.5)]), 32))
    return {
        "good.png": (good, S.BACKGROUND),
        "cmyk.tif": (png_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF"), (255, 0, 0)),
        "cmyk.jpg": (png_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), None),
        "grey.png": (png_bytes(Image.new("L", (8, 8), 100)), (100, 100, 100)),
        "bilevel.png": (png_bytes(Image.new("1", (8, 8), 1)), (255, 255, 255)),
        "rgba.png": (png_bytes(rgba), (255, 255, 255)),
        "half_alpha.png": (png_bytes(half), (127, 127, 255)),
        "la.png": (png_bytes(Image.new("LA", (8, 8), (0, 0))), (255, 255, 255)),
        "palette_transparent.png": (png_bytes(pal), (255, 255, 255)),
        "grey16.png": (png_bytes(grey16), (128, 128, 128)),
        "truncated.png": (good[: len(good) // 2], None),
        "zero.png": (b"", None),
        "not_an_image.png": (b"hello, I am text" * 10, None),
        "missing.png": (None, None),
    }


def write_images(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    cases = odd_images()
    for name, (data, _) in cases.items():
        if data is not None:
            (folder / name).write_bytes(data)
    return cases


def check_converted(records, cases):
    for (name, (_, expected)), rec in zip(cases.items(), records):
        if name == "cmyk.jpg":  # lossy and encoder-dependent: only the mode and rough colour are checked
            assert rec.image.mode == "RGB" and pixels(rec.image)[0, 0, 0] > 200 and pixels(rec.image)[0, 0, 1] < 60
        elif expected is None:
            assert rec is None, name
        else:
            assert rec is not None and rec.image.mode == "RGB", name
            assert tuple(int(v) for v in pixels(rec.image)[0, 0]) == pytest.approx(expected, abs=1), name
    rgba = next(r for (n, _), r in zip(cases.items(), records) if n == "rgba.png")
    assert tuple(pixels(rgba.image)[0, 1]) == (255, 0, 0)


def test_caption_jsonl_skips_and_counts_bad_records(tmp_path):
    cases = write_images(tmp_path / "imgs")
    lines = [json.dumps({"image": name, "caption": f" caption of {name} "}) for name in cases]
    lines += [
        '{"image": "good.png", "caption": "broken json',
        json.dumps({"image": "good.png", "caption": "   "}),
        json.dumps({"image": "good.png"}),
        json.dumps(["not", "a", "dict"]),
        "",
        json.dumps({"caption": "no image field"}),
        b"\xff\xfe not utf-8".decode("latin-1"),
    ]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    ds = open_source(tmp_path / "caps.jsonl", "caption_jsonl", image_root=tmp_path / "imgs")
    assert ds.stats == {} and len(ds) == len(cases) + 6  # broken lines are records, counted when read
    records = read_all(ds)
    check_converted(records, cases)
    assert records[0].caption == "caption of good.png"
    assert records[len(cases) :] == [None] * 6
    assert ds.stats == {"ok": 10, "bad_json": 2, "bad_image": 3, "missing_file": 1, "empty_text": 2, "bad_record": 2}
    assert "truncated" in ds.last_error["bad_image"] or "not_an_image" in ds.last_error["bad_image"]


def test_llava_json_skips_and_counts_bad_records(tmp_path):
    cases = write_images(tmp_path / "imgs")
    convo = [{"from": "human", "value": "<image>\n  What is this? "}, {"from": "gpt", "value": " a shape \n"}]
    entries = [{"id": n, "image": n, "conversations": convo} for n in cases]
    entries += [
        {"id": "text only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {
            "id": "openai style",
            "image": ["good.png"],
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "<image>Q"},
                {"role": "assistant", "content": "A"},
            ],
        },
        {"id": "no answer", "image": "good.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]},
        {"id": "empty", "image": "good.png", "conversations": []},
        {"id": "blank answer", "image": "good.png", "conversations": convo[:1] + [{"from": "gpt", "value": " "}]},
        {"id": "bad role", "image": "good.png", "conversations": [{"from": "robot", "value": "x"}] + convo[1:]},
        {"id": "placeholder, no image", "conversations": convo},
        {"id": "two images", "image": ["good.png", "grey.png"], "conversations": convo},
        "not a dict",
    ]
    (tmp_path / "und.json").write_text(json.dumps(entries))
    ds = LlavaJsonSource(tmp_path / "und.json", image_root=tmp_path / "imgs")
    records = read_all(ds)
    check_converted(records, cases)
    assert records[0].turns == [("user", "What is this?"), ("assistant", "a shape")]
    text_only, openai = records[len(cases)], records[len(cases) + 1]
    assert text_only.image is None and text_only.turns == [("user", "hi"), ("assistant", "hello")]
    assert openai.image.size == (32, 32) and openai.turns == [("user", "Q"), ("assistant", "A")]
    assert records[len(cases) + 2 :] == [None] * 7
    assert ds.stats == {
        "ok": 12,
        "bad_image": 3,
        "missing_file": 1,
        "empty_conversation": 3,
        "bad_record": 2,
        "missing_image": 1,
        "multi_image": 1,
    }

    # the JSONL variant: a broken line is a record counted as bad_json when read
    (tmp_path / "und.jsonl").write_text(json.dumps(entries[0]) + "\n{broken\n" + json.dumps(entries[1]) + "\n")
    ds = LlavaJsonSource(tmp_path / "und.jsonl", image_root=tmp_path / "imgs")
    assert len(ds) == 3 and ds.stats == {}
    assert ds[1] is None and ds.stats == {"bad_json": 1} and "und.jsonl:2" in ds.last_error["bad_json"]


def tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_skips_and_counts_bad_samples(tmp_path):
    cases = odd_images()
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (name, (data, _)) in enumerate(cases.items()):
            if data is not None:
                tar_add(tar, f"s{i:03d}.{name.rsplit('.', 1)[1]}", data)
            tar_add(tar, f"s{i:03d}.txt", f"caption {name}".encode())
        good = cases["good.png"][0]
        tar_add(tar, "sub/dir/j.png", good)
        tar_add(tar, "sub/dir/j.json", json.dumps({"caption": "from json"}).encode())
        tar_add(tar, "nocap.png", good)
        tar_add(tar, "badjson.png", good)
        tar_add(tar, "badjson.json", b"{nope")
        tar_add(tar, "emptycap.png", good)
        tar_add(tar, "emptycap.txt", b"  \n")
    ds = WebDatasetSource(str(shard))
    records = read_all(ds)
    assert len(ds) == len(cases) + 4
    check_converted(records[: len(cases)], cases)
    assert records[0].caption == "caption good.png"
    assert records[len(cases)].caption == "from json" and records[len(cases) + 1 :] == [None] * 3
    assert ds.stats == {"ok": 11, "bad_image": 3, "missing_file": 1, "empty_text": 2, "bad_json": 1}

    # shards cut short: the samples before the damage stay readable and the shard is counted as bad
    small = tmp_path / "small.tar"
    with tarfile.open(small, "w") as tar:
        for key in ("a", "b"):
            tar_add(tar, f"{key}.txt", f"caption {key}".encode())
            tar_add(tar, f"{key}.png", good)
    members = tarfile.open(small).getmembers()
    data = small.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: members[3].offset_data + members[3].size // 2])  # in b.png
    cut = WebDatasetSource(tmp_path / "cut.tar")
    assert cut.stats == {"bad_shard": 1} and "cut.tar" in cut.last_error["bad_shard"]
    assert len(cut) == 2 and cut[0].caption == "caption a" and cut[1] is None
    assert cut.stats == {"bad_shard": 1, "ok": 1, "bad_image": 1} and "early" in cut.last_error["bad_image"]
    (tmp_path / "cut2.tar").write_bytes(data[: members[2].offset])  # between two members: tarfile sees no error
    cut2 = WebDatasetSource(tmp_path / "cut2.tar")
    assert cut2.stats == {"bad_shard": 1} and "truncated" in cut2.last_error["bad_shard"]
    assert [r.caption for r in read_all(cut2)] == ["caption a"]
    assert WebDatasetSource(small).stats == {}


def test_text_jsonl_skips_and_counts_bad_lines(tmp_path):
    (tmp_path / "t.jsonl").write_text(
        '{"text": " one line. "}\n{"text": ""}\n{broken\n"a bare string"\n{"txt": "wrong key"}\n7\n\n'
    )
    ds = TextJsonlSource(tmp_path / "t.jsonl")
    assert len(ds) == 6 and ds.stats == {}
    assert read_all(ds) == [TextRecord("one line."), None, None, TextRecord("a bare string"), None, None]
    assert ds.stats == {"bad_json": 1, "ok": 2, "empty_text": 2, "bad_record": 1}
    assert ds[-1] is None and list(ds)[0] == TextRecord("one line.")
    with pytest.raises(IndexError):
        ds[6]


def test_caption_source_default_image_root_is_the_files_folder(tmp_path):
    write_images(tmp_path / "d" / "imgs")
    (tmp_path / "d" / "caps.jsonl").write_text(json.dumps({"image": "imgs/good.png", "text": "t"}) + "\n")
    assert CaptionJsonlSource(tmp_path / "d" / "caps.jsonl")[0].caption == "t"
