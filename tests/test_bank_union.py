"""Several banks routed as one (BankUnion): the same routing and composition as one bank, a shared identity
and cache, and clear 400s for banks that cannot be routed together."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy

from vllm_doc2atom.bank import QUERY_PROJECTION, AtomBank
from vllm_doc2atom.bank_store import BankStore
from vllm_doc2atom.bank_union import BankUnion
from vllm_doc2atom.composer import compose
from vllm_doc2atom.errors import BankError
from vllm_doc2atom.router import Router, RouterConfig
from vllm_doc2atom.router_head import RouterHead

from .conftest import make_document, make_spec
from .test_bank_robustness import _raises
from .test_router import FixedEncoder


def _keyed_bank(path: Path, spec, keys: list[list[float]], seed: int, **spec_changes) -> AtomBank:
    spec = dataclasses.replace(spec, **spec_changes)
    doc = make_document(spec, "d", len(keys), seed=seed)  # the same document and atom ids in every bank
    doc.tensors["keys"] = torch.tensor(keys, dtype=torch.float32)
    return AtomBank.create(path, spec, [doc])


@pytest.fixture
def keyed_root(tmp_path, tiny_model_dir) -> Path:
    """ "near" answers the FixedEncoder's question (e0), "far" does not."""
    spec = make_spec(tiny_model_dir, key_dim=4)
    root = tmp_path / "banks"
    _keyed_bank(root / "near", spec, [[1, 0, 0, 0], [0.9, 0.3, 0, 0], [0, 0, 1, 0]], seed=1)
    _keyed_bank(root / "far", spec, [[0, 1, 0, 0], [0, 0, 0, 1]], seed=2)
    return root


def test_union_routes_and_composes_like_the_single_bank(keyed_root):
    store = BankStore(keyed_root)
    near, far = store.get("near"), store.get("far")
    union = store.get_many(["far", "near"])  # near's rows come second: offset 2
    assert len(union) == 5 and union.document_ids == ["d", "d"] and union.atoms[2].id == near.atoms[0].id
    router = Router(FixedEncoder())
    alone, together = router.route(near, "q"), router.route(union, "q")
    assert [r.index for r in alone.kept] == [0, 1]
    assert [(r.index - 2, r.weight) for r in together.kept] == [(r.index, r.weight) for r in alone.kept]
    assert {union.bank_name_of(r.index) for r in together.kept} == {"near"}
    assert together.kept[0].provenance(union.bank_name_of(together.kept[0].index))["atom_bank"] == "near"
    assert union.bank_name_of(0) == "far"

    single, combined = compose(near, alone.selection), compose(union, together.selection)
    assert combined.tensors.keys() == single.tensors.keys()
    assert all(torch.equal(combined.tensors[k], single.tensors[k]) for k in single.tensors)
    assert combined.name != single.name  # a different bank content: a different adapter identity

    # Factors across members come back in the requested order.
    mixed = union.factors([3, 0, 2])
    expected = (near.factors([1]), far.factors([0]), near.factors([0]))
    for target, (a, b) in mixed.items():
        assert torch.equal(a, torch.cat([e[target][0] for e in expected]))
        assert torch.equal(b, torch.cat([e[target][1] for e in expected]))


def test_union_identity_and_cache(keyed_root):
    store = BankStore(keyed_root)
    union = store.get_many(["near", "far"])
    assert store.get_many(["near", "far"]) is union
    assert store.get_many(["far", "near"]).fingerprint != union.fingerprint
    assert store.get_many(["near"]).fingerprint == store.get("near").fingerprint  # shares indexes, adapters
    assert "/" not in str(union.path) and str(keyed_root) not in repr(union)
    AtomBank.load(keyed_root / "far").add_documents([])  # a new manifest: a new union
    assert store.get_many(["near", "far"]) is not union


def test_union_with_a_changed_member_is_stale(keyed_root):
    store = BankStore(keyed_root)
    union = store.get_many(["near", "far"])
    AtomBank.load(keyed_root / "near").remove_documents(["d"])
    _raises("stale", union.factors, [0])


@pytest.mark.parametrize("names", [["near", "near"], [], ["near"] * 17, "near", ["near", 3]])
def test_union_names_are_checked(keyed_root, names):
    _raises("bad_request", BankStore(keyed_root).get_many, names)


def test_union_refuses_two_names_of_one_bank(keyed_root):
    (keyed_root / "alias").symlink_to(keyed_root / "near")
    _raises("bad_request", BankStore(keyed_root).get_many, ["near", "alias"], match="are the same bank")


INCOMPATIBLE = {
    "micro_rank": ({"micro_rank": 4}, r"different micro_rank \(2 != 4\)"),
    "lora_scaling": ({"lora_scaling": 1.0}, "different lora_scaling"),
    "key_encoder": ({"key_encoder": "other-encoder"}, "keys live in different spaces"),
    "key_dim": ({"key_dim": 8}, "keys live in different spaces"),
    "head vs none": ({"router_head": {"threshold": 0.2}}, "one has a trained router head"),
}


@pytest.mark.parametrize("case", sorted(INCOMPATIBLE))
def test_incompatible_banks_are_bad_requests(keyed_root, tiny_model_dir, case):
    changes, message = INCOMPATIBLE[case]
    spec = make_spec(tiny_model_dir, key_dim=4)
    keys = [[1.0] * changes.get("key_dim", 4)]
    _keyed_bank(keyed_root / "odd", spec, keys, seed=3, **changes)
    error = _raises("bad_request", BankStore(keyed_root).get_many, ["near", "odd"], match=message)
    assert "'near' and 'odd' cannot be routed together" in str(error)


def test_incompatible_targets_base_model_and_projection(keyed_root, tiny_model_dir):
    store = BankStore(keyed_root)
    spec = make_spec(tiny_model_dir, key_dim=4)
    _keyed_bank(keyed_root / "targets", spec, [[1, 0, 0, 0]], seed=3,
                targets=make_spec(tiny_model_dir, modules=("o_proj",)).targets)
    _raises("bad_request", store.get_many, ["near", "targets"], match="different LoRA targets")
    other_base = dataclasses.replace(spec.base_model, num_layers=spec.base_model.num_layers + 2)
    _keyed_bank(keyed_root / "base", spec, [[1, 0, 0, 0]], seed=3, base_model=other_base)
    _raises("bad_request", store.get_many, ["near", "base"], match="different base models .*num_layers")
    shutil.copytree(keyed_root / "near", keyed_root / "projected")
    save_numpy({"projection": np.eye(4, dtype=np.float32)}, str(keyed_root / "projected" / QUERY_PROJECTION))
    _raises("bad_request", store.get_many, ["far", "projected"], match="query projections differ")


def test_union_heads_must_match_but_thresholds_merge_to_the_lowest(tmp_path, tiny_model_dir):
    spec = make_spec(tiny_model_dir, key_dim=4)
    head = dataclasses.asdict(RouterHead(sim_scale=10.0, sim_center=1.0, metadata=True))
    banks = {name: _keyed_bank(tmp_path / name, spec, [[1, 0, 0, 0], [0.8, 0.6, 0, 0]], seed=1,
                               router_head={**head, **change})
             for name, change in {"strict": {"threshold": 0.9}, "loose": {"threshold": 0.1},
                                  "uncalibrated": {}, "other": {"sim_scale": 5.0}}.items()}
    union = BankUnion([banks["strict"], banks["loose"], banks["uncalibrated"]], ["strict", "loose", "plain"])
    assert union.spec.router_head["threshold"] == 0.1
    # cos 0.8 -> weight ~0.12: kept under the union's (loosest) threshold 0.1, as in "loose" alone
    assert len(Router(FixedEncoder()).route(union, "q").kept) == 6
    assert len(Router(FixedEncoder(), RouterConfig(threshold_override=0.3)).route(union, "q").kept) == 3  # the server's
    assert BankUnion([banks["uncalibrated"]]).spec.router_head["threshold"] is None
    with pytest.raises(BankError, match=r"router heads differ in \['sim_scale'\]") as err:
        BankUnion([banks["strict"], banks["other"]], ["strict", "other"])
    assert err.value.kind == "bad_request"
