"""The trainer and the CLI end to end on tiny models and real shapes files."""

import json

import torch

from vlmalign.cli import main
from vlmalign.eval.evaluate import EvalData, evaluate
from vlmalign.models.vlm import VLM
from vlmalign.train.trainer import train

from .conftest import TINY


def test_each_recipe_lowers_its_loss_on_a_fixed_batch(tiny_cfg):
    """Overfit one small set: every loss part the recipe uses must go down."""
    for recipe, part in (("align", "ntp_loss"), ("align-cg", "patch_loss"), ("align-clip", "clip_loss")):
        cfg = tiny_cfg(recipe, "train.max_steps=30", "train.lr=3e-3", "train.warmup_steps=2", "data.train_file=val.jsonl", "train.batch_size=8")
        result = train(cfg)
        first, last = result.history[0][part], result.history[-1][part]
        assert last < first, (recipe, part, first, last)


def test_checkpoint_reloads_with_one_call(tiny_cfg):
    cfg = tiny_cfg("align-clip", "train.max_steps=4")
    result = train(cfg)
    assert (result.checkpoint / "model.safetensors").exists()
    assert (result.checkpoint / "objective.safetensors").exists()
    again = VLM.from_pretrained(result.checkpoint)
    feats = torch.randn(2, again.vision.num_patches, again.vision.hidden_size)
    assert torch.allclose(again.embed_images(feats), result.model.embed_images(feats), atol=1e-6)
    assert again.cfg.recipe == "align-clip"


def test_only_the_projector_and_temperature_train(tiny_cfg):
    cfg = tiny_cfg("align-clip", "train.max_steps=3")
    llm_before = {k: v.clone() for k, v in VLM.build(cfg).llm.state_dict().items()}
    result = train(cfg)
    for k, v in result.model.llm.state_dict().items():
        assert torch.equal(v, llm_before[k]), k
    assert result.objective.log_logit_scale.requires_grad
    assert float(result.objective.logit_scale().detach()) != 1 / 0.07  # it moved


def test_evaluate_reports_retrieval_and_compositional_metrics(tiny_cfg):
    cfg = tiny_cfg("align-cg", "train.max_steps=2")
    result = train(cfg)
    data = EvalData.prepare(result.model, cfg)
    m = evaluate(result.model, data, cfg)
    for key in ("emb_i2t_R@1", "emb_t2i_R@5", "patch_i2t_R@1", "comp_emb_mean", "comp_patch_replace_att", "heldout_ntp_loss", "gap_gap"):
        assert key in m, key
    assert 0 <= m["emb_i2t_R@1"] <= 100 and m["eval_pairs"] == len(data.captions) > 0


def test_cli_train_writes_checkpoint_and_metrics(shapes_root, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "align-cg", *TINY, f"data.root={shapes_root}", f"train.out_dir={out}", "train.max_steps=3"])
    assert rc == 0
    ckpt = out / (out / "latest").read_text()
    saved = json.loads((ckpt / "metrics.json").read_text())
    metrics = saved["metrics"]
    assert "patch_i2t_R@1" in metrics
    training = saved["meta"]["training"]  # what training skipped travels with the metrics
    assert training["skipped"]["loaded"] > 0 and training["nonfinite"]["skipped_total"] == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 3 and "patch_loss" in history[-1]
    rc = main(["eval", str(ckpt)])
    assert rc == 0 and "patch" in capsys.readouterr().out


def test_cli_rejects_unknown_keys(capsys):
    assert main(["train", "align", "train.lrr=1"]) == 2
    assert "train.lrr" in capsys.readouterr().out


def test_demo_runs_all_three_recipes_from_the_same_start(tmp_path):
    from vlmalign.demo import run_demo

    results = run_demo(
        out=tmp_path / "demo", quick=True, llm="tiny", tower="tiny",
        extra=["projector.pool_size=2", "objective.patch_pool=2", "data.shapes_n=80", "train.max_steps=3", "train.batch_size=8"],
    )
    assert set(results) == {"align", "align-cg", "align-clip"}
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert set(summary["results"]) == set(results)


def test_cli_data_shapes_writes_the_layout(tmp_path):
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--n", "30", "--seed", "1"]) == 0
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "meta.json"):
        assert (tmp_path / "s" / name).exists(), name
    assert any((tmp_path / "s" / "sugarcrepe").glob("*.json"))


def test_text_states_are_computed_once_across_evaluations(tiny_cfg):
    from vlmalign.cache import TextStateCache

    cfg = tiny_cfg("align", "train.max_steps=1")
    model = train(cfg).model
    data = EvalData.prepare(model, cfg)
    text_cache = TextStateCache()
    evaluate(model, data, cfg, text_cache)
    assert len(text_cache) > 0
    calls = []
    original = model.text_states
    model.text_states = lambda texts: calls.append(len(texts)) or original(texts)
    evaluate(model, data, cfg, text_cache)
    assert calls == []


def test_cli_names_known_recipes_for_an_unknown_one(capsys):
    assert main(["train", "align-typo"]) == 2
    out = capsys.readouterr().out
    assert "align-typo" in out and "align-cg" in out


def test_cli_train_aborts_on_mostly_broken_data(shapes_root, tmp_path, capsys):
    lines = (shapes_root / "train.jsonl").read_text().splitlines()[:3] + ["{not json"] * 7
    bad = shapes_root / "mostly_bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    try:
        rc = main(["train", "align", *TINY, f"data.root={shapes_root}", "data.train_file=mostly_bad.jsonl",
                   f"train.out_dir={tmp_path / 'run'}", "train.max_steps=1", "--max-skip-fraction", "0.5"])
    finally:
        bad.unlink()
    out = capsys.readouterr().out
    assert rc == 1 and "DataQualityError" in out and "7 of 10" in out
    assert not (tmp_path / "run" / "latest").exists()
