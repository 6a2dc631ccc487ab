"""RunLog: TensorBoard scalars, the plain train.log, the progress bar and the disabled rank."""

import io
from pathlib import Path

import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlmalign.train.runlog import LOG_NAME, TB_DIR, RunLog, format_entry, log_eval_metrics


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file under run_dir/tb."""
    acc = EventAccumulator(str(run_dir / TB_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _pipe_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=80), buf  # a StringIO is not a terminal


def _run(out: Path, console: Console, enabled: bool = True) -> None:
    with RunLog(out, total_steps=4, enabled=enabled, title="align", samples_per_step=8, console=console) as rl:
        for step in range(1, 5):
            parts = {"ntp_loss": 4.0 - step, "clip_loss": 1.0 / step, "loss": 5.0 - step}
            rl.step(step, parts)
            if step % 2 == 0:
                rl.log(step, parts | {"step": step, "lr": 1e-3 * step, "grad_norm": 0.5, "logit_scale": 14.3, "note": "x"})
        rl.log_eval(4, {"emb_i2t_R@1": 37.5, "eval_pairs": 64.0, "gap_gap": float("nan")})


def test_tensorboard_scalars_have_the_logged_tags_steps_and_values(tmp_path: Path):
    console, _ = _pipe_console()
    _run(tmp_path, console)
    sc = _scalars(tmp_path)
    assert sc["train/ntp_loss"] == [(2, 2.0), (4, 0.0)]
    assert sc["train/clip_loss"] == [(2, 0.5), (4, 0.25)]
    assert [s for s, _ in sc["train/lr"]] == [2, 4]
    assert sc["train/lr"][1][1] == pytest.approx(4e-3)
    assert sc["train/logit_scale"][0][1] == pytest.approx(14.3)
    assert sc["train/grad_norm"][0][1] == pytest.approx(0.5)
    assert sc["eval/emb_i2t_R@1"] == [(4, 37.5)]
    # "step" is the x axis, not a scalar; strings and NaN are not written
    assert "train/step" not in sc and "train/note" not in sc and "eval/gap_gap" not in sc


def test_log_file_has_one_line_per_log_call(tmp_path: Path):
    console, _ = _pipe_console()
    _run(tmp_path, console)
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    steps = [ln for ln in lines if " step " in ln and "eval" not in ln and "done" not in ln]
    assert len(steps) == 2
    assert "step 2/4" in steps[0] and "ntp_loss 2" in steps[0] and "lr 2.00e-03" in steps[0]
    assert "step 4/4" in steps[1] and "clip_loss 0.25" in steps[1] and "samples/s" in steps[1]
    assert any("eval step 4" in ln and "emb_i2t_R@1 37.5" in ln for ln in lines)
    assert "done at step 4" in lines[-1]


def test_resumed_run_appends_to_the_log(tmp_path: Path):
    console, _ = _pipe_console()
    _run(tmp_path, console)
    _run(tmp_path, console)
    text = (tmp_path / LOG_NAME).read_text()
    assert text.count("step 2/4") == 2 and text.count("# ") == 2


def test_non_terminal_output_is_plain_lines_without_control_codes(tmp_path: Path):
    console, buf = _pipe_console()
    with RunLog(tmp_path, total_steps=4, console=console) as rl:
        assert not rl.uses_progress_bar
    _run(tmp_path, console)
    out = buf.getvalue()
    assert "\x1b" not in out and "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 3  # two step lines and the eval line, nothing per step
    assert lines[0].startswith("step 2/4  ntp_loss 2")  # a long line is not wrapped at 80


def test_terminal_draws_a_progress_bar_with_the_loss_parts(tmp_path: Path):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=200)
    with RunLog(tmp_path, total_steps=4, console=console, title="align") as rl:
        assert rl.uses_progress_bar
        for step in range(1, 5):
            rl.step(step, {"ntp_loss": 1.25})
    out = buf.getvalue()
    assert "4/4" in out and "ntp_loss 1.250" in out and "ETA" in out and "steps/s" in out


def test_disabled_runlog_writes_nothing(tmp_path: Path):
    console, buf = _pipe_console()
    _run(tmp_path / "rank1", console, enabled=False)
    assert not (tmp_path / "rank1").exists()
    assert buf.getvalue() == ""


def test_log_eval_after_close_and_standalone(tmp_path: Path):
    console, buf = _pipe_console()
    rl = RunLog(tmp_path, total_steps=2, console=console)
    rl.close()
    rl.close()  # twice is fine
    rl.log_eval(2, {"emb_t2i_R@5": 50.0})
    log_eval_metrics(tmp_path, 3, {"emb_t2i_R@5": 60.0})
    assert _scalars(tmp_path)["eval/emb_t2i_R@5"] == [(2, 50.0), (3, 60.0)]
    assert (tmp_path / LOG_NAME).read_text().count("eval step") == 2


def test_format_entry():
    text = format_entry({"step": 5, "loss": 2.34567, "lr": 0.0005, "n": 3, "ok": "yes"})
    assert text == "loss 2.346  lr 5.00e-04  n 3  ok yes"


def test_track_passes_items_through_and_is_silent_in_a_pipe():
    from vlmalign.train.runlog import track

    console, buf = _pipe_console()
    assert list(track(range(5), "eval", console=console)) == [0, 1, 2, 3, 4]
    assert buf.getvalue() == ""
    term = io.StringIO()
    items = list(track(range(3), "eval batches", total=3, console=Console(file=term, force_terminal=True)))
    assert items == [0, 1, 2] and "eval batches" in term.getvalue()
