"""Composition: rank budget, content-hash identity, and exactness against hand-merged weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vllm_doc2atom.bank import AtomBank
from vllm_doc2atom.composer import adapter_identity, compose, fit_rank_budget, save_peft_adapter
from vllm_doc2atom.fingerprint import module_path

from .conftest import make_document, make_spec


def test_rank_budget_keeps_the_heaviest_atoms_in_canonical_order():
    used, dropped = fit_rank_budget([(7, 0.9), (2, 0.5), (4, 0.95), (1, 0.0004), (3, 0.6)], micro_rank=4, max_rank=8)
    assert used == [(4, 0.95), (7, 0.9)]  # rank 8 fits two rank-4 atoms, sorted by row
    assert dropped == [(3, 0.6), (2, 0.5)]  # (1, 0.0004) rounds to 0 and is not an atom of the adapter
    assert fit_rank_budget([(3, 0.12345)], 2, None) == ([(3, 0.123)], [])
    with pytest.raises(ValueError, match="twice"):
        fit_rank_budget([(1, 0.5), (1, 0.6)], 2, None)


def test_identity_is_a_content_hash_stable_across_processes():
    used = [(1, 0.5), (4, 0.25)]
    name, int_id = adapter_identity("bank-sha", used)
    code = ("from vllm_doc2atom.composer import adapter_identity;"
            "print(*adapter_identity('bank-sha', [(1, 0.5), (4, 0.25)]))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert other == [name, str(int_id)]
    assert 0 < int_id < 2**53 and name.startswith("d2a-")
    assert adapter_identity("bank-sha", [(1, 0.5), (4, 0.26)])[0] != name
    assert adapter_identity("other-bank", used)[0] != name


def test_composed_shapes_and_rank(bank):
    adapter = compose(bank, [(0, 0.9), (4, 0.7), (6, 0.4)], max_rank=4)
    r = bank.spec.micro_rank
    assert adapter.rank == 2 * r and [i for i, _ in adapter.used] == [0, 4] and adapter.dropped == [(6, 0.4)]
    assert adapter.config["r"] == adapter.config["lora_alpha"] == adapter.rank
    for target in bank.spec.targets:
        d_in, d_out = bank.spec.base_model.module_shape(target.module)
        prefix = f"base_model.model.{module_path(target.module, target.layer)}"
        assert adapter.tensors[f"{prefix}.lora_A.weight"].shape == (adapter.rank, d_in)
        assert adapter.tensors[f"{prefix}.lora_B.weight"].shape == (d_out, adapter.rank)
    assert len(adapter.tensors) == 2 * len(bank.spec.targets)
    with pytest.raises(ValueError, match="nothing to compose"):
        compose(bank, [(0, 0.0)])


def _hand_merged_logits(model_dir, bank, used, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [i for i, _ in used]
    factors = bank.factors(rows)
    with torch.no_grad():
        for t_no, target in enumerate(bank.spec.targets):
            a, b = factors[target]
            delta = sum(w * float(bank.gates[row, t_no]) * bank.spec.lora_scaling * (b[k] @ a[k])
                        for k, (row, w) in enumerate(used))
            model.get_submodule(module_path(target.module, target.layer)).weight += delta
        return model(input_ids).logits


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_peft_adapter_equals_hand_merged_weights(tmp_path, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.models import build_tiny_model

    model_dir = build_tiny_model(tmp_path / arch, arch=arch)
    spec = make_spec(model_dir, modules=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"), layers=(1, 3))
    # Large factors so a wrong composition would show far above the tolerance.
    docs = [make_document(spec, "a", 3, seed=1, scale=0.3), make_document(spec, "b", 2, seed=2, scale=0.3)]
    bank = AtomBank.create(tmp_path / "bank", spec, docs)
    adapter = compose(bank, [(0, 0.8), (3, 0.55), (4, 1.0)])
    folder = save_peft_adapter(adapter, tmp_path / "adapters")

    input_ids = torch.tensor([[1, 5, 9, 42, 7, 100, 3]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        base_logits = base(input_ids).logits
        peft_logits = PeftModel.from_pretrained(base, folder)(input_ids).logits
    manual_logits = _hand_merged_logits(model_dir, bank, adapter.used, input_ids)
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter does change the model
    assert (peft_logits - manual_logits).abs().max() < 1e-4


def test_saved_adapter_is_content_addressed_and_vllm_accepts_it(tmp_path, bank):
    adapter = compose(bank, [(1, 0.6), (5, 0.9)])
    root = tmp_path / "adapters"
    folder = save_peft_adapter(adapter, root)
    assert folder.name == adapter.name
    mtime = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    assert save_peft_adapter(adapter, root) == folder  # reused, not rewritten
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in root.iterdir()) == [adapter.name]
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == adapter.rank

    # vLLM's own loader: config validation, then the tensors mapped onto its (packed) modules.
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(folder), max_position_embeddings=1024)
    helper.validate_legal(LoRAConfig(max_lora_rank=8))
    with pytest.raises(ValueError, match="greater than max_lora_rank"):
        helper.validate_legal(LoRAConfig(max_lora_rank=1))
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    lora = LoRAModel.from_local_checkpoint(str(folder), expected, helper, lora_model_id=adapter.int_id,
                                           device="cpu", dtype=torch.float32)
    assert lora.rank == adapter.rank
    assert set(lora.loras) == {module_path(t.module, t.layer) for t in bank.spec.targets}
