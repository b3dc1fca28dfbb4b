"""Join a QA source's short documents into long ones, to compare the methods where the paper expects atoms to
win: every N documents become one (their texts joined by a blank line), each question kept with its answers.

    .venv/bin/python benchmarks/join_documents.py benchmarks/data/fresh_validation.jsonl --per-document 5 \
        --out data/long_validation.jsonl
    doc2atom data build --source data/long_validation.jsonl --probes-per-doc 2 --out data/long_validation

Input and output rows are the `doc2atom data build` .jsonl source format (document_id, title, document, id,
question, answers, split). Left-over documents that make no full group are dropped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_doc2atom.files import atomic_write_text


def join_documents(rows: list[dict], per_document: int, prefix: str) -> list[dict]:
    order = list(dict.fromkeys(r["document_id"] for r in rows))
    text = {r["document_id"]: r["document"] for r in rows}
    joined = []
    for start in range(0, len(order) - per_document + 1, per_document):
        group = order[start : start + per_document]
        doc_id = f"{prefix}-{start // per_document}"
        document = "\n\n".join(text[d] for d in group)
        joined += [{**r, "document_id": doc_id, "title": doc_id, "document": document}
                   for r in rows if r["document_id"] in group]
    return joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a .jsonl QA source (one row per question)")
    parser.add_argument("--per-document", type=int, default=5, help="short documents per long one")
    parser.add_argument("--out", type=Path, required=True, help=".jsonl to write")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.source.read_text().splitlines() if line.strip()]
    joined = join_documents(rows, args.per_document, args.out.stem)
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in joined))
    print(f"{len({r['document_id'] for r in joined})} long documents, {len(joined)} questions -> {args.out}")


if __name__ == "__main__":
    main()
