"""The memory compiler, the distillation losses, the trainer and `doc2atom compile`, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from training import losses
from training.amortized.checkpoint import load_compiler
from training.amortized.config import TrainConfig
from training.amortized.distill import Distiller
from training.amortized.prepare import prepare
from training.data.build import BuildConfig, build_dataset

from .conftest import EXAMPLE_DOCS

TINY = dict(adapted_layers=2, micro_rank=2, encoder_layer=1, hidden=64, slot_dim=8, batch_size=4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("data")
    build_dataset(BuildConfig(source="synthetic", out=out, limit=6, teacher_model=str(tiny_model_dir),
                              teacher_backend="transformers", top_k=4))
    return out


@pytest.fixture(scope="module")
def setup(dataset, tiny_model_dir, encoder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.amortized.memory_compiler import CompilerConfig, MemoryCompiler
    from vllm_doc2atom.bank_interface import Target
    from vllm_doc2atom.fingerprint import BaseModelFingerprint

    config = TrainConfig(data=str(dataset), model=str(tiny_model_dir), **TINY)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    table, items = prepare(config, model, tokenizer, encoder)
    base = BaseModelFingerprint.from_model_dir(tiny_model_dir)
    compiler_config = CompilerConfig(base_model=base.to_dict(), targets=[Target("down_proj", 2).key,
                                                                         Target("down_proj", 3).key],
                                     feature_dim=128, hidden=64, slot_dim=8, micro_rank=2)
    return config, model, table, items, compiler_config, MemoryCompiler


def _distiller(setup, method="doc2atom"):
    config, model, table, items, compiler_config, compiler_class = setup
    torch.manual_seed(0)
    config = TrainConfig(**{**config.__dict__, "method": method})
    return Distiller(config, model, compiler_class(compiler_config), table), items


def test_compiler_shapes_and_near_no_op_start(setup):
    distiller, items = _distiller(setup)
    table = distiller.table
    a, b, gates = distiller.compiler(table.features[:5])
    for target in distiller.targets:
        d_in, d_out = distiller.compiler.config.fingerprint().module_shape(target.module)
        assert a[target].shape == (5, 2, d_in) and b[target].shape == (5, d_out, 2)
    assert gates.shape == (5, 2) and ((gates > 0) & (gates < 1)).all()
    answerable = [q for q in items if q.student is not None][:2]
    with torch.no_grad():
        adapted = distiller.student_logits(answerable, [[(0, torch.tensor(1.0))]] * 2, a, b, gates)
        hidden = distiller.run_layers([q.student.hidden for q in answerable], None)
        base = distiller.model.lm_head(torch.cat([hidden[i, q.student.answer_positions]
                                                  for i, q in enumerate(answerable)]))
    assert (adapted - base).abs().max() < 1e-3  # B starts near zero: the student starts as the base model


def test_loss_terms_vanish_exactly_when_their_goal_is_met():
    logits = torch.randn(3, 10)
    top = logits.topk(4, dim=-1)
    assert losses.teacher_kl(logits, top.indices, top.values) < 1e-6
    assert losses.teacher_kl(logits, top.indices, top.values.flip(-1)) > 1e-3
    assert losses.logits_kl(logits, logits) < 1e-6 and losses.symmetric_kl(logits, logits + 1.0) < 1e-6
    assert losses.symmetric_kl(logits, torch.randn(3, 10)) > 1e-3
    assert losses.adapter_norm(torch.zeros(4), torch.ones(4), torch.ones(4)) == 0
    assert losses.adapter_norm(torch.full((4,), 0.5), torch.ones(4), torch.ones(4)) == 1.0
    groups = torch.tensor([0, 0, 1, -1])
    assert losses.conflict_exclusivity(torch.tensor([0.5, 0.5, 1.0, 1.0]), groups) == 0
    assert losses.conflict_exclusivity(torch.tensor([0.9, 0.9, 1.0, 1.0]), groups) > 0
    assert losses.confidence_alignment(torch.full((2, 3), 0.7), torch.tensor([0.7, 0.7])) < 1e-12
    assert losses.gate_l1(torch.zeros(2, 3)) == 0
    labels = torch.tensor([1.0, 0.0])
    assert losses.routing_bce(torch.tensor([9.0, -9.0]), labels) < 1e-3 < losses.routing_bce(torch.zeros(2), labels)


def test_answer_terms_weight_the_gold_answer_tokens():
    logits, tokens = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    per_token = torch.nn.functional.cross_entropy(logits, tokens, reduction="none")
    weights = torch.tensor([1.0, 4.0, 4.0, 1.0])
    assert torch.allclose(losses.answer_ce(logits, tokens, weights=weights), (per_token * weights).sum() / 10)
    assert torch.allclose(losses.answer_ce(logits, tokens, weights=torch.ones(4)), losses.answer_ce(logits, tokens))


def test_gold_token_mask_marks_the_tokens_that_spell_the_answer(tiny_model_dir):
    from transformers import AutoTokenizer

    from training.amortized.student_inputs import gold_token_mask

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reply = tokenizer("The harbor master of Quillon is Elvira Tundmark.", add_special_tokens=False)["input_ids"]
    mask = gold_token_mask(tokenizer, reply, ["elvira tundmark"])
    assert tokenizer.decode([t for t, m in zip(reply, mask) if m]).strip() == "Elvira Tundmark"
    assert not gold_token_mask(tokenizer, reply, ["Rodrigo", ""]).any()


def test_factors_carry_the_identity_of_the_tokens_they_read(setup):
    """B is a linear map of attention-weighted token embeddings: two atoms that differ only in one token's
    embedding get different write directions, so a name can be copied rather than memorised."""
    distiller, _ = _distiller(setup)
    inputs = distiller.table.features[:1]
    changed = type(inputs)(inputs.states, inputs.embeddings.clone(), inputs.mask)
    changed.embeddings[0, 0] += 1.0
    with torch.no_grad():
        _, b, _ = distiller.compiler(inputs)
        _, b_changed, _ = distiller.compiler(changed)
    target = distiller.targets[0]
    assert not torch.allclose(b[target], b_changed[target])


def test_every_term_is_computed_and_gradients_reach_every_trained_part(setup):
    distiller, items = _distiller(setup)
    answerable = [q for q in items if q.student is not None][:3]
    probes = [q for q in items if q.student is None][:2]
    terms = distiller.losses(answerable, probes, stage=1, k=2)
    assert set(terms) == {"answer_ce", "teacher_kl", "routing", "conflict", "gate_l1", "confidence",
                          "consistency", "suppression", "protection"}
    sum(terms.values()).backward()
    for name, parameter in distiller.compiler.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    gold_only = distiller.losses(answerable, [], stage=0, k=0)
    assert "consistency" not in gold_only and "suppression" not in gold_only  # curriculum: robustness later


def test_d2l_baseline_composes_whole_documents_without_routing(setup):
    distiller, items = _distiller(setup, method="d2l_atom")
    answerable = [q for q in items if q.student is not None][:2]
    terms = distiller.losses(answerable, [], stage=1, k=2)
    assert "routing" not in terms and "consistency" not in terms and terms["answer_ce"] > 0


def test_twenty_steps_overfit_three_fictional_facts(setup):
    distiller, items = _distiller(setup)
    facts = [q for q in items if q.student is not None][:3]
    optimizer = torch.optim.Adam(distiller.compiler.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(distiller.losses(facts, [], stage=0, k=0)["answer_ce"])
    for _ in range(20):
        loss = distiller.losses(facts, [], stage=0, k=0)["answer_ce"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(distiller.losses(facts, [], stage=0, k=0)["answer_ce"])
    assert after < 0.8 * before, (before, after)  # measured: 5.03 -> 3.55


def test_prepared_inputs_round_trip_through_the_cache(setup, tmp_path, tiny_model_dir):
    from training.amortized.prepared import STUDENT_TENSORS, cache_key, load_prepared, save_prepared

    config, _, table, items, _, _ = setup
    key = cache_key(config, tiny_model_dir, "encoder")
    assert load_prepared(tmp_path, key) is None
    save_prepared(tmp_path, key, table, items)
    loaded_table, loaded_items = load_prepared(tmp_path, key)
    assert (loaded_table.ids, loaded_table.document_rows) == (table.ids, table.document_rows)
    for name in ("states", "embeddings", "mask"):
        assert torch.equal(getattr(loaded_table.features, name), getattr(table.features, name))
    assert torch.equal(loaded_table.groups, table.groups) and torch.equal(loaded_table.types, table.types)
    assert len(loaded_items) == len(items)
    for old, new in zip(items, loaded_items):
        assert (new.id, new.kind, new.split, new.positives, new.gold) == (old.id, old.kind, old.split, old.positives,
                                                                           old.gold)
        assert torch.equal(new.embedding, old.embedding)
        assert (new.student is None) == (old.student is None)
        assert old.student is None or all(torch.equal(getattr(new.student, n), getattr(old.student, n))
                                          for n in STUDENT_TENSORS)
        assert (new.prompt_hidden is None) == (old.prompt_hidden is None)
        assert old.prompt_hidden is None or torch.equal(new.prompt_hidden, old.prompt_hidden)
    assert any(q.student for q in items) and any(q.prompt_hidden is not None for q in items)

    assert cache_key(TrainConfig(**{**config.__dict__, "encoder_layer": 2}), tiny_model_dir, "encoder") != key
    assert cache_key(config, tiny_model_dir, "another encoder") != key
    save_prepared(tmp_path, "newer", table, items[:3])
    assert [p.name for p in tmp_path.iterdir()] == ["newer"]  # one cache per run folder
    (tmp_path / "newer" / "tensors.safetensors").write_bytes(b"damaged")
    assert load_prepared(tmp_path, "newer") is None


def test_train_cli_checkpoint_round_trip_and_resume(tmp_path, dataset, tiny_model_dir, capsys, caplog):
    from training.cli import main

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"data": str(dataset), "model": str(tiny_model_dir), "out": str(tmp_path / "run"),
                                      "steps": 4, "eval_every": 2, "save_every": 2, "gold_only_fraction": 0.5,
                                      "weights": {"gate_l1": 0.02}, **TINY}))
    assert main(["train", "--config", str(config)]) == 0
    checkpoint = Path(capsys.readouterr().out.strip().splitlines()[-1])
    compiler, meta = load_compiler(checkpoint)
    assert meta["step"] == 4 and meta["train"]["weights"]["gate_l1"] == 0.02
    assert not list(checkpoint.parent.glob(".*"))  # atomic swaps leave nothing behind
    again, _ = load_compiler(checkpoint)
    from training.amortized.atom_inputs import AtomInputs

    f = compiler.config.feature_dim
    features = AtomInputs(torch.randn(3, 5, f), torch.randn(3, 5, f), torch.rand(3, 5) > 0.3)
    assert all(torch.equal(x, y) for x, y in zip(compiler(features)[2], again(features)[2]))

    assert len(list((tmp_path / "run" / "prepared").iterdir())) == 1
    with caplog.at_level("INFO", logger="training.amortized.prepared"):
        assert main(["train", "--config", str(config), "--set", "steps=6", "--resume"]) == 0
    assert "loaded prepared inputs" in caplog.text  # the resume skipped preparation
    rows = [line.split(",") for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert load_compiler(checkpoint)[1]["step"] == 6
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))  # curves for TensorBoard

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "CARD.md").write_text("card")
    assert main(["checkpoint", "export", str(checkpoint), str(shipped)]) == 0
    exported, exported_meta = load_compiler(shipped)
    assert "/" not in exported_meta["train"]["data"] + exported_meta["train"]["out"]  # no machine paths shipped
    latest, _ = load_compiler(checkpoint)
    assert all(torch.equal(x, y) for x, y in zip(latest(features)[2], exported(features)[2]))
    assert (shipped / "CARD.md").read_text() == "card"  # files the export does not write are kept
    size = (shipped / "compiler.safetensors").stat().st_size
    assert size < 0.5 * (checkpoint / "compiler.safetensors").stat().st_size  # no optimizer moments
    meta_path = shipped / "checkpoint.json"
    meta_path.write_text(meta_path.read_text().replace('"format_version": 2', '"format_version": 1'))
    with pytest.raises(ValueError, match="format version 1"):
        load_compiler(shipped)
    # Resuming from an old-format checkpoint fails at once, before the data is even read.
    (checkpoint / "checkpoint.json").write_text(meta_path.read_text())
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--set", f"data={tmp_path / 'absent'}", "--resume"]) != 0
    assert "format version 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown settings"):
        config.write_text(yaml.safe_dump({"data": "x", "stepz": 3}))
        TrainConfig.from_file(config)


def test_compile_route_compose_and_peft_match_the_training_path(tmp_path, dataset, tiny_model_dir, capsys):
    """compile -> bank -> router -> composer -> PEFT gives the logits the trainer's LoRA hooks give."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.cli import main
    from training.student import LoRAHooks
    from vllm_doc2atom.bank import AtomBank
    from vllm_doc2atom.composer import compose, save_peft_adapter, stack_factors
    from vllm_doc2atom.encoders import encoder_for
    from vllm_doc2atom.fingerprint import BaseModelFingerprint
    from vllm_doc2atom.router import Router, RouterConfig

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"data": str(dataset), "model": str(tiny_model_dir), "out": str(tmp_path / "run"),
                                      "steps": 2, **TINY}))
    assert main(["train", "--config", str(config)]) == 0
    checkpoint = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["checkpoint", "calibrate", checkpoint, "--data", str(dataset), "--split", "train"]) == 0
    assert "refusal threshold" in capsys.readouterr().out
    calibration = load_compiler(checkpoint)[1]["router_calibration"]
    assert 0.0 < calibration["threshold"] < 1.0 and calibration["refusable"] > 0
    docs = [str(p) for p in sorted(EXAMPLE_DOCS.glob("*.md"))]
    assert main(["compile", *docs, "--mode", "amortized", "--checkpoint", checkpoint,
                 "--out", str(tmp_path / "bank")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 3 and stats["atoms"] > 10 and stats["atoms_per_second"] > 0
    # --add: one more document into the existing bank, the others' shards untouched
    shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "bank" / "shards").iterdir()}
    extra = tmp_path / "extra.md"
    extra.write_text("The Okra Bridge spans the river Tamsel. It was opened in 1911.")
    assert main(["compile", str(extra), "--mode", "amortized", "--checkpoint", checkpoint,
                 "--out", str(tmp_path / "bank"), "--add"]) == 0
    capsys.readouterr()
    grown = AtomBank.load(tmp_path / "bank")
    assert len(grown.document_ids) == 4 and len(grown) > stats["atoms"]
    assert all((tmp_path / "bank" / "shards" / name).stat().st_mtime_ns == t for name, t in shards.items())
    # optimize mode: context distillation brings each atom's adapter closer to the document-reading teacher
    assert main(["compile", docs[0], "--checkpoint", checkpoint, "--out", str(tmp_path / "optimized"),
                 "--mode", "optimize", "--refine-steps", "6", "--refine-lr", "1e-2"]) == 0
    optimized = json.loads(capsys.readouterr().out)
    assert optimized["mode"] == "optimize" and optimized["context_kl_after"] < optimized["context_kl_before"]
    AtomBank.load(tmp_path / "optimized")

    bank = AtomBank.load(tmp_path / "bank", expect_base=BaseModelFingerprint.from_model_dir(tiny_model_dir))
    assert bank.spec.router_head and "+proj-" in bank.spec.key_encoder
    assert bank.spec.router_head["threshold"] == calibration["threshold"]  # the server refuses as calibrated
    router = Router(encoder_for(bank), RouterConfig(threshold_override=0.0, top_k=3))
    result = router.route(bank, "Who wrote the protocol?")
    adapter = compose(bank, result.selection)
    folder = save_peft_adapter(adapter, tmp_path / "adapters")

    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [i for i, _ in adapter.used]
    weights = torch.tensor([w for _, w in adapter.used])
    factors = bank.factors(rows)
    hooks = LoRAHooks(base, bank.spec.targets)
    composed = {t: tuple(x.unsqueeze(0) for x in stack_factors(
        *factors[t], weights * torch.from_numpy(bank.gates[rows, j]) * bank.spec.lora_scaling))
        for j, t in enumerate(bank.spec.targets)}
    with torch.no_grad(), hooks.active(composed):
        hooked = base(ids).logits
    hooks.remove()
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, folder)(ids).logits
    assert (hooked - peft_logits).abs().max() < 1e-5


def test_validation_reports_routing_and_answer_loss_with_and_without_atoms(setup):
    import math

    from training.amortized.validation import VALIDATION_COLUMNS, validate

    distiller, items = _distiller(setup)
    everything = validate(distiller, items, k=100, threshold=0.0)
    assert set(everything) == set(VALIDATION_COLUMNS)
    assert everything["gold_recall"] == 1.0 and everything["false_refusals"] == everything["probe_refusals"] == 0
    assert abs(everything["answer_ce_gold"] - everything["answer_ce_base"]) < 1e-2  # untrained: near no-op
    assert abs(everything["answer_ce_document"] - everything["answer_ce_base"]) < 1e-2
    nothing = validate(distiller, items, k=100, threshold=1.01)
    assert nothing["false_refusals"] == nothing["probe_refusals"] == 1.0 and math.isnan(nothing["answer_ce_routed"])


def test_two_data_parallel_processes_match_one_process(tmp_path, dataset, tiny_model_dir):
    """torchrun --nproc_per_node 2 (gloo) ends with the same weights and logged losses as one process."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    runs = {}
    for name, launcher in [("single", [sys.executable, "-m"]),
                           ("ddp", [str(Path(sys.executable).parent / "torchrun"), "--standalone",
                                    "--nproc_per_node", "2", "-m"])]:
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"data": str(dataset), "model": str(tiny_model_dir), "steps": 3,
                                          "out": str(tmp_path / name), "gold_only_fraction": 0.34,
                                          "eval_every": 100, **TINY}))
        done = subprocess.run([*launcher, "training.cli", "train", "--config", str(config)], capture_output=True,
                              text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = (load_file(str(tmp_path / name / "checkpoint" / "compiler.safetensors")),
                      (tmp_path / name / "metrics.csv").read_text().splitlines())
    (single, single_rows), (ddp, ddp_rows) = runs["single"], runs["ddp"]
    for key, tensor in single.items():
        if key.startswith("model."):
            torch.testing.assert_close(ddp[key], tensor, atol=1e-5, rtol=1e-4, msg=key)
    assert len(single_rows) == len(ddp_rows) == 4
    for a, b in zip(single_rows[1:], ddp_rows[1:]):
        assert abs(float(a.split(",")[3]) - float(b.split(",")[3])) < 1e-4  # total loss per step


def test_learned_router_head_exports_exactly_what_the_server_applies():
    from dataclasses import asdict

    from training.amortized.memory_compiler import TrainableRouterHead
    from vllm_doc2atom.bank_interface import ATOM_TYPES, AtomRecord
    from vllm_doc2atom.router_head import RouterHead

    head = TrainableRouterHead()
    with torch.no_grad():
        head.type_bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, 0.3]))
        head.answer_bearing_bias.fill_(0.7)
        head.confidence_scale.fill_(1.5)
        head.sim_scale.fill_(12.0)
        head.sim_center.fill_(0.4)
    exported = head.export()
    assert RouterHead(**json.loads(json.dumps(asdict(exported)))) == exported  # survives the bank manifest
    for t_index, atom_type in enumerate(ATOM_TYPES):
        for answer_bearing in (False, True):
            atom = AtomRecord(id="a", document_id="d", type=atom_type, text="x", span=(0, 1),
                              answer_bearing=answer_bearing, confidence=0.8)
            with torch.no_grad():
                trained = torch.sigmoid(head(torch.tensor([0.6]), torch.tensor([t_index]),
                                             torch.tensor([float(answer_bearing)]), torch.tensor([0.8])))
            assert abs(exported.weight(0.6, atom, None, stage2=False) - float(trained)) < 1e-6


def test_calibrated_threshold_separates_answerable_from_off_topic_with_the_widest_margin():
    from training.thresholds import best_threshold

    threshold, f1 = best_threshold(answerable=[0.3, 0.8, 0.9], refusable=[0.0, 0.05, 0.1])
    assert f1 == 1.0 and threshold == pytest.approx(0.2)
    # Overlap: refusing every probe costs one answerable question (P 3/4, R 1), better than missing a probe.
    threshold, f1 = best_threshold(answerable=[0.2, 0.8, 0.9], refusable=[0.0, 0.1, 0.6])
    assert threshold == pytest.approx(0.7) and f1 == pytest.approx(6 / 7)
