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
