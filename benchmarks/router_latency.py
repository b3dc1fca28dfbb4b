"""Stage-1 routing latency: cosine top-K over banks of 1e3, 1e5 and 1e6 random keys.

Prints one line per bank size and saves JSON. Target: < 2 ms per query at 1e6 keys with the
approximate (IVF) index on a 2-core CPU. Each query is a key plus noise (as a question is near the
atom that answers it); the hit rate is how often that key is in the top-K. Unclustered random keys
are the hardest case for an IVF index: real keys cluster by topic, which helps it.

    .venv/bin/python benchmarks/router_latency.py [--sizes 1000 100000 1000000] [--dim 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from vllm_doc2atom.key_index import KeyIndex, KeyIndexConfig, normalize


def run(size: int, dim: int, k: int, queries: int, config: KeyIndexConfig, seed: int) -> dict:
    import faiss

    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((size, dim), dtype=np.float32)
    t0 = time.perf_counter()
    index = KeyIndex(keys, config)
    build_s = time.perf_counter() - t0
    # Queries near real keys (a key plus noise), as a question is near the atom that answers it.
    targets = rng.integers(0, size, queries)
    q = keys[targets] + 0.5 * rng.standard_normal((queries, dim), dtype=np.float32)
    index.search(q[:5], k)  # warm-up
    latencies = []
    found = []
    for i in range(queries):
        t = time.perf_counter()
        _, ids = index.search(q[i : i + 1], k)
        latencies.append((time.perf_counter() - t) * 1e3)
        found.append(ids[0])
    exact = faiss.IndexFlatIP(dim)
    exact.add(normalize(keys))
    _, exact_ids = exact.search(normalize(q), k)
    hit_rate = float(np.mean([t in f for t, f in zip(targets, found)]))
    exact_hit_rate = float(np.mean([t in e for t, e in zip(targets, exact_ids)]))
    return {
        "size": size, "dim": dim, "k": k, "index": "exact" if index.exact else "ivf-flat",
        "nprobe": None if index.exact else config.nprobe, "build_s": round(build_s, 3),
        "median_ms": round(float(np.median(latencies)), 4), "p90_ms": round(float(np.percentile(latencies, 90)), 4),
        "hit_rate": round(hit_rate, 4), "exact_hit_rate": round(exact_hit_rate, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256, help="key dimension")
    parser.add_argument("--k", type=int, default=8, help="top-K")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--nprobe", type=int, default=KeyIndexConfig.nprobe)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "router_latency.json"))
    args = parser.parse_args()

    config = KeyIndexConfig(nprobe=args.nprobe)
    rows = []
    print(f"{'keys':>9} {'index':>8} {'build s':>8} {'median ms':>10} {'p90 ms':>8} {'hit rate':>9} {'exact hit':>9}")
    for size in args.sizes:
        row = run(size, args.dim, args.k, args.queries, config, args.seed)
        rows.append(row)
        print(f"{size:>9} {row['index']:>8} {row['build_s']:>8.2f} {row['median_ms']:>10.3f} "
              f"{row['p90_ms']:>8.3f} {row['hit_rate']:>9.3f} {row['exact_hit_rate']:>9.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
