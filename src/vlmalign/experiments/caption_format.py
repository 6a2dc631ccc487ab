"""`vlmalign experiment caption-format`: does the cheap joint step cost quality?

`align-clip` trains the next-token loss on captions and a CLIP loss on prompted
embeddings. With `data.caption_format: plain` (`[<image> x Q] caption`, LLaVA stage 1)
the image embedding takes its own LLM pass; with `prompted` the caption continues the
image embedding prompt, so one pass serves both losses (`objective.shared_pass`,
benchmarks/README.md: about half the step time). This study trains both from the same
initial projector on the same captions (`study.py`) and compares retrieval,
compositionality and the held-out caption loss, the latter in both formats (LLaVA's
plain captioning is what later stages and `vlmalign caption` use).

The question is one of non-inferiority: the claim "plain trains better embeddings than
prompted by at least 2 points of text->image R@5" is "not supported" when the interval of
the difference lies below 2 points, i.e. prompted costs less than that; "supported" or
"inconclusive" means it may cost more.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlmalign.config import Config
from vlmalign.eval.evaluate import heldout_ntp_loss
from vlmalign.experiments import stats
from vlmalign.experiments.runner import Metric
from vlmalign.experiments.study import Arm, Study, run_study
from vlmalign.models.vlm import VLM

MARGIN = 2.0  # points of R@5 (and of compositional accuracy) we accept losing for the cheaper step


def _format(fmt: str):
    def change(cfg: Config) -> Config:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, caption_format=fmt))
    return change


def caption_losses(model: VLM, shared: dict, cfg: Config) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Held-out caption loss in each caption format and in the arm's own (the format
    `vlmalign caption` then uses), one value per seed."""
    out = {f"caption_loss_{fmt}": heldout_ntp_loss(model, shared["eval"], cfg, fmt=fmt) for fmt in ("plain", "prompted")}
    return out | {"caption_loss_own": out[f"caption_loss_{cfg.data.caption_format}"]}, {}


def study() -> Study:
    return Study(
        name="caption-format", title="align-clip: plain vs prompted caption format (the shared-pass step)",
        arms=[Arm("plain", "data.caption_format=plain: the embedding takes its own pass", _format("plain")),
              Arm("prompted", "data.caption_format=prompted: one pass serves both losses", _format("prompted"))],
        claims=[
            stats.Claim("prompted-costs-retrieval", f"plain captions train better embeddings than prompted ones "
                        f"by {MARGIN:g}+ points (text->image R@5)", "t2i_R@5", "plain", "prompted", MARGIN,
                        paper="our default's choice"),
            stats.Claim("prompted-costs-comp", f"plain captions give {MARGIN:g}+ points more compositional accuracy",
                        "comp", "plain", "prompted", MARGIN, paper="our default's choice"),
            stats.Claim("prompted-costs-captioning", "plain training captions better, each model in its own "
                        "format (held-out caption loss)", "caption_loss_own", "plain", "prompted", 0.0,
                        lower_is_better=True, paper="our default's choice"),
            stats.Claim("prompted-costs-plain-captioning", "plain training captions better in LLaVA's plain format "
                        "(held-out caption loss)", "caption_loss_plain", "plain", "prompted", 0.0,
                        lower_is_better=True, paper="our default's choice"),
            stats.Claim("prompted-is-faster", "the prompted step trains faster (training time)", "train_s",
                        "prompted", "plain", 0.0, lower_is_better=True, paper="benchmarks/README.md"),
        ],
        metrics=[Metric("caption_loss_own", "held-out caption loss, the arm's own format", None,
                        lower_is_better=True, unit=""),
                 Metric("caption_loss_plain", "held-out caption loss, plain format", None,
                        lower_is_better=True, unit=""),
                 Metric("caption_loss_prompted", "held-out caption loss, prompted format", None,
                        lower_is_better=True, unit="")],
        measure=caption_losses,
    )


def run_caption_format(out: str | Path = "runs/caption-format", quick: bool = False, seeds: list[int] | None = None,
                       llm: str = "smollm2-135m", tower: str = "efficientnet-lite0", extra: list[str] | None = None,
                       command: str = "", report_only: bool = False) -> dict:
    return run_study(study(), out, quick, seeds, llm, tower, extra, command, report_only)
