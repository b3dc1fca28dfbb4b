"""The frozen base model as a student: cached inputs, the last N layers with per-sample LoRAs, features.

Gradients only need the adapted (last N) layers, so the hidden states entering layer L-N are computed once
per question (prompt + teacher answer) and cached; a training step runs N layers + the LM head. Each sample
of a batch carries its own composed LoRA, applied by forward hooks on the target linears:
    y = W x + B_b (A_b x)       A_b [R, in], B_b [out, R] (stacked by vllm_doc2atom.composer.stack_factors)
which is what PEFT and vLLM compute for the same adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vllm_doc2atom.bank_interface import Target
from vllm_doc2atom.fingerprint import module_path


class LoRAHooks:
    """Per-sample LoRA on the target linears of a frozen model; inactive while `factors` is None."""

    def __init__(self, model: nn.Module, targets: Sequence[Target]) -> None:
        self.factors: dict[Target, tuple[torch.Tensor, torch.Tensor]] | None = None  # A [b, R, in], B [b, out, R]
        self._handles = [model.get_submodule(module_path(t.module, t.layer)).register_forward_hook(self._hook(t))
                         for t in targets]

    def _hook(self, target: Target):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self.factors is None or target not in self.factors:
                return output
            a, b = self.factors[target]
            return output + (inputs[0] @ a.transpose(-1, -2)) @ b.transpose(-1, -2)

        return hook

    @contextmanager
    def active(self, factors: dict[Target, tuple[torch.Tensor, torch.Tensor]] | None):
        previous, self.factors = self.factors, factors
        try:
            yield
        finally:
            self.factors = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def run_last_layers(model: nn.Module, hidden: torch.Tensor, start_layer: int) -> torch.Tensor:
    """hidden [b, t, H] entering layer `start_layer` -> final-normed hidden states [b, t, H].

    Sequences are right-padded, so the causal mask alone keeps real positions exact."""
    inner = model.model
    positions = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
    rotary = inner.rotary_emb(hidden, positions)
    for layer in inner.layers[start_layer:]:
        out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        hidden = out[0] if isinstance(out, tuple) else out
    return inner.norm(hidden)


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


MAX_ATOM_TOKENS = 128  # longer atoms (big chunks) are read in full but give the compiler their first tokens


@dataclass
class AtomInputs:
    """What the compiler reads of each atom: its tokens' layer-L states (read in the document's context), their
    input embeddings (the identity of each token, which the factors can copy), and the mean state."""

    states: torch.Tensor  # [n, t, H] zero-padded
    embeddings: torch.Tensor  # [n, t, H]
    mask: torch.Tensor  # [n, t] True on real tokens

    @property
    def pooled(self) -> torch.Tensor:
        """Mean state over each atom's tokens: [n, H]."""
        m = self.mask.unsqueeze(-1).float()
        return (self.states * m).sum(1) / m.sum(1).clamp(min=1.0)

    def __getitem__(self, rows) -> AtomInputs:
        return AtomInputs(self.states[rows], self.embeddings[rows], self.mask[rows])

    def __len__(self) -> int:
        return self.states.shape[0]

    @staticmethod
    def cat(parts: Sequence[AtomInputs]) -> AtomInputs:
        """Several documents' inputs as one batch, padded to the longest atom."""
        width = max(p.mask.shape[1] for p in parts)
        pad = lambda x: nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]))  # noqa: E731
        return AtomInputs(*(torch.cat([pad(getattr(p, f)) for p in parts]) for f in ("states", "embeddings", "mask")))


@torch.no_grad()
def atom_features(model: nn.Module, tokenizer, document: str, spans: Sequence[tuple[int, int]],
                  layer: int) -> AtomInputs:
    """The compiler's inputs for each atom (by character span) of one document. The document is read once, in
    windows of the model's context size, so every atom's states carry their context."""
    encoding = tokenizer(document, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    hidden = model.config.hidden_size
    window = min(getattr(model.config, "max_position_embeddings", 2048), 2048)
    states = torch.cat([model(input_ids=torch.tensor([ids[i : i + window]]), output_hidden_states=True)
                        .hidden_states[layer][0] for i in range(0, max(len(ids), 1), window)]) if ids else None
    embed = model.get_input_embeddings()
    rows = [[i for i, (s, e) in enumerate(offsets) if s < end and start < e][:MAX_ATOM_TOKENS]
            for start, end in spans]
    width = max([len(r) for r in rows] + [1])
    out = AtomInputs(torch.zeros(len(spans), width, hidden), torch.zeros(len(spans), width, hidden),
                     torch.zeros(len(spans), width, dtype=torch.bool))
    for n, tokens in enumerate(rows):
        if states is not None and tokens:
            out.states[n, : len(tokens)] = states[tokens].float()
            out.embeddings[n, : len(tokens)] = embed(torch.tensor([ids[t] for t in tokens])).float()
            out.mask[n, : len(tokens)] = True
    return out
