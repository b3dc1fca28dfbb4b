"""Stress: N mixed concurrent requests against a real `vllm serve --plugin doc2atom`, banks changing on disk.

    .venv/bin/python benchmarks/stress.py --requests 1000 [--concurrency 16] [--seed 0] [--model DIR]

It builds a tiny random Llama (or takes --model), several untrained banks of the example documents in a temp
bank root, and starts `vllm serve MODEL --plugin doc2atom --doc2atom-adapter-cache 2 --api-key K` (fp32,
short context). Then --concurrency clients send a seeded random mix of requests, through the `openai` SDK
(AsyncOpenAI) or raw httpx:
  valid     chat / completions (streamed or not, n=1 or 2), in-scope questions (routed) and off-topic ones
            (refused); a list of two compatible banks; the Responses API (streamed or not); atom_evidence
            (true and "only"); streams the client cancels after the first chunk; duplicate Authorization
            headers, right key first
  mutable   requests on banks that a background task changes during the run: swapped for a freshly built
            bank (atomic), documents removed and added back, shards corrupted in place (NaN bytes,
            truncated, deleted)
  invalid   unknown bank, "../etc", a NUL in the name, a 300-character name, banks that cannot be routed
            together, atom_evidence "yes", n="abc", max_tokens=-5, malformed and deeply nested JSON,
            a wrong API key, duplicate Authorization headers (wrong key first), atom_bank sent to
            /v1/chat/completions/batch and /invocations

Every request records its category, HTTP status (or exception) and latency. A 200 answer from a bank that is
never corrupted is WRONG when a choice's text is empty, provenance is missing (`x-doc2atom-provenance`
header; `doc2atom` field of non-streamed JSON) or names another bank, or the refusal does not match the
question (off-topic must be refused, in-scope must be routed; not judged on the bank whose documents change).
Generation uses ignore_eos and, for the tiny model, a logit bias against tokens that print nothing alone (an
untrained model repeats lone UTF-8 bytes or special tokens), so an empty text is never the model's doing.
Mutations are spread evenly over the run; clients pause for one that falls behind, so each lands mid-run.
After the run it counts composed-adapter folders (`*/d2a-*`) in --doc2atom-adapter-dir while the server is
up (at most the cache size, nothing in flight) and after shutdown (none).

Exit code 1 on any 5xx, transport error (connection dropped, error inside a 200 stream), unexpected status,
wrong answer, or adapter folders left beyond the cache size. Results: a table on stdout and JSON at --out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a script (or with -m): the project root for vllm_doc2atom/training, this folder for stress_parts.
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from stress_parts.banks import BankFactory  # noqa: E402
from stress_parts.common import ADAPTER_CACHE, BankNames, StressConfig  # noqa: E402
from stress_parts.mutations import Mutator  # noqa: E402
from stress_parts.report import build_results, print_report, save_results  # noqa: E402
from stress_parts.runner import exercise  # noqa: E402
from stress_parts.server import count_adapter_folders, log_errors, server_args, settled_folders  # noqa: E402


def parse_args() -> StressConfig:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=StressConfig.requests,
                        help="requests in the mix (default 1000)")
    parser.add_argument("--concurrency", type=int, default=StressConfig.concurrency,
                        help="clients sending at once (default 16)")
    parser.add_argument("--seed", type=int, default=StressConfig.seed,
                        help="seed of the request mix and the mutations")
    parser.add_argument("--out", default=StressConfig.out,
                        help="JSON results (default benchmarks/results/stress/stress.json)")
    parser.add_argument("--model", help="model folder to serve (default: a tiny random Llama)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (banks, server log)")
    return StressConfig.from_args(parser.parse_args())


def main() -> int:
    config = parse_args()

    from training.models import build_tiny_model
    from training.serve_process import vllm_server

    rng = random.Random(config.seed)
    work = Path(tempfile.mkdtemp(prefix="doc2atom-stress-"))
    adapter_dir = work / "adapters"
    adapter_dir.mkdir()
    print(f"work folder: {work}", file=sys.stderr)
    model_dir = Path(config.model) if config.model else build_tiny_model(work / "tiny-llama", arch="llama")
    names = BankNames()
    factory = BankFactory(model_dir, work / "banks")
    factory.build_all(names)
    mutator = Mutator(factory, names, random.Random(config.seed + 1))
    log = work / "serve.log"
    with vllm_server(model_dir, factory.root, log, server_args(adapter_dir), max_model_len=512) as url:
        plans, outcomes, mutations, wall = asyncio.run(exercise(url, model_dir, names, mutator, config, rng))
        while_up, settle_s = asyncio.run(settled_folders(adapter_dir, ADAPTER_CACHE))
    after_stop = count_adapter_folders(adapter_dir)

    results = build_results(config, plans, outcomes, mutations, wall, while_up, settle_s, after_stop,
                            log_errors(log))
    print_report(results)
    save_results(results, Path(config.out))
    if config.keep or results["failures"]:
        print(f"kept {work} (server log: {log})")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
