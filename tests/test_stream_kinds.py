"""Streaming every training data kind from webdataset shards: LLaVA conversations and
short/long captions are written to shards and batched exactly as the map-style path
batches the same records; bad streamed records are counted skips."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from vlmalign.data.conversations import Conversation, ConversationDataset
from vlmalign.data.images import load_image
from vlmalign.data.sample import LoadReport
from vlmalign.data.shards import INDEX_NAME, ShardStream, shard_command, write_shards
from vlmalign.models.language import IMAGE_TOKEN
from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective
from vlmalign.train.datasets import TrainData, build_stream, build_trainset
from vlmalign.train.recipes import RECIPES, apply_recipe

BATCH = 4
COMPARED = ("input_ids", "attention_mask", "labels")


@pytest.fixture(scope="module")
def conv_shards(shapes_root, tmp_path_factory) -> Path:
    """The shapes layout's instruct_train.json + mcq_train_conversations.json as shards of
    7 (dividing neither the record count nor 2 ranks x 2 workers)."""
    out = tmp_path_factory.mktemp("conv_shards")
    shard_command(shapes_root, out, shard_size=7, kind="conversations")
    return out


@pytest.fixture(scope="module")
def caption_shards(shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caption_shards")
    shard_command(shapes_root, out, shard_size=20)
    return out


def _setup(cfg, kind: str):
    """The model, objective and map-style records/trainset the trainer would build."""
    model = VLM.build(cfg)
    model.set_config(cfg)
    apply_recipe(model, RECIPES.get(cfg.recipe))
    objective = Objective(cfg.objective)
    data = TrainData.prepare(model, cfg, kind)
    return model, objective, data


def _streamed_items(trainset) -> list[dict]:
    return list(trainset.dataset)


def _assert_batches_match(streamed: list[dict], stream_collate, reference: dict[str, dict], ref_collate,
                          keys: tuple[str, ...]) -> None:
    """Batches of streamed items equal the map-style batches of the same records."""
    for start in range(0, len(streamed), BATCH):
        items = streamed[start : start + BATCH]
        got = stream_collate(items)
        want = ref_collate([reference[it["id"]] for it in items])
        assert set(got) == set(want)  # e.g. no input_ids in either when no row has a long caption
        for key in (k for k in keys if k in want):
            if isinstance(want[key], torch.Tensor):
                assert torch.equal(got[key], want[key]), (key, [it["id"] for it in items])
            else:
                assert got[key] == want[key], key
        # PNG images re-encoded as JPEG (quality 95) in the shards: close, not identical.
        assert (got["pixel_values"] - want["pixel_values"]).abs().mean() < 0.05


def test_shard_conversations_keeps_the_parsed_turns(shapes_root, conv_shards):
    index = json.loads((conv_shards / INDEX_NAME).read_text())
    assert index["kind"] == "conversations"
    from vlmalign.config import DataConfig
    from vlmalign.data.splits import train_conversations

    source = {c.id: c for c in train_conversations(DataConfig(root=str(shapes_root), generate_shapes=False))}
    got = list(ShardStream(conv_shards, rank=0, world_size=1, shuffle=False, decode="bytes"))
    assert index["total"] == len(got) == len(source) > 100  # instruct + mcq conversations, none lost
    for conv in got:
        assert conv.turns == source[conv.id].turns
        assert conv.turns[0][1].startswith(f"{IMAGE_TOKEN}\n")
        assert conv.image[:3] == b"\xff\xd8\xff"  # stored as JPEG
    assert {c.meta["position"] for c in got} == set(range(len(got)))


def test_streamed_conversations_batch_like_the_map_style_path(tiny_cfg, conv_shards):
    cfg = tiny_cfg("instruct", f"data.shards={conv_shards}", "train.cache_vision_features=false",
                   f"train.batch_size={BATCH}", "data.max_conversation_tokens=96")
    model, objective, data = _setup(cfg, "conversations")
    ref_set = build_trainset(model, objective, data, cfg)
    ds = ref_set.dataset
    reference = {data.records[ds.index[k]].id: ds[k] for k in range(len(ds))}
    # 96 tokens cut some conversations and leave some with no label: both compared too.
    assert 0 < ref_set.truncated() < len(ds) and data.report.skipped["no_labels_after_truncation"] > 0

    trainset = build_stream(model, cfg, 0, 1, kind="conversations", objective=objective)
    streamed = _streamed_items(trainset)
    assert sorted(it["id"] for it in streamed) == sorted(reference)  # each kept record once
    assert [it["id"] for it in streamed] != [data.records[i].id for i in ds.index]  # shuffled
    _assert_batches_match(streamed, trainset.collator, reference, ref_set.collator, COMPARED)
    assert trainset.truncated() == ref_set.truncated()
    assert trainset.stream.report.skipped == data.report.skipped  # the same records skipped, same reason


def test_streamed_short_long_batches_like_the_map_style_path(tiny_cfg, caption_shards):
    cfg = tiny_cfg("discriminative", f"data.shards={caption_shards}", "train.cache_vision_features=false",
                   f"train.batch_size={BATCH}", "data.short_max_tokens=10", "data.long_min_tokens=160",
                   "data.long_max_tokens=175")
    model, objective, data = _setup(cfg, "short_long")
    ref_set = build_trainset(model, objective, data, cfg)
    from vlmalign.data.short_long import split_captions

    keep, _ = split_captions(data.records, model.tokenizer, cfg.data)
    reference = {data.records[keep[i]].id: ref_set.dataset[i] for i in range(len(ref_set.dataset))}
    # The token limits above (shapes' short captions are 4-21 tiny-tokenizer tokens, long ones
    # 107-194) give rows with a short caption only, a long one only, both, and neither (skipped).
    rows = [(bool(r["short"]), bool(r["long"])) for r in reference.values()]
    assert {(True, False), (False, True), (True, True)} <= set(rows) and len(reference) < len(data.records)

    trainset = build_stream(model, cfg, 0, 1, kind="short_long", objective=objective)
    streamed = _streamed_items(trainset)
    assert sorted(it["id"] for it in streamed) == sorted(reference)
    skipped = trainset.stream.report.skipped
    assert skipped == {"no_short_or_long_caption": len(data.records) - len(reference)}
    keys = (*COMPARED, "ntp_rows", "emb_rows", "captions")
    _assert_batches_match(streamed, trainset.collator, reference, ref_set.collator, keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_and_workers_see_every_conversation_once(tiny_cfg, conv_shards, workers):
    """The training stream (records encoded in the DataLoader workers) of 2 ranks."""
    total = json.loads((conv_shards / INDEX_NAME).read_text())["total"]
    assert total % 2 == 0  # the trainer's even split then drops nothing
    cfg = tiny_cfg("instruct", f"data.shards={conv_shards}", f"train.batch_size={BATCH}")
    model = VLM.build(cfg)
    seen: list[str] = []
    for rank in range(2):
        trainset = build_stream(model, cfg, rank, 2, kind="conversations")
        loader = DataLoader(trainset.dataset, batch_size=BATCH, num_workers=workers, collate_fn=list)
        ids = [it["id"] for batch in loader for it in batch]
        assert len(ids) == total // 2
        seen += ids
    assert len(seen) == len(set(seen)) == total


def _rewrite_members(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    """Copy tar `src` to `dst` with the members named in `replace` given new bytes."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            payload = replace.get(m.name, tin.extractfile(m).read())
            m.size = len(payload)
            tout.addfile(m, io.BytesIO(payload))


def test_corrupt_conversation_members_are_counted_skips(tiny_cfg, conv_shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(conv_shards, bad)
    first = bad / "shard-000000.tar"
    _rewrite_members(first, tmp_path / "t.tar", {
        "000000001.json": b"{not json",
        "000000002.json": json.dumps({"id": "gpt-first", "conversations": [{"from": "gpt", "value": "hi"}]}).encode(),
        "000000003.json": json.dumps({"id": "no-turns"}).encode(),
        "000000004.jpg": b"\xff\xd8\xff garbage, not a jpeg",
    })
    shutil.move(tmp_path / "t.tar", first)
    cfg = tiny_cfg("instruct", f"data.shards={bad}", f"train.batch_size={BATCH}")
    model = VLM.build(cfg)
    trainset = build_stream(model, cfg, 0, 1, kind="conversations")
    items = list(trainset.dataset)
    report = trainset.stream.report
    assert report.skipped == {"malformed_json": 1, "not_alternating": 1, "missing_key": 1, "bad_image": 1}
    assert len(items) == trainset.stream.total - 4
    assert all(it["labels"].count(-100) < len(it["labels"]) for it in items)


def test_records_the_map_path_skips_are_counted_skips_in_the_stream(tiny_cfg, shapes_root, tmp_path):
    cfg = tiny_cfg("instruct", f"data.shards={tmp_path / 'shards'}", "data.max_conversation_tokens=64")
    model = VLM.build(cfg)
    image = shapes_root / "images" / "shapes_000000.png"
    convs = [Conversation(f"c{i}", image, [("user", f"{IMAGE_TOKEN}\nWhat is it?"), ("assistant", f"Shape {i}.")])
             for i in range(3)]
    # The question alone fills the 64 tokens: no assistant token is left to train on.
    convs.append(Conversation("long", image, [("user", f"{IMAGE_TOKEN}\n" + "why " * 80), ("assistant", "No.")]))
    convs.append(Conversation("text-only", None, [("user", "hi"), ("assistant", "hello")]))
    report = LoadReport()
    write_shards(convs, tmp_path / "shards", shard_size=2, report=report)
    assert report.skipped == {"no_image": 1}  # text-only conversations are not written

    trainset = build_stream(model, cfg, 0, 1, kind="conversations")
    assert sorted(it["id"] for it in trainset.dataset) == ["c0", "c1", "c2"]
    map_report = LoadReport()
    ConversationDataset(convs, model.tokenizer, model.image_token_id, model.num_visual_tokens, 64,
                        preprocess=model.preprocess, report=map_report)
    assert trainset.stream.report.skipped == {"no_labels_after_truncation": 1}
    assert map_report.skipped == {"no_labels_after_truncation": 1, "no_image": 1}


def test_shard_command_reads_llava_files_and_counts_text_only(shapes_root, tmp_path, capsys):
    records = [
        {"id": "a", "image": "images/shapes_000000.png",
         "conversations": [{"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "Shapes."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    path = tmp_path / "llava.jsonl"  # a .jsonl of conversations: recognised by its first record
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = shard_command(path, tmp_path / "out", image_root=shapes_root)
    assert (result["kind"], result["samples"], result["skipped"]) == ("conversations", 1, {"no_image": 1})
    assert "wrote 1 conversations (of 1 records)" in capsys.readouterr().out
    (conv,) = list(ShardStream(tmp_path / "out", shuffle=False))
    assert conv.turns[0] == ("user", f"{IMAGE_TOKEN}\nWhat is shown?")  # marker inserted, as the loader does
    assert conv.image.size == load_image(shapes_root / "images" / "shapes_000000.png").size


def test_caption_shards_keep_every_caption_field(caption_shards, shapes_root):
    from vlmalign.data.formats import load_captions_jsonl

    source = {s.id: s for s in load_captions_jsonl(shapes_root / "train.jsonl")}
    for s in ShardStream(caption_shards, shuffle=False, decode="bytes"):
        ref = source[s.id]
        assert (s.caption, s.short_caption, s.long_caption) == (ref.caption, ref.short_caption, ref.long_caption)
        assert s.meta["objects"] == ref.meta["objects"]  # other keys too: data.short_field may name one


def test_a_recipe_on_the_wrong_kind_of_shards_says_what_to_write(tiny_cfg, caption_shards, conv_shards):
    model = VLM.build(tiny_cfg("instruct"))
    with pytest.raises(ValueError, match="holds captions.*--kind conversations"):
        build_stream(model, tiny_cfg("instruct", f"data.shards={caption_shards}"), 0, 1, kind="conversations")
    with pytest.raises(ValueError, match="holds conversations"):
        build_stream(model, tiny_cfg("align", f"data.shards={conv_shards}"), 0, 1, kind="captions")
    with pytest.raises(ValueError, match="data_fraction"):
        build_stream(model, tiny_cfg("instruct", f"data.shards={conv_shards}", "data.data_fraction=0.5"), 0, 1,
                     kind="conversations")


@pytest.mark.parametrize("recipe", ["instruct", "discriminative"])
def test_recipes_train_from_shards(tiny_cfg, conv_shards, caption_shards, recipe):
    """Needs trainer._batches to call build_stream(..., kind=kind, objective=objective)."""
    from vlmalign.train.trainer import train

    shards = conv_shards if recipe == "instruct" else caption_shards
    cfg = tiny_cfg(recipe, f"data.shards={shards}", "train.max_steps=2", f"train.batch_size={BATCH}",
                   "train.log_every=1", "train.warmup_steps=1")
    result = train(cfg)
    assert [h["step"] for h in result.history] == [1, 2]
    assert all(0 < h["ntp_loss"] < 100 for h in result.history)
    if recipe == "discriminative":  # short captions reached the contrastive loss
        assert all(h["clip_loss"] > 0 for h in result.history)
    assert (result.checkpoint / "model.safetensors").exists()
