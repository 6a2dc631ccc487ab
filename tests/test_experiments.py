"""Experiments end to end on tiny models: they run, and write their JSON and plot."""

import json

import pytest
import torch

from vlmalign.cli import main


def test_data_efficiency_runs_every_arm_with_the_ratio_and_the_image_check(tmp_path):
    from vlmalign.experiments.data_efficiency import FREE_FORM, variants

    out = tmp_path / "de"
    rc = main(["experiment", "--quick", "--out", str(out), "--scenes", "60", "--eval-items", "10", "--seeds", "0", "1",
               "--", "data-efficiency",
               "llm.name=tiny", "vision.tower=tiny", "projector.pool_size=2", "objective.patch_pool=2",
               "lora.target_modules=q_proj,v_proj"])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    names = [v.name for v in variants()]
    assert summary["seeds"] == [0, 1]
    assert {(r["variant"], r["seed"]) for r in summary["records"]} == {(v, s) for v in names for s in (0, 1)}
    by = {(r["variant"], r["seed"]): r for r in summary["records"]}
    full, tenth = by[("align @ 100%", 0)]["extra"], by[("align @ 10%", 0)]["extra"]
    assert full["records"] > tenth["records"] >= 1 and full["steps"] >= tenth["steps"]
    from vlmalign.experiments.data_efficiency import warmup_steps

    assert tenth["warmup_steps"] == warmup_steps(tenth["steps"], 0.1)  # warmup is a fraction of the run
    assert [warmup_steps(n, 0.1) for n in (3, 10, 19, 20, 60)] == [0, 0, 0, 2, 6]  # never a lone lr-0 step
    for r in summary["records"]:
        assert len(r["items"]["mcq_lik"]) == 10 and 0 <= r["metrics"]["mcq_lik"] <= 100
    aligned = by[("align (no instruct)", 0)]["metrics"]
    assert aligned["image_information_gap"] == pytest.approx(
        aligned["caption_loss_shuffled_image"] - aligned["caption_loss_true_image"])
    ratio = summary["derived"]["ratio_mcq_lik"]
    assert ratio["lo"] <= ratio["hi"] and ratio["verdict"] in {"supported", "not supported", "inconclusive",
                                                               "underpowered"}
    # the instruction data is free-form QA: no multiple-choice question in it
    convs = json.loads((out / "shapes" / FREE_FORM).read_text())
    assert not any("(A)" in turn["value"] or "A." in turn["value"][:3] for c in convs for turn in c["conversations"])
    assert (out / "plot.png").stat().st_size > 10_000


def test_vladva_runs_every_arm_on_every_seed_with_intervals_and_verdicts(tmp_path):
    from vlmalign.experiments.vladva import ARM_NAMES, CLIP, claims

    out = tmp_path / "vladva"
    rc = main(["experiment", "--quick", "--out", str(out), "--seeds", "0", "1", "--", "vladva", "llm.name=tiny",
               "vision.tower=tiny", "projector.pool_size=2", "objective.patch_pool=2", "data.shapes_n=60", "lora.target_modules=q_proj,v_proj",
               "baseline.text_tower=tiny", "size.lrs=1e-3,2e-4"])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert {(r["variant"], r["seed"]) for r in summary["records"]} == {(v, s) for v in ARM_NAMES for s in (0, 1)}
    for key in ("t2i_R@1", "comp", "comp_swap_att", "wino_text", "wino_group", "zs_acc"):
        m = summary["metrics"][key]
        assert m["chance"] is not None and set(m["variants"]) == set(ARM_NAMES)
        for v in m["variants"].values():
            assert v["lo"] <= v["mean"] <= v["hi"] and len(v["per_seed"]) == 2
    assert summary["metrics"]["wino_text"]["chance"] == 25.0
    assert [c["id"] for c in summary["claims"]] == [c.id for c in claims()]
    assert all(c["verdict"] in {"supported", "not supported", "inconclusive", "underpowered"} for c in summary["claims"])
    # the sweep ran first, on the validation split, and chose an lr for every arm
    sweep = json.loads((out / "sweep" / "results.json").read_text())
    assert set(summary["derived"]["learning_rates"]) == set(ARM_NAMES)
    assert sweep["settings"]["sizes"]["steps"] == sweep["settings"]["sizes"]["sweep_steps"]
    # the sweep skips the held-out caption loss (no choice reads it); the seeds measure it
    sweep_vlm = [r for r in sweep["records"] if not r["variant"].startswith(CLIP)]
    main_vlm = [r for r in summary["records"] if r["variant"] != CLIP]
    assert sweep_vlm and all("heldout_caption_loss" not in r["metrics"] for r in sweep_vlm)
    assert main_vlm and all(r["metrics"]["heldout_caption_loss"] > 0 for r in main_vlm)
    # every arm of a seed started from the same projector: the runs' first logged losses
    # of the two contrastive-only arms on short captions would match; here check the
    # per-item values are stored and average to the metric
    rec = summary["records"][0]
    assert abs(sum(rec["items"]["comp"]) / len(rec["items"]["comp"]) - rec["metrics"]["comp"]) < 1e-9
    assert (out / "plot.png").stat().st_size > 10_000 and "## Claims" in (out / "table.md").read_text()
    # resume: a second call skips every finished (variant, seed)
    before = (out / "results.jsonl").read_text()
    assert main(["experiment", "--quick", "--out", str(out), "--seeds", "0", "1", "--", "vladva", "llm.name=tiny",
                 "vision.tower=tiny", "projector.pool_size=2", "objective.patch_pool=2", "data.shapes_n=60",
                 "lora.target_modules=q_proj,v_proj", "baseline.text_tower=tiny", "size.lrs=1e-3,2e-4"]) == 0
    assert (out / "results.jsonl").read_text() == before


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


def test_ak_runs_both_alignments_then_the_same_instruction_tuning(tmp_path):
    from vlmalign.experiments.ak import ARMS, GROUNDED

    out = tmp_path / "ak"
    assert main(["experiment", "--quick", "--out", str(out), "--scenes", "60", "--eval-items", "8", "--seeds", "0", "--",
                 "ak", "llm.name=tiny", "vision.tower=tiny", "projector.pool_size=2", "objective.patch_pool=2",
                 "lora.target_modules=q_proj,v_proj"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert {r["variant"] for r in summary["records"]} == set(ARMS)
    for r in summary["records"]:
        assert {"t2i_R@5", "caption_loss_true_image"} <= set(r["metrics"])  # every arm, before stage 2
        if ARMS[r["variant"]].instructed:
            assert {"mcq_lik", "mcq_gen", "caption_cider"} <= set(r["metrics"])
            assert r["extra"]["steps"] >= 1  # instruction-tuned
        else:  # the raw arm answers the centring claim before stage 2 and stops there
            assert not {"mcq_lik", "caption_cider"} & set(r["metrics"]) and r["extra"]["steps"] == 0
            assert not (out / "runs" / "align-clip-raw-instruct-1-seed0").exists()
    instructed = [r for r in summary["records"] if ARMS[r["variant"]].instructed]
    assert len(instructed) == 2
    import yaml

    raw = yaml.safe_load((out / "runs" / "align-clip-raw-seed0" / "config.yaml").read_text())
    assert raw["embedding"]["centre"] is False
    assert {c["id"] for c in summary["claims"]} >= {"mcq-gain", "retrieval", "caption-loss", "captioning",
                                                    "captioning-grounded"}
    for r in instructed:  # one CIDEr per held-out image, averaging to the metric
        true, shuffled, gap = (r["items"][k] for k in ("caption_cider", "caption_cider_shuffled", GROUNDED))
        assert len(true) == len(shuffled) == len(gap) >= 2
        assert gap == pytest.approx([t - s for t, s in zip(true, shuffled, strict=True)], abs=1e-12)
        assert r["metrics"][GROUNDED] == pytest.approx(sum(gap) / len(gap), abs=1e-12)
    # records written before the grounded score existed get it from their stored values,
    # even in a report-only run (arithmetic, nothing measured again)
    lines = out / "results.jsonl"
    before = [json.loads(line) for line in lines.read_text().splitlines()]
    for r in before:
        if GROUNDED in r["items"]:
            del r["items"][GROUNDED], r["metrics"][GROUNDED]
    lines.write_text("".join(json.dumps(r) + "\n" for r in before))
    assert main(["experiment", "--report-only", "--quick", "--out", str(out), "--scenes", "60", "--eval-items", "8",
                 "--seeds", "0", "--", "ak", "llm.name=tiny", "vision.tower=tiny", "projector.pool_size=2",
                 "objective.patch_pool=2", "lora.target_modules=q_proj,v_proj"]) == 0
    after = {r["variant"]: r for r in (json.loads(line) for line in lines.read_text().splitlines())}
    for r in instructed:
        assert after[r["variant"]]["items"][GROUNDED] == pytest.approx(r["items"][GROUNDED], abs=1e-12)


def test_ak_measures_captioning_late_from_the_same_weights(tmp_path, monkeypatch):
    """A record written before captioning was measured gets it from the arm's saved
    instruction-tuned checkpoint: the weights it scores are the ones the run scored."""
    from vlmalign.experiments import ak

    def weights_fingerprint(model, data, images=None):  # stands in for the captions: a sum of the trained weights
        w = sum(float(p.double().sum()) for n, p in model.named_parameters() if "lora_" in n or "projector" in n)
        return {"caption_cider": w, "caption_cider_shuffled": 0.0}, {"caption_cider": [w]}, [repr(w)]

    monkeypatch.setattr(ak, "captioning_items", weights_fingerprint)
    out = tmp_path / "ak"
    args = ["experiment", "--quick", "--out", str(out), "--scenes", "60", "--eval-items", "8", "--seeds", "0", "--",
            "ak", "llm.name=tiny", "vision.tower=tiny", "projector.pool_size=2", "objective.patch_pool=2",
            "lora.target_modules=q_proj,v_proj"]
    assert main(args) == 0
    lines = out / "results.jsonl"
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    measured = {r["variant"]: r["metrics"]["caption_cider"] for r in records if "caption_cider" in r["metrics"]}
    assert len(set(measured.values())) == len(measured) == 2  # each instruction-tuned arm trained other weights
    for r in records:
        if r["variant"] in measured:
            del r["metrics"]["caption_cider"], r["items"]["caption_cider"], r["extra"]["captions"]
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(args) == 0  # the second run measures what the records lack, from the checkpoints
    again = {r["variant"]: r for r in (json.loads(line) for line in lines.read_text().splitlines())}
    for variant, w in measured.items():
        assert again[variant]["metrics"]["caption_cider"] == pytest.approx(w, rel=1e-9, abs=1e-9)
        assert again[variant]["extra"]["captions"] == [repr(again[variant]["metrics"]["caption_cider"])]
    assert "caption_cider" not in again["align-clip (raw)"]["metrics"]  # not instruction-tuned: nothing to caption
    assert {c["id"] for c in json.loads((out / "results.json").read_text())["claims"]} >= {"captioning"}


def _quick_study(tmp_path, name: str) -> tuple:
    """`vlmalign experiment --quick NAME` on tiny models, seed 0: (out, summary, records by arm)."""
    out = tmp_path / name
    assert main(["experiment", "--quick", "--out", str(out), "--seeds", "0", "--", name, "llm.name=tiny",
                 "vision.tower=tiny", "projector.pool_size=2", "objective.patch_pool=2"]) == 0
    summary = json.loads((out / "results.json").read_text())
    return out, summary, {r["variant"]: r for r in summary["records"]}


def test_prompt_study_trains_one_model_per_prompt(tmp_path):
    from vlmalign.experiments.prompts import PROMPTS

    out, _, recs = _quick_study(tmp_path, "prompts")
    assert list(recs) == [p[0] for p in PROMPTS] and len(PROMPTS) >= 3
    assert recs["no instruction"]["extra"]["text_prompt"] == "<sent>"
    # each model trained under its own prompt (the saved config of its run says so)
    import yaml

    for name, image_prompt, text_prompt in PROMPTS:
        cfg = yaml.safe_load((out / "runs" / f"{name.replace(' ', '-')}-seed0" / "config.yaml").read_text())
        assert (cfg["embedding"]["image_prompt"], cfg["embedding"]["text_prompt"]) == (image_prompt, text_prompt)


def test_derangement_moves_every_caption_to_another_image():
    import torch

    from vlmalign.experiments.data_efficiency import derangement

    for n in (2, 3, 10, 57):
        p = derangement(n, seed=n)
        assert sorted(p.tolist()) == list(range(n)) and bool((p != torch.arange(n)).all())


def test_image_information_gap_is_zero_when_the_projector_ignores_the_image(tiny_cfg):
    import torch

    from vlmalign.eval.evaluate import EvalData
    from vlmalign.experiments.data_efficiency import image_information
    from vlmalign.models.vlm import VLM

    cfg = tiny_cfg("align", "data.eval_max_samples=12")
    model = VLM.build(cfg)
    data = EvalData.prepare(model, cfg, benchmarks=False)
    got = image_information(model, data, cfg)
    assert got["image_information_gap"] != 0.0  # a random projector still passes the image on
    with torch.no_grad():
        for p in model.projector.parameters():
            p.zero_()  # every image -> the same visual tokens
    got = image_information(model, data, cfg)
    assert abs(got["image_information_gap"]) < 1e-5


@pytest.mark.slow
def test_an_aligned_ntp_projector_carries_image_information(tmp_path):
    """The check the CG-VLM experiment reports, on the real models: after NTP-only
    alignment the held-out caption loss is lower with the true image than with another's."""
    from vlmalign.config import load_config
    from vlmalign.eval.evaluate import EvalData
    from vlmalign.experiments.data_efficiency import image_information
    from vlmalign.paths import recipe_config
    from vlmalign.train.trainer import train

    cfg = load_config(recipe_config("align"), [f"data.root={tmp_path / 'shapes'}", "data.shapes_n=300",
                                               "train.max_steps=40", "train.batch_size=8", "data.eval_max_samples=30",
                                               f"train.out_dir={tmp_path / 'align'}", "train.eval_at_end=false"])
    run = train(cfg)
    got = image_information(run.model, EvalData.prepare(run.model, cfg, benchmarks=False), cfg)
    assert got["image_information_gap"] > 0.05, got


def test_caption_format_study_trains_each_format_and_reports_both_caption_losses(tmp_path):
    out, summary, recs = _quick_study(tmp_path, "caption-format")
    assert list(recs) == ["plain", "prompted"]
    import yaml

    for fmt in ("plain", "prompted"):
        cfg = yaml.safe_load((out / "runs" / f"{fmt}-seed0" / "config.yaml").read_text())
        assert cfg["data"]["caption_format"] == fmt
        m = recs[fmt]["metrics"]
        assert m["caption_loss_plain"] > 0 and m["caption_loss_prompted"] > 0
        assert m["caption_loss_own"] == m[f"caption_loss_{fmt}"]
    # the two formats are different sequences: their held-out losses differ
    assert recs["plain"]["metrics"]["caption_loss_plain"] != recs["plain"]["metrics"]["caption_loss_prompted"]
    assert {c["id"] for c in summary["claims"]} == {"prompted-costs-retrieval", "prompted-costs-comp",
                                                    "prompted-costs-captioning", "prompted-costs-plain-captioning",
                                                    "prompted-is-faster"}


def test_vladva_sweep_judges_each_arm_highest_rate_against_its_lowest():
    from vlmalign.experiments.vladva import ARM_NAMES, sweep_claims

    claims = sweep_claims([2e-4, 1e-3, 5e-4])
    assert [(c.better, c.worse) for c in claims] == [(f"{n} @ 0.001", f"{n} @ 0.0002") for n in ARM_NAMES]
    assert sweep_claims([1e-3]) == []  # one rate: no sweep, nothing to judge


def test_a_name_after_seeds_gets_a_clear_error_not_a_traceback(capsys):
    """`--seeds 3 4 5 prompts` swallows the name into the list: argparse's error then says
    how to write it."""
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment", "--seeds", "3", "4", "prompts"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'prompts' is not a seed" in err and "--seeds 3 4 5 -- prompts" in err


def test_vladva_sweep_settings_leave_out_the_main_seeds(tmp_path):
    """The sweep runs its own seed, so a rerun with other seeds in the same folder resumes
    the finished sweep instead of refusing it as a run with other settings."""
    from vlmalign.experiments.runner import check_settings
    from vlmalign.experiments.vladva import FULL, sweep_experiment

    first = sweep_experiment(FULL | {"seeds": [0, 1, 2]}, tmp_path, "tiny", "tiny", [], "tiny")
    rerun = sweep_experiment(FULL | {"seeds": [3, 4, 5]}, tmp_path, "tiny", "tiny", [], "tiny")
    assert first.seeds == rerun.seeds == [FULL["sweep_seed"]]
    check_settings(tmp_path, first)
    check_settings(tmp_path, rerun)  # raises SettingsMismatch if the seeds were part of the settings
    other = sweep_experiment(FULL | {"sweep_steps": 3}, tmp_path, "tiny", "tiny", [], "tiny")
    with pytest.raises(FileExistsError):
        check_settings(tmp_path, other)


def test_an_out_folder_of_another_run_gets_a_clear_error_not_a_traceback(tmp_path, capsys):
    out = tmp_path / "vladva"
    out.mkdir()
    (out / "experiment.json").write_text(json.dumps({"experiment": "vladva", "variants": [], "settings": {}}))
    rc = main(["experiment", "--quick", "--out", str(out), "vladva", "llm.name=tiny", "vision.tower=tiny",
               "baseline.text_tower=tiny"])
    assert rc == 2
    printed = capsys.readouterr().out
    assert "already exists" in printed and "other settings" in printed and "Traceback" not in printed


def test_ak_captions_the_first_n_held_out_images_when_told(monkeypatch):
    """The default captions 50 of the held-out images (to fit its time budget): exactly
    the first `images` of them, each scored against its own references."""
    from types import SimpleNamespace

    from vlmalign.experiments import ak

    captioned = []

    def fake_caption(model, features, prompt, max_new_tokens):  # the caption repeats the image's own first reference
        captioned.extend(features.tolist())
        return [f"a red circle number {int(f)}" for f in features.tolist()]

    monkeypatch.setattr(ak, "caption_images", fake_caption)
    monkeypatch.setattr(ak, "caption_prompt", lambda tok: "")
    data = SimpleNamespace(captions=[f"a red circle number {i}" for i in range(5) for _ in range(2)],
                           text_to_image=torch.arange(5).repeat_interleave(2), features=torch.arange(5.0))
    metrics, items, texts = ak.captioning_items(SimpleNamespace(tokenizer=None), data, 3)
    assert captioned == [0.0, 1.0, 2.0] and len(texts) == 3
    assert len(items["caption_cider"]) == 3 and min(items[ak.GROUNDED]) > 0  # own references beat another image's
    ak.captioning_items(SimpleNamespace(tokenizer=None), data)
    assert captioned[3:] == [0.0, 1.0, 2.0, 3.0, 4.0]  # None: every held-out image
    assert ak.FULL["caption_images"] == 50 and ak.QUICK["caption_images"] is None
