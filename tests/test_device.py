"""`--device` / `--dtype` (training/device.py): resolved and checked before any model loads, the same code
path on the CPU and a GPU, float32 factors whatever the base model's dtype. Portable: no vLLM, no packaged
models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.device import DeviceConfig
from training.inputs import InputError

pytestmark = pytest.mark.portable

GPU = torch.cuda.is_available()


def test_auto_picks_the_gpu_in_bfloat16_when_there_is_one_else_the_cpu_in_float32():
    expected = ("cpu", "float32")
    if GPU:
        expected = ("cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    resolved = DeviceConfig.from_flags("auto", "auto")
    assert (resolved.device, resolved.dtype) == expected
    assert DeviceConfig() == DeviceConfig.from_flags("cpu", "auto") == DeviceConfig("cpu", "float32")
    assert DeviceConfig.from_flags(" CPU ", "bfloat16") == DeviceConfig("cpu", "bfloat16")  # slow, allowed
    assert DeviceConfig().describe() == {"device": "cpu", "dtype": "float32"}


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_an_input_error_naming_the_flag(device):
    with pytest.raises(InputError, match=rf"--device {device}: torch sees no CUDA GPU.*use --device cpu"):
        DeviceConfig.from_flags(device)


def test_unknown_devices_and_dtypes_are_input_errors_naming_the_flag():
    with pytest.raises(InputError, match=r"--device gpu: choose auto, cpu, cuda, cuda:N"):
        DeviceConfig.from_flags("gpu")
    with pytest.raises(InputError, match=r"--device cuda:x: choose"):
        DeviceConfig.from_flags("cuda:x")
    with pytest.raises(InputError, match=r"--dtype float16: choose auto, float32, bfloat16"):
        DeviceConfig.from_flags("cpu", "float16")
    if GPU:
        with pytest.raises(InputError, match=r"--device cuda:99: this machine has \d+ CUDA GPU"):
            DeviceConfig.from_flags("cuda:99")


def test_batches_keep_their_cpu_size_on_the_cpu():
    assert DeviceConfig().rows_that_fit(32, bytes_per_row=1.0) == 32
    if GPU:  # a GPU takes what fits in half its free memory, never fewer than the CPU's
        assert DeviceConfig("cuda").rows_that_fit(32, bytes_per_row=1.0, max_rows=300) == 300
        assert DeviceConfig("cuda").rows_that_fit(32, bytes_per_row=1e15) == 32


def test_factors_fit_in_float32_on_a_bfloat16_base_model(tiny_model_dir):
    """The LoRA hooks run the factors in float32 and add their result in the layer's dtype: gradients reach
    float32 master weights, and the fit's factors come back float32 on the CPU."""
    from training.student import LoRAHooks, run_last_layers
    from training.study.fit import Example, FitConfig, fit_document
    from vllm_doc2atom.bank_interface import Target

    device = DeviceConfig.from_flags("auto", "bfloat16")
    model = device.load_causal_lm(tiny_model_dir)
    assert model.dtype == torch.bfloat16 and not any(p.requires_grad for p in model.parameters())
    target = Target("down_proj", 3)
    hooks = LoRAHooks(model, [target])
    a = torch.randn(1, 2, 256, device=device.torch_device, requires_grad=True)
    b = torch.randn(1, 128, 2, device=device.torch_device, requires_grad=True)
    hidden = torch.randn(1, 5, 128, device=device.torch_device)  # float32 states: run in the model's dtype
    with hooks.active({target: (a, b)}):
        out = run_last_layers(model, hidden, 2)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and torch.isfinite(b.grad).all()
    hooks.remove()

    answer = torch.tensor([5, 6, 7])
    ids = torch.full((3, 2), -1)
    ids[:, 0] = answer
    examples = [Example(0, [1, 7, 9], answer, ids, torch.zeros(3, 2))]
    result = fit_document(model, [target], 1, 2, 1.0, examples, {"down_proj": (256, 128)},
                          FitConfig(steps=3, batch_size=1))
    assert result.a[target].dtype == result.b[target].dtype == torch.float32
    assert result.a[target].device.type == "cpu" and result.b[target].abs().sum() > 0


def test_a_bfloat16_compile_writes_a_float32_bank_that_loads_and_has_its_own_cache(tmp_path, monkeypatch,
                                                                                  capsys, tiny_model_dir):
    """`doc2atom compile --dtype bfloat16` (on the GPU when there is one; where the packaged sentence encoder
    is missing, a random stand-in of its shape: benchmarks/stand_ins.py)."""
    from training.cli import main
    from vllm_doc2atom.bank import AtomBank

    from .conftest import EXAMPLE_DOCS

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from stand_ins import sentence_encoder

    monkeypatch.setenv("DOC2ATOM_CACHE", str(tmp_path / "cache"))
    doc = EXAMPLE_DOCS / "harbor_of_quillon.md"
    common = [str(doc), "--model", str(tiny_model_dir), "--steps", "2", "--reranker", "none", "--layers", "1"]
    with sentence_encoder("auto", [doc.read_text()]):
        assert main(["compile", *common, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
        stats = json.loads(capsys.readouterr().out)
        # float32 answers and fits differ from bfloat16 ones: not taken from the bfloat16 cache
        assert main(["compile", *common, "--out", str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
        again = json.loads(capsys.readouterr().out)
    assert stats["dtype"] == "bfloat16" and stats["device"].startswith("cuda" if GPU else "cpu")
    assert again["dtype"] == "float32" and again["stage_seconds"]["cached_documents"] == 0
    bank = AtomBank.load(tmp_path / "bf16")
    factors = bank.factors([0])[bank.spec.targets[0]]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in factors)
    # interchangeable: the same spec, the same bytes per atom (float32 shards either way)
    assert AtomBank.load(tmp_path / "fp32").spec == bank.spec
    assert again["bytes_per_atom"] == stats["bytes_per_atom"]


def test_cuda_flag_without_a_gpu_is_refused_before_anything_is_read(tmp_path, capsys):
    if GPU:
        pytest.skip("this machine has a GPU")
    from training.cli import main

    args = ["compile", str(tmp_path / "missing.md"), "--out", str(tmp_path / "bank"), "--device", "cuda"]
    assert main(args) == 2
    assert "--device cuda: torch sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "bank").exists()
