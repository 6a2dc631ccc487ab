"""Inference commands on a trained tiny checkpoint: embed images/texts to safetensors and
search an image index with a text query."""

import shutil

import pytest
import torch

from vlmalign.cli import main
from vlmalign.inference import load_checkpoint, read_index, search
from vlmalign.train.trainer import train


@pytest.fixture()
def trained(tiny_cfg):
    return train(tiny_cfg("align-clip", "train.max_steps=1")).checkpoint


def test_embed_images_and_texts_then_search(trained, shapes_root, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((shapes_root / "images").glob("*.png"))[:5]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "index.safetensors"
    assert main(["embed", "--checkpoint", str(trained), "--images", str(folder), "--out", str(out)]) == 0
    emb, names, meta = read_index(out)
    assert emb.shape[0] == 5 == len(names) and meta["kind"] == "image"
    assert "unreadable image" in capsys.readouterr().out  # the broken file: counted, not a crash
    model = load_checkpoint(trained)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    hits = search(model, emb, names, "a red circle", top=3)
    q = model.embed_texts(["a red circle"])[0]
    expected = (emb @ q).topk(3).indices.tolist()
    assert [h[0] for h in hits] == [names[i] for i in expected]
    assert main(["search", "--checkpoint", str(trained), "--index", str(out), "--top", "2", "a red circle"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith(("1.", "2."))]
    assert len(lines) == 2 and names[expected[0]] in lines[0]

    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\n\na blue square\n")
    tout = tmp_path / "texts.safetensors"
    assert main(["embed", "--checkpoint", str(trained), "--texts", str(texts), "--out", str(tout)]) == 0
    temb, tnames, tmeta = read_index(tout)
    assert tnames == ["a red circle", "a blue square"] and tmeta["kind"] == "text"
    assert torch.allclose(temb, model.embed_texts(tnames), atol=1e-5)
    # an index of texts cannot be searched for images
    assert main(["search", "--checkpoint", str(trained), "--index", str(tout), "x"]) == 2


def test_embed_needs_exactly_one_source(trained, capsys):
    assert main(["embed", "--checkpoint", str(trained), "--out", "x.safetensors"]) == 2
    assert "exactly one" in capsys.readouterr().out
