"""GenEval-style evaluation of generated shapes images.

``make_prompts`` writes prompts of GenEval's six categories in the wording family of the shapes captions;
``detect`` finds the coloured shapes in an image without any learned model (hue classes, connected components,
template matching of the normalised silhouette); ``score`` applies GenEval's rules (right kinds with the right
counts; colours for colors/color_attr; the relation, with GenEval's margin, for position).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from janusflow.data.shapes import (
    COLORS,
    KINDS,
    PALETTE,
    Scene,
    ShapeObject,
    box_relations,
    describe,
    place_objects,
    render,
    size_range,
)

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
PROMPT_RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
CHROMA_MIN = 60.0  # on 0..255: below it a pixel is background (palette chromas are 130..240, background 0)
MIN_AREA_FRAC = 0.01  # smaller blobs are noise (the smallest shapes cover >= 0.013)
MAX_SIDE = 128  # larger images are box-filtered down first: shapes stay legible, labelling stays fast
FEATURE_SIDE = 16
# A blob is a shape only when its silhouette is this close (RMS per feature pixel) to a template and its box is
# nearly square: clean renders reach <= 0.17, heavily blurred ones ~0.25, stray blobs and smears mostly more.
MAX_SHAPE_RMS = 0.25
MAX_ASPECT = 1.6
UNKNOWN = "unknown"

_RGB = np.array(list(PALETTE.values()), dtype=np.float32)
_CHROMA = _RGB.max(1) - _RGB.min(1)


@dataclass
class Detection:
    kind: str
    color: str
    cx: float
    """Box centre as a fraction of the image width (from the left)."""
    cy: float
    """Box centre as a fraction of the image height (from the top)."""
    area: float
    """Covered area as a fraction of the image."""
    w: float = 0.0
    h: float = 0.0


@dataclass
class PromptSpec:
    category: str
    prompt: str
    objects: list[dict]
    """GenEval's "include" list: {"kind", "color", "count"} and, for position, "position": [relation, index]."""


# ----------------------------------------------------------------------------- prompts


def _pick_two(rng: random.Random, distinct_colors: bool) -> tuple[str, str, str, str]:
    k1, k2 = rng.sample(KINDS, 2)
    c1, c2 = rng.sample(COLORS, 2) if distinct_colors else (rng.choice(COLORS), rng.choice(COLORS))
    return k1, c1, k2, c2


def _make_spec(category: str, rng: random.Random, max_count: int) -> PromptSpec:
    k, c = rng.choice(KINDS), rng.choice(COLORS)
    if category == "single_object":
        return PromptSpec(category, f"a photo of {describe(k, c)}", [{"kind": k, "color": c, "count": 1}])
    if category == "colors":
        return PromptSpec(category, describe(k, c), [{"kind": k, "color": c, "count": 1}])
    if category == "counting":
        n = rng.randint(2, max_count)
        return PromptSpec(category, describe(k, c, n), [{"kind": k, "color": c, "count": n}])
    if category in ("two_object", "color_attr"):
        k1, c1, k2, c2 = _pick_two(rng, distinct_colors=category == "color_attr")
        objects = [{"kind": k1, "color": c1, "count": 1}, {"kind": k2, "color": c2, "count": 1}]
        return PromptSpec(category, f"{describe(k1, c1)} and {describe(k2, c2)}", objects)
    if category == "position":
        k1, c1, k2, c2 = _pick_two(rng, distinct_colors=False)
        rel = rng.choice(tuple(PROMPT_RELATIONS))
        prompt = f"{describe(k1, c1)} {PROMPT_RELATIONS[rel]} {describe(k2, c2)}"
        # GenEval's layout: the reference object first, the positioned one refers to it by index
        objects = [{"kind": k2, "color": c2, "count": 1}, {"kind": k1, "color": c1, "count": 1, "position": [rel, 0]}]
        return PromptSpec(category, prompt, objects)
    raise ValueError(f"unknown GenEval category {category!r}; known: {CATEGORIES}")


def make_prompts(seed: int, n_per_category: int, max_count: int = 2) -> list[PromptSpec]:
    """``n_per_category`` prompts of each GenEval category (distinct within a category while possible).

    ``max_count`` is the largest count of the counting prompts: keep it <= the dataset's max_objects.
    """
    if max_count < 2:
        raise ValueError(f"max_count must be >= 2 for counting prompts, got {max_count}")
    rng = random.Random(f"janusflow-shapes-geneval:{seed}")
    specs = []
    for category in CATEGORIES:
        seen: set[str] = set()
        for _ in range(n_per_category):
            for _ in range(100):
                spec = _make_spec(category, rng, max_count)
                if spec.prompt not in seen:
                    break
            seen.add(spec.prompt)
            specs.append(spec)
    return specs


def _positions_hold(spec: PromptSpec, objs: list[ShapeObject], owner: list[int], margin: float) -> bool:
    for i, o in enumerate(spec.objects):
        if not o.get("position"):
            continue
        rel, ref = o["position"]
        for a in (x for x, k in zip(objs, owner) if k == i):
            for b in (x for x, k in zip(objs, owner) if k == ref):
                if rel not in box_relations((a.cx, a.cy, a.size, a.size), (b.cx, b.cy, b.size, b.size), margin):
                    return False
    return True


def spec_scene(spec: PromptSpec, rng: random.Random, margin: float = 0.2) -> Scene:
    """A scene that satisfies ``spec`` (relations hold with a wider margin than scoring needs): the oracle image."""
    owner = [i for i, o in enumerate(spec.objects) for _ in range(o.get("count", 1))]  # spec index per object
    lo, hi = size_range(len(owner))
    for _ in range(10_000):
        sizes = [rng.uniform(lo, hi) for _ in owner]
        centres = place_objects(rng, sizes)
        if centres is None:
            continue
        objs = [
            ShapeObject(spec.objects[i]["kind"], spec.objects[i]["color"], x, y, s)
            for i, (x, y), s in zip(owner, centres, sizes)
        ]
        if _positions_hold(spec, objs, owner, margin):
            return Scene(objs)
    raise RuntimeError(f"could not lay out a scene for {spec.prompt!r}")


# ----------------------------------------------------------------------------- detection


def _as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """HxWx3 float32 in 0..255 from a PIL image or an array (HWC or CHW; uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        if max(image.size) > MAX_SIDE:
            scale = MAX_SIDE / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.convert("RGB").resize(size, Image.Resampling.BOX)
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image array (HxWx3 or 3xHxW), got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32) * 255.0, 0, 255)
    if max(a.shape[:2]) > MAX_SIDE:
        return _as_rgb_array(Image.fromarray(np.rint(a).astype(np.uint8)))
    return a.astype(np.float32)


def _hue(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: chroma (max - min of R, G, B; 0..255) and hue in degrees."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    c = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(mx == r, ((g - b) / c) % 6.0, np.where(mx == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    return chroma, hue * 60.0


_PALETTE_HUES = _hue(_RGB)[1]


def _components(fg: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """4-connected components of foreground pixels of one class; each labelled by its largest pixel index + 1."""
    h, w = fg.shape
    lab = np.where(fg, np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w), 0)
    right = fg[:, :-1] & fg[:, 1:] & (cls[:, :-1] == cls[:, 1:])
    down = fg[:-1] & fg[1:] & (cls[:-1] == cls[1:])
    while True:  # max-label propagation: converges in about the longest component's diameter in steps
        new = lab.copy()
        np.maximum(new[:, :-1], np.where(right, lab[:, 1:], 0), out=new[:, :-1])
        np.maximum(new[:, 1:], np.where(right, lab[:, :-1], 0), out=new[:, 1:])
        np.maximum(new[:-1], np.where(down, lab[1:], 0), out=new[:-1])
        np.maximum(new[1:], np.where(down, lab[:-1], 0), out=new[1:])
        if np.array_equal(new, lab):
            return lab
        lab = new


@dataclass
class _Blob:
    color: int
    feature: np.ndarray
    box: tuple[int, int, int, int]
    """x0, y0, x1, y1 of the pixels at least half covered, inclusive."""
    area: float


def _blobs(rgb: np.ndarray) -> list[_Blob]:
    """Coloured connected components larger than MIN_AREA_FRAC, with their normalised silhouettes."""
    h, w = rgb.shape[:2]
    chroma, hue = _hue(rgb)
    d = np.abs(hue[..., None] - _PALETTE_HUES)
    cls = np.minimum(d, 360.0 - d).argmin(-1)
    # coverage: how much of the pixel the shape covers, if the shape is the pure palette colour on grey
    cov = np.clip(chroma / _CHROMA[cls], 0.0, 1.0)
    lab = _components(chroma >= CHROMA_MIN, cls)
    ids, inverse = np.unique(lab, return_inverse=True)
    areas = np.bincount(inverse.ravel(), weights=cov.ravel())
    padded = np.pad(cov, 1)
    out = []
    for lid, area in zip(ids, areas):
        if lid == 0 or area < MIN_AREA_FRAC * h * w:
            continue
        member = lab == lid
        ys, xs = np.nonzero(member & (cov >= 0.5))
        if len(ys) == 0:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
        # the box plus one pixel around it (indices shifted by the padding), this component only
        crop = np.where(np.pad(member, 1), padded, 0.0)[y0 : y1 + 3, x0 : x1 + 3].astype(np.float32)
        small = Image.fromarray(crop).resize((FEATURE_SIDE, FEATURE_SIDE), Image.Resampling.BILINEAR)
        out.append(_Blob(int(cls.flat[lid - 1]), np.asarray(small, dtype=np.float32).ravel(), (x0, y0, x1, y1), area))
    return out


@functools.cache
def _templates() -> tuple[np.ndarray, tuple[str, ...]]:
    """Silhouette features of clean renders of every kind at several pixel sizes and sub-pixel offsets."""
    feats, kinds = [], []
    for kind in KINDS:
        for color in ("red", "yellow", "purple"):
            for px in (6, 8, 10, 13, 17, 23, 32, 44):
                canvas = 2 * px + 8  # small enough that MIN_AREA_FRAC keeps the object
                for off in (0.0, 0.5):
                    obj = ShapeObject(kind, color, 0.5 + off / canvas, 0.5 + off / canvas, px / canvas)
                    (blob,) = _blobs(np.asarray(render(Scene([obj]), canvas), dtype=np.float32))
                    feats.append(blob.feature)
                    kinds.append(kind)
    return np.stack(feats), tuple(kinds)


def detect(image: np.ndarray | Image.Image) -> list[Detection]:
    """Shapes in an image: colour by the nearest palette hue (ignoring the grey background), kind by the nearest
    template silhouette ("unknown" for blobs that match none), boxes from the pixels at least half covered.
    Deterministic; no learned weights. Accepts PIL images and HWC / CHW arrays (uint8, or float in [0, 1])."""
    rgb = _as_rgb_array(image)
    h, w = rgb.shape[:2]
    blobs = _blobs(rgb)
    if not blobs:
        return []
    bank, bank_kinds = _templates()
    feats = np.stack([b.feature for b in blobs])
    dist = ((feats[:, None, :] - bank[None, :, :]) ** 2).mean(-1)
    out = []
    for blob, j, d2 in zip(blobs, dist.argmin(1), dist.min(1)):
        x0, y0, x1, y1 = blob.box
        bw, bh = x1 - x0 + 1, y1 - y0 + 1
        shaped = d2 <= MAX_SHAPE_RMS**2 and max(bw, bh) <= MAX_ASPECT * min(bw, bh)
        out.append(
            Detection(
                kind=bank_kinds[j] if shaped else UNKNOWN,
                color=COLORS[blob.color],
                cx=(x0 + x1 + 1) / 2 / w,
                cy=(y0 + y1 + 1) / 2 / h,
                area=float(blob.area) / (h * w),
                w=bw / w,
                h=bh / h,
            )
        )
    return out


# ----------------------------------------------------------------------------- scoring


def score(spec: PromptSpec, detections: Sequence[Detection]) -> bool:
    """GenEval's rule for one image: every requested kind is present at least ``count`` times (exactly, for
    counting); for colors / color_attr with the requested colour; for position, every detection of the positioned
    object stands in the relation to every detection of the reference (with GenEval's 0.1 size margin)."""
    check_color = spec.category in ("colors", "color_attr")
    found = []
    for obj in spec.objects:
        matches = [d for d in detections if d.kind == obj["kind"] and (not check_color or d.color == obj["color"])]
        n = obj.get("count", 1)
        if len(matches) < n or (spec.category == "counting" and len(matches) != n):
            return False
        found.append(matches)
    for obj, matches in zip(spec.objects, found):
        if obj.get("position"):
            rel, ref = obj["position"]
            for a in matches:
                for b in found[ref]:
                    if rel not in box_relations((a.cx, a.cy, a.w, a.h), (b.cx, b.cy, b.w, b.h)):
                        return False
    return True


def evaluate(images: Sequence[np.ndarray | Image.Image], specs: Sequence[PromptSpec]) -> dict[str, float]:
    """Accuracy per category present in ``specs`` and ``overall``, GenEval's mean over the categories."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images for {len(specs)} prompt specs")
    hits: dict[str, list[bool]] = {}
    for image, spec in zip(images, specs):
        hits.setdefault(spec.category, []).append(score(spec, detect(image)))
    out = {c: float(np.mean(hits[c])) for c in CATEGORIES if c in hits}
    out["overall"] = float(np.mean(list(out.values()))) if out else 0.0
    return out
