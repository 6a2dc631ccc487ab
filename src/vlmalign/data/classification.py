"""Zero-shot classification from an image folder (ImageNet / torchvision `ImageFolder`
layout) with class-name templates, as CLIP evaluates (Radford et al. 2021, sec. 3.1.4).

Layout: `root/<class folder>/**/*.png|jpg|...`, one folder per class, classes in sorted
folder order. A class's name is its folder name with `_` read as a space ("red_circle" ->
"red circle"), unless `root/class_names.json` maps folder -> name (ImageNet's `n01440764`
-> "tench"). A class's text embedding is the L2-normalised mean of the normalised
embeddings of its name in every template ("a photo of a {}.", ...).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .sample import LoadReport

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
CLASS_NAMES_FILE = "class_names.json"
# A few of CLIP's 80 ImageNet templates that read well for any object class; the prompt
# ensemble (mean over templates) is what CLIP uses.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "an image of a {}.",
)


@dataclass
class ImageFolder:
    """Images of a class-per-folder dataset with their labels."""

    images: list[Path]  # [N]
    labels: Tensor  # [N] class index of each image (LongTensor)
    class_names: list[str]  # [C] readable names, the text the templates receive
    folders: list[str] = field(default_factory=list)  # [C] folder names


def _class_names(root: Path, folders: list[str]) -> list[str]:
    mapping_file = root / CLASS_NAMES_FILE
    if not mapping_file.is_file():
        return [f.replace("_", " ") for f in folders]
    try:
        mapping = json.loads(mapping_file.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{mapping_file} is not valid JSON ({err}); it must map folder name -> class name") from err
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f"{mapping_file} must be a JSON object mapping folder name -> class name (strings)")
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise ValueError(f"{mapping_file} names no class for folder(s) {missing[:5]}; add them or delete the file")
    return [mapping[f] for f in folders]


def load_image_folder(root: str | Path, report: LoadReport | None = None) -> ImageFolder:
    """Images and labels from `root/<class>/...` (subfolders of a class folder included).

    Dot files are ignored. Counted in `report`: `not_an_image` (a file whose extension is
    not an image's), `outside_class_folder` (a file directly in `root`, other than
    `class_names.json`), `empty_class` (a class folder with no image: the class stays a
    candidate label, as an unused ImageNet class would). Images are not decoded here;
    unreadable ones are skipped and counted when their features are computed.

    Raises FileNotFoundError when `root` is not a folder, ValueError when it has no class
    folder or no image at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected root/<class name>/<images>")
    report = report if report is not None else LoadReport()
    folders = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            folders.append(entry.name)
        elif entry.name != CLASS_NAMES_FILE:
            report.skip("outside_class_folder", str(entry), "files must sit in a class folder root/<class>/")
    if not folders:
        raise ValueError(f"{root} holds no class folder; expected root/<class name>/<images>")
    images: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        count = 0
        for file in sorted((root / folder).rglob("*")):
            if file.name.startswith(".") or not file.is_file():
                continue
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                report.skip("not_an_image", str(file), f"extension {file.suffix!r} is not one of {sorted(IMAGE_EXTENSIONS)}")
                continue
            images.append(file)
            labels.append(label)
            count += 1
            report.loaded += 1
        if count == 0:
            report.skip("empty_class", str(root / folder), "no image in this class folder")
    if not images:
        raise ValueError(f"no image files under {root} (extensions {sorted(IMAGE_EXTENSIONS)})")
    return ImageFolder(images, torch.tensor(labels, dtype=torch.long), _class_names(root, folders), folders)


def class_embeddings(
    embed_texts: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> Tensor:
    """One embedding per class [C, D]: normalise(mean_t normalise(embed(template_t(name)))).

    CLIP's prompt ensembling (Radford et al. 2021): every template is filled with the class
    name, embedded, L2-normalised, averaged over templates and normalised again.
    `embed_texts` maps a list of N strings to [N, D].
    """
    if not templates:
        raise ValueError("no templates given; pass e.g. ['a photo of a {}.']")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the class name; got {bad}")
    if not class_names:
        raise ValueError("no class names given")
    texts = [t.format(name) for name in class_names for t in templates]
    emb = torch.as_tensor(embed_texts(texts)).float()  # [C * T, D]
    emb = F.normalize(emb, dim=-1).view(len(class_names), len(templates), -1)  # [C, T, D]
    return F.normalize(emb.mean(dim=1), dim=-1)  # [C, D]
