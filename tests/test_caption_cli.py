"""`vlmalign caption`: batched greedy captions for a folder or a file, bad images counted,
JSONL output in the captions format; on a tiny trained checkpoint."""

import json
import shutil

import pytest
import torch

from vlmalign.data.images import load_image
from vlmalign.data.sample import LoadReport
from vlmalign.inference import (
    caption_command,
    caption_files,
    caption_paths,
    default_caption_prompt,
    load_checkpoint,
)
from vlmalign.train.trainer import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shapes_root):
    from tests.conftest import TINY
    from vlmalign.config import load_config
    from vlmalign.paths import recipe_config

    out = tmp_path_factory.mktemp("run") / "align"
    cfg = load_config(recipe_config("align"), TINY + [
        f"data.root={shapes_root}", f"train.out_dir={out}", "train.max_steps=1", "train.eval_at_end=false",
    ])
    return train(cfg).checkpoint


@pytest.fixture()
def folder(shapes_root, tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    pngs = sorted((shapes_root / "images").glob("*.png"))[:5]
    for i, p in enumerate(pngs):
        shutil.copy(p, (d / "sub" if i == 4 else d) / p.name)
    (d / "broken.png").write_bytes(b"not an image")
    (d / "notes.txt").write_text("not an image file either")
    return d


def _model(checkpoint):
    torch.manual_seed(0)  # the tiny tower is random: the same one on every load
    return load_checkpoint(checkpoint)


def test_caption_files_batches_skips_bad_images_and_matches_generate(checkpoint, folder):
    model = _model(checkpoint)
    paths = caption_paths(folder)
    assert len(paths) == 6 and paths[-1].parent.name == "sub"  # recursive, sorted, images only
    report = LoadReport()
    out = caption_files(model, paths, prompt="", batch_size=2, max_new_tokens=4, report=report)
    assert [p for p, _ in out] == [p for p in paths if p.name != "broken.png"]
    assert report.skipped == {"unreadable image": 1} and report.loaded == 5
    # the same captions as one unbatched generate per image
    for p, text in out[:2]:
        pixels = model.preprocess([load_image(p)])
        assert text == model.generate(pixel_values=pixels, max_new_tokens=4)[0].split("\n")[0].strip()
    assert caption_files(model, [folder / "broken.png"], report=LoadReport()) == []


def test_default_prompt_follows_the_recipe(checkpoint):
    model = _model(checkpoint)
    assert default_caption_prompt(model) == ""  # align: stage-1 captioning after the visual tokens
    asked = default_caption_prompt(model, "Describe the shapes.")
    assert asked.count("<image>") == 1 and "Describe the shapes." in asked and asked.endswith("assistant\n")
    model.cfg.recipe = "instruct"
    assert "Describe the image in one sentence." in default_caption_prompt(model)


def test_caption_command_writes_jsonl_and_prints(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    results, report = caption_command(checkpoint.parent, folder, out=out, batch_size=4, max_new_tokens=3)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["image"] for x in lines] == [str(p) for p, _ in results] and len(lines) == 5
    assert all(set(x) == {"image", "caption"} for x in lines)
    captured = capsys.readouterr()
    assert "wrote 5 captions" in captured.out and "unreadable image" in captured.err
    one = next(p for p in folder.glob("*.png") if p.name != "broken.png")
    results, _ = caption_command(checkpoint, one, max_new_tokens=3)
    assert len(results) == 1 and capsys.readouterr().out.startswith(f"{one}\t")
    with pytest.raises(FileNotFoundError, match="no such file"):
        caption_command(checkpoint, folder / "missing")
