"""`doc2atom router eval`: how often routing puts a gold atom first / in the top 3 / top 8 (and MRR), within
the question's document and over every atom of the split, for each routing method side by side."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vllm_doc2atom.encoders import QueryEncoder
from vllm_doc2atom.files import atomic_write_text

from ..inputs import InputError
from .examples import RoutingExample, SplitBank, load_examples, load_split
from .routing_text import routing_text
from .scorers import RERANK_FIRST, RERANK_SURE, BM25Scorer, MiniLMScorer, RerankedScorer, RerankerModel, Scorer

logger = logging.getLogger(__name__)

# What routing reads of each atom: its own text, today's bank key (the atomizer's retrieval text, with the
# paragraph's entity prefixed when the atom lacks it), or "<what the document is about>: <text>".
TEXT_KINDS = ("text", "key", "titled")
# method -> (scorer family, text kind); `reranker` re-orders MiniLM's top candidates on the same kind of text
METHODS: dict[str, tuple[str, str]] = {
    "minilm_text": ("minilm", "text"), "minilm_key": ("minilm", "key"), "minilm_titled": ("minilm", "titled"),
    "bm25_text": ("bm25", "text"), "bm25_titled": ("bm25", "titled"),
}
SCOPES = ("document", "bank")  # rank the question's document's atoms, or every atom of the split


@dataclass
class RouterEvalConfig:
    data: list[str]  # dataset folders written by `doc2atom data build`
    split: str = "validation"
    methods: tuple[str, ...] = tuple(METHODS)
    cutoffs: tuple[int, ...] = (1, 3, 8)  # recall@k: a gold atom within the first k
    rerank_top_k: int = 8  # the reranker re-orders this many of MiniLM's best
    # read in two steps, as banks are compiled: the best `rerank_first`, the rest only when none of those
    # scores `rerank_sure` (None: all at once)
    rerank_first: int | None = RERANK_FIRST
    rerank_sure: float | None = RERANK_SURE
    rerank_text: str = "titled"  # the text kind the reranker (and its MiniLM first stage) reads
    reranker_folder: str | None = None  # recorded in the results
    # the atoms a reranked bank keeps (within the question's document): the best, and others within each gap
    # of its logit, at most `kept_max` (study_routing.RERANKED_HEAD)
    kept_gaps: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0)
    kept_max: int = 3


@dataclass
class MethodResult:
    document: dict[str, float]  # recall@k and mrr, ranking the question's own document's atoms
    bank: dict[str, float]  # the same, ranking every atom of the split's documents
    seconds_per_question: float  # ranking the whole bank (question encoding included)
    index_seconds: float  # encoding or indexing the bank's atoms once
    # reranker only, per rerank gap: share of questions with a gold atom among the kept, mean atoms kept
    kept: dict[str, dict[str, float]] | None = None
    # reranker only: the share of questions for which it read only its first candidates (bank-wide)
    sure_after_first: float | None = None


@dataclass
class DatasetResult:
    name: str
    data: str  # the dataset folder
    documents: int
    atoms: int
    questions: int
    methods: dict[str, MethodResult] = field(default_factory=dict)


def bank_texts(bank: SplitBank, kind: str) -> list[str]:
    """Each atom's text of one kind, in bank row order."""
    if kind == "text":
        return [atom.text for atom in bank.atoms]
    if kind == "key":
        return [atom.retrieval_text or atom.text for atom in bank.atoms]
    if kind == "titled":
        return [routing_text(doc.title, atom.text) for doc in bank.documents for atom in doc.atoms]
    raise ValueError(f"unknown text kind {kind!r}: {', '.join(TEXT_KINDS)}")


def first_gold_rank(scores: np.ndarray, gold: np.ndarray) -> int:
    """1-based rank of the best-scored gold atom; a tie counts against it (BM25 scores often tie at 0)."""
    return 1 + int(np.sum(scores[~gold] >= scores[gold].max()))


def summarise(ranks: list[int], cutoffs: tuple[int, ...]) -> dict[str, float]:
    """recall@k (the share of questions with a gold atom in the first k) for each cutoff, and the MRR."""
    ranks_ = np.asarray(ranks, dtype=np.float64)
    metrics = {f"recall@{k}": float(np.mean(ranks_ <= k)) for k in cutoffs}
    return {**metrics, "mrr": float(np.mean(1.0 / ranks_))}


def evaluate_dataset(folder: str, config: RouterEvalConfig, encoder: QueryEncoder | None = None,
                     reranker: RerankerModel | None = None) -> DatasetResult:
    """Every method of `config` (and the reranker, if given) on one dataset folder's split; InputError when
    the folder has no labelled questions in it. `encoder`: the packaged MiniLM (needed by MiniLM methods)."""
    bank = load_split(folder, config.split)
    return evaluate_loaded(folder, bank, load_examples(folder, config.split, bank), config, encoder, reranker)


def evaluate_loaded(folder: str, bank: SplitBank, examples: list[RoutingExample], config: RouterEvalConfig,
                    encoder: QueryEncoder | None = None, reranker: RerankerModel | None = None) -> DatasetResult:
    """evaluate_dataset on a split already loaded."""
    texts = {kind: bank_texts(bank, kind) for kind in TEXT_KINDS}
    scorers: dict[str, Scorer] = {}
    index_seconds: dict[str, float] = {}
    for method in config.methods:
        start = time.perf_counter()
        family, kind = METHODS[method]
        scorers[method] = (MiniLMScorer.of_texts(encoder, texts[kind]) if family == "minilm"
                           else BM25Scorer(texts[kind]))
        index_seconds[method] = time.perf_counter() - start
    if reranker is not None:
        start = time.perf_counter()
        first = scorers.get(f"minilm_{config.rerank_text}")
        keys = first.keys if isinstance(first, MiniLMScorer) else encoder.encode(texts[config.rerank_text])
        scorers["reranker"] = RerankedScorer(MiniLMScorer(encoder, keys), reranker, texts[config.rerank_text],
                                             config.rerank_top_k, config.rerank_first, config.rerank_sure)
        index_seconds["reranker"] = index_seconds.get(f"minilm_{config.rerank_text}",
                                                      time.perf_counter() - start)
    ranks: dict[str, dict[str, list[int]]] = {method: {scope: [] for scope in SCOPES} for method in scorers}
    kept: dict[float, list[tuple[bool, int]]] = {gap: [] for gap in config.kept_gaps}  # (gold kept, kept)
    seconds = dict.fromkeys(scorers, 0.0)
    sure: list[bool] = []
    name = dataset_name(folder)
    for example in tqdm(examples, desc=f"router eval {name}", unit="question"):
        rows = bank.rows[example.document_id]
        gold = np.zeros(len(bank.atoms), dtype=bool)
        gold[[rows[i] for i in example.gold]] = True
        for method, scorer in scorers.items():
            start = time.perf_counter()
            scores = scorer.scores(example.question)  # the whole bank first: it pays the question's encoding
            seconds[method] += time.perf_counter() - start
            ranks[method]["bank"].append(first_gold_rank(scores, gold))
            if isinstance(scorer, RerankedScorer):
                sure.append(len(scorer.last) < min(scorer.top_k, len(scores)))
            within = scorer.scores(example.question, rows)
            ranks[method]["document"].append(first_gold_rank(within, gold[rows.start : rows.stop]))
            if isinstance(scorer, RerankedScorer):
                for gap in config.kept_gaps:
                    kept[gap].append(kept_by_gap(scorer.last, example.gold, gap, config.kept_max))
    result = DatasetResult(name, str(folder), len(bank.documents), len(bank.atoms), len(examples))
    for method in scorers:
        result.methods[method] = MethodResult(
            document=summarise(ranks[method]["document"], config.cutoffs),
            bank=summarise(ranks[method]["bank"], config.cutoffs),
            seconds_per_question=round(seconds[method] / len(examples), 5),
            index_seconds=round(index_seconds[method], 3),
            kept={str(gap): {"gold_kept": float(np.mean([g for g, _ in pairs])),
                             "mean_kept": float(np.mean([n for _, n in pairs]))} for gap, pairs in kept.items()}
            if method == "reranker" else None,
            sure_after_first=float(np.mean(sure)) if method == "reranker" and sure else None)
    return result


def kept_by_gap(logits: dict[int, float], gold: frozenset[int], gap: float, most: int) -> tuple[bool, int]:
    """(a gold atom is kept, atoms kept) when the best reranked atom is kept with every other within `gap`
    logits of it, at most `most`."""
    order = sorted(logits, key=lambda i: -logits[i])
    kept = [i for i in order if logits[i] >= logits[order[0]] - gap][:most]
    return bool(set(kept) & gold), len(kept)


def evaluate_routing(config: RouterEvalConfig, reranker: RerankerModel | None = None) -> list[DatasetResult]:
    """Every dataset of `config`; all inputs are read and checked before the sentence encoder loads (once)."""
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown routing method {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    if config.rerank_text not in TEXT_KINDS:
        raise InputError(f"unknown text kind {config.rerank_text!r} for the reranker: {', '.join(TEXT_KINDS)}")
    datasets = []
    for folder in config.data:
        bank = load_split(folder, config.split)
        datasets.append((folder, bank, load_examples(folder, config.split, bank)))
    encoder = None
    if reranker is not None or any(METHODS[m][0] == "minilm" for m in config.methods):
        from vllm_doc2atom.encoders import SentenceTransformerEncoder

        encoder = SentenceTransformerEncoder()
    return [evaluate_loaded(*dataset, config, encoder, reranker) for dataset in datasets]


def write_results(results: list[DatasetResult], config: RouterEvalConfig, out: str | Path) -> None:
    payload = {"split": config.split, "config": asdict(config), "results": [asdict(r) for r in results]}
    atomic_write_text(Path(out), json.dumps(payload, indent=2) + "\n")


def format_table(results: list[DatasetResult], split: str) -> str:
    """One row per dataset and method: recall@k and MRR within the document, then bank-wide, then s/question."""
    metrics = list(next(iter(results[0].methods.values())).document) if results and results[0].methods else []
    head = " ".join(f"{m.replace('recall', 'R'):>6}" for m in metrics)
    lines = [f"{'dataset':<20} {'method':<14} {'q':>5} | document: {head} | bank-wide: {head} | {'s/q':>7}"]
    for result in results:
        for method, r in result.methods.items():
            doc = " ".join(f"{r.document[m]:6.3f}" for m in metrics)
            bank = " ".join(f"{r.bank[m]:6.3f}" for m in metrics)
            lines.append(f"{result.name[:20]:<20} {method:<14} {result.questions:>5} |           {doc} |"
                         f"            {bank} | {r.seconds_per_question:7.4f}")
    for result in results:
        reranker = result.methods.get("reranker")
        for gap, k in ((reranker.kept if reranker else None) or {}).items():
            lines.append(f"{result.name[:20]:<20} reranker keeps (gap {gap}): gold kept {k['gold_kept']:.3f}, "
                         f"{k['mean_kept']:.2f} atoms")
        if reranker and reranker.sure_after_first is not None:
            lines.append(f"{result.name[:20]:<20} reranker sure after its first candidates: "
                         f"{reranker.sure_after_first:.3f} of the questions")
    counts = "; ".join(f"{r.name}: {r.documents} documents, {r.atoms} atoms" for r in results)
    return "\n".join(lines + [f"split {split}; {counts}"])


def dataset_name(folder: str | Path) -> str:
    """A dataset's name in tables: its folder's name."""
    return Path(folder).resolve().name
