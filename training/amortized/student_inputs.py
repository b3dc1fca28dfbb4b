"""The amortized trainer's cached student inputs: each question's prompt + teacher answer, run once through the
frozen base model up to the first adapted layer, with the teacher's top-k targets and the gold-answer tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StudentExample:
    """One question's cached student input: hidden states entering the first adapted layer."""

    question_id: str
    hidden: torch.Tensor  # [t, H]
    answer_positions: torch.Tensor  # positions whose next-token prediction is an answer token [n]
    answer_tokens: torch.Tensor  # [n]
    topk_ids: torch.Tensor  # [n, k] teacher's top-k (-1 = none)
    topk_logprobs: torch.Tensor  # [n, k]
    fact_mask: torch.Tensor  # [n] bool: the answer tokens that spell a gold answer (the fact, not the template)


def student_prompt_ids(tokenizer, question: str) -> list[int]:
    """The prompt vLLM builds for a chat request with this single user message (no document)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@torch.no_grad()
def encode_students(model: nn.Module, tokenizer, questions: Sequence[tuple[str, str, list[str]]], targets: dict,
                    start_layer: int) -> list[StudentExample]:
    """(question id, text, gold answers) + teacher targets -> cached hidden states entering `start_layer`."""
    from tqdm import tqdm

    examples = []
    for qid, text, answers in tqdm(questions, desc="student states", unit="q"):
        target = targets[qid]
        prompt = student_prompt_ids(tokenizer, text)
        answer = target["tokens"].long()
        ids = torch.tensor([prompt + answer.tolist()])
        states = model(input_ids=ids, output_hidden_states=True).hidden_states[start_layer][0]
        n = len(answer)
        examples.append(StudentExample(qid, states.float(), torch.arange(len(prompt) - 1, len(prompt) - 1 + n),
                                       answer, target["topk_ids"].long(), target["topk_logprobs"].float(),
                                       gold_token_mask(tokenizer, answer.tolist(), answers)))
    return examples


def gold_token_mask(tokenizer, tokens: list[int], answers: Sequence[str]) -> torch.Tensor:
    """True on the tokens of a reply that spell a gold answer (case-insensitive): [len(tokens)] bool.

    The teacher answers in full sentences; most of their tokens restate the question, so an unweighted loss is
    dominated by the template and barely sees the fact. Weighting these tokens points the loss at the fact."""
    pieces = [tokenizer.decode(tokens[: i + 1]) for i in range(len(tokens))]
    ends = [len(p) for p in pieces]  # character end of each token in the decoded reply
    text = pieces[-1].lower() if pieces else ""
    mask = torch.zeros(len(tokens), dtype=torch.bool)
    for answer in answers:
        start = text.find(answer.strip().lower()) if answer.strip() else -1
        if start < 0:
            continue
        stop = start + len(answer.strip())
        for i, end in enumerate(ends):
            begin = ends[i - 1] if i else 0
            if begin < stop and start < end:
                mask[i] = True
    return mask
