"""How long a COCO-5k retrieval evaluation takes: ranking 5,000 images x 25,000 captions in
bounded memory, and embedding throughput of the packaged models.

    .venv/bin/python benchmarks/retrieval_scale.py --json benchmarks/results/retrieval-scale-cpu-2core.json

1. Ranking (`eval.metrics.retrieval_metrics`, tiles with a running top-k): synthetic unit
   features at the size of the COCO 5k test split (5,000 images, 5 captions each) and
   SmolLM2's embedding size (576), captions clustered around their image. Timed from the
   embeddings (the 5,000 x 25,000 matrix is never built) and, for comparison, from a matrix
   computed first; the growth of the process's peak resident memory is recorded for each.
2. Embedding throughput of the real packaged models, `VLM.build(load_config(recipe_config(
   "align-clip")))` (SmolLM2-135M + EfficientNet-Lite0, prompted last-token embeddings):
   images/s from 640 x 480 PIL images (preprocess, tower, projector, LLM pass) and captions/s
   (COCO-length captions), `--batches` batches after one warm-up batch, wall and CPU time;
   FLOPs per image and per caption counted with torch's FlopCounterMode.
3. A COCO-5k evaluation's time here as measured (5,000 images + 25,000 captions + ranking),
   on this machine idle from the FLOPs at `--idle-gflops`, and on one H100 from the FLOPs
   at a stated MFU.

Writes a JSON with `os.getloadavg()` before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import H100_BF16_DENSE_TFLOPS, photo_like  # noqa: E402
from record import write_record  # noqa: E402 - benchmarks/record.py, beside this script

from vlmalign.config import load_config  # noqa: E402
from vlmalign.eval.metrics import retrieval_metrics  # noqa: E402
from vlmalign.models.vlm import VLM  # noqa: E402
from vlmalign.paths import recipe_config  # noqa: E402

SUBJECTS = ["a man", "a woman", "two children", "a dog", "a cat", "a group of people", "a bus", "a train",
            "a plate of food", "a giraffe", "a surfer", "a kitchen"]
ACTIONS = ["standing next to", "sitting on", "walking along", "parked near", "riding", "looking at",
           "lying on top of", "in front of"]
PLACES = ["a wooden table", "the beach", "a busy street", "a green field", "a snowy hill", "a white building",
          "the water", "a city sidewalk"]


def coco_like_captions(n: int) -> list[str]:
    """Captions of COCO's length (~10-11 words), all different."""
    return [f"{SUBJECTS[i % 12]} {ACTIONS[(i // 12) % 8]} {PLACES[(i // 96) % 8]} on a sunny day number {i}"
            for i in range(n)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic_coco(n_img: int, per_image: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=1)  # [N_img, D]
    t2i = torch.arange(n_img * per_image) % n_img  # [N_txt]
    txt = torch.nn.functional.normalize(img[t2i] + 1.2 * torch.randn(len(t2i), dim, generator=g) / dim**0.5 * 4, dim=1)
    return img, txt, t2i


def time_ranking(n_img: int, per_image: int, dim: int) -> dict:
    img, txt, t2i = synthetic_coco(n_img, per_image, dim)
    out: dict = {"images": n_img, "captions": len(t2i), "dim": dim}
    rss0 = peak_rss_mb()
    t, c = time.perf_counter(), time.process_time()
    metrics = retrieval_metrics((img, txt), t2i)
    out["from_embeddings_s"] = round(time.perf_counter() - t, 2)
    out["from_embeddings_cpu_s"] = round(time.process_time() - c, 2)
    out["from_embeddings_peak_rss_growth_mb"] = round(peak_rss_mb() - rss0, 1)
    out["recalls"] = {k: round(v, 2) for k, v in metrics.items()}
    rss1 = peak_rss_mb()
    t = time.perf_counter()
    sim = img @ txt.T  # [N_img, N_txt]
    again = retrieval_metrics(sim, t2i)
    out["from_matrix_s"] = round(time.perf_counter() - t, 2)
    out["from_matrix_peak_rss_growth_mb"] = round(peak_rss_mb() - rss1, 1)
    out["matrix_mb"] = round(sim.numel() * 4 / 2**20, 1)
    out["same_recalls"] = again == metrics
    return out


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def time_embedding(batches: int, image_batch: int, text_batch: int) -> dict:
    t = time.perf_counter()
    model = VLM.build(load_config(recipe_config("align-clip"))).eval()
    load_s = time.perf_counter() - t
    model.set_embedding_mean(torch.zeros(1, model.hidden_size))  # centring on, as trained models have it
    images = [photo_like(i) for i in range(image_batch * (batches + 1))]
    captions = coco_like_captions(text_batch * (batches + 1))
    out: dict = {"model": "align-clip: SmolLM2-135M + EfficientNet-Lite0, pooled 3x3 projector", "load_s": round(load_s, 1),
                 "image_batch": image_batch, "text_batch": text_batch, "batches": batches}
    with torch.no_grad():
        model.embed_images(images[:image_batch], batch_size=image_batch)  # warm-up
        t, c = time.perf_counter(), time.process_time()
        model.embed_images(images[image_batch:], batch_size=image_batch)
        out["images_per_s"] = round(image_batch * batches / (time.perf_counter() - t), 2)
        # CPU seconds (all threads) per image: what it costs the cores, whatever else runs
        out["cpu_s_per_image"] = round((time.process_time() - c) / (image_batch * batches), 3)
        # where an image's time goes, on one batch
        chunk = images[image_batch : 2 * image_batch]
        t = time.perf_counter()
        pixels = model.preprocess(chunk)
        t_pre = time.perf_counter() - t
        t = time.perf_counter()
        feats = model.tower_features(pixels)
        t_tower = time.perf_counter() - t
        t = time.perf_counter()
        model.finish_embedding(model.image_states(model.visual_tokens(features=feats)))
        t_llm = time.perf_counter() - t
        out["image_ms_split"] = {"preprocess": round(1000 * t_pre / image_batch, 2),
                                 "tower": round(1000 * t_tower / image_batch, 2),
                                 "projector_and_llm": round(1000 * t_llm / image_batch, 2)}
        model.embed_texts(captions[:text_batch], batch_size=text_batch)  # warm-up
        t, c = time.perf_counter(), time.process_time()
        model.embed_texts(captions[text_batch:], batch_size=text_batch)
        out["captions_per_s"] = round(text_batch * batches / (time.perf_counter() - t), 2)
        out["cpu_s_per_caption"] = round((time.process_time() - c) / (text_batch * batches), 3)
        out["gflop_per_image"] = round(count_flops(lambda: model.embed_images(chunk, batch_size=image_batch)) / image_batch / 1e9, 3)
        out["gflop_per_caption"] = round(
            count_flops(lambda: model.embed_texts(captions[:text_batch], batch_size=text_batch)) / text_batch / 1e9, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--image-batch", type=int, default=16)
    ap.add_argument("--text-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--idle-gflops", type=float, default=125.0,
                    help="model FLOP rate of this machine idle (70%% of its 180 GFLOPS 2-thread fp32 matmul "
                         "peak, FINDINGS.md) for the idle estimate")
    ap.add_argument("--gpu-mfu", type=float, default=0.2,
                    help="MFU assumed for the H100 estimate (inference of a 135M model in batches of a few hundred)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    ranking = time_ranking(args.images, args.per_image, args.dim)
    print("ranking:", json.dumps(ranking))
    emb = time_embedding(args.batches, args.image_batch, args.text_batch)
    print("embedding:", json.dumps(emb))

    n_img, n_txt = args.images, args.images * args.per_image
    here = {"images_s": round(n_img / emb["images_per_s"], 1), "captions_s": round(n_txt / emb["captions_per_s"], 1),
            "ranking_s": ranking["from_embeddings_s"]}
    here["total_s"] = round(sum(here.values()), 1)
    # the same on this machine idle, from the FLOPs at the rate its matmuls reach then (CPU
    # time is no guide on a shared machine: waiting threads spin and count as busy)
    idle_rate = args.idle_gflops * 1e9
    idle = {"gflops": args.idle_gflops,
            "images_s": round(n_img * emb["gflop_per_image"] * 1e9 / idle_rate, 1),
            "captions_s": round(n_txt * emb["gflop_per_caption"] * 1e9 / idle_rate, 1),
            "ranking_s": round(2 * n_img * n_txt * args.dim / idle_rate, 1)}
    idle["total_s"] = round(idle["images_s"] + idle["captions_s"] + idle["ranking_s"], 1)
    gpu_rate = args.gpu_mfu * H100_BF16_DENSE_TFLOPS * 1e12
    gpu = {"mfu": args.gpu_mfu, "peak_bf16_dense_tflops": H100_BF16_DENSE_TFLOPS,
           "images_s": round(n_img * emb["gflop_per_image"] * 1e9 / gpu_rate, 2),
           "captions_s": round(n_txt * emb["gflop_per_caption"] * 1e9 / gpu_rate, 2),
           "ranking_gflop": round(2 * n_img * n_txt * args.dim / 1e9, 1)}
    print(f"COCO-5k here ({args.threads} threads): {here}; idle, from FLOPs at {args.idle_gflops} GFLOPS: {idle}")
    print(f"COCO-5k on one H100 at MFU {args.gpu_mfu:.0%} (model FLOPs only; decoding JPEGs not counted): {gpu}")
    record = {
        "what": "COCO-5k-size retrieval: bounded-memory ranking and embedding throughput (benchmarks/retrieval_scale.py)",
        "threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "load_avg_before": list(load_before),
        "ranking": ranking, "embedding": emb,
        "coco5k_estimate_here": here, "coco5k_estimate_idle": idle, "coco5k_estimate_h100": gpu,
        "load_avg_after": list(os.getloadavg()),
    }
    write_record(args.json, record, load_before)


if __name__ == "__main__":
    main()
