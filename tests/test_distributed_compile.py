"""`torchrun ... -m training.cli compile`: ranks fit their share of the documents into the study cache, rank 0
writes the bank — the same bank as one process compiles (tiny Llama, two CPU ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.cli import main
from training.compile.distributed import deal
from vllm_doc2atom.bank import AtomBank

from .conftest import EXAMPLE_DOCS

REPO = Path(__file__).resolve().parent.parent
RANKS = 2
LIGHTHOUSE = ("# The Corvel Lighthouse\n\nThe Corvel Lighthouse stands on a basalt spur south of Pellam. "
              "It was lit in 1802 by the keeper Ansel Roe. Its lamp burns rapeseed oil and can be seen "
              "19 miles out at sea.\n")


def torchrun(args: list[str], cache: Path) -> dict:
    """`torchrun --standalone` (a free rendezvous port) with two CPU ranks; rank 0's stats."""
    env = {**os.environ, "DOC2ATOM_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(RANKS), "-m", "training.cli", "compile", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)  # only rank 0 prints


def assert_same_bank(one: AtomBank, many: AtomBank) -> None:
    """Same atoms and keys, factors within float noise (thread counts may differ), same spec and threshold."""
    assert [a.__dict__ for a in one.atoms] == [a.__dict__ for a in many.atoms]
    assert {**one.spec.__dict__, "router_head": None} == {**many.spec.__dict__, "router_head": None}
    head, other = one.spec.router_head, many.spec.router_head
    assert other["threshold"] == pytest.approx(head["threshold"], abs=1e-4)
    assert {**head, "threshold": None} == {**other, "threshold": None}
    rows = list(range(len(one)))
    torch.testing.assert_close(torch.as_tensor(many.keys), torch.as_tensor(one.keys), atol=1e-5, rtol=1e-4)
    assert (many.gates == one.gates).all()
    fa, fb = one.factors(rows), many.factors(rows)
    for target in one.spec.targets:
        for x, y in zip(fa[target], fb[target]):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-3)


def test_two_ranks_compile_the_bank_one_process_compiles_and_add_to_it(tmp_path, tiny_model_dir, monkeypatch,
                                                                         capsys):
    extra = tmp_path / "corvel_lighthouse.md"
    extra.write_text(LIGHTHOUSE)
    docs = [str(p) for p in sorted(EXAMPLE_DOCS.glob("*.md"))]
    common = ["--model", str(tiny_model_dir), "--steps", "3"]

    # one process, with as many threads as each rank gets (the same float sums)
    monkeypatch.setenv("DOC2ATOM_CACHE", str(tmp_path / "cache-one"))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // RANKS))
    try:
        assert main(["compile", *docs, "--out", str(tmp_path / "one"), *common]) == 0
        one = AtomBank.load(tmp_path / "one")
        assert main(["compile", str(extra), "--out", str(tmp_path / "one"), "--add", *common]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()

    stats = torchrun([*docs, "--out", str(tmp_path / "many"), *common], tmp_path / "cache-many")
    assert stats["world_size"] == RANKS and len(stats["rank_seconds"]) == RANKS
    assert sum(stats["rank_documents"]) == 3 and stats["documents"] == 3
    assert stats["stage_seconds"]["cached_documents"] == 0 and stats["stage_seconds"]["fit"] > 0
    assert_same_bank(one, AtomBank.load(tmp_path / "many"))

    # --add (all four documents again): the three already fitted come from the cache, the new one is fitted
    stats = torchrun([*docs, str(extra), "--out", str(tmp_path / "many"), "--add", *common],
                     tmp_path / "cache-many")
    assert stats["stage_seconds"]["cached_documents"] == 3 and stats["documents"] == 4
    assert_same_bank(AtomBank.load(tmp_path / "one"), AtomBank.load(tmp_path / "many"))


def test_documents_are_dealt_evenly_by_count_and_length():
    documents = {f"d{i}": "x" * n for i, n in enumerate([50, 10, 40, 20, 30, 60, 5])}
    shares = deal(documents, 3)
    assert sorted(d for share in shares for d in share) == sorted(documents)
    assert [len(s) for s in shares] == [3, 2, 2]
    assert max(sum(len(documents[d]) for d in s) for s in shares) <= 75  # 215 chars: ~72 each
    reordered = deal(dict(reversed(documents.items())), 3)
    assert {frozenset(s) for s in reordered} == {frozenset(s) for s in shares}  # not the order given
    assert all(share == sorted(share, key=list(documents).index) for share in shares)  # in the order given
    assert deal(documents, 1) == [list(documents)]


@pytest.mark.parametrize(("flags", "refused"), [
    (["--mode", "amortized"], "--mode amortized does not run under torchrun"),
    (["--no-cache"], "--no-cache does not go with torchrun"),
])
def test_what_torchrun_cannot_distribute_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys,
                                                                          flags, refused):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    doc = str(sorted(EXAMPLE_DOCS.glob("*.md"))[0])
    assert main(["compile", doc, "--out", str(tmp_path / "bank"), *flags]) == 2
    assert refused in capsys.readouterr().err
    assert not (tmp_path / "bank").exists()
