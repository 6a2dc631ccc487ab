"""The HTML report: one self-contained page with every run's numbers and plots, notes for
what is missing, and (where Chromium is installed) a real browser rendering."""

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import yaml
from PIL import Image

from tests.browser import require_browser
from vlmalign.eval.html_report import (
    default_report_path,
    expand_run_dirs,
    load_run,
    metric_label,
    write_report,
)
from vlmalign.eval.plots import write_run_plots
from vlmalign.eval.report import write_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "screenshot_report.py"


def _fake_run(root: Path, name: str, r1: float, contrastive: str = "none", plots: bool = False) -> Path:
    """A run folder as the trainer writes it: config, history, latest -> checkpoint-8 with
    metrics.json (and plots/ when asked)."""
    run = root / name
    ck = run / "checkpoint-8"
    ck.mkdir(parents=True)
    (run / "latest").write_text("checkpoint-8")
    cfg = {"recipe": name, "objective": {"contrastive": contrastive}, "train": {"out_dir": str(run), "lr": 0.001}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    history = [{"ntp_loss": 3.0 - s / 8, "loss": 3.0 - s / 8, "step": s, "lr": 1e-3} for s in (2, 4, 6, 8)]
    (run / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history))
    metrics = {"emb_i2t_R@1": r1, "emb_i2t_R@5": r1 + 20, "emb_t2i_R@1": r1 / 2, "heldout_ntp_loss": 2.345, "eval_pairs": 40.0}
    write_metrics(ck / "metrics.json", metrics, meta={"recipe": name})
    if plots:
        write_run_plots(run, history, None)
    return run


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.img_srcs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.img_srcs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained_and_holds_runs_metrics_and_plots(tmp_path: Path):
    a = _fake_run(tmp_path / "runs", "align", 12.5, plots=True)
    b = _fake_run(tmp_path / "runs", "align-clip", 47.25, contrastive="clip", plots=True)
    out = write_report([a, b], tmp_path / "out" / "report.html")
    page = out.read_text()
    parser = _Collector()
    parser.feed(page)
    parser.close()
    text = " ".join(parser.text)
    assert "align" in text and "align-clip" in text
    assert "12.5" in text and "47.2" in text  # R@1 values, 1 decimal
    assert "2.345" in text  # held-out loss, 3 decimals
    assert "image → text R@1 (prompted embeddings)" in text
    # the config values that differ are shown, the out_dir that always differs is not
    assert "objective.contrastive" in text and "clip" in text
    assert "train.lr" not in text.split("Full configs")[0]
    # plots: 2 comparison plots (loss, recall) + each run's loss_curves.png, all inline PNGs
    assert len(parser.img_srcs) == 4
    assert all(src.startswith("data:image/png;base64,") for src in parser.img_srcs)
    assert page.count('<img src="data:image/png;base64,') == 4
    assert "http://" not in page and "https://" not in page
    assert parser.tags.count("table") >= 3  # runs, metrics, config differences


def test_best_value_is_marked_per_row(tmp_path: Path):
    a = _fake_run(tmp_path, "a", 10.0)
    b = _fake_run(tmp_path, "b", 30.0)
    page = write_report([a, b], tmp_path / "r.html").read_text()
    assert '<td class="best">30.0</td>' in page and '<td class="best">10.0</td>' not in page
    # equal values in every run: no winner
    assert '<td class="best">2.345</td>' not in page


def test_missing_pieces_are_noted_not_fatal(tmp_path: Path):
    ok = _fake_run(tmp_path, "complete", 20.0)
    bare = tmp_path / "bare"
    (bare / "checkpoint-3").mkdir(parents=True)  # trained, never evaluated, no history
    page = write_report([ok, bare, tmp_path / "typo"], tmp_path / "r.html").read_text()
    assert "no metrics.json in" in page and f"vlmalign eval {bare / 'checkpoint-3'}" in page
    assert "no training history" in page
    assert "typo is not a folder" in page
    assert "20.0" in page  # the complete run is still reported


def test_run_folder_forms(tmp_path: Path):
    a = _fake_run(tmp_path / "demo", "align", 5.0)
    b = _fake_run(tmp_path / "demo", "align-cg", 6.0)
    # a folder of runs expands into its runs; a checkpoint folder reports its run
    assert expand_run_dirs([tmp_path / "demo"]) == [a, b]
    run = load_run(a / "checkpoint-8")
    assert run.run_dir == a and run.metrics["emb_i2t_R@1"] == 5.0 and len(run.history) == 4
    # `latest` wins over a newer-looking folder
    (a / "checkpoint-9").mkdir()
    assert load_run(a).checkpoint == a / "checkpoint-8"
    assert default_report_path([a, b]) == (tmp_path / "demo" / "report.html").resolve()


def test_metric_labels():
    assert metric_label("patch_t2i_R@10") == "text → image R@10 (patch-token)"
    assert metric_label("comp_emb_mean") == "mean over categories (prompted embeddings)"
    assert metric_label("comp_patch_swap_att") == "swap att (patch-token)"
    assert metric_label("something_new") == "something_new"


def test_screenshot_in_headless_chromium(tmp_path: Path):
    require_browser()  # skipped without Chromium, except in CI (.ci/run installs it)
    a = _fake_run(tmp_path, "align", 12.5)
    b = _fake_run(tmp_path, "align-clip", 40.0, contrastive="clip")
    html = write_report([a, b], tmp_path / "report.html")
    png = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(html), str(png), "--height", "1200"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as im:
        assert im.size == (1280, 1200)
        rgb = im.convert("RGB")
        # a rendered page: mostly white background, plenty of other colours (text, tables)
        assert len(rgb.getcolors(maxcolors=1_000_000)) > 50
        assert rgb.getpixel((5, 5)) == (255, 255, 255)


def test_screenshot_script_reports_a_missing_file(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none.html"), str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
