"""Two CPU ranks (gloo) give the loss and gradients of one process on the same global batch,
for every contrastive term (patch-token, its sigmoid form, CLIP, SigLIP) and with
gradient accumulation (GradCache) on each rank.

The global batch has 8 shapes samples: rank 0 holds 4 short captions, rank 1 4 long ones,
so the ranks score different numbers of label tokens (the case where a per-rank mean of the
next-token loss is wrong). Each rank runs `Objective(gather=True)` on its half, backward,
then averages the gradients of the trainable parameters over ranks as DDP does; the
reference runs `Objective(gather=False)` on the whole batch in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vlmalign.objective as objective_module
from vlmalign.config import load_config
from vlmalign.data.collate import CaptionCollator, CaptionDataset
from vlmalign.data.formats import load_captions_jsonl
from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective, rank_token_weight
from vlmalign.paths import recipe_config
from vlmalign.train.recipes import RECIPES, apply_recipe
from vlmalign.train.step import TrainStep, accumulate_gradients

from .conftest import TINY

WORLD = 2
PER_RANK = 4
TOL = 1e-5
RECIPES_UNDER_TEST = ("align-cg", "align-clip", "align-siglip", "align-cg-sigmoid")
# Variants of the shipped recipes, as config overrides (the SigLIP gather is its own code path).
VARIANTS = {"align-siglip": ("align-clip", ["objective.contrastive=siglip"]),
            "align-cg-sigmoid": ("align-cg", ["objective.patch_sigmoid_weight=0.5"])}
ACCUMULATED = ("align-cg", "align-clip")
# (rank 0 count, rank 1 count) -> weights that rank_token_weight must return on each rank.
WEIGHT_CASES = {(0, 6): (0.0, 2.0), (3, 1): (1.5, 0.5), (0, 0): (0.0, 0.0)}


# ----------------------------------------------------------------------- shared set-up
def _config(recipe: str, root: str | Path):
    base, extra = VARIANTS.get(recipe, (recipe, []))
    return load_config(recipe_config(base), [*TINY, f"data.root={root}", *extra])


def _tiny_model(root: str | Path) -> VLM:
    """The tiny VLM, same seed in every process (both recipes share the backbone)."""
    torch.manual_seed(0)
    return VLM.build(_config("align", root))


def _setup(model: VLM, recipe: str, root: str, mean_states: torch.Tensor, gather: bool):
    """Prepare `model` as the trainer does for `recipe`; returns (objective,
    {name: trainable parameter})."""
    cfg = _config(recipe, root)
    model.set_config(cfg)  # as the trainer does
    apply_recipe(model, RECIPES.get(cfg.recipe))
    model.set_embedding_mean(mean_states)  # before any loss, identical on every rank
    model.train()
    model.llm.eval()  # no dropout in the backbones
    model.vision.eval()
    objective = Objective(cfg.objective, gather=gather)
    params = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    params |= {f"objective.{n}": p for n, p in objective.named_parameters() if p.requires_grad}
    return objective, params


def _make_batches(root: Path, model: VLM) -> dict:
    """One global batch and its two rank halves, collated separately (as each rank's
    loader would), with cached-style features and text states."""
    samples = load_captions_jsonl(root / "train.jsonl")[: WORLD * PER_RANK]
    # Rank 0: short captions; rank 1: long captions -> unequal label-token counts.
    samples = samples[:PER_RANK] + [
        dataclasses.replace(s, caption=s.long_caption) for s in samples[PER_RANK:]
    ]
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(
        len(samples), model.vision.num_patches, model.vision.hidden_size, generator=gen
    )  # [N, P, Dv]
    with torch.no_grad():
        text_states = model.text_states([s.caption for s in samples])  # [N, D]
    dataset = CaptionDataset(samples, features, text_states)
    collate = CaptionCollator(
        model.tokenizer, model.image_token_id, model.num_visual_tokens,
        model.cfg.data.max_caption_tokens,
    )
    items = [dataset[i] for i in range(len(dataset))]
    halves = [collate(items[r * PER_RANK : (r + 1) * PER_RANK]) for r in range(WORLD)]
    half = PER_RANK // 2  # two micro-batches per rank for the accumulation test
    quarters = [collate(items[q * half : (q + 1) * half]) for q in range(2 * WORLD)]
    return {
        "root": str(root), "mean_states": text_states, "global": collate(items), "halves": halves,
        "quarters": quarters,
    }


class _NoWrap:
    """What accumulate_gradients uses of an Accelerator, for an unwrapped model whose
    gradients the test averages over ranks itself (as DDP would on the last replay)."""

    def backward(self, loss):
        loss.backward()

    def no_sync(self, module):
        return contextlib.nullcontext()

    def unwrap_model(self, module):
        return module


def _loss_and_grads(model, objective, params, batch) -> dict:
    for p in params.values():
        p.grad = None
    total, parts = objective(model, batch)
    total.backward()
    return {
        "loss": total.detach(),
        "parts": {k: v.detach() for k, v in parts.items()},
        "grads": {n: p.grad.detach().clone() for n, p in params.items()},
    }


# ----------------------------------------------------------------------- the ranks
def _ddp_average(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over ranks, as DDP's gradient all-reduce (gloo has no ReduceOp.AVG)."""
    out = {}
    for name, g in grads.items():
        g = g.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        out[name] = g / dist.get_world_size()
    return out


def _rank_main(rank: int, world: int, port: int, payload_path: str, out_dir: str) -> None:
    warnings.filterwarnings(
        "ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
        category=FutureWarning,
    )
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    # Loopback only: gloo picks its interface from the host name unless told.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        payload = torch.load(payload_path, weights_only=False)
        batch = payload["halves"][rank]
        out: dict = {"weights": {}}
        for counts in WEIGHT_CASES:
            out["weights"][counts] = float(rank_token_weight(torch.tensor(counts[rank])))
        model = _tiny_model(payload["root"])
        for recipe in RECIPES_UNDER_TEST:
            objective, params = _setup(model, recipe, payload["root"], payload["mean_states"], True)
            exact = _loss_and_grads(model, objective, params, batch)
            exact["grads"] = _ddp_average(exact["grads"])
            # The naive version: every rank's next-token loss its own per-token mean.
            no_weight = mock.patch.object(
                objective_module, "rank_token_weight", lambda n: torch.ones((), device=n.device)
            )
            with no_weight:
                naive = _loss_and_grads(model, objective, params, batch)
            naive["grads"] = _ddp_average(naive["grads"])
            out[recipe] = {"exact": exact, "naive": naive}
        out["accumulated"] = {}
        for recipe in ACCUMULATED:  # K = 2 micro-batches per rank, GradCache across ranks
            objective, params = _setup(model, recipe, payload["root"], payload["mean_states"], True)
            for p in params.values():
                p.grad = None
            micro = payload["quarters"][2 * rank : 2 * rank + 2]
            accumulate_gradients(_NoWrap(), TrainStep(model, objective), objective, micro)
            out["accumulated"][recipe] = _ddp_average({n: p.grad.detach().clone() for n, p in params.items()})
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model(shapes_root) -> VLM:
    return _tiny_model(shapes_root)


@pytest.fixture(scope="module")
def batches(shapes_root, model) -> dict:
    return _make_batches(shapes_root, model)


@pytest.fixture(scope="module")
def two_ranks(batches, tmp_path_factory) -> list[dict]:
    """Per-rank results of one 2-process gloo run (both recipes)."""
    work = tmp_path_factory.mktemp("dist")
    torch.save(batches, work / "payload.pt")
    mp.spawn(
        _rank_main, args=(WORLD, _free_port(), str(work / "payload.pt"), str(work)),
        nprocs=WORLD, join=True,
    )
    return [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process(model, batches) -> dict:
    out = {}
    for recipe in RECIPES_UNDER_TEST:
        objective, params = _setup(model, recipe, batches["root"], batches["mean_states"], False)
        out[recipe] = _loss_and_grads(model, objective, params, batches["global"])
    return out


def _rank_mean(ranks: list[dict], recipe: str, kind: str, key: str) -> torch.Tensor:
    return torch.stack([r[recipe][kind]["parts"][key] for r in ranks]).float().mean()


# ----------------------------------------------------------------------- tests
def test_ranks_hold_unequal_label_token_counts(two_ranks, one_process):
    counts = [int(r["align-cg"]["exact"]["parts"]["ntp_tokens"]) for r in two_ranks]
    assert counts[1] >= 2 * counts[0] > 0, counts  # long vs short captions
    assert sum(counts) == int(one_process["align-cg"]["parts"]["ntp_tokens"])


@pytest.mark.parametrize("recipe", RECIPES_UNDER_TEST)
def test_two_ranks_match_one_process(two_ranks, one_process, recipe):
    ref = one_process[recipe]
    parts = [p for p in ("ntp_loss", "patch_loss", "patch_sigmoid_loss", "clip_loss", "siglip_loss")
             if p in ref["parts"]]
    assert len(parts) == (3 if recipe == "align-cg-sigmoid" else 2), parts  # NTP + the contrastive parts
    for key in ("loss", *parts):  # "loss": the total, weights included
        got, want = float(_rank_mean(two_ranks, recipe, "exact", key)), float(ref["parts"][key])
        assert abs(got - want) < TOL, (key, got, want)
    for rank in two_ranks:
        grads = rank[recipe]["exact"]["grads"]
        assert grads.keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert g.abs().max() > 0, name  # a gradient that exists, so the check means something
            torch.testing.assert_close(grads[name], g, rtol=0, atol=TOL, msg=name)
    if recipe in ("align-clip", "align-siglip"):
        assert "objective.log_logit_scale" in ref["grads"]
    if recipe == "align-siglip":
        assert "objective.logit_bias" in ref["grads"]


@pytest.mark.parametrize("recipe", ACCUMULATED)
def test_two_ranks_accumulating_two_micro_batches_match_one_process(two_ranks, one_process, recipe):
    """2 ranks x 2 micro-batches of 2 (GradCache across ranks, token-weighted next-token
    loss) give the gradients of one process on the 8-sample batch."""
    ref = one_process[recipe]["grads"]
    for rank in two_ranks:
        grads = rank["accumulated"][recipe]
        assert grads.keys() == ref.keys()
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=0, atol=TOL, msg=name)


@pytest.mark.parametrize("recipe", ACCUMULATED)
def test_per_rank_token_mean_would_differ(two_ranks, one_process, recipe):
    """Without the global token weighting, the 2-rank loss and gradients are off by far more
    than the tolerance above: the parity test can fail."""
    ref = one_process[recipe]
    naive_ntp = _rank_mean(two_ranks, recipe, "naive", "ntp_loss")
    assert abs(float(naive_ntp) - float(ref["parts"]["ntp_loss"])) > 100 * TOL
    diff = max(
        float((two_ranks[0][recipe]["naive"]["grads"][n] - g).abs().max())
        for n, g in ref["grads"].items()
    )
    assert diff > 100 * TOL, diff


def test_rank_token_weight_on_two_ranks(two_ranks):
    for counts, expected in WEIGHT_CASES.items():
        got = tuple(r["weights"][counts] for r in two_ranks)
        assert got == pytest.approx(expected), (counts, got)


def test_gather_without_process_group_changes_nothing(model, batches):
    """One process: gather=True is the plain objective (weight exactly 1)."""
    assert float(rank_token_weight(torch.tensor(7))) == 1.0
    objective, params = _setup(model, "align-cg", batches["root"], batches["mean_states"], False)
    plain = _loss_and_grads(model, objective, params, batches["halves"][1])
    objective.gather = True
    gathered = _loss_and_grads(model, objective, params, batches["halves"][1])
    assert torch.equal(plain["loss"], gathered["loss"])
    for name, g in plain["grads"].items():
        assert torch.equal(g, gathered["grads"][name]), name
