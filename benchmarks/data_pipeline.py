"""Images/s of the input pipeline per DataLoader worker, for COCO-size JPEGs, and how many
workers one GPU needs.

    .venv/bin/python benchmarks/data_pipeline.py --json benchmarks/results/data-pipeline-cpu-2core.json

1. Writes `--images` JPEGs of 640 x 480 (COCO's typical size; photo-like content: smooth
   shading, texture, edges and sensor noise, quality 90, ~150 KB each) into a temp folder.
2. Times (wall and CPU time), image by image in one thread, the stages a worker runs: read the file, decode it
   (`data.images.load_image`: full decode, EXIF orientation, RGB) and the tower's
   `preprocess` (bicubic resize to S x S, scale, normalise) for two towers: the packaged
   EfficientNet-Lite0 (224 px) and a CLIP ViT-L/14-336 (336 px, OpenAI CLIP mean/std; the
   preprocessing of a real one, built here from a tiny random CLIP vision config of the same
   resolution since no hub is reachable).
3. Times a `DataLoader` over the same files with 0, 1, 2 workers (batch 32, prefetch 4,
   persistent workers, one warm-up pass): images/s, and images/s per worker.
4. Estimates the images/s one H100 consumes in `align` with a frozen CLIP ViT-L/14-336 tower
   and SmolLM2-135M (the tower's forward FLOPs counted with torch's FlopCounterMode, the LLM's
   from its matmul weights), at a stated MFU of bf16 dense peak, and the workers that rate
   needs, from the CPU time per image (a worker with a core of its own) and from the rate
   measured through the DataLoader here (a shared machine gives each worker less).

Writes a JSON with `os.getloadavg()` before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from record import write_record  # benchmarks/record.py, beside this script
from torch.utils.data import DataLoader, Dataset

from vlmalign.config import VisionConfig
from vlmalign.data.images import load_image
from vlmalign.models.vision import build_vision_tower

H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100 SXM5 datasheet, dense (no sparsity)
COCO_SIZE = (640, 480)


def photo_like(seed: int, size: tuple[int, int] = COCO_SIZE) -> Image.Image:
    """A procedural picture with the statistics that drive JPEG cost: smooth shading, a few
    hard-edged objects, mid-frequency texture and sensor noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    low = rng.normal(size=(6, 8, 3))
    shade = np.asarray(Image.fromarray(((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    texture = np.asarray(Image.fromarray(rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    img = Image.fromarray(np.clip(0.7 * shade + 0.3 * texture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(30, 250)), y0 + int(rng.integers(30, 200))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_jpegs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:06d}.jpg"
        photo_like(i).save(p, "JPEG", quality=90)
        paths.append(p)
    return paths


def clip_l14_336_tower(folder: Path):
    """A vision tower whose preprocessing is a CLIP ViT-L/14-336's (336 px, CLIP mean/std):
    a tiny random CLIP vision model at that resolution, saved and loaded as the `hf` tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2)
    CLIPVisionModel(cfg).save_pretrained(folder)
    return build_vision_tower(VisionConfig(tower="hf", name=str(folder), image_size=336))


def vit_l14_336_forward_flops() -> float:
    """Forward FLOPs of one 336 px image through CLIP ViT-L/14 (all 24 layers), counted by
    FlopCounterMode on the meta device (no weights allocated)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=336, patch_size=14)
    with torch.device("meta"):
        model = CLIPVisionModel(cfg)
        x = torch.zeros(1, 3, 336, 336)
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=x)
    return float(counter.get_total_flops())


def smollm2_align_flops(visual_tokens: int = 9, caption_tokens: int = 20) -> float:
    """FLOPs per sample of SmolLM2-135M in an `align` step: forward 2 W T, backward 2 W T
    (frozen weights: activation gradients only), W = decoder matmul weights (30 layers of
    q, k, v, o and the gated MLP at hidden 576, 3 KV heads of 64, MLP 1536); the LM head
    (576 x 49152) on the caption positions only, forward and backward; attention scores
    (T^2) negligible at T ~ 30."""
    d, inter, kv, layers, vocab = 576, 1536, 3 * 64, 30, 49152
    w = layers * (d * d * 2 + 2 * d * kv + 3 * d * inter)
    t = visual_tokens + caption_tokens
    return 4.0 * w * t + 4.0 * d * vocab * caption_tokens


class Files(Dataset):
    """What a training worker does per image: decode the file, preprocess for the tower."""

    def __init__(self, paths: list[Path], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess([load_image(self.paths[i])])[0]  # [3, S, S]


def stage_times(paths: list[Path], towers: dict) -> dict:
    """Median wall ms and CPU ms (this thread's `time.thread_time`) per image of each stage,
    in this process on one thread. CPU time is what a stage costs a core whatever else the
    machine runs; wall time also holds the waits of a shared machine."""
    stages = ["read", "decode", *(f"preprocess_{k}" for k in towers), "load_image_plus_preprocess_336"]
    wall: dict[str, list[float]] = {k: [] for k in stages}
    cpu: dict[str, list[float]] = {k: [] for k in stages}

    def timed(name, fn):
        w, c = time.perf_counter(), time.thread_time()
        out = fn()
        cpu[name].append(time.thread_time() - c)
        wall[name].append(time.perf_counter() - w)
        return out

    def decode(data: bytes) -> Image.Image:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")

    for p in paths:
        data = timed("read", p.read_bytes)
        img = timed("decode", lambda data=data: decode(data))
        for name, tower in towers.items():
            timed(f"preprocess_{name}", lambda tower=tower, img=img: tower.preprocess([img]))
        # the real loader end to end, as a worker runs it for the 336 px tower
        timed("load_image_plus_preprocess_336", lambda p=p: towers["clip-vit-l14-336"].preprocess([load_image(p)]))
    ms = lambda xs: round(1000 * statistics.median(xs), 2)  # noqa: E731
    return {"wall_ms": {k: ms(v) for k, v in wall.items()}, "cpu_ms": {k: ms(v) for k, v in cpu.items()}}


def loader_rate(paths: list[Path], preprocess, workers: int, batch_size: int, passes: int) -> float:
    """Images/s of a DataLoader over `paths`, after one warm-up pass (worker start-up and
    file cache excluded)."""
    loader = DataLoader(Files(paths, preprocess), batch_size=batch_size, num_workers=workers,
                        prefetch_factor=4 if workers else None, persistent_workers=workers > 0)
    for _ in loader:  # warm-up
        pass
    t = time.perf_counter()
    n = 0
    for _ in range(passes):
        for batch in loader:
            n += batch.shape[0]
    rate = n / (time.perf_counter() - t)
    del loader
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time")
    ap.add_argument("--passes", type=int, default=2, help="timed passes over the images per setting")
    ap.add_argument("--mfu", default="0.3,0.4,0.5", help="MFU values for the H100 estimate")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    load_before = os.getloadavg()
    torch.set_num_threads(1)  # the main process stands for one worker (DataLoader workers use 1 thread)
    tmp = Path(tempfile.mkdtemp(prefix="vlmalign-pipeline-"))
    t = time.perf_counter()
    paths = write_jpegs(tmp / "jpeg", args.images)
    sizes = [p.stat().st_size for p in paths]
    print(f"wrote {len(paths)} JPEGs 640x480, mean {statistics.mean(sizes) / 1e3:.0f} KB, in {time.perf_counter() - t:.1f} s")
    towers = {"efficientnet-lite0-224": build_vision_tower(VisionConfig()),
              "clip-vit-l14-336": clip_l14_336_tower(tmp / "clip-336")}
    stages = stage_times(paths, towers)
    print("per image (median, 1 thread):", stages)

    rates: dict[str, dict[str, float]] = {}
    for name, tower in towers.items():
        rates[name] = {}
        for w in [int(x) for x in args.workers.split(",")]:
            r = loader_rate(paths, tower.preprocess, w, args.batch_size, args.passes)
            rates[name][f"workers_{w}"] = round(r, 1)
            print(f"{name}: {w} worker(s): {r:.1f} images/s")
    per_worker_336 = rates["clip-vit-l14-336"].get("workers_1") or rates["clip-vit-l14-336"]["workers_0"]
    # what one worker gives on a core of its own: the CPU time of its work per image
    per_core_336 = 1000 / stages["cpu_ms"]["load_image_plus_preprocess_336"]
    print(f"one worker on a core of its own (CPU time): {per_core_336:.0f} images/s at 336 px; "
          f"measured through the DataLoader on this shared machine: {per_worker_336:.0f}")

    vit = vit_l14_336_forward_flops()
    llm = smollm2_align_flops()
    estimates = []
    for m in [float(x) for x in args.mfu.split(",")]:
        per_s = m * H100_BF16_DENSE_TFLOPS * 1e12 / (vit + llm)
        estimates.append({"mfu": m, "images_per_s": round(per_s),
                          "workers_needed_own_core": math.ceil(per_s / per_core_336),
                          "workers_needed_at_measured_rate": math.ceil(per_s / per_worker_336)})
    print(f"ViT-L/14-336 forward {vit / 1e9:.0f} GFLOP/image, SmolLM2 align step {llm / 1e9:.1f} GFLOP/sample")
    for e in estimates:
        print(f"H100 at MFU {e['mfu']:.0%}: {e['images_per_s']} images/s -> {e['workers_needed_own_core']} workers "
              f"on cores of their own ({e['workers_needed_at_measured_rate']} at the rate measured here)")

    record = {
        "what": "decode + resize + normalise of 640x480 JPEGs per DataLoader worker (benchmarks/data_pipeline.py)",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "pillow": Image.__version__},
        "load_avg_before": list(load_before),
        "images": len(paths), "jpeg_quality": 90, "mean_jpeg_kb": round(statistics.mean(sizes) / 1e3, 1),
        "batch_size": args.batch_size, "prefetch_factor": 4,
        "stage_ms_per_image": stages,
        "loader_images_per_s": rates,
        "per_worker_images_per_s_336": round(per_worker_336, 1),
        "per_core_images_per_s_336_from_cpu_time": round(per_core_336, 1),
        "h100_estimate": {
            "recipe": "align, frozen CLIP ViT-L/14-336 tower (576 patches), pooled projector to 3x3 = 9 visual "
                      "tokens, SmolLM2-135M frozen, ~20 caption tokens",
            "vit_l14_336_forward_gflop": round(vit / 1e9, 1),
            "llm_step_gflop_per_sample": round(llm / 1e9, 2),
            "peak_bf16_dense_tflops": H100_BF16_DENSE_TFLOPS,
            "by_mfu": estimates,
        },
        "load_avg_after": list(os.getloadavg()),
    }
    write_record(args.json, record, load_before)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
