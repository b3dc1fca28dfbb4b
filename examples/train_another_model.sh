#!/usr/bin/env bash
# Doc2Atom for a different base model: build data with that model as teacher, train its compiler and
# router, compile, serve. Any Hugging Face-format causal LM folder works (Llama/Gemma-2 style layers).
# Self-study needs none of this: `doc2atom compile DOCS --model MODEL_DIR --out BANK` fits every atom from the
# model itself at compile time. This script is for the amortized compiler (one trained network for all atoms).
# Usage: examples/train_another_model.sh MODEL_DIR [STEPS]
set -euo pipefail
model=${1:?usage: $0 MODEL_DIR [STEPS]}
steps=${2:-500}
bin=$(dirname "$0")/../.venv/bin
cd "$(dirname "$0")/.."

# 1. Data: documents, atoms, probes, labels, splits, and the model's own answers WITH the document
#    (the distillation teacher). Mix sources by training on one, then resuming on another.
"$bin/doc2atom" data build --source synthetic --limit 240 --out data/other-synthetic --model "$model"
# 2. Train: the same recipe as the shipped checkpoint, this model as student (on the CPU: training has no GPU path yet).
"$bin/doc2atom" train --config configs/smollm2-synthetic.yaml --set model="$model" \
    --set data=data/other-synthetic --set out=runs/other --set steps="$steps"
# 2b. Choose the router's refusal threshold on the validation documents (stored in the checkpoint).
"$bin/doc2atom" checkpoint calibrate runs/other/checkpoint --data data/other-synthetic
# 3. Compile and serve with the new checkpoint (a bank records its base model: serving it on another
#    model is refused with a 409).
"$bin/doc2atom" compile examples/docs/*.md --mode amortized --checkpoint runs/other/checkpoint --out banks/other-examples
echo "now: $bin/vllm serve $model --plugin doc2atom --doc2atom-bank-root banks"
# 4. Score it against the Doc-to-LoRA baseline (train it with --set method=d2l_atom --set out=runs/other-d2l):
#    doc2atom eval --data data/other-synthetic --checkpoint runs/other/checkpoint \
#        --d2l-atom-checkpoint runs/other-d2l/checkpoint --out runs/other-eval
