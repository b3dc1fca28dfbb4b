"""`doc2atom bank info | remove | upgrade`: inspect and edit atom banks."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bank = subparsers.add_parser("bank", help="inspect and edit atom banks").add_subparsers(dest="action",
                                                                                         required=True)
    p = bank.add_parser("info", help="validate a bank and print its summary as JSON")
    p.add_argument("bank")
    p.add_argument("--no-verify", action="store_true",
                   help="skip hashes and finiteness checks (format v2: of the segments; v1: of every shard)")
    p.set_defaults(func=run_info)
    p = bank.add_parser("remove", help="remove documents' atoms from a bank (the others are untouched)")
    p.add_argument("bank")
    p.add_argument("document_ids", nargs="+")
    p.set_defaults(func=run_remove)
    p = bank.add_parser("upgrade", help="rewrite a format-v1 bank as format v2 (atomic; shards are kept): "
                                        "it then loads without reading its shards")
    p.add_argument("bank")
    p.set_defaults(func=run_upgrade)


def run_info(args: argparse.Namespace) -> int:
    from vllm_doc2atom.bank import AtomBank

    bank = AtomBank.load(args.bank, verify=not args.no_verify)
    print(json.dumps(bank.summary(), indent=2))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from vllm_doc2atom.bank import AtomBank

    from ..inputs import InputError, name_list

    bank = AtomBank.load(args.bank)
    known = set(bank.document_ids)
    unknown = [d for d in args.document_ids if d not in known]
    if unknown:
        raise InputError(f"bank {bank.path} has no document {name_list(unknown)}; its documents: "
                         f"{name_list(bank.document_ids)} (see `doc2atom bank info`)")
    bank = bank.remove_documents(args.document_ids)
    print(f"{bank.path}: {len(bank)} atoms in {len(bank.document_ids)} documents remain")
    return 0


def run_upgrade(args: argparse.Namespace) -> int:
    from vllm_doc2atom.bank import AtomBank

    bank = AtomBank.load(args.bank)  # a v1 bank: every shard read and hashed once more
    if bank.format_version >= 2:
        print(f"{bank.path}: already format v{bank.format_version} ({len(bank)} atoms)")
        return 0
    bank = bank.upgrade()
    print(f"{bank.path}: upgraded to format v{bank.format_version}: {len(bank)} atoms in "
          f"{len(bank.document_ids)} documents, {len(bank.segments)} segment(s); shards unchanged")
    return 0
