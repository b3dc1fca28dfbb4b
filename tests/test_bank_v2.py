"""Bank format v2: v1 banks still load and upgrade to an equal bank; loading reads segments, never shards;
records are parsed when read; edits touch only the files they change; keys are read in blocks to build an
index; unions of v2 banks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy

from training.cli import main
from vllm_doc2atom import bank_interface
from vllm_doc2atom.bank import MANIFEST_NAME, AtomBank
from vllm_doc2atom.bank_rows import LazyAtoms
from vllm_doc2atom.bank_store import BankStore
from vllm_doc2atom.bank_union import BankUnion
from vllm_doc2atom.composer import compose
from vllm_doc2atom.errors import BankError
from vllm_doc2atom.key_index import KeyIndex, KeyIndexConfig
from vllm_doc2atom.router import Router

from .conftest import make_document, make_spec
from .test_bank import segment_files, shard_file
from .test_bank_union import _keyed_bank
from .test_router import FixedEncoder
from .v1_bank import write_v1_bank


def _docs(spec, *names_sizes: tuple[str, int]):
    return [make_document(spec, name, n, seed=i + 1) for i, (name, n) in enumerate(names_sizes)]


def _files(bank: Path) -> dict[str, tuple[int, int]]:
    """Every file of a bank -> (inode, mtime): what an edit touched."""
    return {p.relative_to(bank).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in bank.rglob("*") if p.is_file()}


def _same_bank(a: AtomBank, b: AtomBank) -> None:
    assert a.document_ids == b.document_ids and len(a) == len(b)
    assert [x.to_dict() for x in a.atoms] == [x.to_dict() for x in b.atoms]
    assert np.array_equal(a.keys, b.keys) and np.array_equal(a.gates, b.gates)
    rows = list(range(len(a)))
    fa, fb = a.factors(rows), b.factors(rows)
    assert all(torch.equal(fa[t][0], fb[t][0]) and torch.equal(fa[t][1], fb[t][1]) for t in fa)


# ---- v1 banks ---------------------------------------------------------------------------------------


def test_a_v1_bank_loads_and_upgrades_to_an_equal_bank(tmp_path, spec, capsys):
    docs = _docs(spec, ("doc-a", 3), ("doc-b", 4))
    path = write_v1_bank(tmp_path / "old", spec, docs)
    old = AtomBank.load(path)
    assert old.format_version == 1 and isinstance(old.atoms, list)
    shards = {k: v for k, v in _files(path).items() if k.startswith("shards/")}

    assert main(["bank", "upgrade", str(path)]) == 0
    assert "upgraded to format v2: 7 atoms in 2 documents, 1 segment(s)" in capsys.readouterr().out
    new = AtomBank.load(path)
    assert new.format_version == 2 and isinstance(new.atoms, LazyAtoms) and new.fingerprint != old.fingerprint
    _same_bank(old, new)
    assert {k: v for k, v in _files(path).items() if k.startswith("shards/")} == shards  # not rewritten
    _same_bank(new, AtomBank.create(tmp_path / "fresh", spec, docs))  # as if written as v2
    assert main(["bank", "upgrade", str(path)]) == 0 and "already format v2" in capsys.readouterr().out
    assert main(["bank", "info", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["format_version"] == 2


def test_editing_a_v1_bank_upgrades_it_first(tmp_path, spec):
    path = write_v1_bank(tmp_path / "old", spec, _docs(spec, ("doc-a", 3), ("doc-b", 4)))
    grown = AtomBank.load(path).add_documents([make_document(spec, "doc-c", 2, seed=7)])
    assert grown.format_version == 2 and grown.document_ids == ["doc-a", "doc-b", "doc-c"]
    assert [a.id for a in grown.atoms][-2:] == ["doc-c#0", "doc-c#1"]
    shrunk = AtomBank.load(write_v1_bank(tmp_path / "old2", spec, _docs(spec, ("x", 1), ("y", 2)))) \
        .remove_documents(["x"])
    assert shrunk.format_version == 2 and shrunk.document_ids == ["y"] and len(shrunk) == 2


# ---- loading reads no shard -------------------------------------------------------------------------


def test_load_reads_segments_never_shards(bank, monkeypatch):
    opened: list[str] = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(Path(file).parent.name if isinstance(file, (str, os.PathLike)) else "?")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    parsed = []
    real_from_dict = bank_interface.AtomRecord.from_dict.__func__
    monkeypatch.setattr(bank_interface.AtomRecord, "from_dict",
                        classmethod(lambda cls, data: parsed.append(1) or real_from_dict(cls, data)))
    loaded = AtomBank.load(bank.path)
    assert "shards" not in opened and "segments" in opened
    assert parsed == []  # no record parsed at load
    assert loaded.atoms[5].id == "doc-b#2" and parsed == [1]
    assert loaded.atoms[5] is loaded.atoms[-2] and parsed == [1]  # cached


def test_a_shard_deleted_or_corrupted_after_writing_fails_only_its_documents(bank):
    shard_file(bank.path, 0).unlink()
    data = bytearray(shard_file(bank.path, 1).read_bytes())
    data[-1] ^= 0xFF
    loaded = AtomBank.load(bank.path)  # loads: no shard is read
    assert len(loaded) == 7
    with pytest.raises(BankError, match="is missing") as err:
        loaded.factors([1])
    assert err.value.kind == "invalid"
    assert loaded.factors([3, 6])  # doc-b still serves
    shard_file(bank.path, 1).write_bytes(bytes(data))
    with pytest.raises(BankError, match="sha256 does not match"):
        AtomBank.load(bank.path).factors([4])


def test_a_segment_damaged_after_loading_is_a_bank_error(bank):
    loaded = AtomBank.load(bank.path)
    segment, records = segment_files(bank.path)
    time.sleep(0.05)
    os.utime(segment)  # a touch: re-hashed once, still good
    assert np.array_equal(loaded.key_source().take(np.asarray([4, 0])), bank.keys[[4, 0]])
    loaded.check_files()
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # a gate's bytes
    segment.write_bytes(bytes(data))  # in place
    for read in (lambda: loaded.key_source().take(np.asarray([1])), loaded.check_files,
                 lambda: AtomBank.load(bank.path)):
        with pytest.raises(BankError, match="sha256") as err:
            read()
        assert err.value.kind == "invalid"
    with open(records, "r+b") as f:
        f.write(b"[")
    with pytest.raises(BankError, match="records segments/.* no longer matches"):
        loaded.atoms[2]


def test_a_segment_removed_by_a_writer_is_stale_for_the_old_bank(bank, spec):
    store = BankStore(bank.path.parent)
    old = store.get("bank")
    grown = AtomBank.load(bank.path).add_documents([make_document(spec, "doc-c", 2, seed=3)])
    old_grown = AtomBank.load(bank.path)
    grown.remove_documents(["doc-c"])  # deletes doc-c's segment after the manifest swap
    with pytest.raises(BankError, match="changed on disk") as err:
        old_grown.atoms[8]
    assert err.value.kind == "stale"
    assert old.atoms[0].id == "doc-a#0"  # its segment is still referenced
    assert store.get("bank") is not old and len(store.get("bank")) == 7


# ---- records ----------------------------------------------------------------------------------------


def test_lazy_records_equal_the_written_ones(tmp_path, spec):
    docs = _docs(spec, ("doc-a", 3), ("doc-b", 4), ("doc-c", 1))
    docs[1].atoms[2].retrieval_text = "Ünïcode: ☃ and a line\nbreak"
    bank = AtomBank.create(tmp_path / "b", spec, docs)
    written = [a.to_dict() for d in docs for a in d.atoms]
    assert [a.to_dict() for a in bank.atoms] == written
    assert [bank.atoms[i].to_dict() for i in reversed(range(len(bank)))] == written[::-1]
    assert [a.to_dict() for a in bank.atoms[2:5]] == written[2:5]
    assert bank.atoms.index(bank.atoms[6]) == 6 and len(bank.atoms) == 8
    with pytest.raises(IndexError):
        bank.atoms[8]
    lines = segment_files(bank.path)[1].read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == written  # one AtomRecord.to_dict() per line
    tensors = load_numpy(str(segment_files(bank.path)[0]))  # a plain safetensors file
    assert np.array_equal(tensors["keys"], torch.cat([d.tensors["keys"] for d in docs]).numpy())


def test_summary_counts_types_from_records(bank):
    summary = AtomBank.load(bank.path).summary()
    assert summary["format_version"] == 2 and summary["segments"] == 1
    assert summary["atoms_per_type"] == {"fact_claim": 7}


# ---- edits ------------------------------------------------------------------------------------------


def test_add_and_remove_touch_only_the_files_they_change(bank, spec):
    before = _files(bank.path)
    grown = bank.add_documents([make_document(spec, "doc-c", 2, seed=3)])
    after = _files(bank.path)
    assert {k: after[k] for k in before if k != MANIFEST_NAME} == {k: v for k, v in before.items()
                                                                    if k != MANIFEST_NAME}
    added = sorted(set(after) - set(before))
    assert [Path(a).parent.name for a in added] == ["segments", "segments", "shards"]
    assert after[MANIFEST_NAME] != before[MANIFEST_NAME]

    doc_a_shard = shard_file(bank.path, 0).relative_to(bank.path).as_posix()
    shrunk = grown.remove_documents(["doc-a"])  # its segment still holds doc-b: kept
    now = _files(bank.path)
    assert set(after) - set(now) == {doc_a_shard}  # nothing else deleted, nothing else rewritten:
    assert {k: now[k] for k in now if k != MANIFEST_NAME} == {k: after[k] for k in now if k != MANIFEST_NAME}
    assert shrunk.document_ids == ["doc-b", "doc-c"] and [a.id for a in shrunk.atoms][0] == "doc-b#0"
    assert np.array_equal(shrunk.gates, grown.gates[3:]) and np.array_equal(shrunk.keys, grown.keys[3:])

    final = shrunk.remove_documents(["doc-c"])  # doc-c's segment is referenced no more: deleted
    left = sorted(p.name.split(".")[1] for p in (bank.path / "segments").iterdir())
    assert left == ["jsonl", "safetensors"]
    assert final.document_ids == ["doc-b"] and len(final.segments) == 1


def test_an_atom_id_already_in_the_bank_is_refused_and_nothing_is_committed(bank, spec):
    before = _files(bank.path)
    clash = make_document(spec, "doc-c", 2, seed=3)
    clash.atoms[1].id = "doc-a#2"
    with pytest.raises(BankError, match="'doc-a#2' is already in the bank"):
        bank.add_documents([clash])
    assert _files(bank.path) == before  # the new segment and shard were removed again
    replaced = bank.add_documents([make_document(spec, "doc-a", 2, seed=5)], replace=True)
    assert replaced.document_ids == ["doc-b", "doc-a"]  # a replaced document's ids may come back


def test_readding_the_same_documents_reuses_content_addressed_files(bank, spec):
    doc = make_document(spec, "doc-c", 2, seed=3)
    grown = bank.add_documents([doc])
    again = grown.add_documents([doc], replace=True)
    assert again.document_ids == ["doc-a", "doc-b", "doc-c"] and len(again.segments) == 2
    assert again.atoms[8].id == "doc-c#1" and again.factors([8])
    assert len(list((bank.path / "segments").iterdir())) == 4
    assert AtomBank.load(bank.path).atoms[8].id == "doc-c#1"


# ---- keys, index, unions -----------------------------------------------------------------------------


def _clustered_keys(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 20), dim))
    keys = centres[rng.integers(0, len(centres), n)] + 0.15 * rng.standard_normal((n, dim))
    return (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype(np.float32)


def test_an_ivf_index_is_built_from_segment_blocks_and_rescores(tmp_path, tiny_model_dir, monkeypatch):
    spec = make_spec(tiny_model_dir, key_dim=32, modules=("down_proj",), layers=(3,), micro_rank=1)
    keys = _clustered_keys(2400, 32, seed=0)
    docs = []
    for d in range(240):
        doc = make_document(spec, f"d{d}", 10, seed=d)
        doc.tensors["keys"] = torch.from_numpy(keys[10 * d: 10 * d + 10])
        docs.append(doc)
    bank = AtomBank.create(tmp_path / "b", spec, docs[:200]).add_documents(docs[200:])
    bank = bank.remove_documents(["d3"])  # three runs of rows, two segments
    kept = np.delete(keys, np.s_[30:40], axis=0)
    monkeypatch.setattr(AtomBank, "keys", property(lambda self: pytest.fail("keys read whole")))
    index = KeyIndex(bank.key_source(), KeyIndexConfig(exact_max=100, nprobe=8))
    exact = KeyIndex(kept, KeyIndexConfig(exact_max=10_000))
    assert not index.exact and exact.exact
    noise = np.random.default_rng(1).standard_normal((len(kept[::97]), 32)).astype(np.float32)
    queries = kept[::97] + 0.05 * noise
    sims, rows = index.search(queries, 8)
    true_sims, true_rows = exact.search(queries, 8)
    recall = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(rows, true_rows)])
    assert recall >= 0.95
    found = rows[0] >= 0
    exact_cosines = kept[rows[0][found]] @ queries[0] / np.linalg.norm(queries[0])
    assert np.allclose(sims[0][found], exact_cosines, atol=1e-5)  # re-scored exactly, not the 8-bit codes


def test_a_union_of_v2_banks_reads_members_lazily(tmp_path, spec):
    a = AtomBank.create(tmp_path / "a", spec, _docs(spec, ("doc-a", 3)))
    b = AtomBank.load(write_v1_bank(tmp_path / "b", spec, _docs(spec, ("doc-x", 2), ("doc-y", 2))))
    union = BankUnion([a, b], ["a", "b"])
    assert not isinstance(union.atoms, list) and len(union.atoms) == 7
    assert [x.id for x in union.atoms] == ["doc-a#0", "doc-a#1", "doc-a#2", "doc-x#0", "doc-x#1", "doc-y#0",
                                           "doc-y#1"]
    assert union.atoms[-1].id == "doc-y#1" and union.atoms[3].document_id == "doc-x"
    source = union.key_source()
    assert np.array_equal(source.take(np.asarray([6, 0, 3])), union.keys[[6, 0, 3]])
    assert np.array_equal(np.concatenate(list(source.chunks(2))), union.keys)
    single = compose(b, [(1, 0.5), (2, 0.25)])
    combined = compose(union, [(4, 0.5), (5, 0.25)])
    assert all(torch.equal(single.tensors[k], combined.tensors[k]) for k in single.tensors)


def test_a_union_of_v2_banks_routes(tmp_path, tiny_model_dir):
    spec = make_spec(tiny_model_dir, key_dim=4)
    _keyed_bank(tmp_path / "near", spec, [[1, 0, 0, 0], [0.9, 0.3, 0, 0], [0, 0, 1, 0]], seed=1)
    _keyed_bank(tmp_path / "far", spec, [[0, 1, 0, 0], [0, 0, 0, 1]], seed=2)
    store = BankStore(tmp_path)
    routed = Router(FixedEncoder()).route(store.get_many(["far", "near"]), "q")
    assert [r.index for r in routed.kept] == [2, 3] and routed.kept[0].atom.id == "d#0"
