"""vlmalign: train and evaluate vision-language models with contrastive and generative
objectives together (CG-VLM, Ak et al., VladVA)."""

__version__ = "0.1.0"
