"""Multiple-choice evaluation (ScienceQA-IMG style): by option likelihood and by generation.

Both ways ask the question exactly as training teaches it: `data.scienceqa.mcq_user_turn`
(image marker, LLaVA's ScienceQA prompt) rendered as a user turn with the tokenizer's chat
template and its generation prompt, `<image>` expanded to the visual tokens.

- **Likelihood** (`score_choices_likelihood`): each option's continuation is scored by
  its normalised log-probability, mean_t log p(c_t | prompt, c_<t), and the best option
  wins (lm-evaluation-harness's `acc_norm` idea, per token rather than per byte). The
  continuation is the option's letter by default ("B", what training teaches), or its
  text ("blue") or both ("B. blue"). The prompt is run once per item (keys/values
  expanded to its options) and the LM head is applied to continuation positions only.
- **Generation** (`answer_by_generation`): greedy decoding (batched; the same text as
  `VLM.generate` item by item), then `parse_answer` maps the text to an option; text it
  cannot map counts as wrong and is counted.

`evaluate_mcq` gives accuracy (%) both ways, overall and per category. Ties (two options
with exactly the same top score) count as wrong, as every ranking metric in
`eval/metrics.py` does: a collapsed model must not score by the order of the options.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from vlmalign import cache
from vlmalign.data.sample import LoadReport, Sample
from vlmalign.data.scienceqa import LETTERS, MCQItem, load_mcq_json, mcq_user_turn, option_letter
from vlmalign.models.prompts import expand_image_tokens
from vlmalign.models.vlm import VLM, PromptPrefix
from vlmalign.train.runlog import track

log = logging.getLogger(__name__)

CONTINUATIONS = ("letter", "text", "letter_text")

# ---------------------------------------------------------------- answer parsing

_NUMBER_WORDS = {
    "zero": "0", "no": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# "The answer is B", "answer: (b)", "correct option is C", "choice (D)"
_PHRASE = re.compile(
    r"\b(?:answer|option|choice)\s*(?:is|would\s+be|:)?\s*:?\s*"
    r"(?P<open>\()?(?P<letter>[A-Za-z])(?P<close>\))?(?P<after>[^A-Za-z]|$)",
    re.IGNORECASE,
)
# "(B) blue", "B. blue", "B) blue", "B: blue" at the start of the text
_LEADING = re.compile(r"^\s*(?:\((?P<a>[A-Za-z])\)|(?P<b>[A-Z])\s*[.):](?![A-Za-z0-9]))")
_BARE = re.compile(r"^\s*\(?\s*(?P<letter>[A-Za-z])\s*\)?\s*[.:)]?\s*$")
_ALTERNATIVE = re.compile(r"^\s*(?:or|and|/|,)\s*\(?[A-Z]\)?(?![A-Za-z])")


def _normalise(text: str) -> str:
    """Lowercase, punctuation to spaces, number words to digits, single spaces."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words)


def _letter_index(letter: str, n: int) -> int | None:
    k = LETTERS.find(letter.upper())
    return k if 0 <= k < n else None


def _contains_words(haystack: str, needle: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack) is not None


def _by_text(text: str, choices: Sequence[str]) -> int | None:
    """The option whose text the answer is, or names unambiguously, or None."""
    said = _normalise(text)
    opts = [_normalise(c) for c in choices]
    if not said or any(not o for o in opts):
        return None
    if len(set(opts)) != len(opts):  # options differing only in case or punctuation: exact text only
        exact = [k for k, c in enumerate(choices) if c.strip() == text.strip()]
        return exact[0] if len(exact) == 1 else None
    if said in opts:
        return opts.index(said)
    inside = [k for k, o in enumerate(opts) if _contains_words(said, o)]
    # an option that contains every other named one wins ("dark red" over "red")
    inside = [k for k in inside if not any(j != k and _contains_words(opts[j], opts[k]) for j in inside)]
    if len(inside) == 1:
        return inside[0]
    if inside:
        return None  # several options named: ambiguous
    around = [k for k, o in enumerate(opts) if _contains_words(o, said)]
    return around[0] if len(around) == 1 else None


def parse_answer(text: str, choices: Sequence[str]) -> int | None:
    """The option index a generated answer names, or None when it cannot tell.

    In order: a bare letter ("B", "(b)", "B."); a letter after "answer"/"option"/"choice"
    ("The answer is B", "Answer: (b)"); a letter opening the text with a delimiter
    ("(B) blue", "B. blue"); else the option text, case- and punctuation-insensitive, with
    number words read as digits ("two" = "2"): an exact match, else the one option named
    as whole words in the answer (an option containing the other named ones wins:
    "dark red" over "red"), else the one option that contains the answer. Lower-case
    letters count only bracketed or alone ("the answer is a circle" is not option A).
    Letters beyond the number of options, "A or B", and several options named are
    None.
    """
    n = len(choices)
    if not text or not text.strip():
        return None
    bare = _BARE.match(text)
    if bare:
        return _letter_index(bare["letter"], n)
    for m in _PHRASE.finditer(text):
        letter, bracketed = m["letter"], bool(m["open"] and m["close"])
        if bool(m["open"]) != bool(m["close"]):
            continue
        rest = text[m.end("letter") + (1 if m["close"] else 0):]
        if letter.islower() and not bracketed and not re.match(r"^\s*([.,:;!)]|$)", rest):
            continue  # "the answer is a circle": an article, not option a
        if _ALTERNATIVE.match(rest):
            return None  # "A or B"
        return _letter_index(letter, n)
    lead = _LEADING.match(text)
    if lead:
        if _ALTERNATIVE.match(text[lead.end():]):
            return None  # "(A) or (C)"
        return _letter_index(lead["a"] or lead["b"], n)
    return _by_text(text, choices)


# ---------------------------------------------------------------- prompts and features


def render_mcq_prompt(tokenizer, item: MCQItem, chat_template: bool = True, system_prompt: str | None = None) -> str:
    """The text the model sees before its answer: `mcq_user_turn(item)` as a user turn of
    the chat template with the generation prompt (the template's default system prompt,
    or `system_prompt`), exactly as `encode_conversation` renders a training sample.
    Without a chat template (or `chat_template=False`): the turn text and a newline."""
    turn = mcq_user_turn(item)
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": turn})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return turn + "\n"


def continuation_text(item: MCQItem, k: int, continuation: str = "letter") -> str:
    """What follows the prompt for option k: "B" (`letter`), "blue" (`text`) or
    "B. blue" (`letter_text`)."""
    if continuation == "letter":
        return option_letter(k)
    if continuation == "text":
        return item.choices[k]
    if continuation == "letter_text":
        return f"{option_letter(k)}. {item.choices[k]}"
    raise ValueError(f"unknown continuation {continuation!r}; known: {', '.join(CONTINUATIONS)}")


def features_by_image(
    model: VLM, images: Sequence[Path], report: LoadReport | None = None, batch_size: int = 32
) -> dict[str, Tensor]:
    """Tower features [P, Dv] of each distinct image path, keyed by `str(path)`: each
    image encoded once (`cache.tower_features`), unreadable ones skipped and counted in
    `report`. Valid for any model sharing the (frozen) tower, so it can be reused."""
    distinct = list(dict.fromkeys(str(p) for p in images))
    probe = [Sample(id=str(i), image=Path(p)) for i, p in enumerate(distinct)]
    feats, kept = cache.tower_features(model, probe, batch_size=batch_size, report=report)
    return {str(s.image): feats[i] for i, s in enumerate(kept)}


def mcq_image_features(
    model: VLM, items: Sequence[MCQItem], report: LoadReport | None = None, batch_size: int = 32
) -> dict[str, Tensor]:
    """`features_by_image` for the images of `items` (text-only items need none)."""
    return features_by_image(model, [it.image for it in items if it.image is not None], report, batch_size)


def _encode_continuation(tokenizer, prompt: str, prompt_ids: list[int], text: str) -> list[int]:
    """Token ids of `text` after `prompt`: the tail of tokenising prompt + text as one
    string (what training sees), or `text` alone when the two merge at the boundary."""
    full = tokenizer(prompt + text, add_special_tokens=False).input_ids
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids):]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"the continuation {text!r} tokenises to nothing; check the options")
    return ids


def _visual_for(model: VLM, items: Sequence[MCQItem], features: dict[str, Tensor]) -> Tensor | None:
    """Visual tokens [N_with_image * Q, D] of the items that have an image, in order."""
    keys = [str(it.image) for it in items if it.image is not None]
    if not keys:
        return None
    dev = model.projector_device()
    visual = model.visual_tokens(features=torch.stack([features[k] for k in keys]).to(dev))  # [N, Q, D]
    return visual.reshape(-1, visual.shape[-1])  # [N * Q, D]


def _embed(model: VLM, ids: Tensor, visual: Tensor | None) -> Tensor:
    """Input embeddings [B, T, D] with visual tokens [N * Q, D] at the image ids, row-major
    (rows without an image simply have no image ids)."""
    embeds = model.input_embeddings(ids)
    if visual is None:
        return embeds
    is_image = (ids == model.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(is_image, visual.to(embeds.dtype))


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (t - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows], device=device)
    return ids, mask


def _expanded_cache(model: VLM, past, index: Tensor) -> DynamicCache:
    """A fresh cache holding rows `index` of `past` (the prompt of each option's item)."""
    out = DynamicCache(config=model.llm.config)
    for i, layer in enumerate(past.layers):
        out.update(layer.keys.index_select(0, index), layer.values.index_select(0, index), i)
    return out


def _logits(model: VLM, states: Tensor) -> Tensor:
    """fp32 logits [M, V] from final states [M, D]: the LM head on these rows only
    (with Gemma's final-logit softcapping when the LLM has it)."""
    head = model.llm.get_output_embeddings()
    logits = F.linear(states, head.weight, head.bias).float()  # [M, V]
    cap = getattr(model.llm.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _log_probs(model: VLM, states: Tensor, targets: Tensor) -> Tensor:
    """log p(targets) [M] from final states [M, D]."""
    return _logits(model, states).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def shared_head(rows: list[list[int]], image_token_id: int) -> int:
    """How many leading tokens every row has in common before any image token (the chat
    template's system turn and user header), leaving at least one token per row."""
    h = min(len(r) for r in rows) - 1
    for r in rows:
        h = min(h, r.index(image_token_id) if image_token_id in r else h)
        h = next((i for i in range(h) if r[i] != rows[0][i]), h)
    return max(h, 0)


class _PromptPass:
    """One forward of a batch of items' prompts (right-padded, visual tokens spliced),
    keeping what continuations need: the cache, the mask [B, Tp], the prompt lengths [B]
    and the final state of each prompt's last token [B, D]. The leading tokens every
    prompt shares (`shared_head`) run once, not once per row; the rest runs against
    their keys/values."""

    def __init__(self, model: VLM, batch: list[MCQItem], features: dict[str, Tensor],
                 chat_template: bool, system_prompt: str | None) -> None:
        tok = model.tokenizer
        dev = model.projector_device()
        self.prompts = [render_mcq_prompt(tok, it, chat_template, system_prompt) for it in batch]
        self.raw = [tok(p, add_special_tokens=False).input_ids for p in self.prompts]
        rows = [expand_image_tokens(r, model.image_token_id, model.num_visual_tokens) if it.image is not None else r
                for it, r in zip(batch, self.raw, strict=True)]
        ids, self.mask = _pad(rows, tok.pad_token_id, dev)  # [B, Tp]
        self.lengths = self.mask.sum(1)  # [B]
        h = shared_head(rows, model.image_token_id)
        head = {"past_key_values": PromptPrefix(rows[0][:h]).expand(model, len(batch), dev)} if h else {}
        embeds = _embed(model, ids[:, h:], _visual_for(model, batch, features))  # [B, Tp - h, D]
        out = model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=self.mask, use_cache=True, **head)
        self.cache = out.past_key_values  # head + rest: Tp positions
        self.last = out.last_hidden_state[torch.arange(len(batch), device=dev), self.lengths - 1 - h]  # [B, D]


def _batch_scores(model: VLM, pp: _PromptPass, batch: list[MCQItem], continuation: str) -> list[Tensor]:
    """Normalised log-probability of each option of `batch` ([C_i] per item), from the
    prompt pass `pp` (its cache is read, not changed)."""
    tok = model.tokenizer
    dev = model.projector_device()
    conts = [[_encode_continuation(tok, p, r, continuation_text(it, k, continuation))
              for k in range(len(it.choices))] for it, p, r in zip(batch, pp.prompts, pp.raw, strict=True)]
    owner = torch.tensor([b for b, c in enumerate(conts) for _ in c], device=dev)  # [N] item per option
    cids, cmask = _pad([c for cs in conts for c in cs], tok.pad_token_id, dev)  # [N, Tc]
    states = pp.last[owner][:, None]  # [N, 1, D] predicts each continuation's first token
    if cids.shape[1] > 1:
        pos = pp.lengths[owner][:, None] + torch.arange(cids.shape[1], device=dev)  # [N, Tc]
        cout = model.llm.get_decoder()(
            inputs_embeds=model.input_embeddings(cids[:, :-1]),
            attention_mask=torch.cat([pp.mask[owner], cmask[:, :-1]], dim=1),  # [N, Tp + Tc - 1]
            position_ids=pos[:, :-1],
            past_key_values=_expanded_cache(model, pp.cache, owner),
            use_cache=True,
        )
        states = torch.cat([states, cout.last_hidden_state], dim=1)  # [N, Tc, D]
    keep = cmask.bool()
    logp = torch.zeros(cids.shape, device=dev)
    logp[keep] = _log_probs(model, states[keep], cids[keep])
    per_option = (logp.sum(1) / cmask.sum(1)).cpu()  # [N]
    return list(per_option.split([len(c) for c in conts]))


def _batch_generate(model: VLM, pp: _PromptPass, max_new_tokens: int) -> list[str]:
    """Greedy answers from the prompt pass `pp` (its cache grows as tokens are decoded)."""
    tok = model.tokenizer
    dev = model.projector_device()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    cache, mask, pos, last = pp.cache, pp.mask, pp.lengths.clone(), pp.last
    done = torch.zeros(len(pp.prompts), dtype=torch.bool, device=dev)
    new: list[Tensor] = []
    for step in range(max_new_tokens):
        nxt = _logits(model, last).argmax(-1).masked_fill(done, pad)  # [B]
        new.append(nxt)
        done |= nxt == eos
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)  # [B, T + 1]
        out = model.llm.get_decoder()(
            inputs_embeds=model.input_embeddings(nxt[:, None]), attention_mask=mask,
            position_ids=pos[:, None], past_key_values=cache, use_cache=True,
        )
        cache, last, pos = out.past_key_values, out.last_hidden_state[:, -1], pos + 1
    ids = torch.stack(new, dim=1).tolist()  # [B, steps]
    return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]


def _check_features(items: Sequence[MCQItem], features: dict[str, Tensor]) -> None:
    missing = [it.id for it in items if it.image is not None and str(it.image) not in features]
    if missing:
        raise ValueError(f"no tower features for the images of items {missing[:5]}; drop those items "
                         "(mcq_image_features skips unreadable images) or pass their features")


# ---------------------------------------------------------------- likelihood


def _over_batches(model: VLM, items: Sequence[MCQItem], features: dict[str, Tensor] | None, batch_size: int,
                  chat_template: bool, system_prompt: str | None, label: str, work) -> list:
    """`work(prompt_pass, batch)` on each batch of `items` (one prompt pass per batch),
    in eval mode (the model's mode is restored after); the per-item results in order."""
    if features is None:
        features = mcq_image_features(model, items)
    _check_features(items, features)
    out: list = []
    was_training = model.training
    model.eval()
    starts = range(0, len(items), batch_size)
    for start in track(starts, label, total=len(starts)):
        batch = list(items[start : start + batch_size])
        out += work(_PromptPass(model, batch, features, chat_template, system_prompt), batch)
    model.train(was_training)
    return out


def _check_continuation(continuation: str) -> None:
    if continuation not in CONTINUATIONS:
        raise ValueError(f"unknown continuation {continuation!r}; known: {', '.join(CONTINUATIONS)}")




@torch.no_grad()
def choice_scores(
    model: VLM,
    items: Sequence[MCQItem],
    features: dict[str, Tensor] | None = None,
    continuation: str = "letter",
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> list[Tensor]:
    """Normalised log-probability of each option, one [C_i] tensor per item.

    score(k) = (1 / T_k) sum_t log p(c_kt | prompt, c_k<t) over the T_k tokens of option
    k's continuation (`continuation_text`). Per batch of items: the prompts (right-padded,
    visual tokens spliced) run once with a cache; each option's continuation runs against
    its item's cached keys/values (explicit positions; padding masked), skipped when every
    continuation is one token; the LM head is applied at continuation positions only.
    `features` maps `str(item.image)` to tower features [P, Dv] (`mcq_image_features`;
    computed here when None).
    """
    _check_continuation(continuation)
    return _over_batches(model, items, features, batch_size, chat_template, system_prompt, "MCQ: option likelihoods",
                         lambda pp, batch: _batch_scores(model, pp, batch, continuation))


def _argmax_no_tie(scores: Tensor) -> int | None:
    best = int(scores.argmax())
    return None if int((scores == scores[best]).sum()) > 1 else best


def score_choices_likelihood(
    model: VLM,
    items: Sequence[MCQItem],
    features: dict[str, Tensor] | None = None,
    continuation: str = "letter",
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> list[int | None]:
    """The option with the highest normalised log-probability for each item (see
    `choice_scores`); None when two options tie exactly at the top (counted wrong)."""
    scores = choice_scores(model, items, features, continuation, batch_size, chat_template, system_prompt)
    return [_argmax_no_tie(s) for s in scores]


# ---------------------------------------------------------------- generation


@torch.no_grad()
def generate_answers(
    model: VLM,
    items: Sequence[MCQItem],
    features: dict[str, Tensor] | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy answers to `items`, the same text `VLM.generate(features=..., prompt=
    render_mcq_prompt(...))` gives item by item, but batched: the prompts (different
    lengths, right-padded) run once, then one token per step for the whole batch with
    explicit positions and the padding masked, each row stopping at the end-of-sequence
    token. Text-only items are supported (no visual tokens)."""
    return _over_batches(model, items, features, batch_size, chat_template, system_prompt, "MCQ: generation",
                         lambda pp, batch: _batch_generate(model, pp, max_new_tokens))


def answer_by_generation(
    model: VLM,
    items: Sequence[MCQItem],
    features: dict[str, Tensor] | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> tuple[list[int | None], list[str]]:
    """Greedy answers (`generate_answers`) and the options they name: `(predictions,
    texts)`, a prediction None when `parse_answer` cannot map the text."""
    texts = generate_answers(model, items, features, max_new_tokens, batch_size, chat_template, system_prompt)
    return [parse_answer(t, it.choices) for t, it in zip(texts, items, strict=True)], texts


@torch.no_grad()
def scores_and_answers(
    model: VLM,
    items: Sequence[MCQItem],
    features: dict[str, Tensor],
    continuation: str = "letter",
    max_new_tokens: int = 8,
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> tuple[list[Tensor], list[str]]:
    """`choice_scores` and `generate_answers` of `items` from one prompt pass per batch
    (the prompt's keys/values serve the options' continuations, then greedy decoding):
    the same results as the two calls, at about half the cost."""
    _check_continuation(continuation)

    def both(pp: _PromptPass, batch: list[MCQItem]) -> list[tuple[Tensor, str]]:
        scores = _batch_scores(model, pp, batch, continuation)  # reads the prompt cache
        return list(zip(scores, _batch_generate(model, pp, max_new_tokens), strict=True))  # then extends it

    pairs = _over_batches(model, items, features, batch_size, chat_template, system_prompt,
                          "MCQ: likelihoods + generation", both)
    return [sc for sc, _ in pairs], [t for _, t in pairs]


# ---------------------------------------------------------------- metrics


def _category_key(name: str) -> str:
    """A metric-key-safe category name: "natural science" -> "natural_science"."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "uncategorised"


def mcq_accuracy(items: Sequence[MCQItem], predictions: Sequence[int | None], prefix: str) -> dict[str, float]:
    """`{prefix}_acc` and `{prefix}_acc_{category}` in percent; None predictions are wrong."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    if not items:
        raise ValueError("no items to evaluate")
    right = [p is not None and p == it.answer for it, p in zip(items, predictions, strict=True)]
    out = {f"{prefix}_acc": 100.0 * sum(right) / len(right)}
    groups: dict[str, list[bool]] = {}
    for it, r in zip(items, right, strict=True):
        groups.setdefault(_category_key(it.category), []).append(r)
    if len(groups) > 1 or "" not in {it.category for it in items}:
        out |= {f"{prefix}_acc_{c}": 100.0 * sum(v) / len(v) for c, v in groups.items()}
    return out


def evaluate_mcq(
    model: VLM,
    items: Sequence[MCQItem],
    features: dict[str, Tensor] | None = None,
    batch_size: int = 8,
    continuation: str = "letter",
    generation: bool = True,
    max_new_tokens: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
    report: LoadReport | None = None,
) -> dict[str, float]:
    """Multiple-choice accuracy (%) by option likelihood and by generation, overall and
    per category.

    Keys: `mcq_items`, `mcq_chance` (mean of 100 / number of options), `mcq_lik_acc`,
    `mcq_lik_acc_{category}`, and with `generation`: `mcq_gen_acc`,
    `mcq_gen_acc_{category}`, `mcq_gen_unparsed` (% of items whose answer could not be
    parsed; they count as wrong). Tower features are computed once per distinct image
    unless `features` (`mcq_image_features`) is passed; items whose image cannot be read
    are left out and counted in `report` and `mcq_skipped`.
    """
    report = report if report is not None else LoadReport()
    if features is None:
        features = mcq_image_features(model, items, report=report)
    kept = [it for it in items if it.image is None or str(it.image) in features]
    if not kept:
        raise ValueError(f"none of the {len(items)} multiple-choice items has a readable image; {report.summary()}")
    metrics: dict[str, float] = {
        "mcq_items": float(len(kept)),
        "mcq_skipped": float(len(items) - len(kept)),
        "mcq_chance": sum(100.0 / len(it.choices) for it in kept) / len(kept),
    }
    if not generation:
        lik = score_choices_likelihood(model, kept, features, continuation, batch_size, chat_template, system_prompt)
        return metrics | mcq_accuracy(kept, lik, "mcq_lik")
    scores, texts = scores_and_answers(model, kept, features, continuation, max_new_tokens, batch_size,
                                       chat_template, system_prompt)
    metrics |= mcq_accuracy(kept, [_argmax_no_tie(s) for s in scores], "mcq_lik")
    gen = [parse_answer(t, it.choices) for t, it in zip(texts, kept, strict=True)]
    metrics |= mcq_accuracy(kept, gen, "mcq_gen")
    metrics["mcq_gen_unparsed"] = 100.0 * sum(p is None for p in gen) / len(gen)
    return metrics


def evaluate_mcq_file(
    model: VLM,
    path: str | Path,
    image_root: str | Path | None = None,
    max_items: int = 0,
    allow_outside_root: bool = False,
    report: LoadReport | None = None,
    **kwargs,
) -> dict[str, float]:
    """`evaluate_mcq` on a multiple-choice file (`load_mcq_json`: shapes' `mcq_test.json`
    or any file of that format); `max_items` > 0 keeps the first that many. Records the
    loader skipped are counted in `report` and added to `mcq_skipped`. `kwargs` go to
    `evaluate_mcq` (batch_size, continuation, generation, max_new_tokens, ...)."""
    report = report if report is not None else LoadReport()
    items = load_mcq_json(path, image_root=image_root, report=report, allow_outside_root=allow_outside_root)
    if max_items > 0:
        items = items[:max_items]
    skipped_on_load = report.total_skipped()
    metrics = evaluate_mcq(model, items, report=report, **kwargs)
    metrics["mcq_skipped"] += skipped_on_load
    return metrics
