"""The discriminative recipe on two CPU ranks (gloo) gives the loss and gradients of one
process on the same global batch: CLIP on short captions with embeddings gathered across
ranks, NTP on long captions token-weighted over the global batch, with LoRA and soft
prompts training (the text path is not cached: text states are recomputed with grad)."""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmalign.config import load_config
from vlmalign.data.formats import load_captions_jsonl
from vlmalign.data.short_long import ShortLongCollator, ShortLongDataset, split_captions
from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective
from vlmalign.paths import recipe_config
from vlmalign.train.recipes import RECIPES, apply_recipe

from .conftest import TINY
from .test_distributed import PER_RANK, TOL, WORLD, _ddp_average, _free_port, _loss_and_grads

OVERRIDES = ["lora.target_modules=q_proj,v_proj", "data.long_max_tokens=200", "embedding.centre=false"]


def _model_and_objective(root: str, gather: bool):
    cfg = load_config(recipe_config("discriminative"), [*TINY, f"data.root={root}", *OVERRIDES])
    torch.manual_seed(0)  # identical LoRA and soft-prompt initialisation in every process
    model = VLM.build(cfg)
    apply_recipe(model, RECIPES.get("discriminative"))
    model.train()
    model.llm.eval()
    model.vision.eval()
    objective = Objective(cfg.objective, gather=gather)
    params = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    params |= {f"objective.{n}": p for n, p in objective.named_parameters() if p.requires_grad}
    return model, objective, params


def _batches(root: Path) -> dict:
    model, _, _ = _model_and_objective(str(root), False)
    samples = load_captions_jsonl(root / "train.jsonl")[: WORLD * PER_RANK]
    keep, caps = split_captions(samples, model.tokenizer, model.cfg.data)
    assert len(keep) == len(samples) and all(c.short and c.long for c in caps)
    feats = torch.randn(len(caps), model.vision.num_patches, model.vision.hidden_size,
                        generator=torch.Generator().manual_seed(1))  # [N, P, Dv]
    data = ShortLongDataset(caps, [s.image for s in samples], feats)
    collate = ShortLongCollator(model.tokenizer, model.image_token_id, model.num_visual_tokens, 200)
    items = [data[i] for i in range(len(data))]
    return {"root": str(root), "global": collate(items),
            "halves": [collate(items[r * PER_RANK : (r + 1) * PER_RANK]) for r in range(WORLD)]}


def _rank_main(rank: int, world: int, port: int, payload_path: str, out_dir: str) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        payload = torch.load(payload_path, weights_only=False)
        model, objective, params = _model_and_objective(payload["root"], True)
        out = _loss_and_grads(model, objective, params, payload["halves"][rank])
        out["grads"] = _ddp_average(out["grads"])
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(shapes_root, tmp_path_factory):
    batches = _batches(shapes_root)
    work = tmp_path_factory.mktemp("dist-disc")
    torch.save(batches, work / "payload.pt")
    mp.spawn(_rank_main, args=(WORLD, _free_port(), str(work / "payload.pt"), str(work)), nprocs=WORLD, join=True)
    ranks = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    model, objective, params = _model_and_objective(str(shapes_root), False)
    return ranks, _loss_and_grads(model, objective, params, batches["global"])


def test_two_ranks_match_one_process_for_discriminative(runs):
    ranks, ref = runs
    for key in ("loss", "ntp_loss", "clip_loss"):
        got = float(torch.stack([r["parts"][key] for r in ranks]).float().mean())
        assert abs(got - float(ref["parts"][key])) < TOL, (key, got, float(ref["parts"][key]))
    names = [n for n in ref["grads"] if "soft" in n or "lora_B" in n or "projector" in n]
    assert any("image_soft" in n for n in names) and any("lora_B" in n for n in names)
    for rank in ranks:
        for name, g in ref["grads"].items():
            torch.testing.assert_close(rank["grads"][name], g, rtol=0, atol=TOL, msg=name)
    assert any(ref["grads"][n].abs().max() > 0 for n in names)
