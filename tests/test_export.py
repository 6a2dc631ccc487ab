"""`vlmalign export`: a LoRA instruct checkpoint becomes a plain transformers LLM (merged)
plus a vlmalign folder that rebuilds the same VLM; on tiny models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlmalign.data.images import load_image
from vlmalign.export import export_checkpoint, load_export
from vlmalign.inference import load_checkpoint
from vlmalign.models.language import IMAGE_TOKEN
from vlmalign.models.lora import is_lora
from vlmalign.train.trainer import train

QA = "data.train_file=instruct_train.json"


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, shapes_root):
    """2 instruct steps with LoRA at a large lr, so the adapters clearly change the LLM."""
    from tests.conftest import TINY
    from vlmalign.config import load_config
    from vlmalign.paths import recipe_config

    out = tmp_path_factory.mktemp("run") / "instruct"
    cfg = load_config(recipe_config("instruct"), TINY + [
        f"data.root={shapes_root}", f"train.out_dir={out}", QA, "train.max_steps=2", "train.lr=2e-2",
        "train.warmup_steps=0", "train.eval_at_end=false",
    ])
    assert cfg.lora.enabled
    return train(cfg).checkpoint


def _load(fn, path, **kwargs):
    """The tiny vision tower is random (drawn from the global RNG): seed so that every
    load builds the same tower; real towers reload their weights from their source."""
    torch.manual_seed(0)
    return fn(path, **kwargs)


def _image_text_batch(model, shapes_root):
    """ids [1, T] with the visual tokens in front of a chat turn, and pixel values."""
    image = next((shapes_root / "images").glob("*.png"))
    pixels = model.preprocess([load_image(image)])
    text = model.tokenizer("What colour is the circle?", add_special_tokens=False).input_ids
    ids = torch.tensor([[model.image_token_id] * model.num_visual_tokens + text])
    return ids, torch.ones_like(ids), pixels


@torch.no_grad()
def test_merged_export_loads_in_plain_transformers_and_matches(lora_checkpoint, shapes_root, tmp_path):
    original = _load(load_checkpoint, lora_checkpoint)
    assert is_lora(original.llm)
    out = export_checkpoint(lora_checkpoint.parent, tmp_path / "export")  # the run folder: its latest
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "llm", "vlm"]

    plain = AutoModelForCausalLM.from_pretrained(out / "llm", local_files_only=True).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    ids = original.tokenizer("a small red circle left of a blue square", return_tensors="pt").input_ids
    lora_logits = original.llm(input_ids=ids).logits
    assert (plain(input_ids=ids).logits - lora_logits).abs().max() < 1e-5
    with original.llm.disable_adapter():  # the adapters did change the LLM: the check has teeth
        assert (original.llm(input_ids=ids).logits - lora_logits).abs().max() > 1e-3

    # the plain tokenizer has no <image> (its id would index past the embedding table)
    tok = AutoTokenizer.from_pretrained(out / "llm", local_files_only=True)
    assert IMAGE_TOKEN not in tok.get_vocab() and len(tok) == plain.get_input_embeddings().num_embeddings
    assert max(tok(f"{IMAGE_TOKEN} hello").input_ids) < len(tok)
    assert tok.chat_template == original.tokenizer.chat_template
    gen = plain.generate(**tok("a red", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == len(tok("a red").input_ids) + 3

    meta = json.loads((out / "vlm" / "export.json").read_text())
    assert meta["lora"] == "merged" and meta["image_token_id"] == original.image_token_id
    rebuilt = _load(load_export, out)
    assert not is_lora(rebuilt.llm) and rebuilt.image_token_id == original.image_token_id
    ids, mask, pixels = _image_text_batch(original, shapes_root)
    want = original.hidden_states(ids, mask, original.visual_tokens(pixel_values=pixels))
    got = rebuilt.hidden_states(ids, mask, rebuilt.visual_tokens(pixel_values=pixels))
    assert (got - want).abs().max() < 1e-5


@torch.no_grad()
def test_unmerged_export_keeps_adapters_and_survives_a_move(lora_checkpoint, shapes_root, tmp_path):
    original = _load(load_checkpoint, lora_checkpoint)
    out = export_checkpoint(lora_checkpoint, tmp_path / "a" / "export", merge_lora=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "llm", "llm-lora", "vlm"]
    moved = out.rename(tmp_path / "moved")  # the config's absolute llm path is now stale
    rebuilt = _load(load_export, moved / "vlm")
    assert is_lora(rebuilt.llm)
    ids, mask, pixels = _image_text_batch(original, shapes_root)
    want = original.hidden_states(ids, mask, original.visual_tokens(pixel_values=pixels))
    got = rebuilt.hidden_states(ids, mask, rebuilt.visual_tokens(pixel_values=pixels))
    assert (got - want).abs().max() < 1e-5
    # llm/ alone is the base model: it differs from the fine-tuned one
    base = AutoModelForCausalLM.from_pretrained(moved / "llm", local_files_only=True).eval()
    text = ids[:, original.num_visual_tokens:]
    assert (base(input_ids=text).logits - original.llm(input_ids=text).logits).abs().max() > 1e-3


def test_export_refuses_a_non_empty_folder_and_a_non_checkpoint(lora_checkpoint, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(lora_checkpoint, tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="not a vlmalign checkpoint"):
        export_checkpoint(tmp_path / "busy", tmp_path / "new")
    with pytest.raises(FileNotFoundError, match="not a vlmalign export"):
        load_export(tmp_path / "busy")


def test_cli_export_then_caption_from_the_export(tiny_cfg, shapes_root, tmp_path, capsys):
    import json

    from vlmalign.cli import main
    from vlmalign.train.trainer import train

    run = train(tiny_cfg("instruct", "data.train_file=instruct_train.json", "train.max_steps=1"))
    out = tmp_path / "exported"
    assert main(["export", str(run.checkpoint), "--out", str(out)]) == 0
    assert (out / "llm" / "config.json").exists() and (out / "vlm" / "export.json").exists()
    assert main(["export", str(run.checkpoint), "--out", str(out)]) == 2  # a non-empty folder is refused
    images = sorted((shapes_root / "images").glob("*.png"))[:3]
    captions = tmp_path / "captions.jsonl"
    torch.manual_seed(0)  # the tiny tower is random: seed as the export was made
    assert main(["caption", "--checkpoint", str(out), "--images", str(images[0].parent), "--out", str(captions),
                 "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    assert len(rows) == len(list(images[0].parent.glob("*.png"))) and all("caption" in r for r in rows)
