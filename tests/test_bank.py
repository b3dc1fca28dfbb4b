"""Atom bank format v1: round trip, atomic edits, and a clear BankError for every kind of bad bank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_doc2atom.bank import MANIFEST_NAME, AtomBank
from vllm_doc2atom.bank_interface import AtomRecord, BankSpec
from vllm_doc2atom.errors import BankError
from vllm_doc2atom.files import file_sha256
from vllm_doc2atom.fingerprint import BaseModelFingerprint

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
    with pytest.raises(BankError, match="not in the bank") as err:
        shrunk.remove_documents(["nope"])
    assert err.value.kind == "not_found"
    assert [p.name for p in bank.path.iterdir() if p.name.startswith(".")] == []


# ---- bad banks ------------------------------------------------------------------------------------


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def _rewrite_shard(path: Path, mutate) -> None:
    """Change the first document's tensors and keep the manifest's sha256 consistent."""
    manifest = _manifest(path)
    shard = path / manifest["documents"][0]["shard"]
    tensors = load_file(shard)
    mutate(tensors)
    save_file(tensors, shard)
    manifest["documents"][0]["sha256"] = file_sha256(shard)
    _write_manifest(path, manifest)


def _set_version(p):
    m = _manifest(p)
    m["format_version"] = 99
    _write_manifest(p, m)


def _drop_atom_record(p):
    m = _manifest(p)
    m["documents"][0]["atoms"].pop()
    _write_manifest(p, m)


def _duplicate_atom_id(p):
    m = _manifest(p)
    m["documents"][1]["atoms"][0]["id"] = m["documents"][0]["atoms"][0]["id"]
    m["documents"][1]["atoms"][0]["document_id"] = m["documents"][1]["id"]
    _write_manifest(p, m)


def _bad_atom_type(p):
    m = _manifest(p)
    m["documents"][0]["atoms"][0]["type"] = "rumour"
    _write_manifest(p, m)


def _escape_shard(p):
    m = _manifest(p)
    m["documents"][0]["shard"] = "../outside.safetensors"
    (p.parent / "outside.safetensors").write_bytes((p / "shards").iterdir().__next__().read_bytes())
    _write_manifest(p, m)


def _flip_bytes(p):
    shard = next((p / "shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))


def _garbage_shard(p):
    manifest = _manifest(p)
    shard = p / manifest["documents"][0]["shard"]
    shard.write_bytes(b"not a safetensors file")
    manifest["documents"][0]["sha256"] = file_sha256(shard)
    _write_manifest(p, manifest)


def _missing_spec_field(p):
    m = _manifest(p)
    del m["spec"]["micro_rank"]
    _write_manifest(p, m)


BAD_BANKS = {
    "missing manifest": (lambda p: (p / MANIFEST_NAME).unlink(), "missing manifest.json"),
    "invalid json": (lambda p: (p / MANIFEST_NAME).write_text("{not json"), "invalid JSON"),
    "unknown version": (_set_version, "unknown bank format version 99"),
    "malformed spec": (_missing_spec_field, "spec is malformed"),
    "missing shard": (lambda p: next((p / "shards").iterdir()).unlink(), "is missing"),
    "flipped bytes": (_flip_bytes, "sha256 does not match"),
    "not safetensors": (_garbage_shard, "is corrupt"),
    "shape mismatch": (lambda p: _rewrite_shard(p, lambda t: t.update({"keys": t["keys"][:, :-1].contiguous()})),
                       "has shape"),
    "nan in factors": (lambda p: _rewrite_shard(p, lambda t: next(v for k, v in t.items() if k.startswith("A."))
                                                .__setitem__((0, 0, 0), float("nan"))), "NaN or Inf"),
    "missing tensor": (lambda p: _rewrite_shard(p, lambda t: t.pop("gates")), "gates"),
    "count mismatch": (_drop_atom_record, "holds 3 atoms but the manifest lists 2"),
    "duplicate atom id": (_duplicate_atom_id, "not unique"),
    "unknown atom type": (_bad_atom_type, "unknown type 'rumour'"),
    "shard outside bank": (_escape_shard, "outside"),
}


@pytest.mark.parametrize("case", sorted(BAD_BANKS))
def test_bad_bank_raises_clear_bank_error(bank, case):
    damage, message = BAD_BANKS[case]
    damage(bank.path)
    with pytest.raises(BankError, match=message):
        AtomBank.load(bank.path)


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
