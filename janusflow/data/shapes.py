"""The procedural "shapes world": coloured shapes on a light background, with captions, VQA and text lines.

Everything is a pure function of a ``random.Random``, so a seed fixes the world. ``write_shapes_dataset`` writes
it to disk in the real dataset formats (caption JSONL + WebDataset tars for generation, LLaVA JSON for
understanding, text JSONL) so that the embedded default exercises the same loaders as a real run.
"""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from janusflow.io import atomic_path

BACKGROUND: tuple[int, int, int] = (240, 240, 240)
# Hues 0, 27, 53, 129, 223, 280 degrees, all strongly saturated: the detector classifies by hue, which is
# unchanged when a colour is blended with the grey background (anti-aliasing, blur).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 120, 10),
    "yellow": (240, 215, 20),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (150, 50, 200),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
)  # fmt: skip
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
REL_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below",),
}
CAPTION_PREFIXES: tuple[str, ...] = ("", "", "", "a photo of ", "an image of ", "a picture of ")

MAX_OBJECTS = 6
CROSS_ARM = 0.36  # arm width of a cross, as a fraction of its size
GAP = 0.06  # minimum free space between two objects' boxes, so that blur never merges them
MARGIN = 0.03  # minimum distance of a box from the image border
DUPLICATE_PROB = 0.3  # chance that a further object repeats an earlier (kind, colour): makes counting meaningful
POSITION_THRESHOLD = 0.1  # GenEval's: offsets are reduced by this fraction of the two boxes' sizes
SUPERSAMPLE = 4
DATASET_VERSION = 2  # 2: larger objects (size_range)
MANIFEST = "manifest.json"


@dataclass
class ShapeObject:
    kind: str
    color: str
    cx: float
    """Centre of the object's bounding box, x from the left, as a fraction of the image width."""
    cy: float
    """Centre of the bounding box, y from the top, as a fraction of the image height."""
    size: float
    """Side of the (square) bounding box as a fraction of the image size."""


@dataclass
class Scene:
    objects: list[ShapeObject]

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls([ShapeObject(**o) for o in d["objects"]])


@dataclass
class ShapesSample:
    """Everything the world produces for one image."""

    scene: Scene
    image: Image.Image
    caption: str
    qa: list[tuple[str, str]]
    text: str


# ----------------------------------------------------------------------------- geometry


def size_range(n: int) -> tuple[float, float]:
    """Box sides (fractions of the image) for a scene of n objects: as large as the layout allows, so that the
    outline that tells the kinds apart spans several generation tokens (a 32 px image is 8 x 8 tokens; a lone
    object of 0.3-0.5 covered 2-4 of them, and a toy model drew blobs: shapes-GenEval shape accuracy 0.48 ->
    0.88 for 0.45-0.7, same recipe). Two boxes of 0.42 still fit side by side with the margin and the gap."""
    return {1: (0.45, 0.7), 2: (0.3, 0.42), 3: (0.22, 0.34), 4: (0.2, 0.3)}.get(n, (0.16, 0.22))


def _apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    need = (a[2] + b[2]) / 2 + GAP
    return abs(a[0] - b[0]) >= need or abs(a[1] - b[1]) >= need


def place_objects(rng: random.Random, sizes: list[float], tries: int = 200) -> list[tuple[float, float]] | None:
    """Random non-overlapping centres for boxes of the given sizes, or None when the greedy placement fails."""
    boxes: list[tuple[float, float, float]] = []
    for s in sizes:
        lo, hi = MARGIN + s / 2, 1 - MARGIN - s / 2
        if lo > hi:
            return None
        for _ in range(tries):
            box = (rng.uniform(lo, hi), rng.uniform(lo, hi), s)
            if all(_apart(box, other) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return [(x, y) for x, y, _ in boxes]


def box_relations(
    a: tuple[float, float, float, float], b: tuple[float, float, float, float], threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """GenEval's relative position of box A=(cx, cy, w, h) to box B, in image coordinates (y down).

    The centre offset is shrunk by ``threshold`` times the summed box sizes per axis; a relation holds when the
    shrunk offset, over the full offset's length, exceeds 0.5 along that axis (within ~60 degrees of it).
    """
    dx, dy = a[0] - b[0], a[1] - b[1]
    norm = math.hypot(dx, dy)
    if norm == 0:
        return set()
    rx = math.copysign(max(abs(dx) - threshold * (a[2] + b[2]), 0.0), dx) / norm
    ry = math.copysign(max(abs(dy) - threshold * (a[3] + b[3]), 0.0), dy) / norm
    out = set()
    if rx < -0.5:
        out.add("left of")
    if rx > 0.5:
        out.add("right of")
    if ry < -0.5:
        out.add("above")
    if ry > 0.5:
        out.add("below")
    return out


def relations(a: ShapeObject, b: ShapeObject) -> set[str]:
    """Which of RELATIONS hold for object ``a`` relative to object ``b``."""
    return box_relations((a.cx, a.cy, a.size, a.size), (b.cx, b.cy, b.size, b.size))


def sample_scene(rng: random.Random, max_objects: int, min_objects: int = 1) -> Scene:
    """A scene of ``min_objects..max_objects`` non-overlapping objects; some repeat an earlier kind and colour."""
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
    n = rng.randint(min_objects, max_objects)
    attrs: list[tuple[str, str]] = []
    for _ in range(n):
        if attrs and rng.random() < DUPLICATE_PROB:
            attrs.append(rng.choice(attrs))
        else:
            attrs.append((rng.choice(KINDS), rng.choice(COLORS)))
    lo, hi = size_range(n)
    while True:
        sizes = [rng.uniform(lo, hi) for _ in range(n)]
        centres = place_objects(rng, sizes)
        if centres is not None:
            break
    objects = [
        ShapeObject(k, c, round(x, 4), round(y, 4), round(s, 4)) for (k, c), (x, y), s in zip(attrs, centres, sizes)
    ]
    return Scene(objects)


# ----------------------------------------------------------------------------- rendering


def shape_polygon(kind: str, cx: float, cy: float, size: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal kind in the units of cx, cy, size (None for the circle)."""
    h = size / 2
    if kind == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "cross":
        a = size * CROSS_ARM / 2
        return [
            (cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a), (cx + h, cy + a), (cx + a, cy + a),
            (cx + a, cy + h), (cx - a, cy + h), (cx - a, cy + a), (cx - h, cy + a), (cx - h, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if kind == "circle":
        return None
    raise ValueError(f"unknown shape kind {kind!r}; known: {KINDS}")


def render(scene: Scene, image_size: int) -> Image.Image:
    """RGB image of the scene, anti-aliased by drawing at 4x and box-filtering down."""
    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        color = PALETTE[o.color]
        # PIL fills the pixels on the outline too: drawing 1 px smaller (at 4x) keeps the areas exact
        cx, cy, s = o.cx * big - 0.5, o.cy * big - 0.5, o.size * big - 1
        poly = shape_polygon(o.kind, cx, cy, s)
        if poly is None:
            draw.ellipse([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], fill=color)
        else:
            draw.polygon(poly, fill=color)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- language


def describe(kind: str, color: str | None, count: int = 1) -> str:
    """'a red circle', 'an orange square', 'two green triangles' (colour optional)."""
    noun = kind if count == 1 else PLURALS[kind]
    words = f"{color} {noun}" if color else noun
    if count == 1:
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"
    return f"{NUMBER_WORDS[count]} {words}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def caption(scene: Scene, rng: random.Random) -> str:
    """A short caption naming every object's colour and kind, counts, and for two objects often their relation."""
    groups = list(Counter((o.kind, o.color) for o in scene.objects).items())
    rng.shuffle(groups)
    prefix = rng.choice(CAPTION_PREFIXES) if len(groups) <= 2 else ""  # long lists stay short without it
    if len(scene.objects) == 2 and len(groups) == 2:
        a, b = rng.sample(scene.objects, 2)
        rels = sorted(relations(a, b))
        if rels and rng.random() < 0.6:
            rel = rng.choice(REL_WORDS[rng.choice(rels)])
            return f"{prefix}{describe(a.kind, a.color)} {rel} {describe(b.kind, b.color)}"
    return prefix + _join([describe(k, c, n) for (k, c), n in groups])


def _attribute_question(objs: list, rng: random.Random, by: str, ask: str, question) -> list[tuple[str, str]]:
    """A question about attribute ``ask`` of the objects sharing a value of ``by`` (e.g. the colour of the
    squares), asked only of a ``by`` value whose objects agree on it; none when no value qualifies."""
    values = {g: {getattr(o, ask) for o in objs if getattr(o, by) == g} for g in {getattr(o, by) for o in objs}}
    agreeing = sorted(g for g, vs in values.items() if len(vs) == 1)
    if not agreeing:
        return []
    g = rng.choice(agreeing)
    return [(question(g, sum(getattr(o, by) == g for o in objs)), next(iter(values[g])))]


def vqa(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Question/answer pairs about the scene, one per question type that applies, in random order.

    Types: object count, count of one kind (possibly 0), colour of a kind, shape of a colour, existence of a
    (colour, kind), and the relative position of two distinct objects. Answers are single words or digits.
    """
    objs = scene.objects
    out: list[tuple[str, str]] = []
    q = rng.choice(("How many objects are there?", "How many shapes are there?", "How many shapes are in the image?"))
    out.append((q, str(len(objs))))
    kind = rng.choice(KINDS)
    out.append((f"How many {PLURALS[kind]} are there?", str(sum(o.kind == kind for o in objs))))

    out += _attribute_question(objs, rng, "kind", "color", lambda k, n: f"What color is the {k}?" if n == 1
                               else f"What color are the {PLURALS[k]}?")
    out += _attribute_question(objs, rng, "color", "kind", lambda c, n: f"What shape is the {c} object?" if n == 1
                               else f"What shape are the {c} objects?")

    present = sorted({(o.kind, o.color) for o in objs})
    absent = [(k, c) for k in KINDS for c in COLORS if (k, c) not in present]
    k, c = rng.choice(present) if rng.random() < 0.5 or not absent else rng.choice(absent)
    out.append((f"Is there {describe(k, c)}?", "yes" if (k, c) in present else "no"))

    counts = Counter((o.kind, o.color) for o in objs)
    unique = [o for o in objs if counts[(o.kind, o.color)] == 1]
    pairs = [(a, b) for a in unique for b in unique if a is not b and relations(a, b)]
    if pairs:
        a, b = rng.choice(pairs)
        rels = sorted(relations(a, b))
        the_a, the_b = f"the {a.color} {a.kind}", f"the {b.color} {b.kind}"
        if len(rels) == 1 and rng.random() < 0.3:
            out.append((f"Where is {the_a} relative to {the_b}?", rels[0].split()[0]))
        else:
            rel = rng.choice(rels)
            yes = rng.random() < 0.5
            out.append((f"Is {the_a} {rel if yes else OPPOSITE[rel]} {the_b}?", "yes" if yes else "no"))
    rng.shuffle(out)
    return out


_CORNERS = {"circle": 0, "square": 4, "triangle": 3, "cross": 12}
_SIDE_FACTS = {
    "circle": ("is round", "has no corners", "has no straight sides"),
    "square": ("has four equal sides", "has four corners", "has four right angles"),
    "triangle": ("has three sides", "has three corners", "points up"),
    "cross": ("has four arms", "looks like a plus sign", "has twelve corners"),
}


def text_line(rng: random.Random) -> str:
    """One text-only sentence about the shapes world (shapes, colours, counting, relations)."""
    k1, k2 = rng.sample(KINDS, 2)
    c1, c2, c3 = rng.sample(COLORS, 3)
    a, b, n = rng.randint(0, 5), rng.randint(0, 5), rng.randint(2, 3)
    polygon = rng.choice(("square", "triangle"))
    w = NUMBER_WORDS
    lines = (
        f"a {k1} {rng.choice(_SIDE_FACTS[k1])}.",
        f"{c1} and {c2} are colors.",
        f"{PLURALS[k1]} and {PLURALS[k2]} are shapes.",
        f"{w[a]} plus {w[b]} is {w[a + b]}.",
        f"{w[a + 1]} comes after {w[a]}.",
        f"{describe(k1, c1)} is a {k1} that is {c1}.",
        f"a {k1} can be {c1}, {c2} or {c3}.",
        f"if a {k1} is left of a {k2}, the {k2} is right of the {k1}.",
        f"if a {k1} is above a {k2}, the {k2} is below the {k1}.",
        rng.choice(("left is the opposite of right.", "above is the opposite of below.")),
        f"{w[n]} {PLURALS[polygon]} have {w[n * _CORNERS[polygon]]} corners.",
    )
    return rng.choice(lines)


# ----------------------------------------------------------------------------- samples and the on-disk dataset


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """The random stream of one sample: independent per (seed, split, index), so samples are random-access."""
    return random.Random(f"janusflow-shapes:{seed}:{split}:{index}")


def make_sample(seed: int, split: str, index: int, image_size: int, max_objects: int) -> ShapesSample:
    rng = sample_rng(seed, split, index)
    scene = sample_scene(rng, max_objects)
    cap = caption(scene, rng)
    qa = vqa(scene, rng)[: rng.randint(1, 2)]
    return ShapesSample(scene, render(scene, image_size), cap, qa, text_line(rng))


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: shards are byte-identical across runs
    tar.addfile(info, io.BytesIO(data))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_split(root: Path, split: str, n: int, image_size: int, max_objects: int, seed: int, shard_size: int) -> dict:
    (root / "images" / split).mkdir(parents=True)
    gen, und, text, scenes, shards = [], [], [], [], []
    tar: tarfile.TarFile | None = None
    try:
        for i in range(n):
            s = make_sample(seed, split, i, image_size, max_objects)
            rel = f"images/{split}/{i:06d}.png"
            png = _png_bytes(s.image)
            (root / rel).write_bytes(png)
            if i % shard_size == 0:
                if tar is not None:
                    tar.close()
                shards.append(f"gen_{split}-{i // shard_size:05d}.tar")
                tar = tarfile.open(root / shards[-1], "w", format=tarfile.USTAR_FORMAT)
            assert tar is not None
            _tar_add(tar, f"{i:06d}.png", png)
            _tar_add(tar, f"{i:06d}.txt", s.caption.encode())
            gen.append({"image": rel, "caption": s.caption})
            conv = []
            for j, (q, a) in enumerate(s.qa):
                conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
            und.append({"id": f"{split}-{i:06d}", "image": rel, "conversations": conv})
            text.append({"text": s.text})
            scenes.append({"image": rel, "caption": s.caption, **s.scene.to_dict()})
    finally:
        if tar is not None:
            tar.close()
    _write_jsonl(root / f"gen_{split}.jsonl", gen)
    (root / f"und_{split}.json").write_text(json.dumps(und, indent=1))
    _write_jsonl(root / f"text_{split}.jsonl", text)
    _write_jsonl(root / f"scenes_{split}.jsonl", scenes)
    return {
        "num_images": n,
        "images": f"images/{split}",
        "gen_jsonl": f"gen_{split}.jsonl",
        "gen_tar": shards,
        "und_json": f"und_{split}.json",
        "text_jsonl": f"text_{split}.jsonl",
        "scenes_jsonl": f"scenes_{split}.jsonl",
    }


def read_manifest(root: str | Path) -> dict | None:
    """The dataset's manifest, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _matches(root: Path, params: dict) -> bool:
    manifest = read_manifest(root)
    return manifest is not None and manifest.get("params") == params


def write_shapes_dataset(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    image_size: int,
    max_objects: int,
    seed: int,
    shard_size: int = 1000,
) -> Path:
    """Write the shapes world to ``out_dir`` in the real formats and return its path.

    Idempotent: when ``out_dir/manifest.json`` records the same parameters, nothing is written. The dataset is
    built in a temporary sibling folder and renamed into place, so an interrupted write never looks complete,
    and concurrent writers (e.g. several ranks) end with one complete copy. An existing dataset with other
    parameters is replaced; a non-empty folder that is not a shapes dataset is never touched.
    """
    out = Path(out_dir)
    if num_train < 0 or num_val < 0 or image_size < 8 or shard_size < 1:
        raise ValueError(f"bad shapes dataset parameters: {num_train=} {num_val=} {image_size=} {shard_size=}")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    params = {
        "version": DATASET_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "max_objects": max_objects,
        "seed": seed,
        "shard_size": shard_size,
    }
    if _matches(out, params):
        return out
    if out.exists() and not (out.is_dir() and (read_manifest(out) is not None or not any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not a shapes dataset; refusing to overwrite it")
    with atomic_path(out, done=lambda: _matches(out, params)) as tmp:  # done: a concurrent writer finished first
        tmp.mkdir()
        splits = {
            split: _write_split(tmp, split, n, image_size, max_objects, seed, shard_size)
            for split, n in (("train", num_train), ("val", num_val))
        }
        manifest = {"name": "janusflow-shapes", "params": params, "splits": splits}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
