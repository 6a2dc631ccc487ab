"""`vlmalign serve CKPT [--index photos.safetensors]`: a local Gradio page for a trained model
(a checkpoint, a run folder, a vlmalign export or a transformers LLaVA folder).

- **Chat**: upload an image and ask questions (a multi-turn `ChatSession`, rendered with
  the tokenizer's chat template as the instruct recipe trains), or caption it.
- **Search** (with `--index`, written by `vlmalign embed --images`): type a query and see
  the nearest images of the index with their cosine scores.

The page is meant for one user on their own machine: the server binds to 127.0.0.1 by
default, Gradio's analytics are off and the page loads nothing from outside (the theme's
fonts are served locally, no share link, no SSR node server), so it works offline.
Needs the `serve` extra: `pip install 'vlmalign[serve]'`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Shown instead of an empty bubble when the model generated only special tokens.
EMPTY_ANSWER = "(no text: the model ended its answer at once)"

CSS = """
.gradio-container { width: 100% !important; max-width: 1100px !important; margin: 0 auto !important; }
#vlmalign-results table { font-variant-numeric: tabular-nums; }
#vlmalign-header p { color: var(--body-text-color-subdued); margin-top: 0; }
"""


def _require_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError(f"vlmalign serve needs Gradio ({e}): pip install 'vlmalign[serve]'") from None
    return gr


class ServeModel:
    """The page's actions on one loaded model (plain functions of strings and paths, so
    they are tested without a browser)."""

    def __init__(self, model, checkpoint: str, index: str | Path | None = None, max_new_tokens: int = 64) -> None:
        from vlmalign.inference import read_index

        self.model = model
        self.checkpoint = checkpoint
        self.max_new_tokens = max_new_tokens
        self.index = self.names = None
        if index is not None:
            emb, names, meta = read_index(index)
            if meta.get("kind") != "image":
                raise ValueError(f"{index} holds {meta.get('kind')} embeddings; index images with `vlmalign embed --images DIR`")
            if emb.shape[1] != model.hidden_size:
                raise ValueError(f"{index} holds {emb.shape[1]}-d embeddings, the model makes {model.hidden_size}-d ones: "
                                 "embed the images with this checkpoint")
            from vlmalign.search_index import cached_index

            # built once (exact search, or FAISS for a large index), not per query
            self.index, self.names = cached_index(emb, index), names

    def caption(self, image: str | None) -> str:
        """A caption of the image at `image`, prompted as `vlmalign caption` does."""
        import torch

        from vlmalign.data.images import load_image
        from vlmalign.inference import default_caption_prompt

        if not image:
            return "Upload an image first."
        pixels = self.model.preprocess([load_image(image)]).to(self.model.projector_device())
        with torch.no_grad():
            (text,) = self.model.generate(pixels, prompt=default_caption_prompt(self.model),
                                          max_new_tokens=self.max_new_tokens)
        return text or EMPTY_ANSWER

    def chat(self, image: str | None, question: str, state: Any) -> tuple[str, Any]:
        """The answer to `question` about `image`, continuing the conversation in `state`
        (`(image, ChatSession)`) while the image is the same; returns (answer, state)."""
        from vlmalign.inference import ChatSession

        if not image:
            return "Upload an image first.", state
        if state is None or state[0] != image:
            state = (image, ChatSession(self.model, image, max_new_tokens=self.max_new_tokens))
        return state[1].ask(question) or EMPTY_ANSWER, state

    def search(self, query: str, top: int = 8) -> list[tuple[str, float]]:
        """The `top` images of the index nearest to `query`: [(path, cosine score)]."""
        from vlmalign.inference import search

        if self.index is None:
            return []
        return search(self.model, self.index, self.names, query, top)


def build_page(server: ServeModel):
    """The Gradio Blocks page for `server`."""
    gr = _require_gradio()
    cfg = server.model.cfg
    with gr.Blocks(title="vlmalign", analytics_enabled=False, fill_width=True) as page:
        gr.Markdown(f"## vlmalign · {cfg.recipe}\n{server.checkpoint}", elem_id="vlmalign-header")
        with gr.Tab("Chat"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=320,
                                     buttons=["fullscreen"], elem_id="vlmalign-image")
                    caption_btn = gr.Button("Caption it", elem_id="vlmalign-caption-btn")
                    caption = gr.Textbox(label="Caption", interactive=False, elem_id="vlmalign-caption")
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Conversation", height=380, buttons=["copy", "copy_all"],
                                         elem_id="vlmalign-chat")
                    question = gr.Textbox(label="Question", placeholder="What is in the image?", lines=1,
                                          elem_id="vlmalign-question")
                    with gr.Row():
                        ask_btn = gr.Button("Ask", variant="primary", elem_id="vlmalign-ask-btn")
                        clear_btn = gr.Button("New conversation")
            session = gr.State(None)

            def ask(img, text, history, sess):
                if not text.strip():
                    return history, sess, ""
                answer, sess = server.chat(img, text, sess)
                history = list(history or []) + [{"role": "user", "content": text},
                                                 {"role": "assistant", "content": answer}]
                return history, sess, ""

            ask_btn.click(ask, [image, question, chatbot, session], [chatbot, session, question])
            question.submit(ask, [image, question, chatbot, session], [chatbot, session, question])
            clear_btn.click(lambda: ([], None), None, [chatbot, session])
            image.change(lambda: ([], None, ""), None, [chatbot, session, caption])
            caption_btn.click(server.caption, [image], [caption])
        if server.index is not None:
            with gr.Tab("Search"):
                gr.Markdown(f"{len(server.names)} images in the index")
                with gr.Row():
                    query = gr.Textbox(label="Query", placeholder="a red circle", scale=4, elem_id="vlmalign-query")
                    top = gr.Slider(1, min(32, len(server.names)), value=min(8, len(server.names)), step=1,
                                    label="Results", scale=1)
                search_btn = gr.Button("Search", variant="primary", elem_id="vlmalign-search-btn")
                gallery = gr.Gallery(label="Nearest images", columns=4, height=560, buttons=["fullscreen"],
                                     elem_id="vlmalign-gallery")
                table = gr.Dataframe(headers=["rank", "score", "image"], datatype=["number", "str", "str"],
                                     interactive=False, elem_id="vlmalign-results", wrap=True)

                def run_search(text, k):
                    hits = server.search(text, int(k)) if text.strip() else []
                    shown = [(name, f"{score:.3f} · {Path(name).name}") for name, score in hits]
                    rows = [[i, f"{score:.3f}", name] for i, (name, score) in enumerate(hits, start=1)]
                    return shown, rows

                search_btn.click(run_search, [query, top], [gallery, table])
                query.submit(run_search, [query, top], [gallery, table])
    return page


def serve(
    checkpoint: str,
    index: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_new_tokens: int = 64,
    device: str = "auto",
) -> None:
    """Load `checkpoint` (and the index) and serve the page until interrupted. `device`:
    "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:1", ..."""
    gr = _require_gradio()
    import torch

    from vlmalign.export import is_llava_folder, load_llava_export
    from vlmalign.inference import load_checkpoint

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    load = load_llava_export if is_llava_folder(checkpoint) else load_checkpoint
    model = load(checkpoint).to(device)
    server = ServeModel(model, str(checkpoint), index, max_new_tokens)
    page = build_page(server)
    # The index's images live wherever they were embedded: let the page show those folders.
    allowed = sorted({str(Path(n).resolve().parent) for n in server.names or []})
    if host not in (DEFAULT_HOST, "localhost"):
        log.warning("serving on %s: anyone who can reach this address can use the model", host)
    page.queue(default_concurrency_limit=1)  # one generation at a time: the model is not thread-safe
    page.launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, mcp_server=False,
        footer_links=[], allowed_paths=allowed, css=CSS, theme=gr.themes.Default(), quiet=False,
    )
