"""Experiments that reproduce the papers' claims in miniature, all through one runner
(`runner.py`: variants x seeds, results appended as they finish, intervals and verdicts
from `stats.py`). `EXPERIMENTS` maps each `vlmalign experiment NAME` to its module and
entry point; every entry point takes `out, quick, seeds, extra, command, report_only`
(and `sizes` where it has them)."""

EXPERIMENTS: dict[str, tuple[str, str, str]] = {
    "vladva": ("vlmalign.experiments.vladva", "run_vladva", "VladVA: ablation + CLIP peer, retrieval and compositionality"),
    "data-efficiency": ("vlmalign.experiments.data_efficiency", "run_data_efficiency",
                        "CG-VLM: 10% of the instruction data vs generative alignment on 100%, zero-shot MCQ"),
    "ak": ("vlmalign.experiments.ak", "run_ak", "Ak et al.: align vs align-clip, each then instruction-tuned"),
    "prompts": ("vlmalign.experiments.prompts", "run_prompt_training",
                "Ak et al.: align-clip trained with each embedding prompt (--checkpoint: evaluate one model)"),
    "caption-format": ("vlmalign.experiments.caption_format", "run_caption_format",
                       "align-clip with plain vs prompted captions: does the cheaper shared-pass step cost quality?"),
}
