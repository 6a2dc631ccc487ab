"""The CLIP peer baseline: open_clip's loss, training on shapes, the shared evaluation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlmalign import losses
from vlmalign.baseline.clip import (
    ClipBaselineConfig,
    ClipDualEncoder,
    evaluate_clip_checkpoint,
    open_clip_loss,
    run_clip_baseline,
    train_clip_baseline,
)
from vlmalign.config import ConfigError

from .conftest import TINY

TINY_TEXT = ClipBaselineConfig(text_tower="tiny", embed_dim=16)


def test_loss_is_open_clips_and_equals_ours() -> None:
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 16, generator=gen), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(6, 16, generator=gen), dim=-1).requires_grad_(True)
    scale = torch.tensor(1 / 0.07)
    theirs = open_clip_loss(img, txt, scale)
    ours = losses.clip_loss(img, txt, scale)["clip_loss"]
    assert abs(float(theirs.detach()) - float(ours.detach())) < 1e-6
    g_theirs = torch.autograd.grad(theirs, (img, txt))
    g_ours = torch.autograd.grad(ours, (img, txt))
    for a, b in zip(g_theirs, g_ours, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_training_lowers_the_loss_and_evaluates_with_the_shared_code(tiny_cfg, tmp_path) -> None:
    cfg = tiny_cfg("align-clip", "train.max_steps=16", "train.lr=3e-3", "train.warmup_steps=2",
                   "train.batch_size=8", "train.log_every=4", "data.train_file=val.jsonl")
    out = tmp_path / "clip"
    metrics = train_clip_baseline(cfg, out, ClipBaselineConfig(text_tower="tiny", embed_dim=16, text_lr=3e-3))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 16
    assert history[-1]["clip_loss"] < history[0]["clip_loss"] - 0.1
    # The keys of eval.evaluate.embedding_metrics: the VLM's emb_ keys, Karpathy, zero-shot.
    for key in ("emb_i2t_R@1", "emb_t2i_R@5", "gap_gap", "comp_emb_mean", "comp_emb_swap_att",
                "kp_i2t_R@1", "kp_t2i_R@10", "zs_acc", "train_clip_loss"):
        assert key in metrics, key
    assert metrics["kp_images"] == metrics["eval_pairs"] == 10  # 96 scenes: 10 test images
    assert metrics["zs_images"] == 48
    saved = json.loads((out / "metrics.json").read_text())["metrics"]
    assert saved["emb_i2t_R@1"] == pytest.approx(metrics["emb_i2t_R@1"])
    torch.manual_seed(cfg.train.seed)  # the tiny image tower is random: the one training built
    again = evaluate_clip_checkpoint(out)
    for key in ("emb_i2t_R@1", "kp_t2i_R@5", "comp_emb_mean", "zs_acc"):
        assert again[key] == pytest.approx(metrics[key]), key


def test_checkpoint_reloads_to_identical_embeddings(tiny_cfg, tmp_path) -> None:
    cfg = tiny_cfg("align-clip")
    model = ClipDualEncoder.build(cfg, TINY_TEXT)
    with torch.no_grad():  # as if trained: every saved weight differs from a fresh build
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ckpt")
    again = ClipDualEncoder.from_pretrained(tmp_path / "ckpt")
    assert again.options == TINY_TEXT
    feats = torch.randn(3, model.vision.hidden_size)  # pooled tower features
    texts = ["a large red circle", "a small blue square above a large green star"]
    assert torch.allclose(again.embed_images(feats), model.embed_images(feats), atol=1e-6)
    assert torch.allclose(again.embed_texts(texts), model.embed_texts(texts), atol=1e-6)
    e = again.embed_texts(texts)
    assert e.shape == (2, 16) and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_locked_text_tower_trains_only_the_projections(tiny_cfg, tmp_path) -> None:
    from safetensors.torch import load_file

    cfg = tiny_cfg("align-clip", "train.max_steps=3", "data.train_file=val.jsonl")
    options = ClipBaselineConfig(text_tower="tiny", embed_dim=16, train_text_tower=False)
    fresh = ClipDualEncoder.build(cfg, options).state_dict()
    train_clip_baseline(cfg, tmp_path / "clip", options)
    saved = load_file(str(tmp_path / "clip" / "model.safetensors"))
    assert set(saved) == {"image_proj.weight", "text.proj.weight", "log_logit_scale"}
    assert not torch.equal(saved["text.proj.weight"], fresh["text.proj.weight"])
    assert float(saved["log_logit_scale"]) != pytest.approx(float(fresh["log_logit_scale"]), abs=1e-7)


def test_cli_function_splits_baseline_keys_and_rejects_unknown_ones(shapes_root, tmp_path) -> None:
    common = [*TINY, f"data.root={shapes_root}", "train.max_steps=2", "data.train_file=val.jsonl"]
    with pytest.raises(ConfigError, match="typo"):
        run_clip_baseline("align-clip", [*common, "baseline.typo=1"], out=tmp_path / "x")
    metrics = run_clip_baseline(
        "align-clip", [*common, "baseline.text_tower=tiny", "baseline.embed_dim=8"], out=tmp_path / "c"
    )
    assert json.loads((tmp_path / "c" / "baseline.json").read_text())["embed_dim"] == 8
    assert "emb_i2t_R@1" in metrics


def test_vlm_and_clip_run_through_the_same_evaluation(tiny_model, tiny_cfg) -> None:
    from vlmalign.eval.evaluate import EvalData, embedding_metrics, evaluate

    cfg = tiny_cfg("align-clip")
    tiny_model.set_embedding_mean(torch.zeros(1, tiny_model.hidden_size))
    vlm_data = EvalData.prepare(tiny_model, cfg)
    vlm = evaluate(tiny_model, vlm_data, cfg)
    clip = ClipDualEncoder.build(cfg, TINY_TEXT)
    clip_data = EvalData.prepare(clip, cfg)
    peer = embedding_metrics(clip, clip_data)
    # the same tasks (captions, items, Karpathy, zero-shot), features from each model's tower
    assert clip_data.captions == vlm_data.captions and clip_data.kp_captions == vlm_data.kp_captions
    assert clip_data.zs_class_names == vlm_data.zs_class_names and len(clip_data.zs_image_rows) == 48
    assert clip_data.features.shape[1:] == (clip.vision.hidden_size,)  # pooled, not patches
    assert set(peer) <= set(vlm)
    for key in ("emb_i2t_R@1", "kp_t2i_R@5", "zs_acc", "comp_emb_mean", "gap_matched_cosine"):
        assert key in peer, key
    assert "patch_i2t_R@1" in vlm and "heldout_ntp_loss" in vlm


@pytest.mark.slow
def test_packaged_minilm_and_efficientnet_build_and_embed(tiny_cfg) -> None:
    from PIL import Image

    cfg = tiny_cfg("align-clip", "vision.tower=efficientnet-lite0", "vision.image_size=224")
    model = ClipDualEncoder.build(cfg, ClipBaselineConfig())
    assert model.vision.hidden_size == 1280 and model.text.transformer.config.hidden_size == 384
    ids = model.tokenizer(["a red circle", "a red disc", "stock market prices fell"], padding=True,
                          return_tensors="pt").input_ids
    with torch.no_grad():  # [3, 384] sentence embeddings before the projection
        pooled = model.text.pooler(model.text.transformer(input_ids=ids, attention_mask=(ids != 0).long()),
                                   (ids != 0).long())
    pooled = F.normalize(pooled, dim=-1)
    assert float(pooled[0] @ pooled[1]) > float(pooled[0] @ pooled[2]) + 0.2  # MiniLM's semantics
    img = model.embed_images([Image.new("RGB", (224, 224), (200, 20, 20))])
    assert img.shape == (1, 256) and torch.allclose(img.norm(dim=-1), torch.ones(1), atol=1e-5)
