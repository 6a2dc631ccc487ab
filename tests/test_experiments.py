"""Experiments end to end on tiny models: they run, and write their JSON and plot."""

import json

from vlmalign.cli import main


def test_data_efficiency_runs_and_writes_results(tmp_path):
    out = tmp_path / "de"
    rc = main(["experiment", "--quick", "--out", str(out), "data-efficiency", "llm.name=tiny", "vision.tower=tiny",
               "projector.pool_size=2", "objective.patch_pool=2", "data.shapes_n=60", "train.batch_size=16"])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    res = summary["results"]["0"]
    assert set(res) == {"align", "align-cg"}
    for runs in res.values():
        assert set(runs) == {"0", "0.1", "0.25", "1.0"}
        assert runs["1.0"]["records"] > runs["0.25"]["records"] > runs["0.1"]["records"] >= 1
        assert runs["1.0"]["steps"] >= runs["0.1"]["steps"]
        for m in runs.values():
            assert 0.0 <= m["mcq_lik_acc"] <= 100.0 and m["mcq_items"] > 0
    assert (out / "mcq_vs_fraction.png").stat().st_size > 10_000
