"""Two ways to get a method's answer to a question: the real served path (`vllm serve --plugin doc2atom`,
queried with the openai SDK: what the README reports) and transformers+PEFT in this process (fast iteration,
no server). Both build the same prompts and use the same banks and adapters."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..data.teacher import teacher_messages
from ..device import DeviceConfig
from .artifacts import artifact_name, lora_name
from .methods import METHODS, Artifact

logger = logging.getLogger(__name__)


@dataclass
class Reply:
    text: str
    flagged_refusal: bool  # doc2atom refused (no atom covers the question): no model call
    seconds: float
    atoms: int = 0  # atoms composed (routed methods)
    prompt_tokens: int = 0  # what the model read (0: refused without a model call)


def messages_for(method: str, document: str, question: str) -> list[dict[str, str]]:
    """ICL reads the document exactly as the teacher did; every other method sees the question alone. The
    evidence methods get ICL's instruction too: the server puts the routed atoms' text where ICL's document is."""
    if method == "icl":
        return teacher_messages(document, question)
    if METHODS[method].evidence:
        return [teacher_messages(document, question)[0], {"role": "user", "content": question}]
    return [{"role": "user", "content": question}]


def answer_tail(decoded: list[str], answer: str) -> int:
    """How many of a prompt's last tokens spell `answer` (the prompt ends with it): the fewest whose text
    holds it."""
    target, tail = answer.strip(), ""
    for n, token in enumerate(reversed(decoded), start=1):
        tail = token + tail
        if target in tail:
            return n
    raise ValueError(f"the prompt does not end with the answer {answer!r}")


class Backend(Protocol):
    def answer(self, method: str, document_id: str, document: str, question: str) -> Reply: ...


class ServedBackend:
    """A running `vllm serve MODEL --plugin doc2atom` over work_dir/banks, the monolithic LoRAs registered
    with `--lora-modules`. Use as a context manager: the server lives as long as the `with` block."""

    def __init__(self, model_dir: Path, work_dir: Path, max_tokens: int, max_lora_rank: int,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.model_dir, self.work_dir, self.max_tokens = model_dir, work_dir, max_tokens
        self.max_lora_rank, self.extra_args = max_lora_rank, extra_args
        self._server = None

    def __enter__(self) -> ServedBackend:
        import openai

        from ..serve_process import vllm_server

        adapters = sorted((self.work_dir / "adapters").glob("*/*")) if (self.work_dir / "adapters").exists() else []
        context = json.loads((self.model_dir / "config.json").read_text()).get("max_position_embeddings", 2048)
        # ICL needs the whole document in the prompt: the model's full context, within reason on a CPU
        args = ["--max-lora-rank", str(self.max_lora_rank), *self.extra_args]
        if adapters:
            args += ["--lora-modules", *(f"{p.name}={p}" for p in adapters)]
        (self.work_dir / "banks").mkdir(parents=True, exist_ok=True)
        self._server = vllm_server(self.model_dir, self.work_dir / "banks", self.work_dir / "serve.log", args,
                                   max_model_len=min(context, 8192))
        url = self._server.__enter__()
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
        self.base_model = self.client.models.list().data[0].id
        return self

    def __exit__(self, *exc) -> None:
        self._server.__exit__(*exc)

    def answer(self, method: str, document_id: str, document: str, question: str) -> Reply:
        model, extra = self.base_model, {}
        entry = METHODS[method]
        if entry.artifact is Artifact.ROUTED:
            extra = {"atom_bank": artifact_name(method, document_id), "atom_evidence": entry.evidence}
        elif entry.artifact is Artifact.MONOLITHIC:
            model = lora_name(method, document_id)
        start = time.perf_counter()
        reply = self.client.chat.completions.create(
            model=model, messages=messages_for(method, document, question), max_tokens=self.max_tokens,
            temperature=0, extra_body=extra or None)
        seconds = time.perf_counter() - start
        provenance = (reply.model_extra or {}).get("doc2atom") or {}
        return Reply(reply.choices[0].message.content or "", bool(provenance.get("refused")), seconds,
                     len(provenance.get("atoms", [])), reply.usage.prompt_tokens if reply.usage else 0)


class TransformersBackend:
    """transformers + PEFT in this process: the router and composer of the plugin, an adapter per answer. The
    base model runs on `device` (default: the CPU, float32); routing stays on the CPU, as served."""

    def __init__(self, model_dir: Path, work_dir: Path, max_tokens: int, max_lora_rank: int, top_k: int,
                 threshold: float | None, device: DeviceConfig | None = None) -> None:
        from transformers import AutoTokenizer

        from vllm_doc2atom.bank_store import BankStore
        from vllm_doc2atom.router import RouterConfig, RouterPool

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.device = device or DeviceConfig()
        self.model = self.device.load_causal_lm(model_dir)
        self.work_dir, self.max_tokens, self.max_lora_rank = work_dir, max_tokens, max_lora_rank
        self.banks = BankStore(work_dir / "banks")
        self.routers = RouterPool(RouterConfig(top_k=top_k, threshold_override=threshold))
        self.scratch = Path(tempfile.mkdtemp(prefix="doc2atom-eval-adapters-"))

    def __enter__(self) -> TransformersBackend:
        return self

    def __exit__(self, *exc) -> None:
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)

    def _prepare(self, method: str, document_id: str, document: str,
                 question: str) -> tuple[Path | None, list[dict[str, str]], int] | None:
        """(the adapter, the messages, atoms composed) that serve `question` by `method`; None: refused."""
        adapter, atoms, evidence = None, 0, []
        entry = METHODS[method]
        if entry.artifact is Artifact.ROUTED:
            from vllm_doc2atom.composer import compose, save_peft_adapter

            bank = self.banks.get(artifact_name(method, document_id))
            result = self.routers.route(bank, question)
            if result.refused:
                return None
            if entry.evidence == "only":  # the base model reads the routed atoms: no adapter
                atoms, evidence = len(result.kept), [r.atom.text for r in result.kept]
            else:
                composed = compose(bank, result.selection, self.max_lora_rank)
                adapter, atoms = save_peft_adapter(composed, self.scratch), len(composed.used)
                if entry.evidence:
                    used = {row for row, _ in composed.used}
                    evidence = [r.atom.text for r in result.kept if r.index in used]
        elif entry.artifact is Artifact.MONOLITHIC:
            adapter = self.work_dir / "adapters" / method / lora_name(method, document_id)
        messages = messages_for(method, document, question)
        if evidence:
            from vllm_doc2atom.openai_io import with_evidence

            messages = with_evidence("chat", {"messages": messages}, evidence)["messages"]
        return adapter, messages, atoms

    def answer(self, method: str, document_id: str, document: str, question: str) -> Reply:
        start = time.perf_counter()
        prepared = self._prepare(method, document_id, document, question)
        if prepared is None:
            from vllm_doc2atom.settings import DEFAULT_REFUSAL

            return Reply(DEFAULT_REFUSAL, True, time.perf_counter() - start)
        adapter, messages, atoms = prepared
        text, prompt_tokens = self._generate(messages, adapter)
        return Reply(text, False, time.perf_counter() - start, atoms, prompt_tokens)

    def gold_nll(self, method: str, document_id: str, document: str, question: str, gold: str) -> float | None:
        """Mean negative log-likelihood per token of `gold` as the whole reply, teacher-forced through the
        method (its routing, adapter and prompt, as `answer`); None when the method refuses the question."""
        import torch

        prepared = self._prepare(method, document_id, document, question)
        if prepared is None:
            return None
        adapter, messages, _ = prepared
        ids = self.tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": gold}],
                                                 continue_final_message=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"].to(self.device.torch_device)
        with self._adapted(adapter) as model, torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        scored = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        n = answer_tail([self.tokenizer.decode([t]) for t in targets.tolist()], gold)
        return -sum(scored[-n:]) / n

    @contextmanager
    def _adapted(self, adapter: Path | None):
        """The base model with `adapter` loaded for the block, then the plain base model again."""
        from peft import PeftModel

        if adapter is None:
            yield self.model
            return
        model = PeftModel.from_pretrained(self.model, adapter)
        try:
            yield model
        finally:
            model.unload()

    def _generate(self, messages: list[dict[str, str]], adapter: Path | None) -> tuple[str, int]:
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"].to(self.device.torch_device)
        with self._adapted(adapter) as model, torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=self.max_tokens, do_sample=False,
                                 pad_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1]
