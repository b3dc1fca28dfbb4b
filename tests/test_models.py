"""Models built from packages: the tiny test models and the packaged default (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import time

import pytest
import torch

from vllm_doc2atom.fingerprint import BaseModelFingerprint


@pytest.mark.portable
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tiny_model_generates_with_a_real_tokenizer_and_chat_template(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.models import build_tiny_model

    path = build_tiny_model(tmp_path / arch, arch=arch, num_layers=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    text = "What is the capital of the country?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    fingerprint = BaseModelFingerprint.from_model_dir(path)
    assert (fingerprint.head_dim, fingerprint.num_layers, fingerprint.architecture) == (
        64, 2, {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM"}[arch])


def test_prepare_default_model_is_idempotent_and_loads():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.models import COMPLETE_MARKER, prepare_model

    path = prepare_model()  # shares the user's cache (DOC2ATOM_CACHE) with `make demo`
    assert (path / COMPLETE_MARKER).is_file()
    start = time.perf_counter()
    assert prepare_model() == path
    assert time.perf_counter() - start < 1.0  # second call finds it ready
    fingerprint = BaseModelFingerprint.from_model_dir(path)
    assert (fingerprint.architecture, fingerprint.num_layers, fingerprint.hidden_size, fingerprint.head_dim) == (
        "LlamaForCausalLM", 30, 576, 64)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def test_unknown_model_name_is_a_clear_error():
    from training.models import prepare_model

    with pytest.raises(ValueError, match="unknown model 'gpt-5'.*smollm2-135m-instruct"):
        prepare_model("gpt-5")


@pytest.mark.portable
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fits_make_logits_as_the_model_does(tmp_path, arch):
    """The fit reads logits from the last hidden states itself: Gemma-2's final soft cap must be applied."""
    from transformers import AutoModelForCausalLM

    from training.models import build_tiny_model
    from training.student import output_logits

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / arch, arch=arch, num_layers=2))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(200.0)  # logits far beyond Gemma-2's cap of 30
        out = model(input_ids=torch.tensor([[5, 9, 14, 3]]), output_hidden_states=True)
        logits = output_logits(model, out.hidden_states[-1])
    assert out.logits.abs().max() > (29.0 if arch == "gemma2" else 30.0)
    torch.testing.assert_close(logits, out.logits, rtol=1e-4, atol=1e-3)
