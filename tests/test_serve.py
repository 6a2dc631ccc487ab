"""`vlmalign serve`: the page's actions on a tiny model, and the page itself driven in
headless Chromium (Playwright with Debian's chromium): upload an image, ask, caption,
search; the page must not request anything outside 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.browser import require_browser

QUESTION = "What colour is the circle?"
QUERY = "a small red circle"
MAX_NEW = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory, shapes_root):
    """A checkpoint whose every part reloads identically in another process (a saved tiny
    HF CLIP tower, the seeded tiny LLM, the trained projector and LoRA), trained 8 instruct
    steps at a large lr so that it answers with words, and an index of 12 images."""
    from transformers import CLIPVisionModel

    from tests.conftest import TINY
    from vlmalign.cli import main
    from vlmalign.config import load_config
    from vlmalign.models.vision import tiny_clip_vision_config
    from vlmalign.paths import recipe_config
    from vlmalign.train.trainer import train

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(root / "clip")
    overrides = [o for o in TINY if not o.startswith("vision.")]
    cfg = load_config(recipe_config("instruct"), overrides + [
        "vision.tower=hf", f"vision.name={root / 'clip'}", "vision.image_size=32", f"data.root={shapes_root}",
        "data.train_file=instruct_train.json", "train.max_steps=8", "train.lr=3e-2", "train.warmup_steps=0",
        "train.eval_at_end=false", "train.report_to=none", f"train.out_dir={root / 'run'}", "embedding.centre=false",
    ])
    ckpt = train(cfg).checkpoint
    images = root / "images"
    images.mkdir()
    for path in sorted((shapes_root / "images").glob("*.png"))[:12]:
        (images / path.name).write_bytes(path.read_bytes())
    assert main(["embed", "--checkpoint", str(ckpt), "--images", str(images), "--out", str(root / "index.safetensors")]) == 0
    return ckpt, root / "index.safetensors", sorted(images.glob("*.png"))


def _expected(ckpt, index, image):
    """What the page must show, computed here with the same functions."""
    from vlmalign.inference import load_checkpoint
    from vlmalign.serve import ServeModel

    server = ServeModel(load_checkpoint(ckpt), str(ckpt), index, max_new_tokens=MAX_NEW)
    answer, _ = server.chat(str(image), QUESTION, None)
    return answer, server.caption(str(image)), server.search(QUERY, 8)


def test_serve_actions(served):
    ckpt, index, images = served
    answer, caption, hits = _expected(ckpt, index, images[0])
    assert answer.strip() and caption.strip()  # words, so the page check below has teeth
    assert len(hits) == 8 and [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert {n for n, _ in hits} <= {str(p) for p in images}

    from vlmalign.inference import load_checkpoint
    from vlmalign.serve import ServeModel

    server = ServeModel(load_checkpoint(ckpt), str(ckpt), index, max_new_tokens=MAX_NEW)
    first, state = server.chat(str(images[0]), QUESTION, None)
    _, same = server.chat(str(images[0]), "And the square?", state)
    assert same[1] is state[1] and len(state[1].messages) == 4  # a follow-up continues the conversation
    _, other = server.chat(str(images[1]), QUESTION, same)
    assert other[1] is not state[1]  # a new image starts a new one
    assert server.chat(None, QUESTION, None)[0] == "Upload an image first."


def test_serve_refuses_an_index_of_another_model(served, tmp_path):
    from safetensors.torch import save_file

    from vlmalign.inference import load_checkpoint
    from vlmalign.serve import ServeModel

    ckpt, _, _ = served
    bad = tmp_path / "other.safetensors"
    save_file({"embeddings": torch.zeros(2, 7)}, str(bad), metadata={"names": '["a", "b"]', "kind": "image"})
    with pytest.raises(ValueError, match="7-d embeddings.*embed the images with this checkpoint"):
        ServeModel(load_checkpoint(ckpt), str(ckpt), bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vlmalign serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"vlmalign serve did not answer at {url} in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def test_page_in_headless_chromium(served, tmp_path):
    chromium = require_browser("gradio", "playwright")
    from playwright.sync_api import expect, sync_playwright

    ckpt, index, images = served
    answer, caption, hits = _expected(ckpt, index, images[0])
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlmalign.cli", "serve", str(ckpt), "--index", str(index), "--port", str(port),
             "--max-new-tokens", str(MAX_NEW)], stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    requested: list[str] = []
    try:
        _wait_for(base + "/", proc, log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requested.append(r.url))
            # anything outside 127.0.0.1 is refused (so the page is proven to work offline)
            page.route(lambda url: not url.startswith(base), lambda route: route.abort())
            page.goto(base + "/", wait_until="load")
            expect(page.locator("#vlmalign-ask-btn")).to_be_visible(timeout=60_000)

            page.locator("#vlmalign-image input[type=file]").set_input_files(str(images[0]))
            expect(page.locator("#vlmalign-image img")).to_be_visible(timeout=30_000)
            page.locator("#vlmalign-question textarea").fill(QUESTION)
            page.locator("#vlmalign-ask-btn").click()
            chat = page.locator("#vlmalign-chat")
            expect(chat).to_contain_text(QUESTION, timeout=60_000)
            expect(chat).to_contain_text(answer, timeout=60_000)
            page.locator("#vlmalign-caption-btn").click()
            expect(page.locator("#vlmalign-caption textarea")).to_have_value(caption, timeout=60_000)
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

            page.get_by_role("tab", name="Search").click()
            page.locator("#vlmalign-query textarea").fill(QUERY)
            page.locator("#vlmalign-search-btn").click()
            results = page.locator("#vlmalign-results")
            top_name, top_score = hits[0]
            expect(results).to_contain_text(f"{top_score:.3f}", timeout=60_000)
            expect(results).to_contain_text(Path(top_name).name)
            expect(page.locator("#vlmalign-gallery img")).to_have_count(len(hits), timeout=30_000)
            # the images themselves load from the server (the index's folder is allowed)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#vlmalign-gallery img')]"
                ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    shots = os.environ.get("VLMALIGN_SCREENSHOTS")
    if shots:  # keep the screenshots to look at
        for name in ("chat.png", "search.png"):
            Path(shots).mkdir(parents=True, exist_ok=True)
            (Path(shots) / name).write_bytes((tmp_path / name).read_bytes())
    outside = [u for u in requested if not u.startswith((base, "data:", "blob:"))]
    assert not outside, f"the page requested addresses outside 127.0.0.1: {outside[:5]}"
    assert any(u.startswith(base) for u in requested)
