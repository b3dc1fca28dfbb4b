"""The bank layer against hostile or careless input: request names, manifests, shards changed under a
running server, non-finite adapters. (Several banks routed as one: test_bank_union.py; format v2 at scale and
v1 banks: test_bank_v2.py.)"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_doc2atom.bank import MANIFEST_NAME, AtomBank
from vllm_doc2atom.bank_store import BankStore
from vllm_doc2atom.composer import compose
from vllm_doc2atom.errors import BankError
from vllm_doc2atom.files import file_sha256
from vllm_doc2atom.router import Router
from vllm_doc2atom.router_head import _HEAD_FIELDS, RouterHead

from .conftest import make_document, make_spec
from .test_bank import BAD_BANKS, BAD_SHARDS, _rewrite_shard, shard_file
from .test_router import FixedEncoder
from .v1_bank import write_v1_bank


@pytest.fixture
def root(tmp_path, spec) -> Path:
    """A bank root holding "docs" (doc-a: rows 0-2, doc-b: rows 3-6) and "other"."""
    root = tmp_path / "banks"
    AtomBank.create(root / "docs", spec, [make_document(spec, "doc-a", 3, seed=1),
                                          make_document(spec, "doc-b", 4, seed=2)])
    AtomBank.create(root / "other", spec, [make_document(spec, "doc-c", 2, seed=3)])
    return root


def _shard(path: Path, document: int = 0) -> Path:
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    if manifest["format_version"] == 1:
        return path / manifest["documents"][document]["shard"]
    return shard_file(path, document)


@pytest.fixture
def v1_root(tmp_path, spec) -> Path:
    """The same banks as `root`, in format v1."""
    root = tmp_path / "v1-banks"
    write_v1_bank(root / "docs", spec, [make_document(spec, "doc-a", 3, seed=1),
                                        make_document(spec, "doc-b", 4, seed=2)])
    write_v1_bank(root / "other", spec, [make_document(spec, "doc-c", 2, seed=3)])
    return root


def _raises(kind: str, call, *args, match: str | None = None) -> BankError:
    with pytest.raises(BankError, match=match) as err:
        call(*args)
    assert err.value.kind == kind, str(err.value)
    return err.value


# ---- 1. request names -------------------------------------------------------------------------------


HOSTILE_NAMES = {
    "nul": "docs\x00",
    "newline": "do\ncs",
    "escape": "\x1b[31mdocs",
    "bidi override": "docs\u202e",
    "lone surrogate": "docs\ud800",
    "long component": "d" * 256,
    "long multibyte component": "é" * 128,  # 256 bytes
    "long name": "/".join(["abcd"] * 300),
    "hidden": ".docs",
    "hidden old dir": "team/.docs.old-1234abcd",
    "dot": "./docs",
    "dotdot": "../docs",
    "absolute": "/etc",
    "backslash": "a\\b",
    "empty component": "a//b",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_NAMES))
def test_hostile_names_are_bad_requests_with_short_messages(root, case):
    (root / "team" / ".docs.old-1234abcd").mkdir(parents=True)  # an atomic write's leftover: never servable
    (root / ".docs").mkdir()
    name = HOSTILE_NAMES[case]
    error = _raises("bad_request", BankStore(root).resolve, name)
    assert len(str(error)) < 160 and str(root) not in str(error)


def test_symlink_loop_and_os_errors_are_clean_bank_errors(root, monkeypatch):
    (root / "loop").symlink_to(root / "loop")
    store = BankStore(root)
    error = _raises("bad_request", store.resolve, "loop")
    assert str(root) not in str(error)
    _raises("bad_request", store.get, "loop")

    def too_long(self, strict=False):
        raise OSError(errno.ENAMETOOLONG, "File name too long", "/srv/secret/banks/x")

    monkeypatch.setattr(Path, "resolve", too_long)
    error = _raises("bad_request", store.resolve, "docs")
    assert "/srv/secret" not in str(error)

    def denied(self, strict=False):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/secret/banks/x")

    monkeypatch.setattr(Path, "resolve", denied)
    _raises("not_found", store.resolve, "docs")


def test_a_huge_name_is_refused_quickly(root):
    start = time.perf_counter()
    error = _raises("bad_request", BankStore(root).resolve, "b" * 1_000_000 + "\x00")
    assert time.perf_counter() - start < 0.05 and len(str(error)) < 160


def test_plain_names_still_resolve(root):
    (root / "team").mkdir()
    shutil.copytree(root / "docs", root / "team" / "docs-v2.1")
    store = BankStore(root)
    assert store.resolve("team/docs-v2.1") == (root / "team" / "docs-v2.1").resolve()
    assert len(store.get("team/docs-v2.1")) == 7


# ---- 2. no server paths in messages -------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(BAD_BANKS))
def test_errors_name_the_bank_as_requested_never_its_path(root, case):
    damage, message = BAD_BANKS[case]
    damage(root / "docs")
    store = BankStore(root)
    with pytest.raises(BankError, match=message) as err:
        store.get("docs")
    text = str(err.value)
    assert text.startswith("bank 'docs'") and str(root) not in text and str(root.parent) not in text
    listed = {b["id"]: b for b in store.list()}
    if "docs" in listed:  # (not listed without its manifest)
        assert not listed["docs"]["ok"] and str(root) not in listed["docs"]["error"]
    assert listed["other"]["ok"]


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_shard_errors_name_the_bank_as_requested_for_that_bank_only(root, case):
    damage, message = BAD_SHARDS[case]
    damage(root / "docs")
    store = BankStore(root)
    bank = store.get("docs")  # a v2 bank loads without its shards
    error = _raises("invalid", bank.factors, [0], match=message)
    assert str(error).startswith("bank 'docs': shard shards/") and str(root) not in str(error)
    assert bank.factors([3])  # doc-b still composes
    listed = {b["id"]: b for b in store.list()}  # the shard read that failed is checked again, and fails
    assert not listed["docs"]["ok"] and str(root) not in listed["docs"]["error"] and listed["other"]["ok"]


@pytest.mark.parametrize("version", [1, 2])
def test_shards_are_named_relative_to_the_bank(root, v1_root, version):
    root = root if version == 2 else v1_root
    shard = _shard(root / "docs")
    shard.write_bytes(b"garbage")
    with pytest.raises(BankError) as err:
        BankStore(root).get("docs").factors([0])  # (v1: already the load)
    assert str(err.value) == (f"bank 'docs': shard shards/{shard.name} is corrupt: "
                              "its sha256 does not match the manifest")


# ---- 3. router head validated at load -----------------------------------------------------------------


BAD_HEADS = {
    "threshold text": ({"threshold": "abc"}, "threshold must be a number in"),
    "threshold above 1": ({"threshold": 1.5}, "threshold"),
    "threshold bool": ({"threshold": True}, "threshold"),
    "max_atoms zero": ({"max_atoms": 0}, "max_atoms must be a positive integer"),
    "max_atoms float": ({"max_atoms": 2.5}, "max_atoms"),
    "metadata text": ({"metadata": "yes"}, "metadata must be true or false"),
    "type_bias values": ({"type_bias": {"fact_claim": "x"}}, "type_bias"),
    "type_bias list": ({"type_bias": [1]}, "type_bias"),
    "scale null": ({"sim_scale": None}, "sim_scale must be a finite number"),
    "not an object": ("abc", "expected an object"),
    "unknown field": ({"bogus": 1}, "unknown fields"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADS))
def test_a_bad_router_head_fails_at_load(root, case):
    head, message = BAD_HEADS[case]
    manifest = json.loads((root / "docs" / MANIFEST_NAME).read_text())
    manifest["spec"]["router_head"] = head
    (root / "docs" / MANIFEST_NAME).write_text(json.dumps(manifest))
    error = _raises("invalid", BankStore(root).get, "docs", match=message)
    assert "malformed router head" in str(error)


def test_a_good_router_head_from_json_routes(tmp_path, tiny_model_dir):
    spec = make_spec(tiny_model_dir, key_dim=4)
    doc = make_document(spec, "d", 2)
    doc.tensors["keys"] = torch.tensor([[1.0, 0, 0, 0], [0.0, 1, 0, 0]])
    head = {"sim_scale": 10, "sim_center": 1, "threshold": 0, "max_atoms": 1, "type_bias": {"fact_claim": 1}}
    bank = AtomBank.create(tmp_path / "b", dataclasses.replace(spec, router_head=head), [doc])
    assert RouterHead.from_dict(head) == RouterHead(sim_scale=10.0, sim_center=1.0, threshold=0.0, max_atoms=1,
                                                    type_bias={"fact_claim": 1.0})
    assert [r.index for r in Router(FixedEncoder()).route(bank, "q").kept] == [0]


def test_every_router_head_field_is_validated():
    assert set(_HEAD_FIELDS) == {f.name for f in dataclasses.fields(RouterHead)}


# ---- 4. shards changed under a loaded bank -------------------------------------------------------------


def _overwrite_data_in_place(path: Path, byte: int) -> None:
    """Keep the safetensors header, overwrite every tensor byte: same inode, same size, a valid file."""
    time.sleep(0.05)  # past the filesystem's timestamp granularity, as any real later write is
    with open(path, "r+b") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
        f.seek(data_start)
        f.write(bytes([byte]) * (path.stat().st_size - data_start))


def test_shard_overwritten_in_place_is_invalid_not_nan(root):
    store = BankStore(root)
    store.recheck_seconds = 0  # get() stats every shard of a v1 bank every time; of a v2 bank, never
    bank = store.get("docs")
    bank.factors([0])  # used: verified
    _overwrite_data_in_place(_shard(root / "docs"), 0xFF)  # every float NaN
    error = _raises("invalid", bank.factors, [0], match="shard shards/.* is corrupt")
    assert "sha256 no longer matches" in str(error)
    assert bank.factors([3])[bank.spec.targets[0]][0].isfinite().all()  # the untouched document still serves
    assert store.get("docs") is bank  # per request: the manifest only
    _raises("invalid", store.get, "docs", True)
    listed = {b["id"]: b for b in store.list()}
    assert not listed["docs"]["ok"] and "is corrupt" in listed["docs"]["error"] and listed["other"]["ok"]
    assert len(store.get("other")) == 2  # only this bank is affected


def test_truncated_shard_is_invalid(root):
    store = BankStore(root)
    bank = store.get("docs")
    shard = _shard(root / "docs", 1)
    os.truncate(shard, shard.stat().st_size // 2)
    _raises("invalid", bank.factors, [4], match="is corrupt")
    listed = {b["id"]: b for b in store.list()}
    assert not listed["docs"]["ok"] and listed["other"]["ok"]


def test_deleted_shard_is_invalid_when_the_manifest_did_not_change(root):
    store = BankStore(root)
    store.recheck_seconds = 0
    bank = store.get("docs")
    _shard(root / "docs").unlink()
    _raises("invalid", bank.factors, [0], match=r"shard shards/\w+\.safetensors is missing")
    _raises("invalid", store.get, "docs", True, match="is missing")
    assert not {b["id"]: b for b in store.list()}["docs"]["ok"]


def test_reader_of_the_old_bank_during_remove_gets_stale(root):
    store = BankStore(root)
    old = store.get("docs")
    AtomBank.load(root / "docs").remove_documents(["doc-a"])  # swaps the manifest, then deletes doc-a's shard
    error = _raises("stale", old.factors, [0], match="changed on disk")
    assert str(root) not in str(error)
    new = store.get("docs")  # what the server's retry does
    assert new.document_ids == ["doc-b"] and new.factors([0])


def test_a_shard_rewritten_with_the_same_content_is_fine(root, monkeypatch):
    store = BankStore(root)
    bank = store.get("docs")
    shard = _shard(root / "docs")
    expected = bank.factors([1])
    copy = shard.with_name("copy")
    shutil.copyfile(shard, copy)
    os.replace(copy, shard)  # a new inode, same bytes (as an identical re-add does)
    got = bank.factors([1])
    assert all(torch.equal(got[t][0], expected[t][0]) for t in expected)
    assert all(b["ok"] for b in store.list())


@pytest.mark.parametrize("version", [1, 2])
def test_list_rehashes_only_changed_shards(root, v1_root, version, monkeypatch):
    root = root if version == 2 else v1_root
    store = BankStore(root)
    store.list()
    store.get("docs").factors([0])  # v2: a shard is verified when first read (v1: all, at load)
    hashes = []
    real_read = AtomBank._read_verified
    monkeypatch.setattr(AtomBank, "_read_verified",
                        lambda self, doc: hashes.append(doc) or real_read(self, doc))
    assert all(b["ok"] for b in store.list()) and hashes == []
    time.sleep(0.05)
    for document in (0, 1):
        os.utime(_shard(root / "docs", document))  # a touch: the stat changes, the content does not
    assert all(b["ok"] for b in store.list())
    assert hashes == ([0, 1] if version == 1 else [0])  # v2: doc-b's shard was never read, so never verified


@pytest.mark.parametrize("version", [1, 2])
def test_get_checks_shards_by_stat_and_opens_only_changed_ones(root, v1_root, version, monkeypatch):
    root = root if version == 2 else v1_root
    store = BankStore(root, recheck_seconds=0)
    store.get("docs").factors([3])
    opened = []
    real_read = AtomBank._read_verified
    monkeypatch.setattr(AtomBank, "_read_verified",
                        lambda self, doc: opened.append(doc) or real_read(self, doc))
    store.get("docs")
    assert opened == []
    time.sleep(0.05)
    os.utime(_shard(root / "docs", 1))
    store.get("docs")
    assert opened == ([1] if version == 1 else [])  # v2: shards are immutable and checked on every read
    store.get("docs", check_shards=True)
    assert opened == ([1] if version == 1 else [1])
    store.get("docs", check_shards=False)  # the manifest only
    BankStore(root).get("docs")  # (a fresh store loads, it does not re-check)


def test_a_shard_truncated_after_loading_is_a_bank_error(root):
    bank = BankStore(root).get("docs")
    os.truncate(_shard(root / "docs", 1), 100)  # under an mmap, reading past here would be SIGBUS
    with pytest.raises(BankError, match="corrupt") as err:
        bank.factors(list(range(len(bank))))
    assert err.value.kind == "invalid"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_factors_are_read_exactly_from_any_float_dtype(tmp_path, spec, dtype):
    doc = make_document(spec, "d", 3)
    doc.tensors = {name: tensor.to(dtype) for name, tensor in doc.tensors.items()}
    got = AtomBank.create(tmp_path / "b", spec, [doc]).factors([2, 0])
    for t in spec.targets:
        assert torch.equal(got[t][0], doc.tensors[f"A.{t.key}"][[2, 0]].float())
        assert torch.equal(got[t][1], doc.tensors[f"B.{t.key}"][[2, 0]].float())


def test_readers_never_see_a_half_changed_bank(root, spec):
    docs = {d.document_id: d for d in (make_document(spec, "doc-a", 3, seed=1), make_document(spec, "doc-b", 4, seed=2),
                                       make_document(spec, "doc-c", 2, seed=3))}
    store = BankStore(root)
    store.recheck_seconds = 0
    stop, problems, reads = threading.Event(), [], []

    def reader() -> None:
        while not stop.is_set():
            try:
                bank = store.get("docs")
                factors = bank.factors(list(range(len(bank))))
                atoms = list(bank.atoms)  # v2: records are read now, perhaps after a removal deleted them
            except BankError as exc:
                if exc.kind != "stale":  # the server retries a stale one
                    problems.append(str(exc))
                continue
            except Exception as exc:  # what a server would answer with a 500
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            for t in spec.targets:
                for row, atom in enumerate(atoms):
                    source = docs[atom.document_id].tensors[f"A.{t.key}"][int(atom.id.split("#")[1])]
                    if not torch.equal(factors[t][0][row], source):
                        problems.append(f"row {row} ({atom.id}) is torn")
            reads.append(len(bank))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        writer = AtomBank.load(root / "docs")
        for _ in range(15):
            writer = writer.add_documents([docs["doc-c"]]).remove_documents(["doc-c"])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert problems == [] and reads


def test_unreadable_shard_is_a_bank_error(root, monkeypatch):
    bank = BankStore(root).get("docs")
    shard, real_open = _shard(root / "docs"), open

    def no_permission(path, *args, **kwargs):  # (chmod 0 would not stop a test running as root)
        if Path(path) == shard.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_permission)
    error = _raises("invalid", bank.factors, [0], match=r"shard shards/\w+\.safetensors cannot be read "
                                                        r"\(Permission denied\)")
    assert str(root) not in str(error)


def test_malformed_manifests_are_bank_errors(root):
    path = root / "docs"
    good = json.loads((path / MANIFEST_NAME).read_text())
    variants = [
        lambda m: m["documents"]["atoms"].__setitem__(0, 5),
        lambda m: m["documents"]["id"].__setitem__(0, ["x"]),
        lambda m: m["documents"]["id"].__setitem__(0, "doc-b"),
        lambda m: m["documents"]["row"].__setitem__(0, 1.5),
        lambda m: m["documents"]["row"].__setitem__(0, True),
        lambda m: m["documents"]["segment"].__setitem__(0, -1),
        lambda m: m["documents"]["segment"].pop(),
        lambda m: m["documents"]["shard_sha256"].__setitem__(0, "shards/\x00"),
        lambda m: m["documents"]["shard_sha256"].__setitem__(0, 7),
        lambda m: m["documents"].update(extra=[]),
        lambda m: m["segments"][0].update(rows="many"),
        lambda m: m["segments"][0].update(rows=6),
        lambda m: m["segments"][0].update(sha256="../../etc/passwd"),
        lambda m: m["segments"].append(m["segments"][0]),
        lambda m: m.update(segments={}),
        lambda m: m.update(spec=[]),
        lambda m: m["spec"]["base_model"].update(num_layers="many"),
        lambda m: m.update(documents=[None]),
        lambda m: m.update(documents=None),
    ]
    for mutate in variants:
        manifest = json.loads(json.dumps(good))
        mutate(manifest)
        (path / MANIFEST_NAME).write_text(json.dumps(manifest))
        error = _raises("invalid", BankStore(root).get, "docs")
        assert str(error).startswith("bank 'docs'") and str(root) not in str(error)


# ---- 5. the composer refuses non-finite adapters -------------------------------------------------------


def test_compose_refuses_nan_factors_and_names_the_shard(root, v1_root):
    path = v1_root / "docs"  # a v1 bank loaded unverified: the composer's own check is what stops it
    shard = _shard(path)
    tensors = load_file(shard)
    next(v for k, v in tensors.items() if k.startswith("A.")).__setitem__((1, 0, 0), float("nan"))
    save_file(tensors, shard)
    _fix_v1_sha(path, shard)  # only the values are bad
    bank = AtomBank.load(path, verify=False)
    error = _raises("invalid", compose, bank, [(1, 0.9), (4, 0.5)], match="composed adapter is not finite")
    assert f"shard shards/{_shard(path).name} may be corrupt" in str(error)
    assert "doc-b" not in str(error) and _shard(path, 1).name not in str(error)
    assert compose(bank, [(4, 0.5)]).rank == bank.spec.micro_rank  # other atoms still compose

    path = root / "docs"  # v2: the first read of a shard checks every value
    _rewrite_shard(path, lambda t: next(v for k, v in t.items() if k.startswith("A.")).__setitem__(
        (1, 0, 0), float("nan")))
    bank = AtomBank.load(path)
    error = _raises("invalid", compose, bank, [(1, 0.9), (4, 0.5)], match="NaN or Inf")
    assert f"shard shards/{_shard(path).name}" in str(error) and "doc-b" not in str(error)
    assert compose(bank, [(4, 0.5)]).rank == bank.spec.micro_rank


def _fix_v1_sha(path: Path, shard: Path) -> None:
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    entry = next(d for d in manifest["documents"] if d["shard"].endswith(shard.name))
    entry["sha256"] = file_sha256(shard)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_compose_refuses_values_beyond_fp16(bank, monkeypatch):
    real = bank.factors

    def huge(rows):
        factors = real(rows)
        return {t: (a * 1e9, b) for t, (a, b) in factors.items()}

    monkeypatch.setattr(bank, "factors", huge)
    _raises("invalid", compose, bank, [(0, 1.0)], match="fp16 range")


def test_a_bank_being_swapped_for_a_new_one_is_never_missing(root, monkeypatch):
    store = BankStore(root)
    aside = root / ".docs.old-12345678"
    os.rename(root / "docs", aside)  # the instant between the two renames of AtomBank.create(overwrite=True)
    threading.Timer(0.05, os.rename, (aside, root / "docs")).start()
    assert len(store.get("docs")) > 0
    with pytest.raises(BankError) as err:
        store.get("never-there")
    assert err.value.kind == "not_found"
