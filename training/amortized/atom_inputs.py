"""What the memory compiler reads of each atom (`AtomInputs`), computed from one reading of its document."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

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
        fields = ("states", "embeddings", "mask")
        return AtomInputs(*(torch.cat([pad(getattr(p, f)) for p in parts]) for f in fields))


@torch.no_grad()
def atom_features(model: nn.Module, tokenizer, document: str, spans: Sequence[tuple[int, int]],
                  layer: int) -> AtomInputs:
    """The compiler's inputs for each atom (by character span) of one document. The document is read once, in
    windows of the model's context size, so every atom's states carry their context. The model may be on any
    device, in any dtype: the inputs come back float32, on the CPU."""
    encoding = tokenizer(document, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    hidden = model.config.hidden_size
    window = min(getattr(model.config, "max_position_embeddings", 2048), 2048)
    device = next(model.parameters()).device

    def read(window_ids: list[int]) -> torch.Tensor:  # one window's layer-`layer` states [t, H]
        out = model(input_ids=torch.tensor([window_ids], device=device), output_hidden_states=True)
        return out.hidden_states[layer][0]

    states = torch.cat([read(ids[i : i + window]) for i in range(0, max(len(ids), 1), window)]) if ids else None
    embed = model.get_input_embeddings()
    rows = [[i for i, (s, e) in enumerate(offsets) if s < end and start < e][:MAX_ATOM_TOKENS]
            for start, end in spans]
    width = max([len(r) for r in rows] + [1])
    out = AtomInputs(torch.zeros(len(spans), width, hidden), torch.zeros(len(spans), width, hidden),
                     torch.zeros(len(spans), width, dtype=torch.bool))
    for n, tokens in enumerate(rows):
        if states is not None and tokens:
            out.states[n, : len(tokens)] = states[tokens].float().cpu()
            token_ids = torch.tensor([ids[t] for t in tokens], device=device)
            out.embeddings[n, : len(tokens)] = embed(token_ids).float().cpu()
            out.mask[n, : len(tokens)] = True
    return out
