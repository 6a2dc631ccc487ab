"""Experiments end to end on tiny models: they run, and write their JSON and plot."""

import json

from vlmalign.cli import main


def test_data_efficiency_runs_and_writes_results(tmp_path):
    out = tmp_path / "de"
    rc = main(["experiment", "--quick", "--out", str(out), "--scenes", "60", "--align-steps", "3", "--eval-items", "10",
               "data-efficiency", "llm.name=tiny", "vision.tower=tiny", "projector.pool_size=2", "objective.patch_pool=2",
               "train.batch_size=16"])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["settings"]["scenes"] == 60 and summary["settings"]["align_steps"] == 3
    assert json.loads((out / "shapes" / "meta.json").read_text())["n"] == 60
    res = summary["results"]["0"]
    assert set(res) == {"align", "align-cg"}
    for runs in res.values():
        assert set(runs) == {"0", "0.1", "0.25", "1.0"}
        assert runs["1.0"]["records"] > runs["0.25"]["records"] > runs["0.1"]["records"] >= 1
        assert runs["1.0"]["steps"] >= runs["0.1"]["steps"]
        for m in runs.values():
            assert 0.0 <= m["mcq_lik_acc"] <= 100.0 and m["mcq_items"] == 10
    assert (out / "mcq_vs_fraction.png").stat().st_size > 10_000


def test_vladva_ablation_runs_every_variant_and_the_clip_peer(tmp_path):
    from vlmalign.experiments.vladva import CLIP, VARIANTS, run_vladva

    out = tmp_path / "vladva"
    results = run_vladva(out=out, quick=True, llm="tiny", tower="tiny", clip_text_tower="tiny",
                         extra=["projector.pool_size=2", "objective.patch_pool=2", "data.shapes_n=60",
                                "train.max_steps=2", "lora.target_modules=q_proj,v_proj", "data.long_max_tokens=200"])
    assert set(results) == {*VARIANTS, CLIP}
    for m in results.values():
        assert 0.0 <= m["emb_i2t_R@1"] <= 100.0 and "comp_emb_mean" in m
    saved = json.loads((out / "results.json").read_text())["results"]
    assert saved["contrastive long"]["emb_t2i_R@1"] == results["contrastive long"]["emb_t2i_R@1"]
    # the long-caption variant trained on long captions: its cached text states hold them
    assert results["+ soft prompts + LoRA"] != results["contrastive short"]


def test_prompts_experiment_compares_prompts_on_one_checkpoint(tiny_cfg, tmp_path):
    from vlmalign.experiments.prompts import PROMPTS
    from vlmalign.train.trainer import train

    run = train(tiny_cfg("align-clip", "train.max_steps=2", "data.eval_max_samples=12"))
    out = tmp_path / "prompts.json"
    assert main(["experiment", "--checkpoint", str(run.checkpoint.parent), "--out", str(out), "prompts"]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == [p[0] for p in PROMPTS]
    gaps = {round(m["gap_gap"], 6) for m in results.values()}
    assert len(gaps) > 1  # the prompt changes the embeddings
    assert results["no instruction"]["text_prompt"] == "<sent>"
