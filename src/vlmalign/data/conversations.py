"""LLaVA-style conversations: loading, label masks through the chat template, batching.

File format (LLaVA, Liu et al. 2023; `.json` list, or `.jsonl` one record a line):
`[{"id", "image", "conversations": [{"from": "human"|"gpt", "value": str}, ...]}]`, the
`<image>` marker in the first human turn (LLaVA writes `"<image>\\n"` at its start).

Label masks are computed on the *whole rendered conversation*, never by tokenising turns
separately and concatenating them (the source of LLaVA's off-by-one and loss-0 bugs,
issues #661, #1166, #1706): the conversation is rendered with the tokenizer's chat
template as text, each assistant content's character span is located in that text, and
the fast tokenizer's offset mapping turns spans into token positions. Loss is taken on
every assistant turn's content tokens and its end-of-turn token (e.g. `<|im_end|>`);
system prompt, user turns, role headers and image positions are -100. Decoding the
labelled tokens is checked to give back each assistant content exactly, otherwise
`TemplateMismatchError` names the sample.

Loader skip reasons (counted in the `LoadReport`, with `file:[index]` examples):

- `malformed_json` (a `.jsonl` line only; a malformed `.json` file raises ValueError)
- `not_an_object`, `missing_key`, `wrong_type`: a record or turn of the wrong shape
- `unknown_role`: `from` not human/gpt (user/assistant are accepted as aliases)
- `empty_value`: a turn whose text is empty after stripping
- `not_alternating`: turns not user, assistant, user, ... starting with the user
- `no_assistant_turn`: no assistant turn at all; `ends_with_user`: a trailing user turn
- `misplaced_image_marker`, `multiple_image_markers`, `marker_without_image`
- `outside_root`: an image path that leaves the data root (`image_root`, by default the
  file's folder), unless `allow_outside_root=True` (`data.allow_outside_root`)
- `missing_image` (file not found), `bad_image` (with `check_images=True`)
- `no_image`: a text-only record, when `allow_text_only=False`
- `duplicate_record`: a record identical to an earlier one (the later copy)
- `bad_encoding`: a `.jsonl` line that is not UTF-8 (its byte offset in the detail); a
  `.json` file that is not UTF-8 raises ValueError naming the offset, line and column

Repairs (the record is kept) are counted in `LoadReport.repaired`:
`inserted_image_marker` (an image but no marker: `"<image>\\n"` put at the start of the
first user turn, as LLaVA's format expects) and `duplicate_id` (an id used before,
renamed `id#2`, ...: LLaVA's files reuse an image's id for several conversations).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlmalign.data.collate import IGNORE_INDEX
from vlmalign.data.formats import (
    DuplicateTracker,
    check_image,
    iter_records,
    json_type,
    require_strings,
    resolve_image_path,
)
from vlmalign.data.images import load_image
from vlmalign.data.records import RecordCodec, RecordStore, Tables
from vlmalign.data.sample import LoadReport
from vlmalign.models.language import IMAGE_TOKEN

log = logging.getLogger(__name__)

ROLES: dict[str, str] = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


class TemplateMismatchError(ValueError):
    """The chat template and the tokenizer disagree about a conversation's text, so the
    assistant tokens cannot be located exactly (labels would be wrong)."""


@dataclass
class Conversation:
    """One image (or none) with its turns `(role, text)`, role "user" or "assistant",
    alternating from the user and ending with the assistant; `<image>` in the first user
    turn when `image` is set. `meta` keeps the record's other keys."""

    id: str
    image: Path | None
    turns: list[tuple[str, str]]
    meta: dict = field(default_factory=dict)

    def messages(self, system_prompt: str | None = None) -> list[dict[str, str]]:
        """The turns as chat-template messages `[{"role", "content"}]`."""
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return msgs + [{"role": r, "content": t} for r, t in self.turns]


def _alternating(roles: list[str] | tuple[str, ...]) -> bool:
    return all(role == ("user" if k % 2 == 0 else "assistant") for k, role in enumerate(roles))


def _encode_conversation(c: Conversation, tables: Tables) -> tuple:
    roles = tuple(role for role, _ in c.turns)
    texts = tuple(tables.text_ref(text) for _, text in c.turns)
    return (c.id, tables.image_ref(c.image), texts, None if _alternating(roles) else roles, c.meta or None)


def _decode_conversation(t: tuple, tables: Tables) -> Conversation:
    rec_id, image, texts, roles, meta = t
    if roles is None:  # user, assistant, user, ... as every loaded conversation
        roles = ["user" if k % 2 == 0 else "assistant" for k in range(len(texts))]
    turns = [(role, tables.text(text)) for role, text in zip(roles, texts, strict=True)]
    return Conversation(id=rec_id, image=tables.image(image), turns=turns, meta=meta or {})


# A conversation in a `RecordStore`: its roles only when they do not alternate from the
# user, its texts through the shared table (LLaVA's recurring prompts stored once).
CONVERSATION_CODEC = RecordCodec(Conversation, _encode_conversation, _decode_conversation)


class ConversationLoadReport(LoadReport):
    """A `LoadReport` for conversations (repairs, e.g. an inserted `<image>` marker, are
    counted by every `LoadReport` now; the name is kept for callers)."""


# ---------------------------------------------------------------- loading


def _iter_records(path: Path, report: LoadReport) -> Iterator[tuple[str, Any]]:
    return iter_records(path, report, 'a LLaVA conversation file is a list [{"id", "image", "conversations": [...]}, ...]')


_SHARED_MAX = 4096  # distinct short texts shared per load


def _shared(text: str, shared: dict[str, str]) -> str:
    """One object for a short text that recurs within a file (LLaVA's pretraining prompts:
    a dozen instructions over 558K records), so its copies are not held apart."""
    if len(text) > 200:
        return text
    found = shared.get(text)
    if found is not None:
        return found
    if len(shared) < _SHARED_MAX:
        shared[text] = text
    return text


def _parse_turns(raw: Any, where: str, report: LoadReport, shared: dict[str, str]) -> list[tuple[str, str]] | None:
    if not isinstance(raw, list):
        report.skip("wrong_type", where, f"'conversations' must be a list, got {json_type(raw)}")
        return None
    turns: list[tuple[str, str]] = []
    for k, turn in enumerate(raw):
        if not isinstance(turn, dict):
            report.skip("not_an_object", where, f"turn {k} is a {json_type(turn)}, not an object")
            return None
        if not require_strings(turn, ("from", "value"), where, report, what=f"turn {k}: "):
            return None
        role = ROLES.get(turn["from"].strip().lower())
        if role is None:
            report.skip("unknown_role", where, f"turn {k} is from {turn['from']!r}; known: human, gpt")
            return None
        text = _shared(turn["value"].strip(), shared)
        if not text:
            report.skip("empty_value", where, f"turn {k} ({turn['from']}) is empty")
            return None
        turns.append((role, text))
    if not any(role == "assistant" for role, _ in turns):
        report.skip("no_assistant_turn", where, "no 'gpt' turn to train on")
        return None
    for k, (role, _) in enumerate(turns):
        if role != ("user" if k % 2 == 0 else "assistant"):
            report.skip("not_alternating", where, f"turn {k} is {role}; turns must alternate human, gpt, ...")
            return None
    if turns[-1][0] == "user":
        report.skip("ends_with_user", where, f"the last turn ({len(turns) - 1}) is a human turn with no answer")
        return None
    return turns


def _parse_conversation(
    rec: Any, where: str, default_id: str, root: Path, report: LoadReport,
    check_images: bool, allow_text_only: bool, allow_outside_root: bool, dups: DuplicateTracker,
    shared: dict[str, str] | None = None,
) -> Conversation | None:
    if not isinstance(rec, dict):
        report.skip("not_an_object", where, f"expected a JSON object, got {json_type(rec)}")
        return None
    if "conversations" not in rec:
        report.skip("missing_key", where, "no 'conversations' key")
        return None
    rec_id = rec.get("id", default_id)
    if not isinstance(rec_id, (str, int)) or isinstance(rec_id, bool):
        report.skip("wrong_type", where, f"'id' must be a string or integer, got {rec_id!r}")
        return None
    image_field = rec.get("image")
    if image_field is not None and (not isinstance(image_field, str) or not image_field.strip()):
        report.skip("wrong_type", where, f"'image' must be a non-empty string (one image per record), got {image_field!r}")
        return None
    turns = _parse_turns(rec["conversations"], where, report, shared if shared is not None else {})
    if turns is None:
        return None
    markers = [text.count(IMAGE_TOKEN) for _, text in turns]
    if sum(markers) > 1:
        report.skip("multiple_image_markers", where, f"{sum(markers)} {IMAGE_TOKEN} markers; one image per record")
        return None
    if sum(markers) == 1 and markers[0] == 0:
        report.skip("misplaced_image_marker", where, f"{IMAGE_TOKEN} must be in the first human turn")
        return None
    if image_field is None:
        if sum(markers):
            report.skip("marker_without_image", where, f"{IMAGE_TOKEN} in the text but no 'image' key")
            return None
        if not allow_text_only:
            report.skip("no_image", where, "text-only record (pass allow_text_only=True to keep it)")
            return None
        image = None
    else:
        found = resolve_image_path(image_field, [root], where, report, allow_outside_root)
        if found is None:
            return None
        image = found[0]
    if dups.is_duplicate_record(rec, where):
        return None
    if image is not None:
        if not check_image(image, where, report, check_images):
            return None
        if markers[0] == 0:
            turns[0] = ("user", f"{IMAGE_TOKEN}\n{turns[0][1]}")
            report.repair("inserted_image_marker", where, f"{IMAGE_TOKEN} put at the start of the first human turn")
    meta = {k: v for k, v in rec.items() if k not in ("id", "image", "conversations")}
    return Conversation(id=dups.unique_id(str(rec_id), where), image=image, turns=turns, meta=meta)


def load_conversations(
    path: str | Path,
    image_root: str | Path | None = None,
    report: LoadReport | None = None,
    check_images: bool = False,
    allow_text_only: bool = True,
    allow_outside_root: bool = False,
) -> RecordStore[Conversation]:
    """Load LLaVA-format conversations (see the module docstring for the format).

    Relative image paths resolve against `image_root` (default: the file's folder), the
    data root images may not leave unless `allow_outside_root`. Turn texts are stripped
    (templates such as Llama-3's trim them too). Bad records are skipped and counted in
    `report`, repairs counted too (see the module docstring); a record without `id` gets
    `"{file stem}-{index}"`, a repeated id becomes `"{id}#2"`. Raises
    FileNotFoundError if `path` is missing and ValueError if a `.json` file is not a
    valid UTF-8 JSON list (naming the position) or holds no conversation records. The
    file is parsed one record at a time (`iter_conversations`) and the conversations kept
    in a compact `RecordStore` (data/records.py), a read-only sequence.
    """
    convs = iter_conversations(path, image_root, report, check_images, allow_text_only, allow_outside_root)
    return RecordStore.build(convs, CONVERSATION_CODEC)


def iter_conversations(
    path: str | Path,
    image_root: str | Path | None = None,
    report: LoadReport | None = None,
    check_images: bool = False,
    allow_text_only: bool = True,
    allow_outside_root: bool = False,
) -> Iterator[Conversation]:
    """`load_conversations`, one conversation at a time: memory holds one record of the
    file (and a 16-byte digest per record for the duplicate check), so a file of any size
    can be checked (`vlmalign data check`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file {path} does not exist; check the path")
    report = report if report is not None else ConversationLoadReport()
    root = Path(image_root) if image_root is not None else path.parent
    dups = DuplicateTracker(report)
    n_records, any_conversations, first, shared = 0, False, None, {}
    for i, (where, rec) in enumerate(_iter_records(path, report)):
        n_records += 1
        if first is None:
            first = rec
        any_conversations = any_conversations or (isinstance(rec, dict) and "conversations" in rec)
        conv = _parse_conversation(
            rec, where, f"{path.stem}-{i}", root, report, check_images, allow_text_only, allow_outside_root, dups,
            shared,
        )
        if conv is not None:
            report.loaded += 1
            yield conv
    if n_records and not any_conversations:
        keys = f"keys {sorted(first)[:8]}" if isinstance(first, dict) else f"a JSON {json_type(first)}"
        raise ValueError(
            f"{path} is not a LLaVA conversation file: none of its {n_records} records has a 'conversations' "
            f"key (the first has {keys}). A captions file ({{\"image\", \"caption\"}} per line) trains the "
            "align recipes; the instruct recipe needs [{\"id\", \"image\", \"conversations\": [...]}, ...]"
        )


# ---------------------------------------------------------------- label masks


@dataclass
class EncodedConversation:
    """Token ids and labels of one conversation, `<image>` expanded to the visual tokens.

    `labels[t]` is `input_ids[t]` where the model is trained to produce that token (the
    assistant contents and their end-of-turn tokens), else -100; the shift happens in the
    loss. `missing_end_tokens`: assistant turns after which no special end-of-turn token
    was found (the model would never learn to stop there).
    """

    input_ids: list[int]
    labels: list[int]
    id: str = ""
    truncated: bool = False
    missing_end_tokens: int = 0

    @property
    def num_labels(self) -> int:
        """Number of trained positions."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class _Rendered:
    """One encoding before image expansion: the template text, its tokens and offsets."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    trained: list[bool]
    missing_end_tokens: int


def _special_ids(tokenizer, image_token_id: int) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False)}
    ids.discard(image_token_id)
    return ids


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _assistant_spans(conv: Conversation, tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant contents in `text`, in turn order.

    Each content is searched after the previous turn's text and after the rendered
    prefix of the conversation up to its generation prompt (so a content that also
    occurs in the system prompt or a user turn is not picked there).
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for k, msg in enumerate(messages):
        content = msg["content"]
        if msg["role"] != "assistant":
            at = text.find(content, cursor)
            if at >= 0:
                cursor = at + len(content)
            continue
        try:
            prefix = _render(tokenizer, messages[:k], generation_prompt=True)
            cursor = max(cursor, _common_prefix(prefix, text))
        except Exception:  # noqa: BLE001 - some templates reject prefixes; the search still holds
            pass
        at = text.find(content, cursor)
        if at < 0:
            raise TemplateMismatchError(
                f"conversation {conv.id!r}: assistant turn {len(spans) + 1} ({content[:60]!r}) does "
                f"not appear verbatim in the text rendered by the chat template; the template "
                "changes or drops assistant content, so labels cannot be placed. Fix the "
                "template (tokenizer.chat_template) or the data."
            )
        spans.append((at, at + len(content)))
        cursor = at + len(content)
    return spans


def _render_and_mask(
    conv: Conversation, tokenizer, image_token_id: int, system_prompt: str | None
) -> _Rendered:
    """Render with the chat template, tokenise once with offsets, and mark trained tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; set tokenizer.chat_template (a Jinja string) "
            "before encoding conversations"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encoding conversations needs a fast tokenizer (offset mapping); load it with use_fast=True")
    for role, content in conv.turns:
        if role == "assistant" and IMAGE_TOKEN in content:
            raise ValueError(f"conversation {conv.id!r}: {IMAGE_TOKEN} inside an assistant turn")
    messages = conv.messages(system_prompt)
    text = _render(tokenizer, messages)
    spans = _assistant_spans(conv, tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    want_images = 1 if conv.image is not None else 0
    if ids.count(image_token_id) != want_images:
        raise TemplateMismatchError(
            f"conversation {conv.id!r}: expected {want_images} {IMAGE_TOKEN} token(s) after the "
            f"chat template, found {ids.count(image_token_id)}; make sure {IMAGE_TOKEN} is a single "
            "special token of the tokenizer (load_llm adds it) and that the template keeps it"
        )
    special = _special_ids(tokenizer, image_token_id)
    trained = [False] * len(ids)
    missing_end = 0
    for turn, (cs, ce) in enumerate(spans, start=1):
        inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < ce and e > cs]
        content = text[cs:ce]
        decoded = tokenizer.decode([ids[i] for i in inside], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False) if inside else ""
        if not inside or decoded.strip() != content.strip() or any(trained[i] for i in inside):
            raise TemplateMismatchError(
                f"conversation {conv.id!r}: assistant turn {turn}: the tokens over its text decode "
                f"to {decoded!r}, not {content!r}; the tokenizer merges template text with the "
                "content at a turn boundary. Change the template so turns are separated by "
                "special tokens or whitespace."
            )
        for i in inside:
            trained[i] = True
        # the end-of-turn token: the first special token after the content, whitespace between
        end, j = None, inside[-1] + 1
        while j < len(ids):
            if ids[j] in special:
                end = j
                break
            s, e = offsets[j]
            if e > s and not text[s:e].isspace():
                break
            j += 1
        if end is None:
            missing_end += 1
        else:
            for i in range(inside[-1] + 1, end + 1):
                trained[i] = True
    return _Rendered(text, ids, offsets, trained, missing_end)


def _expand(r: _Rendered, image_token_id: int, num_visual_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, source token index per position) with `<image>` repeated."""
    ids, labels, source = [], [], []
    for i, (tok, t) in enumerate(zip(r.ids, r.trained, strict=True)):
        n = num_visual_tokens if tok == image_token_id else 1
        ids += [tok] * n
        labels += [tok if t and tok != image_token_id else IGNORE_INDEX] * n
        source += [i] * n
    return ids, labels, source


def encode_conversation(
    conv: Conversation,
    tokenizer,
    image_token_id: int,
    num_visual_tokens: int,
    max_len: int,
    system_prompt: str | None = None,
) -> EncodedConversation:
    """Token ids and labels for one conversation (loss on assistant turns only).

    The whole conversation is rendered once by `tokenizer.apply_chat_template(...,
    tokenize=False)` (its default system prompt included, or `system_prompt`), tokenised
    once with offsets, and a token is trained when it overlaps an assistant content's
    character span, plus the special end-of-turn token that follows it. `<image>` becomes
    `num_visual_tokens` image ids (label -100). Sequences longer than `max_len` (visual
    tokens included) are cut from the end; the result may then hold zero labels (see
    `num_labels`; `encode_conversations` skips those). Raises `TemplateMismatchError`
    when the labelled tokens would not decode to exactly the assistant contents.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    rendered = _render_and_mask(conv, tokenizer, image_token_id, system_prompt)
    ids, labels, _ = _expand(rendered, image_token_id, num_visual_tokens)
    truncated = len(ids) > max_len
    return EncodedConversation(
        input_ids=ids[:max_len], labels=labels[:max_len], id=conv.id, truncated=truncated,
        missing_end_tokens=rendered.missing_end_tokens,
    )


def encode_conversations(
    convs: list[Conversation],
    tokenizer,
    image_token_id: int,
    num_visual_tokens: int,
    max_len: int,
    report: LoadReport | None = None,
    system_prompt: str | None = None,
) -> list[EncodedConversation]:
    """`encode_conversation` on each; samples left with zero labels after truncation are
    skipped and counted in `report` as `no_labels_after_truncation`."""
    report = report if report is not None else LoadReport()
    out = []
    for conv in convs:
        enc = encode_conversation(conv, tokenizer, image_token_id, num_visual_tokens, max_len, system_prompt)
        if enc.num_labels == 0:
            report.skip("no_labels_after_truncation", conv.id,
                        f"{max_len} tokens hold no assistant token; raise max_len")
            continue
        out.append(enc)
        report.loaded += 1
    return out


# ---------------------------------------------------------------- dataset and batching


class ConversationDataset(Dataset):
    """Encoded conversations with, per item, cached tower features or a preprocessed image.

    `features` [N, P, Dv] rows align with `convs` (before any skip). Text-only
    conversations are skipped (`no_image`: every row of a VLM batch needs its visual
    tokens), as are samples with no label left (`no_labels_after_truncation`), both
    counted in `report`. Items: `index` (into `convs`), `input_ids`, `labels`, and
    `features` or `pixel_values`.
    """

    def __init__(
        self,
        convs: list[Conversation],
        tokenizer,
        image_token_id: int,
        num_visual_tokens: int,
        max_len: int,
        features: Tensor | None = None,
        preprocess=None,
        report: LoadReport | None = None,
        system_prompt: str | None = None,
    ) -> None:
        if features is None and preprocess is None:
            raise ValueError("ConversationDataset needs cached features or a preprocess function")
        if features is not None and len(features) != len(convs):
            raise ValueError(f"{len(features)} feature rows for {len(convs)} conversations")
        self.report = report if report is not None else LoadReport()
        self.convs, self.features, self.preprocess = convs, features, preprocess
        self.index: list[int] = []
        self.encoded: list[EncodedConversation] = []
        for i, conv in enumerate(convs):
            if conv.image is None:
                self.report.skip("no_image", conv.id, "text-only conversation")
                continue
            enc = encode_conversation(conv, tokenizer, image_token_id, num_visual_tokens, max_len, system_prompt)
            if enc.num_labels == 0:
                self.report.skip("no_labels_after_truncation", conv.id,
                                 f"{max_len} tokens hold no assistant token; raise max_len")
                continue
            self.index.append(i)
            self.encoded.append(enc)
            self.report.loaded += 1
        if self.report.total_skipped():
            log.warning("%s", self.report.summary())

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, k: int) -> dict:
        i, enc = self.index[k], self.encoded[k]
        item: dict = {"index": i, "input_ids": enc.input_ids, "labels": enc.labels}
        if self.features is not None:
            item["features"] = self.features[i]
        else:
            item["pixel_values"] = self.preprocess([load_image(self.convs[i].image)])[0]
        return item


@dataclass
class ConversationCollator:
    """Right-pads encoded conversations into input_ids, attention_mask, labels [B, T]
    (labels -100 on padding); stacks `features` or `pixel_values`; keeps `index`."""

    tokenizer: object

    def __call__(self, items: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        t = max(len(it["input_ids"]) for it in items)
        batch: dict = {
            "input_ids": torch.tensor([it["input_ids"] + [pad] * (t - len(it["input_ids"])) for it in items]),
            "attention_mask": torch.tensor([[1] * len(it["input_ids"]) + [0] * (t - len(it["input_ids"]))
                                            for it in items]),
            "labels": torch.tensor([it["labels"] + [IGNORE_INDEX] * (t - len(it["labels"])) for it in items]),
        }
        if "index" in items[0]:
            batch["index"] = torch.tensor([it["index"] for it in items])
        for key in ("features", "pixel_values"):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items])  # [B, P, Dv] / [B, 3, H, W]
        return batch


# ---------------------------------------------------------------- data check


@dataclass
class CheckReport:
    """What `vlmalign data check` prints: trained-token share, problem samples, examples."""

    conversations: int = 0
    total_tokens: int = 0  # after image expansion and truncation
    image_tokens: int = 0
    trained_tokens: int = 0
    truncated: list[str] = field(default_factory=list)
    zero_label: list[str] = field(default_factory=list)
    missing_end_token: list[str] = field(default_factory=list)
    mismatches: list[tuple[str, str]] = field(default_factory=list)  # (id, message)
    shown: list[tuple[str, str]] = field(default_factory=list)  # (id, marked text)

    @property
    def trained_share(self) -> float:
        """Trained tokens / all tokens (image positions included)."""
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def trained_share_of_text(self) -> float:
        """Trained tokens / text tokens (image positions excluded)."""
        text = self.total_tokens - self.image_tokens
        return self.trained_tokens / text if text else 0.0


def _marked_text(r: _Rendered, kept: int, image_token_id: int, num_visual_tokens: int) -> str:
    """The rendered text of the first `kept` tokens, trained runs wrapped in [[...]]."""
    out, pos, open_run = [], 0, False
    for i in range(kept):
        s, e = r.offsets[i]
        if s > pos:  # characters no token covers (rare): shown untrained
            if open_run:
                out.append("]]")
                open_run = False
            out.append(r.text[pos:s])
        if r.trained[i] != open_run:
            out.append("[[" if r.trained[i] else "]]")
            open_run = r.trained[i]
        piece = r.text[s:e]
        out.append(f"<image x{num_visual_tokens}>" if r.ids[i] == image_token_id else piece)
        pos = max(pos, e)
    if open_run:
        out.append("]]")
    if kept < len(r.ids):
        out.append(f"...[truncated: {len(r.ids) - kept} more tokens]")
    return "".join(out)


def check_conversations(
    convs: list[Conversation],
    tokenizer,
    image_token_id: int,
    num_visual_tokens: int,
    max_len: int,
    show: int = 3,
    system_prompt: str | None = None,
) -> CheckReport:
    """Encode every conversation as training would and report what is trained.

    Counts trained tokens (overall share), truncated samples, samples with zero trained
    tokens, assistant turns with no end-of-turn token, and template mismatches (recorded,
    not raised); renders the first `show` samples with trained text in `[[...]]`.
    """
    report = CheckReport()
    for conv in convs:
        report.conversations += 1
        try:
            rendered = _render_and_mask(conv, tokenizer, image_token_id, system_prompt)
        except TemplateMismatchError as err:
            report.mismatches.append((conv.id, str(err)))
            continue
        ids, labels, source = _expand(rendered, image_token_id, num_visual_tokens)
        ids, labels = ids[:max_len], labels[:max_len]
        report.total_tokens += len(ids)
        report.image_tokens += ids.count(image_token_id)
        n_labels = sum(label != IGNORE_INDEX for label in labels)
        report.trained_tokens += n_labels
        if len(source) > max_len:
            report.truncated.append(conv.id)
        if n_labels == 0:
            report.zero_label.append(conv.id)
        if rendered.missing_end_tokens:
            report.missing_end_token.append(conv.id)
        if len(report.shown) < show:
            kept = source[max_len - 1] + 1 if len(source) > max_len else len(rendered.ids)
            report.shown.append((conv.id, _marked_text(rendered, kept, image_token_id, num_visual_tokens)))
    return report


def _id_list(ids: list[str], limit: int = 10) -> str:
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def format_check(report: CheckReport) -> str:
    """The check report as text for the terminal."""
    lines = [
        f"{report.conversations} conversations, {report.total_tokens} tokens after truncation "
        f"({report.image_tokens} image positions)",
        f"trained tokens: {report.trained_tokens} = {report.trained_share:.1%} of all tokens, "
        f"{report.trained_share_of_text:.1%} of text tokens",
    ]
    if report.truncated:
        lines.append(f"truncated to max_len: {len(report.truncated)} ({_id_list(report.truncated)})")
    if report.zero_label:
        lines.append(f"ZERO trained tokens (skipped in training; raise max_len): {len(report.zero_label)} "
                     f"({_id_list(report.zero_label)})")
    else:
        lines.append("samples with zero trained tokens: none")
    if report.missing_end_token:
        lines.append(f"no end-of-turn token after an assistant turn (the model will not learn to stop): "
                     f"{len(report.missing_end_token)} ({_id_list(report.missing_end_token)})")
    for conv_id, message in report.mismatches[:3]:
        lines.append(f"TEMPLATE MISMATCH {conv_id}: {message}")
    if len(report.mismatches) > 3:
        lines.append(f"... {len(report.mismatches) - 3} more template mismatches")
    for conv_id, text in report.shown:
        lines += ["", f"--- {conv_id} (trained text in [[...]])", text.rstrip("\n")]
    return "\n".join(lines)
