"""The user's own data (issue 18): vlmalign never writes into a folder the user points it
at, evaluates the data a run trained on (or says why not), and never loses a real record
silently. Real files on disk, tiny models, the CLI's `main([...])` end to end."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmalign.cli import main
from vlmalign.config import DataConfig, load_config
from vlmalign.data.sample import DataPathError, LoadReport

from .conftest import TINY

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmalign"

# The example LLaVA's docs publish for custom data (docs/Finetune_Custom_Data.md): a
# trailing comma after the last turn and a literal `...` for "more records".
LLAVA_DOCS_EXAMPLE = """[
  {
    "id": "997bb945-628d-4724-b370-b84de974a19f",
    "image": "part-000001/997bb945-628d-4724-b370-b84de974a19f.jpg",
    "conversations": [
      {
        "from": "human",
        "value": "<image>\\nWrite a prompt for Stable Diffusion to generate this image."
      },
      {
        "from": "gpt",
        "value": "a beautiful painting of chernobyl by nekro, pascal blanche, john harris, greg rutkowski"
      },
    ]
  },
  ...
]
"""


def tree_hash(folder: Path) -> str:
    """sha256 over every path under `folder` (files, folders) and every file's bytes."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _flat(text: str) -> str:
    """Console output without the line breaks rich puts into long lines."""
    return "".join(text.split())


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    """A user's folder: nine photos and their captions.jsonl."""
    folder = tmp_path / "photos"
    folder.mkdir()
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey"]
    with (folder / "captions.jsonl").open("w") as f:
        for i, colour in enumerate(colours):
            arr = np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"photo_{i}.jpg", quality=90)
            f.write(json.dumps({"image": f"photo_{i}.jpg", "caption": f"a photo with a {colour} patch"}) + "\n")
    return folder


def _train_args(root: str, train_file: str, out: Path, *extra: str) -> list[str]:
    return ["train", "align", *TINY, f"data.root={root}", f"data.train_file={train_file}", f"train.out_dir={out}",
            "train.max_steps=2", "train.batch_size=4", "train.warmup_steps=0", *extra]


# ---------------------------------------------------------------- case 1, 2, 3, 8: the whole journey


def test_a_users_folder_is_never_written_by_any_command(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = tree_hash(photos)
    run = tmp_path / "runs" / "mine"

    # 1. a path typo (the file is resolved under data.root): fails first, writes nothing
    assert main(_train_args("photos", "photos/captions.jsonl", run)) == 2
    out = _flat(capsys.readouterr().out)
    assert _flat("data.train_file='photos/captions.jsonl'") in out  # the key and the value given
    assert _flat(str(Path("photos") / "photos" / "captions.jsonl")) in out  # the path it resolved to
    assert "relativetothecurrentfolder" in out  # and the fix
    assert tree_hash(photos) == before and not run.exists()

    # 2. the corrected command trains on the user's file and evaluates a held-out split of it
    assert main(_train_args("photos", "captions.jsonl", run)) == 0
    out = _flat(capsys.readouterr().out)
    assert _flat("held out of training") in out and _flat("heldout.jsonl") in out  # announced
    assert _flat("held-out retrieval: 2 pairs from held-out split of data.train_file=captions.jsonl") in out
    assert _flat("set data.compositional_file=") in out and _flat("set data.karpathy_file=") in out
    assert tree_hash(photos) == before
    held = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 2 and all(Path(h["image"]).parent == photos.resolve() for h in held)  # the user's own
    checkpoint = run / (run / "latest").read_text().strip()
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    assert metrics["metrics"]["eval_pairs"] == 2 and "compositional_items" not in metrics["metrics"]
    assert not any(k.startswith(("kp_", "zs_", "comp_")) for k in metrics["metrics"])  # no shapes benchmark
    assert json.loads((run / "provenance.json").read_text())["data"][str(Path("photos") / "captions.jsonl")][
        "sha256"] == hashlib.sha256((photos / "captions.jsonl").read_bytes()).hexdigest()

    # 8. eval writes beside the checkpoint; the checkpoint stays byte-identical and verifies
    from vlmalign.train import rundir
    from vlmalign.train.checkpoint import verify_checkpoint

    real_versions = rundir.package_versions
    installed = real_versions()
    monkeypatch.setattr(rundir, "package_versions", lambda names=rundir.PACKAGES: {**installed, "torch": "9.9.9"})
    ckpt_before = tree_hash(checkpoint)
    assert main(["eval", str(run)]) == 0
    out = _flat(capsys.readouterr().out)
    assert "madewithotherversions" in out and "torch9.9.9(checkpoint:" in out  # the provenance warning
    monkeypatch.setattr(rundir, "package_versions", real_versions)
    assert tree_hash(checkpoint) == ckpt_before
    verify_checkpoint(checkpoint)
    assert json.loads((run / f"eval-{checkpoint.name}" / "metrics.json").read_text())["metrics"]["eval_pairs"] == 2
    assert main(["eval", "--out", str(checkpoint / "eval"), str(run)]) == 2  # never inside it
    # a folder of real data is evaluated from its own file: no training file needed
    assert main(["eval", "--out", str(tmp_path / "eval2"), str(run), "data.train_file=",
                 "data.eval_file=captions.jsonl"]) == 0
    assert json.loads((tmp_path / "eval2" / "metrics.json").read_text())["metrics"]["eval_pairs"] == 9
    assert tree_hash(checkpoint) == ckpt_before and tree_hash(photos) == before

    # 3. caption: the count and an estimate are printed before the work
    assert main(["caption", "--checkpoint", str(run), "--images", "photos", "--out", str(tmp_path / "caps.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "9 images in photos" in err and "about" in err
    assert len((tmp_path / "caps.jsonl").read_text().splitlines()) == 9

    # embed, data check, data shard: read the folder, write elsewhere
    assert main(["embed", "--checkpoint", str(run), "--images", "photos", "--out", str(tmp_path / "e.safetensors")]) == 0
    assert main(["data", "check", "instruct", *TINY, "data.root=photos", "data.train_file=captions.jsonl"]) == 2
    assert "isnotaLLaVAconversationfile" in _flat(capsys.readouterr().out)
    assert main(["data", "shard", "--from", "photos/captions.jsonl", "--out", str(tmp_path / "shards")]) == 0
    assert tree_hash(photos) == before


def test_shapes_is_generated_only_into_a_new_empty_or_shapes_folder(photos, tmp_path):
    from vlmalign.data.splits import ensure_data

    before = tree_hash(photos)
    with pytest.raises(DataPathError, match="holds other files"):
        ensure_data(DataConfig(root=str(photos), shapes_n=12))  # no train_file: would have been shapes
    assert tree_hash(photos) == before
    with pytest.raises(DataPathError, match=r"data\.eval_file='nope\.jsonl' resolves to"):
        ensure_data(DataConfig(root=str(tmp_path / "new"), shapes_n=12, eval_file="nope.jsonl"))
    assert not (tmp_path / "new").exists()  # checked before anything was written
    ensure_data(DataConfig(root=str(tmp_path / "new"), shapes_n=12))
    assert json.loads((tmp_path / "new" / "meta.json").read_text())["n"] == 12
    (tmp_path / "empty").mkdir()
    ensure_data(DataConfig(root=str(tmp_path / "empty"), shapes_n=12))
    assert (tmp_path / "empty" / "train.jsonl").is_file()
    with pytest.raises(DataPathError, match="generate_shapes is off"):
        ensure_data(DataConfig(root=str(tmp_path / "absent"), generate_shapes=False))


def test_no_import_circle_between_the_scene_library_and_the_questions():
    def imports(name: str) -> set[str]:
        tree = ast.parse((SRC / "data" / name).read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found.add((node.module or "").split(".")[-1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[-1] for a in node.names}
        return found

    assert not imports("shapes.py") & {"instruct", "shapes_writer"}
    assert "shapes_writer" not in imports("instruct.py")
    assert {"shapes", "instruct"} <= imports("shapes_writer.py")


# ---------------------------------------------------------------- case 2: what is evaluated


def test_a_users_run_evaluates_only_the_files_it_names(photos, shapes_root, tmp_path):
    from vlmalign.eval.evaluate import EvalPlan

    user = str(photos / "captions.jsonl")
    # data.root is a shapes folder with its own benchmarks, but the run trains on the user's file
    cfg = load_config(None, TINY + [f"data.root={shapes_root}", f"data.train_file={user}"])
    plan = EvalPlan.load(cfg)
    assert len(plan.samples) == 2 and all(s.image.parent == photos.resolve() for s in plan.samples)
    assert not plan.items and not plan.kp_captions and not plan.zs_images
    lines = "\n".join(plan.describe())
    for key in ("data.compositional_file", "data.karpathy_file", "data.zeroshot_dir"):
        assert key in lines

    # a Karpathy-split file by any name, a SugarCrepe file, named in the config
    split = tmp_path / "my_retrieval_split.json"
    shutil.copy(shapes_root / "karpathy_shapes.json", split)
    cfg = load_config(None, TINY + [f"data.root={shapes_root}", f"data.train_file={user}",
                                    f"data.karpathy_file={split}", "data.compositional_file=sugarcrepe"])
    plan = EvalPlan.load(cfg)
    assert plan.kp_captions and plan.sources["karpathy"] == str(split) and plan.items

    # eval.* switches choose what runs
    cfg = load_config(None, TINY + [f"data.root={shapes_root}", "eval.compositional=false", "eval.karpathy=false"])
    plan = EvalPlan.load(cfg)
    assert plan.samples and not plan.items and not plan.kp_captions and plan.zs_images
    assert "eval.compositional=false" in "\n".join(plan.describe())


def test_a_folder_made_in_the_shapes_layout_is_evaluated_on_its_test_split(photos, tmp_path):
    from vlmalign.data.splits import eval_samples, train_samples, uses_shapes_layout

    folder = tmp_path / "layout"
    shutil.copytree(photos, folder)
    lines = (folder / "captions.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[6:]) + "\n")
    cfg = DataConfig(root=str(folder))
    assert uses_shapes_layout(cfg) and len(train_samples(cfg)) == 6 and len(eval_samples(cfg)) == 3
    assert not (folder / "meta.json").exists()  # nothing generated into it


def test_the_held_out_split_is_seeded_disjoint_and_left_out_of_training(photos):
    from vlmalign.data.splits import eval_samples, train_samples

    cfg = DataConfig(root=str(photos), train_file="captions.jsonl", heldout_fraction=0.3)
    train, held = train_samples(cfg), eval_samples(cfg)
    assert len(held) == 3 and len(train) == 6
    assert not {s.id for s in train} & {s.id for s in held}
    assert [s.id for s in eval_samples(cfg)] == [s.id for s in held]  # seeded: the same every time
    other = eval_samples(DataConfig(root=str(photos), train_file="captions.jsonl", heldout_fraction=0.3, heldout_seed=1))
    assert [s.id for s in other] != [s.id for s in held]
    named = DataConfig(root=str(photos), train_file="captions.jsonl", eval_file="captions.jsonl")
    assert len(train_samples(named)) == 9  # an eval file given: nothing held out


# ---------------------------------------------------------------- case 4: ScienceQA choices


def test_scienceqa_options_that_differ_only_in_case_are_kept(tmp_path):
    from vlmalign.data.scienceqa import load_scienceqa
    from vlmalign.eval.mcq import parse_answer

    problem = {"question": "Which correctly shows the title of a movie?",
               "choices": ["A breath of Fresh Air", "A Breath of Fresh Air"], "answer": 1, "hint": "",
               "image": None, "task": "closed choice", "grade": "grade5", "subject": "language science",
               "topic": "capitalization", "category": "Capitalization", "skill": "", "lecture": "", "solution": "",
               "split": "val"}
    (tmp_path / "problems.json").write_text(json.dumps({"14": problem}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"val": ["14"], "trainval": ["14"], "minival": ["14"]}))
    for split in ("val", "trainval", "minival"):
        report = LoadReport()
        items = load_scienceqa(tmp_path / "problems.json", tmp_path / "pid_splits.json", split, img_only=False,
                               report=report)
        assert [it.id for it in items] == ["14"] and report.total_skipped() == 0
    choices = items[0].choices
    assert parse_answer("B", choices) == 1 and parse_answer("(A)", choices) == 0  # letters: never ambiguous
    assert parse_answer("A Breath of Fresh Air", choices) == 1  # the exact text names one option
    assert parse_answer("a breath of fresh air", choices) is None  # matches both: not guessed


# ---------------------------------------------------------------- case 5: data errors at the CLI


@pytest.mark.parametrize("command", [
    ["data", "shard", "--from", "{file}", "--out", "{out}"],
    ["data", "check", "instruct", *TINY, "data.train_file={file}"],
    ["train", "instruct", *TINY, "data.train_file={file}", "train.out_dir={out}"],
])
def test_invalid_json_is_one_message_and_exit_code_2(tmp_path, capsys, command):
    path = tmp_path / "llava.json"
    path.write_text(LLAVA_DOCS_EXAMPLE)
    argv = [a.format(file=path, out=tmp_path / "out") for a in command]
    assert main(argv) == 2
    captured = capsys.readouterr()
    out = _flat(captured.out + captured.err)
    assert "Traceback" not in captured.out + captured.err
    assert "isnotvalidJSON" in out and "line14,column5" in out  # the trailing comma's position


def test_a_file_that_is_not_conversations_is_an_error(photos):
    from vlmalign.data.conversations import load_conversations

    with pytest.raises(ValueError, match="is not a LLaVA conversation file"):
        load_conversations(photos / "captions.jsonl")


# ---------------------------------------------------------------- case 6, 7: counts and skips


def test_every_skipped_record_is_kept_and_written(tmp_path):
    from vlmalign.data.formats import load_captions_jsonl
    from vlmalign.train.rundir import write_skipped

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [json.dumps({"image": "a.png", "caption": "ok"})] + [
        json.dumps({"image": f"missing_{i}.png", "caption": "gone"}) for i in range(7)] + ["{not json"]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    report = LoadReport()
    load_captions_jsonl(tmp_path / "c.jsonl", report=report)
    assert report.skipped == {"missing_image": 7, "malformed_json": 1}
    assert len(report.as_dict()["examples"]["missing_image"]) == 3  # the summary keeps a few
    written = [json.loads(line) for line in write_skipped(tmp_path / "run", report).read_text().splitlines()]
    assert len(written) == 8  # skipped.jsonl keeps all
    assert {r["where"] for r in written} == {f"{tmp_path / 'c.jsonl'}:{i}" for i in range(2, 10)}
    assert all(r["task"] == "train" and r["reason"] and r["detail"] for r in written)


def test_data_shard_lists_every_skipped_record(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [json.dumps({"image": "a.png", "caption": "ok"})] + [
        json.dumps({"image": f"missing_{i}.png", "caption": "gone"}) for i in range(5)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["data", "shard", "--from", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "shards")]) == 0
    assert len((tmp_path / "shards" / "skipped.jsonl").read_text().splitlines()) == 5


def test_evaluation_reports_counts_and_keeps_task_skips_apart(shapes_root, tmp_path):
    from vlmalign.eval.evaluate import EvalData, EvalPlan, evaluate
    from vlmalign.models.vlm import VLM

    pairs = [json.loads(line) for line in (shapes_root / "test.jsonl").read_text().splitlines()][:4]
    (tmp_path / "eval.jsonl").write_text("\n".join(
        [json.dumps({**r, "image": str(shapes_root / r["image"])}) for r in pairs] + ["{bad"]) + "\n")
    items = {f"x{i}": {"filename": str(shapes_root / r["image"]), "caption": r["caption"],
                       "negative_caption": r["negatives"]["replace_att"]} for i, r in enumerate(pairs)}
    items["bad1"] = {"filename": "nope.png", "caption": "a", "negative_caption": "b"}
    items["bad2"] = {"filename": "nope2.png", "caption": "a", "negative_caption": "b"}
    (tmp_path / "replace_att.json").write_text(json.dumps(items))
    cfg = load_config(None, TINY + ["recipe=align-clip", f"data.root={shapes_root}",
                                    f"data.eval_file={tmp_path / 'eval.jsonl'}",
                                    f"data.compositional_file={tmp_path / 'replace_att.json'}",
                                    "data.allow_outside_root=true"])
    plan = EvalPlan.load(cfg, benchmarks=False)
    summary = plan.skip_summary()
    assert summary["pairs"]["skipped"] == {"malformed_json": 1}
    assert summary["compositional"]["skipped"] == {"missing_image": 2}

    # a freshly built model (no embedding mean yet) evaluates, and every accuracy has its count
    model = VLM.build(cfg)
    assert not bool(model.embed_mean_ready)
    metrics = evaluate(model, EvalData.prepare(model, cfg, plan=plan), cfg)
    assert metrics["eval_pairs"] == 4 and metrics["compositional_items"] == 4
    assert metrics["compositional_items_replace_att"] == 4 and "comp_emb_replace_att" in metrics


# ---------------------------------------------------------------- one run per folder; provenance

HOLD = "import sys, time; from vlmalign.train.rundir import RunLock; RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)"


def test_a_second_run_into_the_same_folder_refuses_and_a_killed_run_leaves_no_lock(tiny_cfg, shapes_root, tmp_path, capsys):
    from vlmalign.train.rundir import RunLock, RunLockedError

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": "0"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(out).acquire()
        argv = ["train", "align", *TINY, f"data.root={shapes_root}", f"train.out_dir={out}", "train.max_steps=1"]
        assert main(argv) == 2
        assert "inuse" in _flat(capsys.readouterr().out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(out) as lock:  # the killed run's lock went with it
        assert lock.active
        with RunLock(out):  # re-entrant in one process (the command line and the trainer)
            pass
        assert lock.active
    RunLock(out).acquire().release()


def test_provenance_records_versions_and_data_hashes(tiny_cfg, shapes_root, tmp_path):
    from vlmalign import __version__
    from vlmalign.train.rundir import (
        copy_provenance,
        provenance,
        provenance_differences,
        read_provenance,
        sha256_file,
        write_provenance,
    )

    cfg = tiny_cfg("align")
    record = provenance(cfg)
    assert record["vlmalign"]["version"] == __version__
    assert record["packages"]["torch"] and record["hardware"]["cpu_count"]
    train_file = str(shapes_root / "train.jsonl")
    assert record["data"][train_file]["sha256"] == hashlib.sha256(Path(train_file).read_bytes()).hexdigest()
    assert sha256_file(train_file) == record["data"][train_file]["sha256"]
    assert provenance_differences(record) == []
    run = tmp_path / "run"
    write_provenance(run, record)
    (run / "checkpoint-1").mkdir()
    copy_provenance(run, run / "checkpoint-1")
    assert read_provenance(run / "checkpoint-1") == record
    record["packages"]["transformers"] = "1.0.0"
    assert any(line.startswith("transformers ") and "1.0.0" in line for line in provenance_differences(record))


# ---------------------------------------------------------------- the trainer's own calls
# train() holds the run folder's lock, writes provenance at setup (each checkpoint copies it
# under its manifest) and every skipped record at the end.


def test_training_lists_every_skip_and_each_checkpoint_keeps_its_provenance(tiny_cfg, photos, tmp_path):
    from vlmalign.train.checkpoint import MANIFEST_NAME, verify_checkpoint
    from vlmalign.train.trainer import train

    with (photos / "captions.jsonl").open("a") as f:
        for i in range(3):
            f.write(json.dumps({"image": f"gone_{i}.jpg", "caption": "a photo that is not there"}) + "\n")
    cfg = tiny_cfg("align", f"data.root={photos}", "data.train_file=captions.jsonl", "train.max_steps=1",
                   "train.batch_size=4", f"train.out_dir={tmp_path / 'run'}")
    result = train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["where"].rsplit(":", 1)[1] for r in lines) == ["10", "11", "12"]
    assert all(r["reason"] == "missing_image" for r in lines)
    verify_checkpoint(result.checkpoint)
    manifest = json.loads((result.checkpoint / MANIFEST_NAME).read_text())
    assert "provenance.json" in manifest["files"]


def test_train_itself_refuses_a_folder_another_process_holds(tiny_cfg, tmp_path):
    from vlmalign.train.rundir import RunLockedError
    from vlmalign.train.trainer import train

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": "0"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError):
            train(tiny_cfg("align", "train.max_steps=1", f"train.out_dir={out}"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
