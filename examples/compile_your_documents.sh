#!/usr/bin/env bash
# Your own documents -> an atom bank (self-study with the default model) -> served -> asked.
# Usage: examples/compile_your_documents.sh DOCS_DIR [BANK_NAME]
#   DOCS_DIR holds .md / .txt files (id = file name) or .jsonl files of {"id", "text"}.
set -euo pipefail
docs=${1:?usage: $0 DOCS_DIR [BANK_NAME]}
name=${2:-mydocs}
root=${DOC2ATOM_BANK_ROOT:-banks}
bin=$(dirname "$0")/../.venv/bin

model=$("$bin/doc2atom" models prepare)                       # SmolLM2-135M-Instruct, once
"$bin/doc2atom" compile "$docs"/*.* --out "$root/$name" --overwrite   # --model DIR: any causal LM folder
"$bin/doc2atom" bank info "$root/$name" | head -20

"$bin/vllm" serve "$model" --plugin doc2atom --doc2atom-bank-root "$root" --port 8000 &
server=$!
trap 'kill $server' EXIT
until curl -sf http://127.0.0.1:8000/health >/dev/null; do sleep 2; done
"$bin/python" "$(dirname "$0")/openai_client.py" --bank "$name" "${QUESTION:-What is this document about?}"
# Add or drop documents later without recompiling the rest:
#   doc2atom compile new.md --out "$root/$name" --add ;  doc2atom bank remove "$root/$name" DOC_ID
