#!/usr/bin/env bash
# The same request as examples/openai_client.py, with curl: `atom_bank` is just one more JSON field.
# Usage: examples/curl.sh "Who wrote the Velmora Orchard Protocol?" [bank] [base-url]
set -euo pipefail
question=${1:-"Who wrote the Velmora Orchard Protocol?"}
bank=${2:-examples}
url=${3:-http://127.0.0.1:8000}
model=$(curl -s "$url/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
curl -s "$url/v1/chat/completions" -H "Content-Type: application/json" -d "$(python3 - "$model" "$question" "$bank" <<'PY'
import json, sys
model, question, bank = sys.argv[1:]
print(json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                  "max_tokens": 64, "temperature": 0, "atom_bank": bank}))
PY
)" | python3 -m json.tool
echo
curl -s "$url/v1/atom_banks" | python3 -m json.tool   # the banks this server can see
