"""`shapes`: the built-in procedural dataset of coloured shapes (PIL only).

Each scene holds 1-3 non-overlapping objects (colour, shape, size, position) on a plain
light background. Each sample has

- a short caption (< 30 tokens): "a large red circle left of a small blue square";
- a long caption (40-120 words): count, each object's attributes and place in the
  image, the pairwise relations, the background;
- SugarCrepe-style hard negatives of the short caption (Hsieh et al., 2023) in the
  categories `replace_att`, `replace_obj`, `swap_att`, `replace_rel` (a relation swapped
  for its opposite) and `add_obj`, each checked to be false for the scene;
- `objects`: the scene as plain dicts, from which instruction QA can be derived;
- three paraphrases (`paraphrases`), true descriptions derived from the scene without
  randomness, which with the short and long captions make the 5 captions per image of
  the Karpathy-format retrieval file.

`shapes_writer.write_shapes` writes the JSONL splits and the data in the real benchmark
formats, so the loaders for real data serve `shapes` too: SugarCrepe JSON, LLaVA conversations,
ScienceQA-style multiple choice, a COCO-style Karpathy-split JSON (`karpathy_shapes.json`)
and an ImageNet-style zero-shot classification folder (`zeroshot/<colour>_<shape>/`).

Everything is deterministic by seed (`random.Random(seed)`, never the global RNG):
`shapes_writer.write_shapes` called twice with the same arguments writes byte-identical files.
Captions are built from a small structure (`CaptionSpec`: object descriptors plus
relation clauses) so that negatives are edits of the structure, and truth is checked by
matching the structure against the scene rather than by string surgery.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw

from .sample import Sample

# Saturated colours, far apart in hue so a small vision tower separates them easily.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (25, 60, 225),
    "yellow": (245, 205, 0),
    "purple": (135, 35, 190),
    "orange": (250, 120, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
# Side of an object's bounding box, in pixels on a 224 canvas (scaled with image_size).
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (40, 60), "large": (80, 104)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {
    "left of": "right of", "right of": "left of", "above": "below", "below": "above",
}
# Light backgrounds with a name for the long caption; each image jitters the tone by a few levels.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 248),
    "light grey": (222, 222, 222),
    "pale beige": (240, 232, 212),
}
NEGATIVE_CATEGORIES: tuple[str, ...] = (
    "replace_att", "replace_obj", "swap_att", "replace_rel", "add_obj",
)
OBJECT_COUNT_WEIGHTS = (0.2, 0.4, 0.4)  # P(1, 2, 3 objects); 1-object captions run out fast
BASE_SIZE = 224
KARPATHY_FILE = "karpathy_shapes.json"
ZEROSHOT_DIR = "zeroshot"
MIN_GAP = 6  # px on a 224 canvas: objects are separated by at least this along some axis
MARGIN = 3  # px kept free at the canvas border
SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges at little cost


@dataclass(frozen=True)
class ShapeObject:
    """One object: attributes, centre (x, y) and bounding box (x0, y0, x1, y1), pixels."""

    colour: str
    shape: str
    size: str
    x: int
    y: int
    bbox: tuple[int, int, int, int]

    def to_dict(self) -> dict:
        """Plain-dict form stored in the JSONL `objects` field and `Sample.meta`."""
        return {
            "colour": self.colour, "shape": self.shape, "size": self.size,
            "x": self.x, "y": self.y, "bbox": list(self.bbox),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShapeObject:
        """Inverse of `to_dict`."""
        return cls(d["colour"], d["shape"], d["size"], int(d["x"]), int(d["y"]), tuple(d["bbox"]))


@dataclass(frozen=True)
class Scene:
    """A canvas: its objects (in caption order) and background."""

    objects: tuple[ShapeObject, ...]
    background: str
    background_rgb: tuple[int, int, int]
    image_size: int = BASE_SIZE


# ---------------------------------------------------------------- geometry and relations


def _gap(a: ShapeObject, b: ShapeObject, relation: str) -> int:
    """Pixels of free space by which `a` is `relation` `b` (negative: not separated)."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return {
        "left of": bx0 - ax1, "right of": ax0 - bx1, "above": by0 - ay1, "below": ay0 - by1,
    }[relation]


def relation_holds(a: ShapeObject, relation: str, b: ShapeObject, strict: bool = True) -> bool:
    """Whether "a <relation> b" is true.

    strict: the bounding boxes are disjoint along that direction (a lies entirely to the
    left of b, ...), what positive captions state. Loose: the centres are ordered that
    way, what a negative must violate to count as false.
    """
    if strict:
        return _gap(a, b, relation) >= 1
    return {
        "left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y,
    }[relation]


def relation_between(a: ShapeObject, b: ShapeObject) -> str | None:
    """The relation of `a` to `b` to state in a caption, or None when none is clear.

    Among the directions in which the bounding boxes are separated, the one along which
    the centres are furthest apart ("left of" when a is mostly beside b, "above" when
    mostly over it).
    """
    held = [r for r in RELATIONS if relation_holds(a, r, b)]
    if not held:
        return None
    return max(held, key=lambda r: abs(a.x - b.x) if r in ("left of", "right of") else abs(a.y - b.y))


def region_of(obj: ShapeObject, image_size: int) -> tuple[str, str]:
    """(row, column) third of the canvas holding the object's centre."""
    third = image_size / 3
    row = ("top", "middle", "bottom")[min(2, int(obj.y // third))]
    col = ("left", "centre", "right")[min(2, int(obj.x // third))]
    return row, col


REGION_PHRASES: dict[tuple[str, str], str] = {
    ("top", "left"): "in the top left of the image",
    ("top", "centre"): "at the top centre of the image",
    ("top", "right"): "in the top right of the image",
    ("middle", "left"): "on the left side of the image",
    ("middle", "centre"): "in the centre of the image",
    ("middle", "right"): "on the right side of the image",
    ("bottom", "left"): "in the bottom left of the image",
    ("bottom", "centre"): "at the bottom centre of the image",
    ("bottom", "right"): "in the bottom right of the image",
}


# ---------------------------------------------------------------- scene sampling


def _place(rng: random.Random, side: int, placed: list[tuple[int, int, int, int]],
           image_size: int, tries: int = 60) -> tuple[int, int, int, int] | None:
    margin = round(MARGIN * image_size / BASE_SIZE)
    gap = round(MIN_GAP * image_size / BASE_SIZE)
    hi = image_size - margin - side
    if hi < margin:
        return None
    for _ in range(tries):
        x0, y0 = rng.randint(margin, hi), rng.randint(margin, hi)
        box = (x0, y0, x0 + side, y0 + side)
        # separated from every placed box along at least one axis by `gap` pixels
        if all(box[0] >= p[2] + gap or p[0] >= box[2] + gap or box[1] >= p[3] + gap
               or p[1] >= box[3] + gap for p in placed):
            return box
    return None


def sample_scene(rng: random.Random, image_size: int = BASE_SIZE) -> Scene:
    """Draw a scene of 1-3 objects with distinct (colour, shape) pairs and no overlap."""
    n_objects = rng.choices((1, 2, 3), weights=OBJECT_COUNT_WEIGHTS)[0]
    scale = image_size / BASE_SIZE
    while True:  # restart when the boxes do not fit (rare: three large objects)
        kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n_objects)
        objects, boxes = [], []
        for colour, shape in kinds:
            size = rng.choice(SIZES)
            lo, hi = SIZE_RANGES[size]
            side = max(2, round(rng.randint(lo, hi) * scale))
            box = _place(rng, side, boxes, image_size)
            if box is None:
                break
            boxes.append(box)
            x0, y0, x1, y1 = box
            objects.append(ShapeObject(colour, shape, size, (x0 + x1) // 2, (y0 + y1) // 2, box))
        if len(objects) == n_objects:
            break
    background = rng.choice(sorted(BACKGROUNDS))
    jitter = rng.randint(-6, 6)
    rgb = tuple(max(0, min(255, c + jitter)) for c in BACKGROUNDS[background])
    return Scene(tuple(objects), background, rgb, image_size)  # type: ignore[arg-type]


# ---------------------------------------------------------------- rendering


def _star_points(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, r_out = (x0 + x1) / 2, (x1 - x0) / 2
    # a five-pointed star whose outer points touch the box top and sides
    cy = y0 + r_out
    r_in = r_out * 0.45
    points = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_in
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image of `scene.image_size` pixels square."""
    s = SUPERSAMPLE
    size = scene.image_size * s
    img = Image.new("RGB", (size, size), scene.background_rgb)
    draw = ImageDraw.Draw(img)
    outline_w = max(1, round(2 * s * scene.image_size / BASE_SIZE))
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        outline = tuple(int(c * 0.55) for c in fill)
        x0, y0, x1, y1 = (v * s for v in obj.bbox)
        box = (x0, y0, x1 - 1, y1 - 1)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill, outline=outline, width=outline_w)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill, outline=outline, width=outline_w)
        elif obj.shape == "triangle":
            pts = [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])]
            draw.polygon(pts, fill=fill, outline=outline, width=outline_w)
        elif obj.shape == "star":
            draw.polygon(_star_points(box), fill=fill, outline=outline, width=outline_w)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")
    return img.reduce(s) if s > 1 else img


# ---------------------------------------------------------------- captions


@dataclass(frozen=True)
class Descriptor:
    """What a caption says about one object."""

    size: str
    colour: str
    shape: str

    def full(self) -> str:
        """"large red circle"."""
        return f"{self.size} {self.colour} {self.shape}"

    def matches(self, obj: ShapeObject) -> bool:
        """Whether the object has exactly this size, colour and shape."""
        return (self.size, self.colour, self.shape) == (obj.size, obj.colour, obj.shape)


@dataclass(frozen=True)
class CaptionSpec:
    """A short caption as structure: descriptors and clauses (subject, relation, object).

    A clause `(i, None, None)` just mentions descriptor i; `(i, rel, j)` says "i rel j".
    The first mention of a descriptor reads "a large red circle", later ones "the red
    circle" (unique, since descriptors never share a colour and shape).
    """

    descriptors: tuple[Descriptor, ...]
    clauses: tuple[tuple[int, str | None, int | None], ...] = field(default_factory=tuple)

    def render(self) -> str:
        """The caption text, e.g. "a large red circle left of a small blue square"."""
        mentioned: set[int] = set()

        def mention(i: int) -> str:
            d = self.descriptors[i]
            text = f"the {d.colour} {d.shape}" if i in mentioned else f"a {d.full()}"
            mentioned.add(i)
            return text

        parts = []
        for subj, rel, obj in self.clauses:
            text = mention(subj)
            if rel is not None and obj is not None:
                text += f" {rel} {mention(obj)}"
            parts.append(text)
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 2 and self.clauses[0][1] is None:
            return f"{parts[0]} and {parts[1]}"
        return ", ".join(parts[:-1]) + f", and {parts[-1]}"

    def holds_for(self, objects: tuple[ShapeObject, ...] | list[ShapeObject], strict: bool) -> bool:
        """True if some one-to-one matching of descriptors to objects satisfies it all.

        strict=True checks relations as positives state them (separated boxes);
        strict=False as loosely as a reader might (ordered centres): a negative must be
        false even then.
        """
        n = len(self.descriptors)
        for perm in itertools.permutations(range(len(objects)), n):
            if not all(d.matches(objects[perm[i]]) for i, d in enumerate(self.descriptors)):
                continue
            if all(rel is None or relation_holds(objects[perm[s]], rel, objects[perm[o]], strict)
                   for s, rel, o in self.clauses):
                return True
        return False

    def _unique_references(self) -> bool:
        kinds = [(d.colour, d.shape) for d in self.descriptors]
        return len(set(kinds)) == len(kinds)


def _describe(obj: ShapeObject) -> Descriptor:
    return Descriptor(obj.size, obj.colour, obj.shape)


def positive_spec(scene: Scene) -> CaptionSpec:
    """The short caption's structure: one object alone; two as "A rel B"; three as
    "A rel B, and C rel the B"."""
    objs = scene.objects
    descs = tuple(_describe(o) for o in objs)
    if len(objs) == 1:
        return CaptionSpec(descs, ((0, None, None),))
    clauses = [(0, relation_between(objs[0], objs[1]), 1)]
    if len(objs) == 3:
        clauses.append((2, relation_between(objs[2], objs[1]), 1))
    for _, rel, _ in clauses:
        if rel is None:  # cannot happen: placement separates every pair along some axis
            raise AssertionError("objects placed without a clear relation")
    return CaptionSpec(descs, tuple(clauses))


def _with_descriptor(spec: CaptionSpec, i: int, desc: Descriptor) -> CaptionSpec:
    descs = list(spec.descriptors)
    descs[i] = desc
    return replace(spec, descriptors=tuple(descs))


def _candidate_negatives(spec: CaptionSpec, scene: Scene) -> dict[str, list[CaptionSpec]]:
    """All edits of the positive per category, before the truth filter (fixed order)."""
    out: dict[str, list[CaptionSpec]] = {c: [] for c in NEGATIVE_CATEGORIES}
    descs = spec.descriptors
    for i, d in enumerate(descs):
        for colour in COLOURS:
            if colour != d.colour:
                out["replace_att"].append(_with_descriptor(spec, i, replace(d, colour=colour)))
        for size in SIZES:
            if size != d.size:
                out["replace_att"].append(_with_descriptor(spec, i, replace(d, size=size)))
        for shape in SHAPES:
            if shape != d.shape:
                out["replace_obj"].append(_with_descriptor(spec, i, replace(d, shape=shape)))
    for i, j in itertools.combinations(range(len(descs)), 2):
        a, b = descs[i], descs[j]
        for attr in ("colour", "size"):
            if getattr(a, attr) != getattr(b, attr):
                swapped = _with_descriptor(spec, i, replace(a, **{attr: getattr(b, attr)}))
                swapped = _with_descriptor(swapped, j, replace(b, **{attr: getattr(a, attr)}))
                out["swap_att"].append(swapped)
    for k, (subj, rel, obj) in enumerate(spec.clauses):
        if rel is not None:
            clauses = list(spec.clauses)
            clauses[k] = (subj, OPPOSITE[rel], obj)
            out["replace_rel"].append(replace(spec, clauses=tuple(clauses)))
    present = {(o.colour, o.shape) for o in scene.objects}
    for colour, shape, size in itertools.product(COLOURS, SHAPES, SIZES):
        if (colour, shape) not in present:
            new = len(descs)
            out["add_obj"].append(CaptionSpec(
                descs + (Descriptor(size, colour, shape),), spec.clauses + ((new, None, None),)
            ))
    return out


def hard_negatives(scene: Scene, spec: CaptionSpec, rng: random.Random) -> dict[str, str]:
    """One SugarCrepe-style negative per applicable category, each false for the scene.

    A candidate is kept only if it reads differently from the positive, keeps its
    references unambiguous, and is false even under loose relations (`holds_for(strict=
    False)`). Categories with no such candidate (e.g. `swap_att` for one object) are absent.
    """
    positive = spec.render()
    negatives: dict[str, str] = {}
    for category, candidates in _candidate_negatives(spec, scene).items():
        rng.shuffle(candidates)  # then the first valid one: a uniform pick among the valid
        for c in candidates:
            if (c._unique_references() and not c.holds_for(scene.objects, strict=False)
                    and c.render() != positive):
                negatives[category] = c.render()
                break
    return negatives


_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_SHAPE_DETAILS = {
    "circle": "round, like a flat disc",
    "square": "a box with four equal sides",
    "triangle": "a triangle pointing upwards",
    "star": "a star with five sharp points",
}
_REL_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def long_caption(scene: Scene, rng: random.Random) -> str:
    """A multi-sentence description (40-120 words): count, background, each object's
    size, colour, shape and region of the image, the relation of every pair, the fill."""
    objs = scene.objects
    n = len(objs)
    if n == 1:
        sentences = [f"The image shows a single object on a plain {scene.background} background."]
    else:
        sentences = [f"The image shows {_COUNT_WORDS[n]} objects on a plain {scene.background} background."]
    for obj in objs:
        region = REGION_PHRASES[region_of(obj, scene.image_size)]
        article = "It is a" if n == 1 else "There is a"
        sentences.append(f"{article} {obj.size} {obj.colour} {obj.shape} {region}.")
        if n < 3:  # three objects already make a long enough description (<= 120 words)
            sentences.append(f"The {obj.colour} {obj.shape} is {_SHAPE_DETAILS[obj.shape]}.")
    for a, b in itertools.combinations(objs, 2):
        rel = relation_between(a, b)
        if rel is None:
            continue
        text = f"The {a.colour} {a.shape} is {_REL_PHRASES[rel]} the {b.colour} {b.shape}"
        if a.size != b.size:
            text += " and larger than it" if a.size == "large" else " and smaller than it"
        sentences.append(text + ".")
    sentences.append(f"{'The' if n == 1 else 'Each'} shape has a flat colour and a thin dark outline.")
    sentences.append(rng.choice([
        "Nothing else appears in the picture.",
        "There is no text, texture or other object in the picture.",
        "The rest of the picture is empty.",
    ]))
    return " ".join(sentences)


_REGION_WORDS: dict[tuple[str, str], str] = {
    ("top", "left"): "at the top left", ("top", "centre"): "at the top", ("top", "right"): "at the top right",
    ("middle", "left"): "on the left", ("middle", "centre"): "in the centre", ("middle", "right"): "on the right",
    ("bottom", "left"): "at the bottom left", ("bottom", "centre"): "at the bottom",
    ("bottom", "right"): "at the bottom right",
}


def _join(parts: list[str]) -> str:
    """"x", "x and y", "x, y and z"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" and {parts[-1]}"


def reversed_spec(scene: Scene) -> CaptionSpec:
    """The relations of the short caption told from the middle object's side: "a small
    blue square right of a large red circle" for "a large red circle left of a small blue
    square"; for three objects the second object relates to the first and the third."""
    objs = scene.objects
    if len(objs) == 1:
        return CaptionSpec((_describe(objs[0]),), ((0, None, None),))
    order = (1, 0, 2)[: len(objs)]
    descs = tuple(_describe(objs[i]) for i in order)
    clauses = [(0, relation_between(objs[1], objs[j]), k) for k, j in enumerate(order[1:], start=1)]
    if any(rel is None for _, rel, _ in clauses):  # cannot happen: placement separates every pair
        raise AssertionError("objects placed without a clear relation")
    return CaptionSpec(descs, tuple(clauses))


def paraphrases(scene: Scene) -> list[str]:
    """Three true descriptions of the scene besides the short and long captions, derived
    from it without randomness (the same scene always gets the same three):

    1. the relations told from the other object's side ("a small blue square right of a
       large red circle"); one object: it and the background;
    2. a count and a list ("a picture of two shapes: a large red circle and a small blue
       square");
    3. each object with its region of the image ("a large red circle at the top left and
       a small blue square on the right").
    """
    objs = scene.objects
    n = len(objs)
    if n == 1:
        first = f"a {_describe(objs[0]).full()} on a plain {scene.background} background"
    else:
        first = reversed_spec(scene).render()
    listed = _join([f"a {_describe(o).full()}" for o in objs])
    second = f"a picture of {_COUNT_WORDS[n]} shape{'s' if n > 1 else ''}: {listed}"
    third = _join([
        f"a {_describe(o).full()} {_REGION_WORDS[region_of(o, scene.image_size)]}" for o in objs
    ])
    return [first, second, third]


def karpathy_captions(ex: ShapesExample) -> list[str]:
    """The 5 captions of a sample in the Karpathy file: short, long, then `paraphrases`."""
    return [ex.short_caption, ex.long_caption, *paraphrases(ex.scene)]


def zeroshot_scenes(seed: int, image_size: int = BASE_SIZE) -> list[tuple[str, str, Scene]]:
    """Single-object scenes for zero-shot classification: `(class folder, file name,
    scene)`, one small and one large object of every colour and shape (classes
    "<colour>_<shape>", 24 with the default vocabulary). Drawn from their own RNG
    (`random.Random(f"{seed}-zeroshot")`), so they never change the other files."""
    rng = random.Random(f"{seed}-zeroshot")
    scale = image_size / BASE_SIZE
    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            for size in SIZES:
                lo, hi = SIZE_RANGES[size]
                side = max(2, round(rng.randint(lo, hi) * scale))
                box = _place(rng, side, [], image_size)
                if box is None:  # a lone object always fits a canvas of >= 32 px
                    raise AssertionError(f"no room for one {size} object on {image_size} px")
                x0, y0, x1, y1 = box
                obj = ShapeObject(colour, shape, size, (x0 + x1) // 2, (y0 + y1) // 2, box)
                background = rng.choice(sorted(BACKGROUNDS))
                jitter = rng.randint(-6, 6)
                rgb = tuple(max(0, min(255, c + jitter)) for c in BACKGROUNDS[background])
                scene = Scene((obj,), background, rgb, image_size)  # type: ignore[arg-type]
                out.append((f"{colour}_{shape}", f"zs_{colour}_{shape}_{size}.png", scene))
    return out


# ---------------------------------------------------------------- the dataset


@dataclass
class ShapesExample:
    """One generated sample, before it is written to disk."""

    id: str
    scene: Scene
    short_caption: str
    long_caption: str
    negatives: dict[str, str]  # category -> negative short caption

    def to_sample(self, image: Path) -> Sample:
        """As the common `Sample` (caption = short caption, meta = {"objects": [...]})."""
        return Sample(
            id=self.id, image=image, caption=self.short_caption,
            short_caption=self.short_caption, long_caption=self.long_caption,
            meta={"objects": [o.to_dict() for o in self.scene.objects]},
        )


def generate_shapes(n: int, seed: int = 0, image_size: int = BASE_SIZE) -> list[ShapesExample]:
    """Generate `n` scenes with their captions and negatives, all short captions unique.

    A scene whose short caption was already drawn is resampled (so one-object scenes,
    of which there are only 48 distinct captions, become rarer as `n` grows).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[ShapesExample] = []
    rejected = 0
    while len(examples) < n:
        scene = sample_scene(rng, image_size)
        spec = positive_spec(scene)
        short = spec.render()
        if short in seen:
            rejected += 1
            if rejected > 20 * n + 1000:
                raise RuntimeError(f"could not draw {n} distinct short captions; use a smaller n")
            continue
        seen.add(short)
        assert spec.holds_for(scene.objects, strict=True), short
        examples.append(ShapesExample(
            id=f"shapes_{len(examples):06d}", scene=scene, short_caption=short,
            long_caption=long_caption(scene, rng), negatives=hard_negatives(scene, spec, rng),
        ))
    return examples
