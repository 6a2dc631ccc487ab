"""train.report_to: Accelerate's trackers behind RunLog. TensorBoard, W&B offline and the
MLflow file store each receive the config, the training values and the evaluation
metrics, and a resumed run logs into the same run (tracker.json)."""

from __future__ import annotations

import io
import json
import struct
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from vlmalign.train.runlog import TRACKER_FILE, RunLog, log_eval_metrics, report_to_names


def _console() -> Console:
    return Console(file=io.StringIO(), width=100)


def _write_config(out: Path, report_to: list[str]) -> None:
    """config.yaml as the trainer writes it before the loop (RunLog reads report_to there)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"recipe": "align", "train": {"lr": 0.001, "report_to": report_to, "max_steps": 4},
           "lora": {"target_modules": ["all-linear"]}}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))


def _train(out: Path, start: int = 0, steps: tuple[int, ...] = (2, 4)) -> None:
    with RunLog(out, total_steps=4, start_step=start, title="align", console=_console()) as rl:
        for step in steps:
            rl.step(step, {"loss": 5.0 - step})
            rl.log(step, {"loss": 5.0 - step, "lr": 1e-3, "step": step, "note": "x", "bad": float("nan")})
        rl.log_eval(steps[-1], {"emb_i2t_R@1": 37.5})


def test_report_to_names_are_checked():
    assert report_to_names("wandb,mlflow") == ["wandb", "mlflow"]
    assert report_to_names(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert report_to_names("none") == [] and report_to_names([]) == []
    with pytest.raises(ValueError, match="unknown tracker.*comet.*tensorboard, wandb, mlflow"):
        report_to_names(["comet"])


def test_config_parses_report_to():
    from vlmalign.config import load_config

    assert load_config(None).train.report_to == ["tensorboard"]
    assert load_config(None, ["train.report_to=wandb,mlflow"]).train.report_to == ["wandb", "mlflow"]


def test_tensorboard_gets_config_scalars_and_eval(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write_config(tmp_path, ["tensorboard"])
    _train(tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(2, 3.0), (4, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/emb_i2t_R@1")] == [(4, 37.5)]
    assert "train/bad" not in acc.Tags()["scalars"] and "train/step" not in acc.Tags()["scalars"]
    (hparams,) = list((tmp_path / "tb").glob("*/hparams.yml"))
    assert yaml.safe_load(hparams.read_text())["train.lr"] == 0.001


def test_no_tracker_writes_no_event_files(tmp_path):
    _write_config(tmp_path, ["none"])
    _train(tmp_path)
    assert not (tmp_path / "tb").exists() and (tmp_path / "train.log").exists()


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    _write_config(tmp_path, ["wandb"])
    with pytest.raises(ImportError, match=r"pip install 'vlmalign\[wandb\]'"):
        RunLog(tmp_path, total_steps=2, console=_console())


def _wandb_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def _wandb_records(run: Path) -> list:
    """The protobuf records of an offline run's transaction log `run-<id>.wandb` (a
    LevelDB-style log: a 7-byte header, 32 KiB blocks of records, each a 4-byte CRC, a
    2-byte length and a 1-byte type: 1 full, 2 first, 3 middle, 4 last). wandb 0.2x+
    keeps config and summary there in offline mode; older releases also wrote
    files/config.yaml and files/wandb-summary.json."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run.glob("run-*.wandb")
    for _ in range(100):  # wandb's service may still be writing the run's last records
        out = _parse_wandb_log(log.read_bytes(), pb)
        if out and out[-1].WhichOneof("record_type") == "exit":
            break
        time.sleep(0.2)
    return out


def _parse_wandb_log(data: bytes, pb) -> list:
    pos, block, part, out = 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
    return out


def _wandb_run_data(run: Path) -> tuple[dict, dict, list[dict]]:
    """(config, summary, history rows) of an offline W&B run."""
    config, summary, history = {}, {}, []
    for r in _wandb_records(run):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config["_run_id"] = r.run.run_id
        elif kind == "config":
            config |= {u.key: json.loads(u.value_json) for u in r.config.update}
        elif kind == "summary":
            summary |= {"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in r.summary.update}
        elif kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    summary_file = run / "files" / "wandb-summary.json"
    if summary_file.is_file():
        summary |= json.loads(summary_file.read_text())
    return config, summary, history


def test_wandb_offline_run_holds_config_summary_and_resumes_into_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'vlmalign[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _write_config(tmp_path, ["wandb"])
    _train(tmp_path, steps=(1, 2))
    (run,) = _wandb_runs(tmp_path)
    run_id = json.loads((tmp_path / TRACKER_FILE).read_text())["wandb"]
    config, summary, history = _wandb_run_data(run)
    assert config["_run_id"] == run_id
    assert config["train.lr"] == 0.001 and config["recipe"] == "align" and config["lora.target_modules"] == "all-linear"
    assert summary["train/loss"] == 3.0 and summary["eval/emb_i2t_R@1"] == 37.5
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 4.0), (2, 3.0)]

    _train(tmp_path, start=2, steps=(3, 4))  # resumed: the same run id
    runs = _wandb_runs(tmp_path)
    assert len(runs) == 2
    config, summary, history = _wandb_run_data(runs[-1])
    assert config["_run_id"] == run_id
    assert summary["train/loss"] == 1.0 and [h["_step"] for h in history] == [3, 4]


def test_mlflow_file_store_holds_params_metrics_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'vlmalign[mlflow]')")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    _write_config(tmp_path, ["mlflow"])
    _train(tmp_path, steps=(1, 2))
    run_id = json.loads((tmp_path / TRACKER_FILE).read_text())["mlflow"]
    (run,) = list((tmp_path / "mlruns").glob(f"*/{run_id}"))
    assert (run / "params" / "train.lr").read_text() == "0.001"
    loss = (run / "metrics" / "train" / "loss").read_text().split()
    assert [float(v) for v in loss[1::3]] == [4.0, 3.0]  # "timestamp value step" per line
    assert (run / "metrics" / "eval" / "emb_i2t_R_at_1").read_text().split()[1] == "37.5"

    _train(tmp_path, start=2, steps=(3, 4))
    log_eval_metrics(tmp_path, 4, {"emb_t2i_R@5": 60.0})  # after training: the same run
    assert [p.name for p in (tmp_path / "mlruns").glob("*/*") if (p / "metrics").is_dir()] == [run_id]
    lines = (run / "metrics" / "train" / "loss").read_text().splitlines()
    assert [int(line.split()[2]) for line in lines] == [1, 2, 3, 4]
    assert (run / "metrics" / "eval" / "emb_t2i_R_at_5").is_file()


def test_several_trackers_at_once(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _write_config(tmp_path, ["tensorboard", "mlflow"])
    _train(tmp_path)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")) and (tmp_path / "mlruns").is_dir()
    assert set(json.loads((tmp_path / TRACKER_FILE).read_text())) == {"mlflow"}


def test_training_run_reports_to_the_configured_tracker(tiny_cfg, monkeypatch):
    """The trainer's RunLog finds train.report_to in the run's config.yaml."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from vlmalign.train.trainer import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_cfg("align", "train.max_steps=2", "train.report_to=mlflow", "train.eval_at_end=false")
    out = Path(cfg.train.out_dir)
    train(cfg)
    run_id = json.loads((out / TRACKER_FILE).read_text())["mlflow"]
    (run,) = list((out / "mlruns").glob(f"*/{run_id}"))
    assert (run / "params" / "recipe").read_text() == "align"
    assert (run / "params" / "train.report_to").read_text() == "mlflow"
    assert len((run / "metrics" / "train" / "loss").read_text().splitlines()) == 1  # log_every=2, 2 steps
    assert not (out / "tb").exists()
