"""The server's bank store: request bank names are confined to the bank root, and loaded banks cached."""

from __future__ import annotations

import os

import pytest

from vllm_doc2atom.bank_store import BankStore
from vllm_doc2atom.errors import BankError


def test_bank_names_are_confined_to_the_root(tmp_path_factory, bank):
    root = bank.path.parent
    os.symlink(tmp_path_factory.mktemp("outside"), root / "link-out")
    store = BankStore(root)
    assert store.get("bank") is store.get("bank")  # cached
    for name, kind in [("../bank", "bad_request"), ("/bank", "bad_request"), ("a//b", "bad_request"),
                       ("link-out", "bad_request"), ("", "bad_request"), (None, "bad_request"),
                       ("missing", "not_found")]:
        with pytest.raises(BankError) as err:
            store.get(name)
        assert err.value.kind == kind, name
    assert [b["id"] for b in store.list()] == ["bank"]
