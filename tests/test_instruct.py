"""The instruct recipe: conversations, LoRA or full fine-tuning, data fractions, starting
from an alignment checkpoint; on tiny models and the shapes instruction files."""

import pytest
import torch
from safetensors.torch import load_file

from vlmalign.data.images import load_image
from vlmalign.data.splits import subsample
from vlmalign.models.vlm import VLM
from vlmalign.train.datasets import TrainData
from vlmalign.train.recipes import RECIPES, apply_recipe
from vlmalign.train.trainer import train

QA = "data.train_file=instruct_train.json"


def test_subsample_is_seeded_nested_and_ordered():
    records = list(range(100))
    a = subsample(records, 0.1, seed=3)
    assert a == subsample(records, 0.1, seed=3) and len(a) == 10 and a == sorted(a)
    assert set(a) <= set(subsample(records, 0.25, seed=3))  # a smaller fraction nests
    assert a != subsample(records, 0.1, seed=4)
    assert subsample(records, 1.0, seed=0) == records
    with pytest.raises(ValueError, match="data_fraction"):
        subsample(records, 0.0, seed=0)


def test_data_fraction_trains_on_a_reproducible_subset(tiny_cfg):
    full = tiny_cfg("instruct", QA)
    model = VLM.build(full)
    n_all = len(TrainData.prepare(model, full, "conversations").records)
    cfg = tiny_cfg("instruct", QA, "data.data_fraction=0.25", "data.fraction_seed=1")
    ids = [c.id for c in TrainData.prepare(model, cfg, "conversations").records]
    assert len(ids) == round(0.25 * n_all)
    assert ids == [c.id for c in TrainData.prepare(model, cfg, "conversations").records]


def test_lora_instruct_lowers_the_loss_and_saves_only_adapters_and_projector(tiny_cfg):
    cfg = tiny_cfg("instruct", QA, "train.max_steps=25", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=5")
    result = train(cfg)
    first, last = result.history[0]["ntp_loss"], result.history[-1]["ntp_loss"]
    assert last < first
    saved = load_file(str(result.checkpoint / "model.safetensors"))
    assert any("lora_A" in k for k in saved) and any(k.startswith("projector.") for k in saved)
    assert not [k for k in saved if k.startswith("llm.") and "lora_" not in k]  # no base weights
    again = VLM.from_pretrained(result.checkpoint)
    ids = torch.tensor([[again.image_token_id] * again.num_visual_tokens + [5, 6, 7]])
    feats = torch.randn(1, again.vision.num_patches, again.vision.hidden_size)
    model = result.model.eval()
    h1 = model.hidden_states(ids, torch.ones_like(ids), model.visual_tokens(features=feats))
    h2 = again.hidden_states(ids, torch.ones_like(ids), again.visual_tokens(features=feats))
    assert torch.allclose(h1, h2, atol=1e-6)
    base = VLM.build(tiny_cfg("align"))  # same seed-free tiny LLM weights, no adapters
    h0 = base.hidden_states(ids, torch.ones_like(ids), again.visual_tokens(features=feats))
    assert not torch.allclose(h0, h2, atol=1e-4)  # the adapters changed the LLM


def test_full_finetuning_changes_llm_weights(tiny_cfg):
    cfg = tiny_cfg("instruct", QA, "lora.enabled=false", "train.max_steps=2", "train.lr=1e-3")
    before = {k: v.clone() for k, v in VLM.build(cfg).llm.state_dict().items()}
    result = train(cfg)
    changed = [k for k, v in result.model.llm.state_dict().items() if not torch.equal(v, before[k])]
    assert any("layers.0.self_attn" in k for k in changed)
    saved = load_file(str(result.checkpoint / "model.safetensors"))
    assert any(k.startswith("llm.") for k in saved)


def test_instruct_starts_from_an_alignment_checkpoint(tiny_cfg):
    align = train(tiny_cfg("align", "train.max_steps=2"))
    cfg = tiny_cfg("instruct", QA, f"train.init_from={align.checkpoint}", "train.max_steps=1", "train.lr=0")
    result = train(cfg)
    for k, v in align.model.projector.state_dict().items():
        assert torch.equal(result.model.projector.state_dict()[k], v), k


def test_training_the_llm_needs_it_unfrozen_or_lora(tiny_cfg):
    cfg = tiny_cfg("instruct", QA, "lora.enabled=false", "llm.frozen=true")
    with pytest.raises(ValueError, match="llm.frozen=false"):
        apply_recipe(VLM.build(cfg), RECIPES.get("instruct"))


def test_conversation_data_rejects_contrastive_losses(tiny_cfg):
    cfg = tiny_cfg("instruct", QA, "objective.contrastive=clip", "train.max_steps=1")
    with pytest.raises(ValueError, match="next-token loss only"):
        train(cfg)


def test_cli_data_check_prints_trained_spans_and_passes(shapes_root, capsys):
    from vlmalign.cli import main

    from .conftest import TINY

    rc = main(["data", "check", "instruct", *TINY, f"data.root={shapes_root}", QA, "--show", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "trained tokens:" in out and "[[" in out and "zero trained tokens: none" in out


def test_cli_data_check_fails_when_no_assistant_token_fits(shapes_root, capsys):
    from vlmalign.cli import main

    from .conftest import TINY

    # 4 visual tokens + the prompt leave no room for the answer in 12 tokens.
    rc = main(["data", "check", "instruct", *TINY, f"data.root={shapes_root}", QA, "data.max_conversation_tokens=12"])
    out = capsys.readouterr().out
    assert rc == 1 and "ZERO trained tokens" in out


def test_chat_session_keeps_history_and_matches_generate(tiny_cfg, shapes_root):
    from vlmalign.inference import ChatSession, load_checkpoint

    result = train(tiny_cfg("instruct", QA, "train.max_steps=1"))
    model = load_checkpoint(result.checkpoint.parent)  # the run folder: its latest checkpoint
    image = next((shapes_root / "images").glob("*.png"))
    chat = ChatSession(model, image, max_new_tokens=5)
    first = chat.prompt("What colour is the circle?")
    assert first.count("<image>") == 1
    answer = chat.ask("What colour is the circle?")
    pixels = model.preprocess([load_image(image)])
    assert answer == model.generate(pixel_values=pixels, prompt=first, max_new_tokens=5)[0]
    follow = chat.prompt("And its size?")
    assert follow.count("<image>") == 1 and "What colour is the circle?" in follow and answer in follow


def test_cli_chat_one_shot(tiny_cfg, shapes_root, capsys):
    from vlmalign.cli import main

    result = train(tiny_cfg("instruct", QA, "train.max_steps=1"))
    image = next((shapes_root / "images").glob("*.png"))
    capsys.readouterr()
    assert main(["chat", "--checkpoint", str(result.checkpoint), "--image", str(image), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0


def test_cli_eval_of_an_instruct_run_scores_mcq_and_captions(tiny_cfg, capsys):
    import json

    from vlmalign.cli import main

    pytest.importorskip("pycocoevalcap")
    cfg = tiny_cfg("instruct", QA, "train.max_steps=1", "data.eval_max_samples=6")
    result = train(cfg)
    assert main(["eval", "--caption", str(result.checkpoint.parent)]) == 0
    eval_dir = result.checkpoint.parent / f"eval-{result.checkpoint.name}"  # beside the checkpoint, never in it
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    assert metrics["mcq_items"] == 6 and 0 <= metrics["mcq_lik_acc"] <= 100
    assert "caption_cider" in metrics and 0 <= metrics["caption_bleu4"] <= 1
    assert "MCQ acc, likelihood" in capsys.readouterr().out
