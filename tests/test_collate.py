import torch

from vlmalign.data.collate import IGNORE_INDEX, CaptionCollator
from vlmalign.models.language import tiny_tokenizer


def _collator(max_tokens=64):
    tok = tiny_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok, CaptionCollator(tok, tok.convert_tokens_to_ids("<image>"), 4, max_tokens)


def test_labels_cover_caption_and_eos_only():
    tok, c = _collator()
    b = c([{"index": 0, "caption": "a red circle"}, {"index": 1, "caption": "a large blue square left of a green star"}])
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    assert torch.all(labels[:, :4] == IGNORE_INDEX)  # image positions
    assert torch.all(labels[mask == 0] == IGNORE_INDEX)  # padding
    n0 = len(tok("a red circle", add_special_tokens=False).input_ids)
    assert int((labels[0] != IGNORE_INDEX).sum()) == n0 + 1  # caption + eos
    assert labels[0, 4 + n0] == tok.eos_token_id
    assert torch.equal(b["caption_mask"].sum(1), torch.tensor([n0, (b["caption_mask"][1] == 1).sum()]))


def test_overlong_captions_are_truncated_and_counted():
    _, c = _collator(max_tokens=3)
    b = c([{"index": 0, "caption": "a large blue square left of a small green star"}])
    assert c.truncated == 1
    assert int((b["labels"] != IGNORE_INDEX).sum()) == 4  # 3 kept tokens + eos: never zero labels


class _BosTokenizer:
    """A tokenizer that puts <bos> (id 1) before text, as Gemma's does."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

    def __call__(self, text, add_special_tokens=True):
        from types import SimpleNamespace

        ids = [3 + ord(c) % 40 for c in text]
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + ids)


def test_plain_captions_start_with_the_tokenizers_bos_untrained():
    from vlmalign.data.collate import IGNORE_INDEX, CaptionCollator
    from vlmalign.models.prompts import leading_special_ids

    tok = _BosTokenizer()
    assert leading_special_ids(tok) == [1]
    batch = CaptionCollator(tok, image_token_id=99, num_visual_tokens=2)([{"index": 0, "caption": "ab"}])
    assert batch["input_ids"][0].tolist() == [1, 99, 99, 3 + ord("a") % 40, 3 + ord("b") % 40, 2]
    assert batch["labels"][0].tolist()[:3] == [IGNORE_INDEX] * 3


def test_tokenizers_without_bos_get_nothing_prepended(tiny_model):
    from vlmalign.models.prompts import leading_special_ids

    assert leading_special_ids(tiny_model.tokenizer) == []
