"""Teacher targets: the base model's answer WITH the document in context, plus its top-k log-probabilities
per answer token, cached on disk with resume. Probes get the refusal message as a one-hot target.

    OUT/teacher/index.jsonl                 one line per question: id, part, offset, length, answer, refusal
    OUT/teacher/part-<id>.safetensors       tokens [T] int64, topk_ids [T, k] int64, topk_logprobs [T, k] float32

A part is written (atomically) before its index lines are appended, so an interrupted run resumes where
it stopped and never reads half a part. vLLM's offline engine generates when it is installed; transformers
otherwise, on the device and in the dtype of `device` / `dtype` (`training.device`; vLLM takes an explicit
dtype and places itself).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vllm_doc2atom.files import atomic_file
from vllm_doc2atom.settings import DEFAULT_REFUSAL

from .records import ANSWERABLE, Document, Question

logger = logging.getLogger(__name__)

TEACHER_SYSTEM = "Answer the question with a short phrase taken from the document."


@dataclass
class TeacherConfig:
    model: str  # base model folder
    top_k: int = 16  # log-probabilities kept per answer token
    max_new_tokens: int = 48
    backend: str = "auto"  # "vllm", "transformers", or "auto": vllm when importable and the job is big enough
    vllm_min_questions: int = 64  # vLLM's start-up (~2 min on a CPU) pays off above this many answers
    chunk_size: int = 64  # questions per part file (the resume granularity)
    max_model_len: int = 4096
    refusal: str = DEFAULT_REFUSAL  # target answer of probes
    device: str = "auto"  # transformers backend: auto, cpu, cuda or cuda:N (training.device)
    dtype: str = "auto"  # auto, float32 or bfloat16 (vLLM: passed on unless auto)


@dataclass
class TeacherTarget:
    tokens: list[int]
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]


def teacher_messages(document: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": TEACHER_SYSTEM},
            {"role": "user", "content": f"Document:\n{document}\n\nQuestion: {question}"}]


def build_teacher_targets(questions: Sequence[Question], documents: dict[str, Document], out_dir: Path,
                          config: TeacherConfig) -> dict[str, Any]:
    """Generate targets for every question not yet in out_dir's index; returns counts and speed."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / "index.jsonl"
    done = {json.loads(line)["question_id"] for line in index_path.open()} if index_path.exists() else set()
    todo = [q for q in questions if q.id not in done]
    if not todo:
        return {"generated": 0, "cached": len(done)}
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    generate = _generator(config, tokenizer, sum(q.kind == ANSWERABLE for q in todo))
    start, generated, answer_tokens = time.perf_counter(), 0, 0
    with contextlib.closing(generate), tqdm(total=len(todo), desc="teacher targets", unit="q") as bar:
        for chunk in _chunks(todo, config.chunk_size):
            answerable = [q for q in chunk if q.kind == ANSWERABLE]
            prompts = [tokenizer.apply_chat_template(teacher_messages(documents[q.document_id].text, q.question),
                                                     tokenize=False, add_generation_prompt=True) for q in answerable]
            targets = dict(zip([q.id for q in answerable], generate(prompts) if prompts else []))
            refusal = _one_hot(tokenizer(config.refusal, add_special_tokens=False)["input_ids"], config.top_k)
            records = [(q, targets.get(q.id, refusal), q.kind != ANSWERABLE) for q in chunk]
            _write_part(out_dir, records, tokenizer, config.top_k)
            generated += len(answerable)
            answer_tokens += sum(len(targets[q.id].tokens) for q in answerable)
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    stats = {"generated": generated, "refusal_targets": len(todo) - generated, "cached": len(done),
             "seconds": round(seconds, 2), "answers_per_second": round(generated / max(seconds, 1e-9), 3),
             "answer_tokens": answer_tokens, "backend": generate.backend, **generate.placement}
    logger.info("teacher: %s", stats)
    return stats


def load_teacher_targets(out_dir: Path) -> dict[str, dict[str, Any]]:
    """question id -> {answer, refusal, tokens [n], topk_ids [n, k], topk_logprobs [n, k]}."""
    from safetensors.torch import load_file

    parts: dict[str, dict[str, torch.Tensor]] = {}
    targets = {}
    for line in (out_dir / "index.jsonl").open():
        entry = json.loads(line)
        part = parts.setdefault(entry["part"], load_file(str(out_dir / entry["part"])))
        rows = slice(entry["offset"], entry["offset"] + entry["length"])
        targets[entry["question_id"]] = {"answer": entry["answer"], "refusal": entry["refusal"],
                                         **{name: tensor[rows] for name, tensor in part.items()}}
    return targets


# ---- generation backends ------------------------------------------------------------------------------


class _Generator:
    """prompts -> targets, with the backend's name and a close() that frees it (vLLM's engine processes);
    placement: where the transformers backend ran (device, dtype)."""

    def __init__(self, backend: str, generate, close=lambda: None, placement: dict | None = None) -> None:
        self.backend, self._generate, self._close = backend, generate, close
        self.placement = placement or {}

    def __call__(self, prompts: list[str]) -> list[TeacherTarget]:
        return self._generate(prompts)

    def close(self) -> None:
        self._close()


def _generator(config: TeacherConfig, tokenizer, answers: int) -> _Generator:
    backend = config.backend
    if backend == "auto":
        backend = "transformers"
        if answers >= config.vllm_min_questions:
            try:
                import vllm  # noqa: F401
                backend = "vllm"
            except ImportError:
                pass
    return _vllm_generator(config) if backend == "vllm" else _transformers_generator(config, tokenizer)


def _vllm_generator(config: TeacherConfig):
    from vllm import LLM, SamplingParams

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    dtype = {} if config.dtype == "auto" else {"dtype": config.dtype}
    llm = LLM(model=config.model, max_model_len=config.max_model_len, gpu_memory_utilization=0.3, seed=0,
              max_logprobs=config.top_k, **dtype)
    params = SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens, logprobs=config.top_k)

    def generate(prompts: list[str]) -> list[TeacherTarget]:
        results = []
        for output in llm.generate(prompts, params, use_tqdm=False):
            completion = output.outputs[0]
            ids, logprobs = [], []
            for step in completion.logprobs:  # {token id: Logprob}, the sampled token may be an extra entry
                best = sorted(step.items(), key=lambda kv: kv[1].logprob, reverse=True)[: config.top_k]
                ids.append([t for t, _ in best])
                logprobs.append([lp.logprob for _, lp in best])
            results.append(TeacherTarget(list(completion.token_ids), ids, logprobs))
        return results

    return _Generator("vllm", generate, close=llm.llm_engine.engine_core.shutdown)


def _transformers_generator(config: TeacherConfig, tokenizer):
    from ..device import DeviceConfig

    device = DeviceConfig.from_flags(config.device, config.dtype)
    model = device.load_causal_lm(config.model)

    @torch.no_grad()
    def generate(prompts: list[str]) -> list[TeacherTarget]:
        results = []
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device.torch_device)
            out = model.generate(**inputs, max_new_tokens=config.max_new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            logprobs = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)  # [n, vocab]
            top = logprobs.topk(config.top_k, dim=-1)  # .tolist() below brings it to the CPU
            results.append(TeacherTarget(tokens, top.indices.tolist(), top.values.tolist()))
        return results

    return _Generator("transformers", generate, placement=device.describe())


# ---- storage ------------------------------------------------------------------------------------------


def _one_hot(tokens: list[int], k: int) -> TeacherTarget:
    return TeacherTarget(tokens, [[t] + [-1] * (k - 1) for t in tokens], [[0.0] + [-math.inf] * (k - 1)
                                                                          for _ in tokens])


def _write_part(out_dir: Path, records: list[tuple[Question, TeacherTarget, bool]], tokenizer, k: int) -> None:
    from safetensors.torch import save_file

    name = f"part-{uuid.uuid4().hex[:12]}.safetensors"
    tokens, ids, logprobs, lines, offset = [], [], [], [], 0
    for question, target, refusal in records:
        tokens += target.tokens
        ids += target.topk_ids
        logprobs += target.topk_logprobs
        answer = tokenizer.decode(target.tokens, skip_special_tokens=True).strip()
        lines.append(json.dumps({"question_id": question.id, "part": name, "offset": offset,
                                 "length": len(target.tokens), "answer": answer, "refusal": refusal}))
        offset += len(target.tokens)
    with atomic_file(out_dir / name) as tmp:
        save_file({"tokens": torch.tensor(tokens, dtype=torch.int64).reshape(-1),
                   "topk_ids": torch.tensor(ids, dtype=torch.int64).reshape(len(tokens), k),
                   "topk_logprobs": torch.tensor(logprobs, dtype=torch.float32).reshape(len(tokens), k)}, str(tmp))
    with open(out_dir / "index.jsonl", "a", encoding="utf-8") as index:
        index.write("\n".join(lines) + "\n")
        index.flush()
        os.fsync(index.fileno())


def _chunks(items: Sequence[Question], size: int) -> Iterator[Sequence[Question]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
