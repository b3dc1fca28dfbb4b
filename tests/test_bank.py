"""Atom bank format v2 (v1: test_bank_v2.py): round trip, atomic edits, and a clear BankError for every kind
of bad bank — at load for the manifest and segments, at the first read of its factors for a shard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from vllm_doc2atom.bank import MANIFEST_NAME, AtomBank
from vllm_doc2atom.bank_interface import AtomRecord, BankSpec
from vllm_doc2atom.bank_segments import SEGMENT_FORMAT, id_hash
from vllm_doc2atom.errors import BankError
from vllm_doc2atom.files import file_sha256
from vllm_doc2atom.fingerprint import BaseModelFingerprint
from vllm_doc2atom.shard_files import shard_name

from .conftest import make_document, make_spec


def test_round_trip_keeps_records_keys_and_factors(tmp_path, spec):
    docs = [make_document(spec, "doc-a", 3, seed=1), make_document(spec, "doc-b", 4, seed=2)]
    bank = AtomBank.create(tmp_path / "bank", spec, docs)
    loaded = AtomBank.load(tmp_path / "bank")
    assert len(loaded) == 7 and loaded.document_ids == ["doc-a", "doc-b"]
    assert [a.to_dict() for a in loaded.atoms] == [a.to_dict() for d in docs for a in d.atoms]
    assert loaded.spec.to_dict() == spec.to_dict()
    assert loaded.fingerprint == bank.fingerprint
    torch.testing.assert_close(torch.from_numpy(loaded.keys), torch.cat([d.tensors["keys"] for d in docs]))
    # Rows picked across both shards, in the requested order.
    factors = loaded.factors([5, 0, 3])
    for target in spec.targets:
        a, b = factors[target]
        expected_a = torch.stack([docs[1].tensors[f"A.{target.key}"][2], docs[0].tensors[f"A.{target.key}"][0],
                                  docs[1].tensors[f"A.{target.key}"][0]])
        torch.testing.assert_close(a, expected_a)
        assert b.shape == (3, *docs[0].tensors[f"B.{target.key}"].shape[1:])
    # A bank built by one user is often served by another (safetensors alone writes 0600).
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in (tmp_path / "bank").rglob("*") if f.is_file())


def test_create_is_atomic_and_refuses_to_overwrite_silently(tmp_path, spec):
    path = tmp_path / "bank"
    AtomBank.create(path, spec, [make_document(spec, "doc-a", 2)])
    with pytest.raises(BankError, match="already exists"):
        AtomBank.create(path, spec, [make_document(spec, "doc-b", 2)])
    replaced = AtomBank.create(path, spec, [make_document(spec, "doc-b", 2)], overwrite=True)
    assert replaced.document_ids == ["doc-b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no temp or old dirs left


def test_invalid_document_writes_nothing(tmp_path, spec):
    doc = make_document(spec, "doc-a", 2)
    doc.tensors["keys"] = torch.zeros(2, spec.key_dim + 1)
    with pytest.raises(BankError, match="keys has shape"):
        AtomBank.create(tmp_path / "bank", spec, [doc])
    assert list(tmp_path.iterdir()) == []


def test_add_and_remove_documents_leave_other_shards_untouched(bank, spec):
    before = {p.name: p.stat() for p in (bank.path / "shards").iterdir()}
    grown = bank.add_documents([make_document(spec, "doc-c", 2, seed=3)])
    assert grown.document_ids == ["doc-a", "doc-b", "doc-c"] and len(grown) == 9
    for name, stat in before.items():
        now = (bank.path / "shards" / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert grown.fingerprint != bank.fingerprint

    with pytest.raises(BankError, match="already in the bank"):
        grown.add_documents([make_document(spec, "doc-a", 1)])
    replaced = grown.add_documents([make_document(spec, "doc-a", 1, seed=9)], replace=True)
    assert replaced.document_ids == ["doc-b", "doc-c", "doc-a"] and len(replaced) == 7

    shrunk = replaced.remove_documents(["doc-b"])
    assert shrunk.document_ids == ["doc-c", "doc-a"]
    assert len(list((bank.path / "shards").iterdir())) == 2  # doc-b's and the old doc-a's shard are gone
    assert len(list((bank.path / "segments").iterdir())) == 4  # two segments, each .safetensors + .jsonl
    with pytest.raises(BankError, match="not in the bank") as err:
        shrunk.remove_documents(["nope"])
    assert err.value.kind == "not_found"
    assert [p.name for p in bank.path.iterdir() if p.name.startswith(".")] == []


# ---- bad banks ------------------------------------------------------------------------------------


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def segment_files(path: Path, segment: int = 0) -> tuple[Path, Path]:
    sha = _manifest(path)["segments"][segment]["sha256"]
    return path / "segments" / f"{sha[:16]}.safetensors", path / "segments" / f"{sha[:16]}.jsonl"


def shard_file(path: Path, document: int = 0) -> Path:
    return path / shard_name(_manifest(path)["documents"]["shard_sha256"][document])


def _rewrite_segment(path: Path, tensors=None, records=None) -> None:
    """Change the first segment (its tensors or its records; offsets and id hashes follow the records) and
    keep the manifest consistent: only what the mutation did is wrong."""
    manifest = _manifest(path)
    old, old_records = segment_files(path)
    data = load_numpy(old)
    lines = [json.loads(line) for line in old_records.read_text().splitlines()]
    if records:
        records(lines)
    encoded = [(json.dumps(r) + "\n").encode() for r in lines]
    data["record_offsets"] = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    data["id_hashes"] = np.asarray([id_hash(r["id"]) for r in lines], np.int64)
    if tensors:
        tensors(data)
    tmp = path / "segments" / "tmp"
    save_numpy(data, str(tmp), metadata={"format": SEGMENT_FORMAT})
    sha = file_sha256(tmp)
    os.replace(tmp, path / "segments" / f"{sha[:16]}.safetensors")
    records_file = path / "segments" / f"{sha[:16]}.jsonl"
    records_file.write_bytes(b"".join(encoded))
    manifest["segments"][0].update(sha256=sha, records_sha256=file_sha256(records_file))
    _write_manifest(path, manifest)


def _rewrite_shard(path: Path, mutate, document: int = 0) -> None:
    """Change a document's shard and keep the manifest's sha256 (and so the shard's name) consistent."""
    manifest = _manifest(path)
    tensors = load_file(shard_file(path, document))
    mutate(tensors)
    tmp = path / "shards" / "tmp"
    save_file(tensors, tmp)
    sha = file_sha256(tmp)
    os.replace(tmp, path / shard_name(sha))
    manifest["documents"]["shard_sha256"][document] = sha
    _write_manifest(path, manifest)


def _edit(change):
    def damage(path: Path) -> None:
        manifest = _manifest(path)
        change(manifest)
        _write_manifest(path, manifest)
    return damage


def _flip_byte(file: Path, at: int = -5) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


def _garbage_segment(p):
    seg, _ = segment_files(p)
    seg.write_bytes(b"not a safetensors file")
    _edit(lambda m: m["segments"][0].update(sha256=file_sha256(seg)))(p)
    os.replace(seg, p / "segments" / f"{file_sha256(seg)[:16]}.safetensors")
    os.replace(segment_files(p)[1].with_name(seg.stem + ".jsonl"), segment_files(p)[1])


def _garbage_shard(p):
    garbage = p / "shards" / "tmp"
    garbage.write_bytes(b"not a safetensors file")
    sha = file_sha256(garbage)
    os.replace(garbage, p / shard_name(sha))
    _edit(lambda m: m["documents"]["shard_sha256"].__setitem__(0, sha))(p)


def _nan_factor(tensors):
    next(v for k, v in tensors.items() if k.startswith("A."))[0, 0, 0] = float("nan")


def _duplicate_atom_id(lines):
    lines[3]["id"] = lines[0]["id"]  # doc-b's first atom takes doc-a's first atom's id


def _set_type(lines):
    lines[0]["type"] = "rumour"


def _escape_shard(p):
    (p.parent / "outside.safetensors").write_bytes(shard_file(p).read_bytes())
    _edit(lambda m: m["documents"]["shard_sha256"].__setitem__(0, "../outside.safetensors"))(p)


# Damage that loading finds: the manifest, the segments (keys, gates, record index), the records file.
BAD_BANKS = {
    "missing manifest": (lambda p: (p / MANIFEST_NAME).unlink(), "missing manifest.json"),
    "invalid json": (lambda p: (p / MANIFEST_NAME).write_text("{not json"), "invalid JSON"),
    "unknown version": (_edit(lambda m: m.update(format_version=99)), "unknown bank format version 99"),
    "malformed spec": (_edit(lambda m: m["spec"].pop("micro_rank")), "spec is malformed"),
    "missing segment": (lambda p: segment_files(p)[0].unlink(),
                        r"segment segments/\w+\.safetensors is missing"),
    "missing records": (lambda p: segment_files(p)[1].unlink(), r"records segments/\w+\.jsonl is missing"),
    "flipped segment bytes": (lambda p: _flip_byte(segment_files(p)[0]), "sha256 does not match"),
    "flipped record bytes": (lambda p: _flip_byte(segment_files(p)[1], 30), "sha256 does not match"),
    "truncated records": (lambda p: os.truncate(segment_files(p)[1], 100), "hold 100 bytes"),
    "not safetensors": (_garbage_segment, "is corrupt"),
    "key shape": (lambda p: _rewrite_segment(p, lambda t: t.update(keys=t["keys"][:, :-1].copy())),
                  "tensor keys has shape"),
    "nan in keys": (lambda p: _rewrite_segment(p, lambda t: t["keys"].__setitem__((2, 3), np.nan)),
                    "NaN or Inf"),
    "gates above 1": (lambda p: _rewrite_segment(p, lambda t: t["gates"].__setitem__((1, 0), 1.5)),
                      r"\[0, 1\]"),
    "missing tensor": (lambda p: _rewrite_segment(p, lambda t: t.pop("gates")), "gates"),
    "count mismatch": (_edit(lambda m: m["documents"]["atoms"].__setitem__(1, 5)), "lie outside its segment"),
    "shared rows": (_edit(lambda m: m["documents"]["row"].__setitem__(1, 2)), "shares segment rows"),
    "unknown segment": (_edit(lambda m: m["documents"]["segment"].__setitem__(0, 3)), "names a segment"),
    "duplicate atom id": (lambda p: _rewrite_segment(p, records=_duplicate_atom_id), "is not unique"),
    "shard outside bank": (_escape_shard, "64 lowercase hex"),
    "documents as a list": (_edit(lambda m: m.update(documents=[])), "must be a table"),
}

# Damage to a shard: the bank loads, and reading that document's factors is a BankError (kind "invalid").
BAD_SHARDS = {
    "missing shard": (lambda p: shard_file(p).unlink(), r"shard shards/\w+\.safetensors is missing"),
    "flipped bytes": (lambda p: _flip_byte(shard_file(p)), "sha256 does not match"),
    "not safetensors": (lambda p: _garbage_shard(p), "is corrupt: not a readable safetensors file"),
    "no tensors": (lambda p: _rewrite_shard(p, lambda t: t.clear()), "tensors .* missing"),
    "shape mismatch": (lambda p: _rewrite_shard(p, lambda t: t.update(keys=t["keys"][:, :-1].contiguous())),
                       "has shape"),
    "nan in factors": (lambda p: _rewrite_shard(p, _nan_factor), "NaN or Inf"),
    "missing tensor": (lambda p: _rewrite_shard(p, lambda t: t.pop("gates")), "gates"),
    "count mismatch": (_edit(lambda m: m["documents"]["atoms"].__setitem__(0, 2)),
                       "holds 3 atoms but the manifest lists 2"),
    "other gates": (lambda p: _rewrite_shard(p, lambda t: t["gates"].mul_(0.5)),
                    "gates differ from the segment"),
}


@pytest.mark.parametrize("case", sorted(BAD_BANKS))
def test_bad_bank_raises_clear_bank_error(bank, case):
    damage, message = BAD_BANKS[case]
    damage(bank.path)
    with pytest.raises(BankError, match=message) as err:
        AtomBank.load(bank.path)
    assert err.value.kind in ("invalid", "not_found")


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_bad_shard_is_a_bank_error_when_its_factors_are_read(bank, case):
    damage, message = BAD_SHARDS[case]
    damage(bank.path)
    loaded = AtomBank.load(bank.path)  # load never reads a shard
    with pytest.raises(BankError, match=message) as err:
        loaded.factors([0])
    assert err.value.kind == "invalid"
    assert str(err.value).startswith(f"bank {str(bank.path)!r}: shard shards/")
    assert loaded.factors([len(loaded) - 1])  # doc-b still serves


def test_a_bad_record_is_a_bank_error_when_it_is_read(bank):
    _rewrite_segment(bank.path, records=_set_type)
    loaded = AtomBank.load(bank.path)  # records are parsed when they are read
    assert loaded.atoms[1].id == "doc-a#1"
    with pytest.raises(BankError, match="unknown type 'rumour'") as err:
        loaded.atoms[0]
    assert err.value.kind == "invalid" and "records segments/" in str(err.value)


def test_a_record_in_the_wrong_row_is_a_bank_error(bank):
    def swap(lines):
        lines[0], lines[1] = lines[1], lines[0]  # offsets follow, the id hashes are taken from the new order

    _rewrite_segment(bank.path, records=swap)
    loaded = AtomBank.load(bank.path)
    assert loaded.atoms[0].id == "doc-a#1"  # consistent: the ids are only in another order
    _rewrite_segment(bank.path, records=lambda lines: lines[4].update(document_id="doc-a"))
    with pytest.raises(BankError, match="names document 'doc-a', but the manifest places it in 'doc-b'"):
        AtomBank.load(bank.path).atoms[4]


def test_missing_bank_is_not_found(tmp_path):
    with pytest.raises(BankError, match="not a directory") as err:
        AtomBank.load(tmp_path / "nowhere")
    assert err.value.kind == "not_found"


def test_base_model_mismatch(bank, tiny_model_dir):
    served = BaseModelFingerprint.from_model_dir(tiny_model_dir)
    assert AtomBank.load(bank.path, expect_base=served).spec.base_model == bank.spec.base_model
    other = BaseModelFingerprint(**{**served.to_dict(), "hidden_size": 256, "name": "other"})
    with pytest.raises(BankError, match="hidden_size: 128 != 256") as err:
        AtomBank.load(bank.path, expect_base=other)
    assert err.value.kind == "mismatch"


def test_spec_and_record_validation(tiny_model_dir):
    with pytest.raises(BankError, match="outside the base model"):
        make_spec(tiny_model_dir, layers=(7,))
    with pytest.raises(BankError, match="unsupported target module"):
        make_spec(tiny_model_dir, modules=("lm_head",))
    with pytest.raises(BankError, match="bad char span"):
        AtomRecord(id="x", document_id="d", type="fact_claim", text="t", span=(5, 2))
    spec = make_spec(tiny_model_dir)
    assert BankSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
