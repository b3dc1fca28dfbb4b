"""A large bank stores its stage-1 IVF index (index/<sha>.safetensors, listed in the manifest) at every
commit; the router loads it instead of building one. "Large" is lowered to 100 atoms here."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from vllm_doc2atom import bank_index
from vllm_doc2atom.bank import MANIFEST_NAME, AtomBank
from vllm_doc2atom.bank_union import BankUnion
from vllm_doc2atom.errors import BankError, BankErrorKind
from vllm_doc2atom.key_index import KeyIndex, KeyIndexConfig
from vllm_doc2atom.router import Router, RouterConfig

from .conftest import make_document, make_spec
from .v1_bank import write_v1_bank

DIM = 8
CONFIG = KeyIndexConfig(exact_max=100, nprobe=4)


class RandomEncoder:
    """Questions as fixed random vectors (one per distinct text)."""

    identity, dim = "test-encoder", DIM

    def encode(self, texts):
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(DIM) for t in texts]
                        ).astype(np.float32)


@pytest.fixture(autouse=True)
def large_above_100(monkeypatch):
    monkeypatch.setattr(bank_index, "CONFIG", CONFIG)


@pytest.fixture
def small_spec(tiny_model_dir):
    return make_spec(tiny_model_dir, key_dim=DIM, modules=("down_proj",), layers=(3,), micro_rank=1)


def _docs(spec, first: int, count: int, atoms: int = 20):
    docs = []
    for d in range(first, first + count):
        doc = make_document(spec, f"d{d}", atoms, seed=d)
        doc.tensors["keys"] = torch.from_numpy(np.random.default_rng(d).standard_normal((atoms, DIM)).astype(
            np.float32))
        docs.append(doc)
    return docs


def _index_files(bank: AtomBank) -> list[str]:
    return sorted(p.relative_to(bank.path).as_posix() for p in (bank.path / "index").glob("*"))


def _routed(index: KeyIndex, queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return index.search(RandomEncoder().encode(queries), 8)


QUERIES = [f"question {i}" for i in range(12)]


def test_a_large_bank_stores_its_index_and_the_router_loads_it(tmp_path, small_spec, monkeypatch):
    bank = AtomBank.create(tmp_path / "b", small_spec, _docs(small_spec, 0, 10))  # 200 atoms
    manifest = json.loads((bank.path / MANIFEST_NAME).read_text())
    assert manifest["index"]["rows"] == 200 and bank.stored_index is not None
    assert _index_files(bank) == [bank.stored_index.name]
    router = Router(RandomEncoder(), RouterConfig(index=CONFIG))
    built = KeyIndex(bank.key_source(), CONFIG)
    monkeypatch.setattr(Router, "_build_index", lambda self, b: pytest.fail("index built, not loaded"))
    loaded = router.index_for(bank)
    assert not loaded.exact
    for a, b in zip(_routed(loaded, QUERIES), _routed(built, QUERIES)):
        assert np.array_equal(a, b)
    results = router.route_batch(bank, QUERIES)
    assert [r.index for r in results[0].candidates] and all(len(r.candidates) == 8 for r in results)


def test_another_config_or_a_union_builds_its_own(tmp_path, small_spec):
    bank = AtomBank.create(tmp_path / "b", small_spec, _docs(small_spec, 0, 10))
    searched = bank.stored_key_index(KeyIndexConfig(exact_max=100, nprobe=8))  # a search setting: still used
    assert searched is not None and searched._index.nprobe == 8
    other = KeyIndexConfig(exact_max=100, storage="fp16")
    assert bank.stored_key_index(other) is None  # other codes: built as configured
    assert bank.stored_key_index(KeyIndexConfig()) is None  # 200 keys: exact under the default
    built = Router(RandomEncoder(), RouterConfig(index=other)).index_for(bank)
    assert not built.exact and built.config.storage == "fp16"
    union = BankUnion([bank, bank], ["a", "b"])
    assert Router(RandomEncoder(), RouterConfig(index=CONFIG)).index_for(union).size == 400


def test_edits_rewrite_the_index_and_delete_the_old_one(tmp_path, small_spec):
    bank = AtomBank.create(tmp_path / "b", small_spec, _docs(small_spec, 0, 10))
    first = bank.stored_index
    grown = bank.add_documents(_docs(small_spec, 10, 2))
    assert grown.stored_index.rows == 240 and _index_files(grown) == [grown.stored_index.name] != [first.name]
    shrunk = grown.remove_documents(["d0", "d1", "d2", "d3", "d4", "d5"])  # 120 atoms: still IVF
    assert shrunk.stored_index.rows == 120 and _index_files(shrunk) == [shrunk.stored_index.name]
    fresh = KeyIndex(shrunk.key_source(), CONFIG)
    loaded = shrunk.stored_key_index(CONFIG)
    for a, b in zip(_routed(loaded, QUERIES), _routed(fresh, QUERIES)):
        assert np.array_equal(a, b)
    small = shrunk.remove_documents(["d6", "d7"])  # 80 atoms: exact, no index
    assert small.stored_index is None and _index_files(small) == []
    assert "index" not in json.loads((small.path / MANIFEST_NAME).read_text())


def test_a_small_bank_writes_no_index(tmp_path, small_spec, monkeypatch):
    monkeypatch.setattr(bank_index, "CONFIG", KeyIndexConfig())
    bank = AtomBank.create(tmp_path / "b", small_spec, _docs(small_spec, 0, 10))
    assert bank.stored_index is None and not (bank.path / "index").exists()
    assert "index" not in json.loads((bank.path / MANIFEST_NAME).read_text())
    assert Router(RandomEncoder()).index_for(bank).exact


def test_upgrading_a_large_v1_bank_stores_its_index(tmp_path, small_spec):
    path = write_v1_bank(tmp_path / "old", small_spec, _docs(small_spec, 0, 6))
    v1 = AtomBank.load(path)
    assert v1.stored_key_index(CONFIG) is None
    upgraded = v1.upgrade()
    assert upgraded.stored_index.rows == 120 and _index_files(upgraded) == [upgraded.stored_index.name]
    assert upgraded.stored_key_index(CONFIG) is not None


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_index_is_an_invalid_bank_at_routing(tmp_path, small_spec, damage):
    bank = AtomBank.create(tmp_path / "b", small_spec, _docs(small_spec, 0, 10))
    file = bank.path / bank.stored_index.name
    raw = bytearray(file.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        file.write_bytes(bytes(raw))
    elif damage == "truncate":
        file.write_bytes(bytes(raw[:100]))
    else:
        file.unlink()
    router = Router(RandomEncoder(), RouterConfig(index=CONFIG))
    with pytest.raises(BankError) as err:
        router.route(AtomBank.load(bank.path, name="mine"), "q")
    assert err.value.kind == BankErrorKind.INVALID and err.value.kind.http_status == 422
    assert f"bank 'mine': index {bank.stored_index.name}" in str(err.value)
    assert str(tmp_path) not in str(err.value)


def test_a_valid_hash_over_bytes_faiss_cannot_read_is_invalid(tmp_path, small_spec):
    from safetensors.numpy import save

    from vllm_doc2atom.key_index import stored_meta

    bank = AtomBank.create(tmp_path / "b", small_spec, _docs(small_spec, 0, 10))
    meta = json.loads((bank.path / MANIFEST_NAME).read_text())
    raw = save({"index": np.arange(64, dtype=np.uint8)}, metadata=stored_meta(CONFIG, 200, DIM))
    info = bank_index.StoredIndexInfo(hashlib.sha256(raw).hexdigest(), 200)
    (bank.path / info.name).write_bytes(raw)
    meta["index"] = info.to_dict()
    (bank.path / MANIFEST_NAME).write_text(json.dumps(meta))
    with pytest.raises(BankError, match="is corrupt") as err:
        AtomBank.load(bank.path).stored_key_index(CONFIG)
    assert err.value.kind == BankErrorKind.INVALID
