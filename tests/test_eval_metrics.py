"""Tests for vlmalign.eval.metrics and vlmalign.eval.report (pure functions, no models)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console

from vlmalign.eval.metrics import (
    compositional_accuracy,
    modality_gap,
    retrieval_metrics,
    zero_shot_accuracy,
)
from vlmalign.eval.report import metrics_table, print_table, write_metrics

# ---------------------------------------------------------------- retrieval


def test_retrieval_identity_is_perfect():
    out = retrieval_metrics(torch.eye(7), list(range(7)))
    assert out == {f"{d}_R@{k}": 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert list(out) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]


def test_retrieval_reversed_ranking():
    # the correct item is always ranked LAST (it alone scores -1, every wrong one 0)
    n = 10
    sim = -torch.eye(n)
    out = retrieval_metrics(sim, list(range(n)), ks=(1, 9, 10))
    assert out["i2t_R@1"] == 0.0 and out["t2i_R@1"] == 0.0
    assert out["i2t_R@9"] == 0.0 and out["t2i_R@9"] == 0.0  # rank 9 (0-based): not in top 9
    assert out["i2t_R@10"] == 100.0 and out["t2i_R@10"] == 100.0


def test_retrieval_graded_ranks():
    # image i's correct caption i has exactly i wrong captions above it.
    n = 6
    sim = torch.zeros(n, n)
    for i in range(n):
        sim[i] = torch.arange(n, 0, -1).float()  # caption 0 best ... caption n-1 worst
    # i2t rank of image i = i -> R@1 = 1/6, R@5 = 5/6
    out = retrieval_metrics(sim, list(range(n)), ks=(1, 5))
    assert out["i2t_R@1"] == pytest.approx(100 / 6)
    assert out["i2t_R@5"] == pytest.approx(500 / 6)
    # t2i: all images score caption j equally -> every other image ties -> rank n-1 for all
    assert out["t2i_R@1"] == 0.0 and out["t2i_R@5"] == 0.0


def test_retrieval_several_captions_any_counts_for_i2t():
    # 2 images, 2 captions each: captions 0,1 -> image 0; captions 2,3 -> image 1.
    t2i = [0, 0, 1, 1]
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.4],  # image 0: its caption 0 is top-1
            [0.8, 0.7, 0.2, 0.6],  # image 1: best own caption (3, 0.6) is 3rd
        ]
    )
    out = retrieval_metrics(sim, t2i, ks=(1, 2, 3))
    assert out["i2t_R@1"] == 50.0  # only image 0
    assert out["i2t_R@2"] == 50.0
    assert out["i2t_R@3"] == 100.0
    # t2i: caption 0 -> img0 (0.9>0.8) hit; caption 1 -> img0 (0.1<0.7) miss;
    #      caption 2 -> img1 (0.2<0.5) miss; caption 3 -> img1 (0.6>0.4) hit
    assert out["t2i_R@1"] == 50.0
    assert out["t2i_R@2"] == 100.0


def test_retrieval_ties_count_against():
    # Every score equal: a collapsed model must get 0 at R@1, not 100.
    sim = torch.ones(4, 4)
    out = retrieval_metrics(sim, [0, 1, 2, 3], ks=(1, 3, 4))
    assert out["i2t_R@1"] == 0.0 and out["t2i_R@1"] == 0.0
    assert out["i2t_R@3"] == 0.0 and out["t2i_R@3"] == 0.0
    assert out["i2t_R@4"] == 100.0 and out["t2i_R@4"] == 100.0
    # A single tie with one wrong item pushes the correct one to rank 1.
    sim = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    out = retrieval_metrics(sim, [0, 1], ks=(1, 2))
    assert out["i2t_R@1"] == 50.0  # image 0 ties with caption 1
    assert out["t2i_R@1"] == 100.0  # caption 0: image 0 (1.0) > image 1 (0.0)


def test_retrieval_ties_among_own_captions_do_not_hurt():
    sim = torch.tensor([[0.5, 0.5, 0.1], [0.0, 0.0, 0.9]])
    out = retrieval_metrics(sim, [0, 0, 1], ks=(1,))
    assert out["i2t_R@1"] == 100.0


def _naive_retrieval(sim: np.ndarray, t2i: np.ndarray, ks) -> dict[str, float]:
    n_img, n_txt = sim.shape
    i2t_hits = {k: 0 for k in ks}
    for i in range(n_img):
        own = [j for j in range(n_txt) if t2i[j] == i]
        best = max(sim[i, j] for j in own)
        rank = sum(1 for j in range(n_txt) if t2i[j] != i and sim[i, j] >= best)
        for k in ks:
            i2t_hits[k] += rank < k
    t2i_hits = {k: 0 for k in ks}
    for j in range(n_txt):
        c = sim[t2i[j], j]
        rank = sum(1 for i in range(n_img) if i != t2i[j] and sim[i, j] >= c)
        for k in ks:
            t2i_hits[k] += rank < k
    out = {f"i2t_R@{k}": 100.0 * i2t_hits[k] / n_img for k in ks}
    out.update({f"t2i_R@{k}": 100.0 * t2i_hits[k] / n_txt for k in ks})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    n_img = 30
    t2i = rng.permutation(np.repeat(np.arange(n_img), 5))  # 5 captions per image, shuffled
    # rounded scores so ties actually happen
    sim = np.round(rng.normal(size=(n_img, t2i.size)), 1)
    sim[t2i, np.arange(t2i.size)] += 1.0  # some signal so recalls are not all ~0
    ks = (1, 5, 10)
    got = retrieval_metrics(torch.from_numpy(sim).float(), torch.from_numpy(t2i), ks)
    want = _naive_retrieval(sim.astype(np.float32), t2i, ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
    assert 0 < got["i2t_R@1"] < 100 and 0 < got["t2i_R@10"] < 100


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.eye(3)[:, :2], [0, 1])  # image 2 has no caption
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        retrieval_metrics(torch.eye(2), [0, 2])
    with pytest.raises(ValueError, match="2 entries"):
        retrieval_metrics(torch.eye(2), [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), [0, 1])
    with pytest.raises(TypeError, match="integer"):
        retrieval_metrics(torch.eye(2), torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------- compositional


def test_compositional_accuracy_per_category():
    pos = torch.tensor([1.0, 1.0, 0.0, 2.0, 0.5, 0.5, 3.0])
    neg = torch.tensor([0.0, 2.0, 0.0, 1.0, 0.4, 0.6, 1.0])
    cats = ["swap-att", "swap-att", "swap-att", "add-obj", "add-obj", "add-obj", "replace-rel"]
    out = compositional_accuracy(pos, neg, cats)
    assert list(out) == ["swap-att", "add-obj", "replace-rel", "mean", "overall"]
    assert out["swap-att"] == pytest.approx(100 / 3)  # 1 win, 1 loss, 1 tie (= wrong)
    assert out["add-obj"] == pytest.approx(200 / 3)
    assert out["replace-rel"] == 100.0
    assert out["mean"] == pytest.approx((100 / 3 + 200 / 3 + 100) / 3)
    assert out["overall"] == pytest.approx(100 * 4 / 7)


def test_compositional_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        compositional_accuracy(torch.ones(3), torch.ones(3), ["a", "b"])
    with pytest.raises(ValueError, match="clash"):
        compositional_accuracy(torch.ones(1), torch.zeros(1), ["mean"])


# ---------------------------------------------------------------- modality gap


def test_modality_gap_identical_modalities():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    out = modality_gap(x, 3.0 * x)  # scale does not matter: rows are normalised
    assert out["gap"] == pytest.approx(0.0, abs=1e-7)
    assert out["matched_cosine"] == pytest.approx(1.0)
    assert out["mean_image_cosine"] == pytest.approx(out["mean_text_cosine"])


def test_modality_gap_hand_made_vectors():
    # images all along e0 (collinear), texts along e1 / -e1.
    img = torch.tensor([[1.0, 0.0], [2.0, 0.0], [5.0, 0.0]])
    txt = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 3.0]])
    out = modality_gap(img, txt)
    # centroids: (1, 0) and (0, 1/3) -> gap = sqrt(1 + 1/9)
    assert out["gap"] == pytest.approx(math.sqrt(1 + 1 / 9))
    assert out["matched_cosine"] == pytest.approx(0.0)
    assert out["mean_image_cosine"] == pytest.approx(1.0)
    # text pairs: (0,1)=-1, (0,2)=1, (1,2)=-1 -> mean -1/3
    assert out["mean_text_cosine"] == pytest.approx(-1 / 3)


def test_modality_gap_offdiagonal_matches_explicit():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(12, 5, generator=g) + 1.0, torch.randn(12, 5, generator=g)
    out = modality_gap(img, txt)
    u = torch.nn.functional.normalize(img.double(), dim=1)
    cos = u @ u.T
    want = (cos.sum() - cos.diagonal().sum()) / (12 * 11)
    assert out["mean_image_cosine"] == pytest.approx(float(want))


def test_modality_gap_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        modality_gap(torch.ones(3, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="all-zero"):
        modality_gap(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.ones(2, 2))


# ---------------------------------------------------------------- zero-shot


def test_zero_shot_accuracy():
    classes = torch.eye(6)  # class c along e_c
    # image 0 -> class 0 (correct); image 1: true 1, closest 2 then 1 (top-1 miss, top-2 hit);
    # image 2: true 5, scores 5 last of 6 -> top-5 miss; image 3: tie between classes 3 and 4
    img = torch.tensor(
        [
            [1.0, 0, 0, 0, 0, 0],
            [0, 0.5, 0.9, 0, 0, 0],
            [0.6, 0.5, 0.4, 0.3, 0.2, -0.1],
            [0, 0, 0, 1.0, 1.0, 0],
        ]
    )
    out = zero_shot_accuracy(img, classes, [0, 1, 5, 3], ks=(1, 2, 5))
    assert out["top1_acc"] == 25.0  # image 3's tie counts as wrong
    assert out["top2_acc"] == 75.0
    assert out["top5_acc"] == 75.0
    assert list(zero_shot_accuracy(img, classes, [0, 1, 5, 3])) == ["top1_acc", "top5_acc"]


def test_zero_shot_uses_cosine_not_dot_product():
    # Class 1 has a huge norm; with dot product it would win, with cosine class 0 wins.
    classes = torch.tensor([[1.0, 0.0], [100.0, 100.0]])
    out = zero_shot_accuracy(torch.tensor([[1.0, 0.1]]), classes, [0], ks=(1,))
    assert out["top1_acc"] == 100.0


# ---------------------------------------------------------------- report


def test_write_metrics_round_trip(tmp_path):
    path = tmp_path / "deep" / "ckpt" / "eval_retrieval.json"
    metrics = {
        "i2t_R@1": torch.tensor(12.5),
        "t2i_R@1": np.float32(7.25),
        "n_images": np.int64(128),
        "gap": float("nan"),
        "per_class": torch.tensor([1.0, 2.0]),
    }
    written = write_metrics(path, metrics, meta={"checkpoint": tmp_path, "seed": 0})
    assert written == path
    data = json.loads(path.read_text())
    assert data["metrics"] == {
        "i2t_R@1": 12.5,
        "t2i_R@1": 7.25,
        "n_images": 128,
        "gap": None,
        "per_class": [1.0, 2.0],
    }
    assert isinstance(data["metrics"]["i2t_R@1"], float)
    assert data["meta"] == {"checkpoint": str(tmp_path), "seed": 0}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    # overwrite keeps one file, new content
    write_metrics(path, {"i2t_R@1": 1.0})
    assert json.loads(path.read_text()) == {"metrics": {"i2t_R@1": 1.0}, "meta": {}}


def test_write_metrics_rejects_unknown_type_and_keeps_old_file(tmp_path):
    path = tmp_path / "m.json"
    write_metrics(path, {"a": 1.0})
    with pytest.raises(TypeError, match=r"metrics\.bad"):
        write_metrics(path, {"bad": object()})
    assert json.loads(path.read_text())["metrics"] == {"a": 1.0}


def test_metrics_table_renders():
    rows = {
        "align": {"i2t_R@1": 12.3456, "gap": 0.81234, "top1_acc": 1.0},
        "align-cg": {"i2t_R@1": torch.tensor(30.0), "mean": 55.55},
    }
    console = Console(record=True, width=200)
    console.print(metrics_table(rows, title="retrieval"))
    text = console.export_text()
    assert "retrieval" in text
    assert "12.3" in text and "12.35" not in text  # R@ -> one decimal
    assert "0.812" in text  # small non-percentage -> three decimals
    assert "1.0" in text and "1.000" not in text  # key with "acc" -> percentage
    assert "55.5" in text or "55.6" in text
    assert "30.0" in text
    header = next(line for line in text.splitlines() if "run" in line)
    # union of keys in first-seen order
    assert (
        header.index("i2t_R@1")
        < header.index("gap")
        < header.index("top1_acc")
        < header.index("mean")
    )
    align_cg = next(line for line in text.splitlines() if "align-cg" in line)
    assert align_cg.count("-") >= 1 + 2  # the "-" in the name + two missing cells


def test_metrics_table_columns_and_formats():
    rows = {"run0": {"gap": 0.5, "x": 2.0}}
    console = Console(record=True, width=120)
    print_table(rows, columns=["gap"], formats={"gap": "{:.4f}"}, console=console)
    text = console.export_text()
    assert "0.5000" in text
    assert "x" not in text.replace("run0", "")


# ---------------------------------------------------------------- embedding metrics (any embedder)


class _OracleEmbedder:
    """Images: their feature rows, normalised. Texts: the one-hot of the first `img<k>` or
    `c<k>` word, so a caption matches exactly the image of row k."""

    dim = 8

    def embed_images(self, features):
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def embed_texts(self, texts):
        import re

        rows = [int(re.search(r"\b(?:img|c)(\d)\b", t).group(1)) for t in texts]
        return torch.eye(self.dim)[rows]


def _oracle_data(**kw):
    from vlmalign.eval.evaluate import EvalData

    rows = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return EvalData(
        images=[], features=torch.eye(6, 8) * 3.0, captions=["img0", "img1", "img2", "img2 again"],
        text_to_image=rows([0, 1, 2, 2]), items=kw.get("items", []), item_to_image=kw.get("item_rows", rows([])),
        kp_captions=kw.get("kp_captions", []), kp_text_to_image=kw.get("kp_rows", rows([])),
        zs_image_rows=kw.get("zs_rows", rows([])), zs_labels=kw.get("zs_labels", rows([])),
        zs_class_names=kw.get("zs_names", []),
    )


def test_embedding_metrics_with_an_oracle_embedder():
    from vlmalign.data.sample import CompositionalItem
    from vlmalign.eval.evaluate import embedding_metrics

    rows = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    items = [CompositionalItem("i0", None, "img0 true", "img1 false", "good"),
             CompositionalItem("i1", None, "img1 true", "img0 false", "bad")]
    kp_captions = [f"img{k} caption {j}" for k in (0, 1, 3) for j in range(5)]
    data = _oracle_data(
        items=items, item_rows=rows([0, 0]),  # the second item's positive is about another image
        kp_captions=kp_captions, kp_rows=rows([0] * 5 + [1] * 5 + [3] * 5),
        zs_rows=rows([0, 5, 4]), zs_labels=rows([0, 2, 2]), zs_names=["c0", "c4", "c5"],
    )
    m = embedding_metrics(_OracleEmbedder(), data)
    # rows 3-5 belong to other tasks: they are no distractors (and no error) for emb_
    assert m["emb_i2t_R@1"] == m["emb_t2i_R@1"] == 100.0
    assert m["gap_matched_cosine"] == pytest.approx(1.0)
    assert m["comp_emb_good"] == 100.0 and m["comp_emb_bad"] == 0.0 and m["comp_emb_mean"] == 50.0
    assert m["kp_i2t_R@1"] == m["kp_t2i_R@1"] == 100.0 and m["kp_images"] == 3
    # row 0 -> c0 (right), row 5 -> c5 (right), row 4 labelled c5 but shows c4 (wrong)
    assert m["zs_acc"] == pytest.approx(200 / 3) and m["zs_images"] == 3
    assert "zs_top5_acc" not in m  # only 3 classes


def test_embedding_metrics_leaves_out_absent_tasks():
    from vlmalign.eval.evaluate import embedding_metrics

    m = embedding_metrics(_OracleEmbedder(), _oracle_data())
    assert not any(k.startswith(("kp_", "zs_", "comp_")) for k in m)
    assert m["emb_i2t_R@1"] == 100.0
