"""Bank format v2 at scale: load time, memory, index build, routing and composition for 1e3 .. 1e6 atoms.

Writes synthetic v2 banks with `AtomBank.create` (no fitting): ~10 atoms per document, templated fact
texts of every atom type, keys clustered around MiniLM embeddings of those texts (unit, 384-d), random
factors of the default compiled shape (SmolLM2-135M, down_proj of the last 4 layers, rank 8: 264 KiB per
atom) up to 1e5 atoms while the disk has room, and a tiny factor shape at 1e6 and again at 1e5, to show that
loading does not depend on factor bytes. Each bank is measured in a new Python process, as a server meets
it: load, resident memory (VmRSS, peak VmHWM), the stage-1 index (loaded from the bank above 50k atoms, which
stores it: index_s; built afresh: index_build_s), the first request (load + index + route + compose), then
route p50/p99 (`Router.route`: MiniLM + stage 1), the index search alone, compose p50/p99 (3 atoms of 3
documents) and stage-1 recall@8 against an exact scan. The page cache is not dropped: "cold" means a new
process, not an empty cache (the 1e5 real-shape bank's 27 GB of shards exceed this machine's
RAM, so its shards come partly from disk).

    .venv/bin/python benchmarks/bank_scale.py [--sizes 1000 10000 100000 1000000] [--root DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "docs"
CHECKPOINT = ROOT / "training" / "checkpoints" / "smollm2-135m-instruct" / "checkpoint.json"
ATOMS_PER_DOC = 10
TARGETS = {"load_s": 20.0, "rss_mb": 3 * 1024, "route_plus_compose_p50_ms": 30.0}
SYLLABLES = [
    "ka",
    "lor",
    "ven",
    "mi",
    "tha",
    "dru",
    "sel",
    "om",
    "ri",
    "bax",
    "quel",
    "an",
    "tor",
    "ys",
    "pem",
]
ATTRIBUTES = [
    ("founded in", "year"),
    ("is led by", "person"),
    ("exports", "good"),
    ("lies on the river", "place"),
    ("was designed by", "person"),
    ("is famous for its", "good"),
    ("signed a treaty with", "place"),
]
GOODS = [
    "blue salt",
    "dried silverfin",
    "amber glass",
    "copper bells",
    "kelp oil",
    "woven reed mats",
    "iron nails",
]


def names(rng: np.random.Generator, n: int) -> list[str]:
    return ["".join(rng.choice(SYLLABLES, size=rng.integers(2, 4))).capitalize() for _ in range(n)]


def fact_texts(count: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """Templated facts (and the sentences of examples/docs), their subjects, and questions about them."""
    rng = np.random.default_rng(seed)
    towns, people, places = names(rng, count), names(rng, 400), names(rng, 200)
    texts, subjects, questions = [], [], []
    for i in range(count):
        verb, kind = ATTRIBUTES[i % len(ATTRIBUTES)]
        value = {
            "year": str(rng.integers(1200, 1990)),
            "person": f"{rng.choice(people)} {rng.choice(people)}",
            "good": str(rng.choice(GOODS)),
            "place": str(rng.choice(places)),
        }[kind]
        texts.append(f"The town of {towns[i]} {verb} {value}.")
        subjects.append(towns[i])
        questions.append(f"Which town {verb} {value}?")
    for path in sorted(EXAMPLES.glob("*.md")):
        for sentence in path.read_text().replace("\n", " ").split(". "):
            if len(sentence.split()) > 5:
                texts.append(sentence.strip().rstrip(".") + ".")
                subjects.append(path.stem.replace("_", " ").title())
    return texts, subjects, questions


def spec_for(shape: str, key_dim: int):
    from vllm_doc2atom.bank_interface import BankSpec, Target
    from vllm_doc2atom.encoders import MINILM_IDENTITY
    from vllm_doc2atom.fingerprint import BaseModelFingerprint

    if shape == "real":  # the study compiler's defaults (StudyConfig) on the shipped SmolLM2
        base = BaseModelFingerprint.from_dict(json.loads(CHECKPOINT.read_text())["compiler"]["base_model"])
        targets, rank = (
            [Target("down_proj", layer) for layer in range(base.num_layers - 4, base.num_layers)],
            8,
        )
    else:
        base = BaseModelFingerprint(
            name="tiny",
            architecture="LlamaForCausalLM",
            num_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            vocab_size=100,
        )
        targets, rank = [Target("down_proj", 1)], 1
    return BankSpec(
        base_model=base, targets=targets, micro_rank=rank, key_encoder=MINILM_IDENTITY, key_dim=key_dim
    )


def factor_bytes(spec) -> int:
    return sum(4 * int(np.prod(s[1:])) for n, s in spec.expected_shapes(1).items() if n[:2] in ("A.", "B."))


def documents(
    spec, atoms: int, pool: np.ndarray, texts: list[str], subjects: list[str], seed: int
) -> Iterator:
    """Synthetic documents, generated as they are written (constant memory)."""
    import torch

    from vllm_doc2atom.bank_interface import ATOM_TYPES, AtomRecord, DocumentAtoms

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(1 << 24, dtype=np.float32) * 0.02  # 64 MB of factor values to slice from
    shapes = spec.expected_shapes(ATOMS_PER_DOC)
    sigma = 0.35 / np.sqrt(pool.shape[1])  # keys scatter around their text's embedding: distinct, clustered
    for d in range((atoms + ATOMS_PER_DOC - 1) // ATOMS_PER_DOC):
        n = min(ATOMS_PER_DOC, atoms - d * ATOMS_PER_DOC)
        which = rng.integers(0, len(texts), n)
        keys = pool[which] + sigma * rng.standard_normal((n, pool.shape[1]), dtype=np.float32)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        tensors = {
            "keys": torch.from_numpy(keys),
            "gates": torch.from_numpy(rng.random((n, len(spec.targets)), dtype=np.float32)),
        }
        for name, shape in shapes.items():
            if name[:2] in ("A.", "B."):
                size = n * int(np.prod(shape[1:]))
                at = int(
                    rng.integers(0, len(noise) - size)
                )  # a different slice per document: distinct shards
                tensors[name] = torch.from_numpy(noise[at : at + size]).view(n, *shape[1:])
        doc_id = f"doc{d:07d}"
        records = [
            AtomRecord(
                id=f"{doc_id}#{i}",
                document_id=doc_id,
                type=ATOM_TYPES[(d + i) % len(ATOM_TYPES)],
                text=texts[j],
                span=(40 * i, 40 * i + len(texts[j])),
                answer_bearing=i % 2 == 0,
                retrieval_text=f"{subjects[j]}: {texts[j]}",
            )
            for i, j in enumerate(which)
        ]
        yield DocumentAtoms(doc_id, records, tensors)


def disk_bytes(path: Path) -> dict[str, int]:
    out = {"shards": 0, "segments": 0, "other": 0, "allocated": 0}
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            part = p.parent.name if p.parent.name in ("shards", "segments") else "other"
            out[part] += st.st_size
            out["allocated"] += st.st_blocks * 512
    out["total"] = out["shards"] + out["segments"] + out["other"]
    return out


# ---- measuring, in a new process -------------------------------------------------------------------


def set_threads(threads: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def percentiles(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
    }


def measure(path: Path, questions: list[str], seed: int) -> dict:
    """Run in a new process: what a server meets when the bank is first requested, then steady state."""
    from vllm_doc2atom.bank import AtomBank
    from vllm_doc2atom.composer import compose
    from vllm_doc2atom.encoders import SentenceTransformerEncoder
    from vllm_doc2atom.key_index import KeyIndex
    from vllm_doc2atom.router import Router

    encoder = SentenceTransformerEncoder()
    encoder.encode(["warm-up"])
    out: dict = {"memory_runtime_mb": memory_mb()}  # python + torch + MiniLM: what every server holds
    start = time.perf_counter()
    bank = AtomBank.load(path, name="bench")
    out["load_s"] = round(time.perf_counter() - start, 3)
    out["memory_after_load_mb"] = memory_mb()
    router = Router(encoder)
    start = time.perf_counter()
    index = router.index_for(bank)
    out["index_s"] = round(time.perf_counter() - start, 3)  # loaded when the bank stores one, else built
    out["index"] = "exact" if index.exact else f"ivf-{router.config.index.storage}"
    out["index_stored"] = bank.stored_index is not None
    if out["index_stored"]:  # what the first request cost before banks stored their index
        start = time.perf_counter()
        KeyIndex(bank.key_source(), router.config.index)
        out["index_build_s"] = round(time.perf_counter() - start, 3)
    rng = np.random.default_rng(seed)
    docs = len(bank.document_ids)

    def three_atoms() -> list[tuple[int, float]]:  # 3 atoms of 3 documents: 3 shard reads
        picked = rng.choice(docs, size=min(3, docs), replace=False)
        return [(int(d * ATOMS_PER_DOC + rng.integers(0, ATOMS_PER_DOC)) % len(bank), 0.8) for d in picked]

    start = time.perf_counter()
    routed = router.route(bank, questions[0])
    first_route = time.perf_counter() - start
    start = time.perf_counter()
    compose(bank, three_atoms())
    first_compose = time.perf_counter() - start
    out["first_request_s"] = round(out["load_s"] + out["index_s"] + first_route + first_compose, 3)
    if "index_build_s" in out:
        out["first_request_built_index_s"] = round(out["first_request_s"] - out["index_s"] +
                                                   out["index_build_s"], 3)
    out["first_route_ms"], out["first_compose_ms"] = (
        round(first_route * 1e3, 1),
        round(first_compose * 1e3, 1),
    )
    out["memory_after_index_mb"] = memory_mb()

    for q in questions[:5]:
        router.route(bank, q)  # warm-up
    route, composing = [], []
    for q in questions * 2:
        start = time.perf_counter()
        routed = router.route(bank, q)
        route.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        compose(bank, three_atoms())
        composing.append((time.perf_counter() - start) * 1e3)
    out["route"], out["compose"] = percentiles(route), percentiles(composing)
    vectors = encoder.encode(questions)
    encode, search = [], []
    for q, vector in zip(questions, vectors):  # the route's two parts: MiniLM, and the index alone
        start = time.perf_counter()
        encoder.encode([q])
        encode.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        index.search(vector[None], router.config.top_k)
        search.append((time.perf_counter() - start) * 1e3)
    out["encode"], out["search"] = percentiles(encode), percentiles(search)
    out["route_plus_compose_p50_ms"] = round(float(np.percentile(np.add(route, composing), 50)), 2)
    out["refused"] = routed.refused
    out["memory_steady_mb"] = memory_mb()
    out["recall_at_8"] = recall(bank, index, encoder, questions, rng) if not index.exact else 1.0
    start = time.perf_counter()
    bank.summary()  # `doc2atom bank info`: parses every record
    out["summary_s"] = round(time.perf_counter() - start, 2)
    return out


def recall(bank, index, encoder, questions: list[str], rng: np.random.Generator) -> float:
    """Stage-1 recall@8 of the index against an exact scan of every key (queries: the questions and keys
    perturbed)."""
    source = bank.key_source()
    sample = np.sort(rng.choice(len(bank), size=64, replace=False))
    near = source.take(sample) + 0.02 * rng.standard_normal((64, source.dim), dtype=np.float32)
    queries = np.concatenate([encoder.encode(questions), near])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    best_sims = np.full((len(queries), 8), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 8), np.int64)
    offset = 0
    for block in source.chunks(1 << 16):
        block = block / np.linalg.norm(block, axis=1, keepdims=True)
        sims = queries @ block.T
        sims = np.concatenate([best_sims, sims], axis=1)
        rows = np.concatenate(
            [best_rows, offset + np.broadcast_to(np.arange(len(block)), (len(queries), len(block)))], axis=1
        )
        top = np.argpartition(-sims, 8, axis=1)[:, :8]
        best_sims, best_rows = np.take_along_axis(sims, top, 1), np.take_along_axis(rows, top, 1)
        offset += len(block)
    _, found = index.search(queries, 8)
    return round(float(np.mean([len(set(f) & set(b)) / 8 for f, b in zip(found, best_rows)])), 4)


# ---- driver --------------------------------------------------------------------------------------


def cases(sizes: list[int], tiny_sizes: list[int], free: int, real_max: int) -> list[tuple[int, str]]:
    out = []
    for size in sizes:
        real = size <= real_max and size * 280_000 * 1.1 < 0.6 * free
        if not real and size <= real_max:
            print(
                f"{size} atoms: real-shape factors would need {size * 280_000 / 1e9:.0f} GB of "
                f"{free / 1e9:.0f} GB free; using the tiny shape"
            )
        out.append((size, "real" if real else "tiny"))
    out += [(size, "tiny") for size in tiny_sizes if (size, "tiny") not in out]
    return sorted(out, key=lambda c: (c[0], c[1] == "tiny"))


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    panels = [  # (title, value(s) of a row, log y): times that must grow with the data on log axes
        ("load (s)", lambda r: r["load_s"], True),
        ("index build (s)", lambda r: r["index_s"], True),
        ("first request: load + index + route + compose (s)", lambda r: r["first_request_s"], True),
        ("resident memory, steady (MB)", lambda r: r["memory_steady_mb"]["VmRSS"], False),
        (
            "route p50 / p99 (ms): MiniLM + stage 1",
            lambda r: (r["route"]["p50_ms"], r["route"]["p99_ms"]),
            False,
        ),
        (
            "stage-1 search alone p50 / p99 (ms)",
            lambda r: (r["search"]["p50_ms"], r["search"]["p99_ms"]),
            False,
        ),
        ("compose 3 atoms p50 / p99 (ms)", lambda r: (r["compose"]["p50_ms"], r["compose"]["p99_ms"]), False),
        ("stage-1 recall@8 vs exact", lambda r: r["recall_at_8"], False),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for ax, (title, value, log_y) in zip(axes.flat, panels):
        for shape, marker, color in (("real", "o", "tab:blue"), ("tiny", "s", "tab:orange")):
            sel = [r for r in rows if r["factor_shape"] == shape]
            if not sel:
                continue
            values = np.array([value(r) for r in sel], dtype=float).reshape(len(sel), -1)
            for k in range(values.shape[1]):
                ax.plot(
                    [r["atoms"] for r in sel],
                    values[:, k],
                    marker=marker,
                    color=color,
                    linestyle="-" if k == 0 else ":",
                    label=f"{shape} factors" + (" (p99 dotted)" if k else ""),
                )
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("atoms")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Atom bank format v2 at scale (2-core CPU; new process per bank, page cache not dropped)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--tiny-sizes",
        type=int,
        nargs="*",
        default=[100_000],
        help="also measure these sizes with the tiny factor shape",
    )
    parser.add_argument("--real-max", type=int, default=100_000, help="largest size with real-shape factors")
    parser.add_argument("--root", help="where to write the banks (default: a temp dir, deleted afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the banks")
    parser.add_argument("--reuse", action="store_true", help="measure banks already under --root")
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and faiss threads (default 1: on a shared 2-core machine, 2 OpenMP threads "
        "that spin-wait on each other made one MiniLM encode 30x slower)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bank_scale.json"))
    parser.add_argument("--replot", action="store_true", help="only redraw the plot and table from --out")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure one bank in this process
    args = parser.parse_args()

    set_threads(args.threads)
    if args.replot:
        rows = json.loads(Path(args.out).read_text())["results"]
        table(rows)
        plot(rows, Path(args.out).with_suffix(".png"))
        return
    texts, subjects, questions = fact_texts(4000, args.seed)
    questions = questions[: args.questions]
    if args.measure:
        print(json.dumps(measure(Path(args.measure), questions, args.seed)))
        return

    from vllm_doc2atom.bank import AtomBank
    from vllm_doc2atom.encoders import SentenceTransformerEncoder

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bank-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pool = SentenceTransformerEncoder().encode(texts).astype(np.float32)
    print(f"embedded {len(texts)} fact texts in {time.perf_counter() - start:.1f} s")
    rows = []
    try:
        for size, shape in cases(args.sizes, args.tiny_sizes, shutil.disk_usage(root).free, args.real_max):
            spec = spec_for(shape, pool.shape[1])
            path = root / f"{shape}-{size}"
            row = {
                "atoms": size,
                "factor_shape": shape,
                "factor_bytes_per_atom": factor_bytes(spec),
                "documents": (size + ATOMS_PER_DOC - 1) // ATOMS_PER_DOC,
            }
            if not (args.reuse and path.is_dir()):
                start = time.perf_counter()
                AtomBank.create(
                    path, spec, documents(spec, size, pool, texts, subjects, args.seed), overwrite=True
                )
                row["write_s"] = round(time.perf_counter() - start, 1)
            row["disk_bytes"] = disk_bytes(path)
            row["load_average"] = round(os.getloadavg()[0], 2)  # other work on this machine
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--measure",
                    str(path),
                    "--questions",
                    str(args.questions),
                    "--seed",
                    str(args.seed),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            if done.returncode:
                raise RuntimeError(f"measuring {path} failed:\n{done.stderr[-3000:]}")
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            rows.append(row)
            memory = row["memory_steady_mb"]
            built = f" (stored; built: {row['index_build_s']:.2f} s)" if "index_build_s" in row else ""
            print(
                f"{size:>9} {shape:>4}: load {row['load_s']:.2f} s, RSS {memory['VmRSS']:.0f} MB "
                f"(peak {memory['VmHWM']:.0f}), index {row['index_s']:.2f} s"
                f"{built}, route p50 "
                f"{row['route']['p50_ms']:.1f} ms, compose p50 {row['compose']['p50_ms']:.1f} ms, "
                f"first request {row['first_request_s']:.2f} s, recall@8 {row['recall_at_8']}",
                flush=True,
            )
            save(rows, Path(args.out), args.threads)
            if not args.keep:
                shutil.rmtree(path)
    finally:
        if not args.keep and not args.root:
            shutil.rmtree(root, ignore_errors=True)
    table(rows)
    plot(rows, Path(args.out).with_suffix(".png"))


def save(rows: list[dict], out: Path, threads: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_and_faiss_threads": threads,
    }
    note = (
        "Each bank is measured in a new process (imports and the MiniLM encoder loaded first: "
        "memory_runtime_mb). The page cache is not dropped, so load times are for a new process with the "
        "bank's files as the writer left them in the cache (the 1e5 real-shape bank's 27 GB of shards exceed "
        "this machine's RAM). route = Router.route, stage 1 with MiniLM encoding the question; compose = "
        "composer.compose of 3 atoms from 3 random documents (3 shard reads, hash-checked); recall_at_8: "
        "the index's top 8 vs an exact scan, on the questions and 64 perturbed keys."
    )
    out.write_text(
        json.dumps({"machine": machine, "note": note, "targets": TARGETS, "results": rows}, indent=2) + "\n"
    )


def table(rows: list[dict]) -> None:
    print(
        f"\n{'atoms':>9} {'factors':>7} {'disk GB':>8} {'load s':>7} {'RSS MB':>7} {'peak MB':>8} "
        f"{'index s':>8} {'route p50/p99':>14} {'search p50':>10} {'compose p50/p99':>16} {'1st req s':>9} "
        f"{'recall@8':>8}"
    )
    for r in rows:
        mem = r["memory_steady_mb"]
        print(
            f"{r['atoms']:>9} {r['factor_shape']:>7} {r['disk_bytes']['total'] / 1e9:>8.2f} "
            f"{r['load_s']:>7.2f} {mem['VmRSS']:>7.0f} {mem['VmHWM']:>8.0f} {r['index_s']:>8.2f} "
            f"{r['route']['p50_ms']:>6.1f}/{r['route']['p99_ms']:<7.1f} {r['search']['p50_ms']:>10.2f} "
            f"{r['compose']['p50_ms']:>7.1f}/{r['compose']['p99_ms']:<8.1f} {r['first_request_s']:>9.2f} "
            f"{r['recall_at_8']:>8}"
        )


if __name__ == "__main__":
    main()
