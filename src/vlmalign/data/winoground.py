"""Winoground-style word-order pairs on `shapes` (Thrush et al. 2022, in miniature).

Each pair holds two images and two captions with the same words in a different order:

    caption 0: "a large red circle left of a small blue square"   (true of image 0)
    caption 1: "a small blue square left of a large red circle"   (true of image 1)

Image 1 is image 0 mirrored along the relation's axis (left/right or up/down), redrawn
with upright shapes, so the two images hold the same objects and only their arrangement
differs. Scenes come from their own RNG (`random.Random(f"{seed}-winoground")`) and are
new images, held out from every split. Truth is checked on the scene structure
(`CaptionSpec.holds_for`): each caption is strictly true of its image and false, even
loosely read, of the other.

Files: `<root>/pairs.json` (a list of {id, image_0, image_1, caption_0, caption_1}) and
the PNGs beside it.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from vlmalign.data.shapes import (
    BASE_SIZE,
    CaptionSpec,
    Descriptor,
    Scene,
    ShapeObject,
    relation_between,
    render_scene,
    sample_scene,
)

PAIRS_FILE = "pairs.json"


@dataclass(frozen=True)
class WordOrderPair:
    id: str
    image_0: Path
    image_1: Path
    caption_0: str
    caption_1: str


def _mirror(obj: ShapeObject, axis: str, size: int) -> ShapeObject:
    x0, y0, x1, y1 = obj.bbox
    if axis == "x":
        box = (size - x1, y0, size - x0, y1)
    else:
        box = (x0, size - y1, x1, size - y0)
    return ShapeObject(obj.colour, obj.shape, obj.size, (box[0] + box[2]) // 2, (box[1] + box[3]) // 2, box)


def _descriptor(obj: ShapeObject) -> Descriptor:
    return Descriptor(obj.size, obj.colour, obj.shape)


def make_pair(scene: Scene) -> tuple[Scene, str, str] | None:
    """(mirrored scene, caption 0, caption 1) for a two-object scene, or None when the
    scene does not give a valid pair (not two objects, no clear relation)."""
    if len(scene.objects) != 2:
        return None
    a, b = scene.objects
    rel = relation_between(a, b)
    if rel is None:
        return None
    axis = "x" if rel in ("left of", "right of") else "y"
    mirrored = Scene(tuple(_mirror(o, axis, scene.image_size) for o in scene.objects), scene.background,
                     scene.background_rgb, scene.image_size)
    spec_0 = CaptionSpec((_descriptor(a), _descriptor(b)), ((0, rel, 1),))
    spec_1 = CaptionSpec((_descriptor(b), _descriptor(a)), ((0, rel, 1),))
    ok = (spec_0.holds_for(scene.objects, strict=True) and spec_1.holds_for(mirrored.objects, strict=True)
          and not spec_0.holds_for(mirrored.objects, strict=False) and not spec_1.holds_for(scene.objects, strict=False))
    if not ok:
        return None
    return mirrored, spec_0.render(), spec_1.render()


def write_word_order_pairs(root: str | Path, n: int, seed: int = 0, image_size: int = BASE_SIZE) -> list[WordOrderPair]:
    """Write `n` pairs (2n PNGs and `pairs.json`) under `root`; deterministic by seed.
    An existing `pairs.json` of the same n and seed is reused."""
    root = Path(root)
    path = root / PAIRS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("n") == n and saved.get("seed") == seed and saved.get("image_size") == image_size:
            return load_word_order_pairs(path)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-winoground")
    pairs: list[WordOrderPair] = []
    while len(pairs) < n:
        scene = sample_scene(rng, image_size)
        made = make_pair(scene)
        if made is None:
            continue
        mirrored, c0, c1 = made
        i = len(pairs)
        p0, p1 = root / f"pair{i:04d}_0.png", root / f"pair{i:04d}_1.png"
        render_scene(scene).save(p0)
        render_scene(mirrored).save(p1)
        pairs.append(WordOrderPair(f"pair{i:04d}", p0, p1, c0, c1))
    records = [asdict(p) | {"image_0": p.image_0.name, "image_1": p.image_1.name} for p in pairs]
    path.write_text(json.dumps({"n": n, "seed": seed, "image_size": image_size, "pairs": records}, indent=1) + "\n")
    return pairs


def load_word_order_pairs(path: str | Path) -> list[WordOrderPair]:
    """The pairs of a `pairs.json` (images resolved against its folder)."""
    path = Path(path)
    data = json.loads(path.read_text())
    root = path.parent
    return [WordOrderPair(r["id"], root / r["image_0"], root / r["image_1"], r["caption_0"], r["caption_1"])
            for r in data["pairs"]]
