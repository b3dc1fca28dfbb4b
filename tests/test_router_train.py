"""The stage-2 reranker: training pairs, a few training steps, saved (safetensors + JSON), loaded, scoring."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from training.cli import main
from training.inputs import InputError
from training.router.examples import RoutingExample
from training.router.pairs import document_pairs, mixed_pairs
from training.router.reranker import open_reranker
from training.router.train import RerankerTrainConfig, fit_reranker, save_trained
from vllm_doc2atom.reranker import CARD, WEIGHTS

# Each fact's question names its subject; the other atoms share no word with it.
FACTS = [("zorblat lamp", "glows a deep purple colour"), ("quendil bridge", "spans the river Ost"),
         ("marrow kettle", "whistles at dawn"), ("tovish garden", "grows blue pears"),
         ("plinth clock", "chimes eleven times"), ("varnel ship", "carries salt to Kesh")]
TOY = RerankerTrainConfig(steps=8, lr=3e-4, batch_size=30, max_length=32, warmup_fraction=0.0, text="text")


def toy_examples() -> list[RoutingExample]:
    examples = []
    for d in range(2):
        facts = FACTS[3 * d: 3 * d + 3]
        atoms = (*(f"The {name} {fact}." for name, fact in facts), f"Chronicle {d} was written long ago.")
        examples += [RoutingExample(f"What about the {name}?", f"doc{d}", atoms, frozenset({i}),
                                    title=f"Book {d}") for i, (name, _) in enumerate(facts)]
    return examples


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A reranker trained for a few steps on the toy set, saved the way `doc2atom router train` saves it."""
    folder = tmp_path_factory.mktemp("rerankers") / "toy"
    save_trained(folder, fit_reranker([toy_examples()], TOY), TOY, {"data": "toy"})
    return folder


def test_pairs_put_gold_first_then_same_document_then_other_document_negatives():
    examples = toy_examples()
    examples[0] = RoutingExample(examples[0].question, "doc0", examples[0].atom_texts, frozenset({0}),
                                 supporting=frozenset({1}))
    pairs = document_pairs(examples, same_document=2, other_document=1, rng=random.Random(0), text="text")[0]
    assert [p.label for p in pairs] == [1.0, 0.0, 0.0, 0.0]
    assert pairs[0].text == examples[0].atom_texts[0]
    doc0, doc1 = set(examples[0].atom_texts), set(examples[3].atom_texts)
    assert {pairs[1].text, pairs[2].text} == doc0 - set(examples[0].atom_texts[:2])  # never the supporting
    assert pairs[3].text in doc1
    titled = document_pairs(examples, 2, 1, random.Random(0), text="titled")[0]
    assert titled[0].text == f"Book 0: {examples[0].atom_texts[0]}"
    assert mixed_pairs([examples], 2, 1, seed=3) == mixed_pairs([examples], 2, 1, seed=3)
    assert len(mixed_pairs([examples, examples], 2, 1, seed=3, max_pairs=9)) == 8  # whole questions only


def test_trained_reranker_scores_the_gold_atom_highest(saved):
    reranker = open_reranker(saved)
    for example in toy_examples():
        scores = reranker.score(example.question, list(example.atom_texts))
        assert int(np.argmax(scores)) in example.gold, (example.question, scores)


def test_scores_one_finite_logit_per_text_as_the_plugin_hook(saved):
    reranker = open_reranker(saved)
    assert reranker.max_length == 32 and reranker.text_kind == "text"
    texts = ("short", "a much longer atom text " * 20, "third")
    scores = reranker("What about the zorblat lamp?", texts)  # the plugin calls it with any Sequence
    assert scores.shape == (3,) and scores.dtype == np.float32 and np.isfinite(scores).all()
    assert reranker.score("anything", []).shape == (0,)


def test_saved_folder_holds_only_the_trained_tensors_in_safetensors_and_the_card(saved):
    from safetensors import safe_open

    assert {p.name for p in saved.rglob("*")} == {WEIGHTS, CARD}  # no pickle, no copy of the packaged MiniLM
    with safe_open(str(saved / WEIGHTS), "pt") as f:
        names = set(f.keys())
    assert "classifier.weight" in names and "bert.encoder.layer.5.output.dense.weight" in names
    assert not {n for n in names if "word_embeddings" in n or "position_embeddings" in n}  # frozen
    card = json.loads((saved / CARD).read_text())
    assert card["base"]["name"] == "sentence-transformers/all-MiniLM-L6-v2" and len(card["base"]["sha256"]) == 64
    assert card["layers"] == 6 and card["max_length"] == 32 and card["steps"] == 8 and card["seed"] == 0
    assert card["train_split"] == "train" and card["pairs_per_second"] > 0 and card["name"] == "toy"


def test_missing_or_corrupt_reranker_is_a_clear_input_error(saved, tmp_path):
    import shutil

    with pytest.raises(InputError, match="does not exist"):
        open_reranker(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    card = json.loads((saved / CARD).read_text())
    (broken / CARD).write_text(json.dumps({**card, "layers": 3}))
    with pytest.raises(InputError, match="does not fit 3 MiniLM layers"):  # the weights hold 6
        open_reranker(broken)
    (broken / CARD).write_text(json.dumps({**card, "base": {**card["base"], "sha256": "0" * 64}}))
    with pytest.raises(InputError, match="other base weights"):
        open_reranker(broken)
    (broken / WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="unreadable"):
        open_reranker(broken)
    (broken / CARD).write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        open_reranker(broken)
    (broken / CARD).unlink()
    with pytest.raises(InputError, match="router train"):
        open_reranker(broken)


def test_router_train_cli_trains_validates_and_writes_the_card(tmp_path, capsys):
    data = tmp_path / "synthetic"
    assert main(["data", "build", "--source", "synthetic", "--limit", "12", "--out", str(data)]) == 0
    out = tmp_path / "reranker"
    assert main(["router", "train", "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "8", "--max-length", "32", "--layers", "1"]) == 0
    assert str(out) in capsys.readouterr().out
    card = json.loads((out / CARD).read_text())
    assert card["data"][0]["train_questions"] > 0 and card["config"]["text"] == "titled"
    summary = card["validation_summary"]["synthetic"]
    assert summary["questions"] > 0 and 0 <= summary["reranker_recall@1"] <= 1
    assert open_reranker(out).score("a question", ["an atom"]).shape == (1,)
    assert main(["router", "train", "--data", str(tmp_path / "none"), "--out", str(out)]) == 2  # one line
    assert main(["router", "train", "--data", str(data), "--out", str(data)]) == 2  # never replace a dataset
    assert "holds other files" in capsys.readouterr().err
