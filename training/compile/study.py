"""Compile mode `study`: every atom's micro-LoRA is fitted at compile time by self-study — no trained compiler.

Per document: study questions for each atom (rules + the base model, `training.study.questions`), the base model
READING the document answers them (the teacher, top-k log-probabilities kept), and the document's atoms are fitted
together so that the base model WITHOUT the document, with the atoms composed as the server will compose them,
answers the same (`training.study.fit`). Keys are the sentence encoder's embeddings of the atoms' routing text
(no trained projection). The study questions are routed as the server will route them — stage 1, then the
shipped reranker (`study_routing.py`) — and the atoms fitted in those compositions; the refusal threshold is
calibrated on the reranker's scores of the bank's own study questions against off-topic probes.

Questions + teacher answers and fitted factors are cached by content under $DOC2ATOM_CACHE/study, so a rerun or
`compile --add` skips the documents already done.

The base model runs on the device and in the dtype of a `training.device.DeviceConfig` (default: the CPU in
float32); the factors are fitted and stored in float32 either way. A dtype other than float32 is part of the
cache key (it changes the answers and the fit); the device is not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vllm_doc2atom.bank import AtomBank
from vllm_doc2atom.bank_interface import AtomRecord, BankSpec, DocumentAtoms, Target
from vllm_doc2atom.files import atomic_file, atomic_write_text
from vllm_doc2atom.fingerprint import MODULE_PARENTS, BaseModelFingerprint

from ..data.teacher import teacher_messages
from ..device import DeviceConfig
from ..inputs import InputError
from ..models import cache_root
from ..student import LoRAHooks
from ..study import questions as q
from ..study.fit import Example, FitConfig, fit_document
from ..study.general_probes import OFF_TOPIC_PROBES
from ..study.generation import chat_prompt_ids, end_of_turn_id, generate
from ..thresholds import refusal_threshold
from .documents import make_atomizer
from .study_routing import StudyRouter, study_router

logger = logging.getLogger(__name__)

STUDY_VERSION = 4  # bump when cached questions, answers or factors would change for the same inputs
FIXED_ANSWER_TOKENS = 48  # an atom's own text as an answer: longer ones are cut (and then not taught to stop)


@dataclass
class StudyConfig:
    modules: tuple[str, ...] = ("down_proj",)  # adapted linears in each adapted layer
    last_layers: int = 4  # adapt the last N decoder layers (training runs only these: cost grows with N)
    rank: int = 8  # micro rank per atom (the adapter-shape sweep: see benchmarks/study_shapes.py)
    span_questions: int = 3  # rule-made questions per atom (one per answer span)
    clipped_questions: bool = False  # each span question again, ending with the asked span's clause
    span_answer: str = "atom"  # span questions are answered by "atom" (its text: it states the span)
    # or by the "teacher"
    # questions sampled from the base model per atom (kept only if well-formed): SmolLM2-135M's are mostly
    # unusable and cost ~1.8 s per atom, so off; a base model that writes good questions may gain from them
    model_questions: int = 0
    recital: bool = True  # "what does the document say about <subject>, starting with ..." -> the atom's text
    protection: int = 8  # unrelated prompts per document whose base-model answers the atoms must not change
    max_answer_tokens: int = 20  # teacher answer length (the fact comes first; later tokens are chatter)
    top_k: int = 8  # teacher log-probabilities kept per answer token
    fit: FitConfig = field(default_factory=FitConfig)
    cache: bool = True

    def __post_init__(self) -> None:  # refused before any model loads
        unknown = [m for m in self.modules if m not in MODULE_PARENTS]
        if unknown:
            raise InputError(f"unknown module {', '.join(unknown)} to adapt: choose from "
                             f"{', '.join(MODULE_PARENTS)}")
        if self.rank < 1 or self.last_layers < 1:
            raise InputError(f"rank ({self.rank}) and adapted layers ({self.last_layers}) must be at least 1")

    def targets(self, base: BaseModelFingerprint) -> list[Target]:
        layers = range(max(base.num_layers - self.last_layers, 0), base.num_layers)
        return [Target(m, layer) for layer in layers for m in self.modules]


@dataclass
class StudyTimings:
    questions: float = 0.0
    teacher: float = 0.0
    fit: float = 0.0
    cached_documents: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in asdict(self).items()}


class StudyCompiler:
    """Any causal LM folder + documents -> bank-ready atoms whose factors were fitted by self-study."""

    mode = "study"

    def __init__(self, model_dir: str | Path, config: StudyConfig | None = None, atomizer: str = "rules",
                 monolithic: bool = False, routing_text: str | None = None,
                 reranker: str | None = "shipped", device: DeviceConfig | None = None) -> None:
        """reranker: "shipped", "none" or a trained reranker's folder (study_routing.study_router); the
        monolithic baseline is one atom per document and never reranked. routing_text (what keys and reranker
        read, make_atomizer): default "titled" when the reranker was trained on titled text, else "atom".
        device: where the base model runs (the sentence encoder and reranker stay on the CPU, as served)."""
        from transformers import AutoTokenizer

        from vllm_doc2atom.encoders import SentenceTransformerEncoder

        self.config = config or StudyConfig()
        self.encoder = SentenceTransformerEncoder()
        self.router: StudyRouter = study_router(None if monolithic else reranker, self.encoder)  # checked first
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.device = device or DeviceConfig()
        self.model = self.device.load_causal_lm(model_dir)
        self.base = BaseModelFingerprint.from_model_dir(model_dir)
        self.targets = self.config.targets(self.base)
        self.hooks = LoRAHooks(self.model, self.targets)
        # the Doc-to-LoRA baseline: ONE adapter per document, of rank = rank × its atoms (the same parameters),
        # fitted on all of the document's study questions
        self.monolithic = monolithic
        self.atomizer = make_atomizer(atomizer, routing_text or ("titled" if self.router.text_kind == "titled"
                                                                 else "atom"))
        self.spec = BankSpec(base_model=self.base, targets=self.targets, micro_rank=self.config.rank,
                             lora_scaling=1.0, key_encoder=self.encoder.identity, key_dim=self.encoder.dim,
                             checkpoint=f"self-study-v{STUDY_VERSION}", **self.router.spec_fields(None))
        self.timings = StudyTimings()
        self.positives: dict[str, list[float]] = {}  # doc id -> top router weight of each study question
        self.cache_dir = cache_root() / "study"
        self.fit_losses: list[tuple[float, float]] = []

    # ---- one document ----------------------------------------------------------------------------------

    def __call__(self, doc_id: str, text: str) -> DocumentAtoms | None:
        atoms = self.atomizer(doc_id, text)
        if not atoms:
            logger.warning("%s: no atoms (empty document?), skipped", doc_id)
            return None
        keys = torch.from_numpy(self.encoder.encode([a.retrieval_text or a.text for a in atoms])).float()
        rank = self.config.rank * (len(atoms) if self.monolithic else 1)
        key = self._cache_key(text, atoms)
        cached = self._load(key)
        if cached is not None:
            tensors, positives = cached
            self.timings.cached_documents += 1
        else:
            tensors, positives = self._fit(text, atoms, keys, rank, key)
            self._save(key, tensors, positives)
        self.positives[doc_id] = positives
        if self.monolithic:  # one atom: the whole document (a bank of one document per adapter, as D2L serves it)
            self.spec = BankSpec(**{**self.spec.__dict__, "micro_rank": rank})
            whole = AtomRecord(id=f"{doc_id}#all", document_id=doc_id, type="evidence_fragment", text=text.strip(),
                               span=(0, len(text)))
            return DocumentAtoms(doc_id, [whole], {**tensors, "keys": keys.mean(0, keepdim=True)})
        return DocumentAtoms(doc_id, atoms, {**tensors, "keys": keys})

    def _fit(self, text: str, atoms: list[AtomRecord], keys: torch.Tensor, rank: int,
             key: str) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Study the document and fit its atoms: (shard tensors without keys, top weights of its questions).
        key: its cache key, which also picks its protection sample."""
        examples, questions = self._study(text, atoms)
        positives = self._route(examples, questions, keys, atoms)
        if self.monolithic:
            for example in examples:
                example.atom, example.routed = 0, []
        examples = self._protection_examples(key) + examples
        start = time.perf_counter()
        shapes = {m: self.base.module_shape(m) for m in self.config.modules}
        result = fit_document(self.model, self.targets, 1 if self.monolithic else len(atoms), rank,
                              self.spec.lora_scaling, examples, shapes, self.config.fit, self.hooks)
        self.timings.fit += time.perf_counter() - start
        self.fit_losses.append((result.loss_first, result.loss_last))
        tensors = {f"A.{t.key}": result.a[t].contiguous() for t in self.targets}
        tensors |= {f"B.{t.key}": result.b[t].contiguous() for t in self.targets}
        tensors["gates"] = torch.ones(result.a[self.targets[0]].shape[0], len(self.targets))
        return tensors, positives

    def positive_weights(self, text: str, atoms: list[AtomRecord], keys: torch.Tensor) -> list[float]:
        """The top router weight of each of a document's study questions — the refusal calibration's
        positives — without fitting anything (`benchmarks/study_refusal.py`: refusal on many documents)."""
        return self._route(*self._study(text, atoms), keys, atoms)

    def _study(self, text: str, atoms: list[AtomRecord]) -> tuple[list[Example], list[q.StudyQuestion]]:
        """Questions for every atom, answered by the teacher: the fitting examples."""
        cfg = self.config
        start = time.perf_counter()
        subject = q.document_subject(text)
        fixed = cfg.span_answer == "atom"
        questions = [q.StudyQuestion(i, question, "span", answer if fixed else None) for i, a in enumerate(atoms)
                     for question, answer in q.span_questions_with_answers(a.text, cfg.span_questions,
                                                                               cfg.clipped_questions)]
        questions += self._model_questions(text, subject, atoms)
        if cfg.recital:
            questions += [q.recital(subject, a.text, i) for i, a in enumerate(atoms)]
        questions = q.dedupe(questions)
        self.timings.questions += time.perf_counter() - start

        start = time.perf_counter()
        asked = [x for x in questions if x.answer is None]
        answers = generate(self.model, self.tokenizer,
                           [chat_prompt_ids(self.tokenizer, teacher_messages(text, x.text)) for x in asked],
                           cfg.max_answer_tokens, top_k=cfg.top_k)
        self.timings.teacher += time.perf_counter() - start
        by_question = dict(zip(map(id, asked), answers))
        examples = []
        for x in questions:
            prompt = chat_prompt_ids(self.tokenizer, [{"role": "user", "content": x.text}])
            if x.answer is None:
                answer = by_question[id(x)]
                if not answer.tokens:
                    continue
                example = Example(x.atom, prompt, torch.tensor(answer.tokens), answer.topk_ids,
                                  answer.topk_logprobs.float())
                if answer.stopped:
                    example = self._then_stop(example)
            else:  # a fixed answer: one-hot targets, then the end of the turn (a reply that stops, not loops)
                tokens = self.tokenizer(x.answer, add_special_tokens=False)["input_ids"]
                example = Example(x.atom, prompt, torch.tensor(tokens[:FIXED_ANSWER_TOKENS], dtype=torch.long),
                                  torch.zeros(0, cfg.top_k, dtype=torch.long), torch.zeros(0, cfg.top_k))
                # a reply cut mid-sentence must not learn to stop there
                example = self._then_stop(example, stop=len(tokens) <= FIXED_ANSWER_TOKENS)
            examples.append(example)
        kept = [x for x in questions if x.answer is not None or by_question[id(x)].tokens]
        return examples, kept

    def _then_stop(self, example: Example, stop: bool = True) -> Example:
        """Append the end-of-turn token (unless not `stop`) and give every fixed (not teacher-scored) position a
        one-hot target."""
        tokens = torch.cat([example.answer, torch.tensor([end_of_turn_id(self.tokenizer)] if stop else [])]).long()
        ids = torch.full((len(tokens), self.config.top_k), -1, dtype=torch.long)
        logprobs = torch.zeros(len(tokens), self.config.top_k)
        scored = len(example.topk_ids)
        ids[:scored], logprobs[:scored] = example.topk_ids, example.topk_logprobs
        ids[scored:, 0] = tokens[scored:]
        return Example(example.atom, example.prompt, tokens, ids, logprobs, example.routed)

    def _protection_examples(self, key: str) -> list[Example]:
        """Off-topic probes with the base model's own answers (computed once), a sample per document chosen by
        its cache key: a document's fit does not depend on which documents came before it (in this process or
        on another torchrun rank)."""
        n = self.config.protection
        if n <= 0:
            return []
        if self._protection is None:
            start = time.perf_counter()
            prompts = [chat_prompt_ids(self.tokenizer, [{"role": "user", "content": p}]) for p in OFF_TOPIC_PROBES]
            answers = generate(self.model, self.tokenizer, prompts, self.config.max_answer_tokens,
                               top_k=self.config.top_k)
            self._protection = []
            for prompt, answer in zip(prompts, answers):
                if answer.tokens:
                    example = Example(-1, prompt, torch.tensor(answer.tokens), answer.topk_ids,
                                      answer.topk_logprobs.float())
                    self._protection.append(self._then_stop(example) if answer.stopped else example)
            self.timings.teacher += time.perf_counter() - start
        start = (int(key[:8], 16) * n) % max(len(self._protection), 1)
        return (self._protection * 2)[start : start + n]

    _protection: list[Example] | None = None

    def _model_questions(self, text: str, subject: str, atoms: list[AtomRecord]) -> list[q.StudyQuestion]:
        n = self.config.model_questions
        if n <= 0:
            return []
        try:
            prompts = [chat_prompt_ids(self.tokenizer, q.model_question_prompt(text, subject, a.text))
                       for a in atoms for _ in range(n)]
            replies = generate(self.model, self.tokenizer, prompts, 32, temperature=0.7)
        except Exception as err:  # noqa: BLE001 — questions from rules still make a usable atom
            logger.warning("question generation failed (%s: %s); using rule-made questions only",
                           type(err).__name__, err)
            return []
        found = []
        for i, reply in enumerate(replies):
            atom = i // n
            cleaned = q.clean_model_question(reply.text(self.tokenizer), atoms[atom].text)
            if cleaned:
                found.append(q.StudyQuestion(atom, cleaned, "model"))
        logger.debug("model questions: %d of %d usable", len(found), len(replies))
        return found

    def _route(self, examples: list[Example], questions: list[q.StudyQuestion], keys: torch.Tensor,
               atoms: list[AtomRecord]) -> list[float]:
        """The router's picks for every study question, as the server will make them (stage-1 top-k, the
        reranker, the head, weight ≥ 0.5): the compositions to train with. Returns the top weight of each
        asked question (recitals aside): the refusal calibration's positives."""
        candidates = self.router.candidates([x.text for x in questions], atoms, keys.numpy())
        top = []
        for example, x, routed in zip(examples, questions, candidates):
            example.routed = self.router.picks(routed)
            if x.source != "recital":
                top.append(routed[0].weight)
        return top

    # ---- the bank ----------------------------------------------------------------------------------------

    def calibrated_spec(self, compiled: list[DocumentAtoms]) -> BankSpec:
        """The spec with the refusal threshold chosen between the study questions of these documents and
        off-topic probes, each scored by its best atom's router weight in a bank of exactly these atoms."""
        positives = [w for c in compiled for w in self.positives.get(c.document_id, [])]
        threshold = None
        if compiled and positives:
            keys = np.concatenate([c.tensors["keys"].numpy() for c in compiled])
            atoms = [a for c in compiled for a in c.atoms]
            probes = self.router.candidates(OFF_TOPIC_PROBES, atoms, keys, self._probe_embeddings)
            threshold = refusal_threshold(positives, [routed[0].weight for routed in probes])
        return BankSpec(**{**self.spec.__dict__, **self.router.spec_fields(threshold)})

    def create_bank(self, out: str | Path, compiled: list[DocumentAtoms], overwrite: bool = False) -> AtomBank:
        self.spec = self.calibrated_spec(compiled)
        return AtomBank.create(out, self.spec, compiled, overwrite=overwrite, reranker=self.router.copy_from)

    def compatible(self, spec: BankSpec) -> bool:
        """Same model, targets, rank and key space: the threshold of the bank is kept."""
        return {**spec.__dict__, "router_head": None} == {**self.spec.__dict__, "router_head": None}

    def stats(self) -> dict:
        stats = {"stage_seconds": self.timings.as_dict(), **self.device.describe()}
        if self.fit_losses:
            stats["fit_loss_first"] = round(float(np.mean([f for f, _ in self.fit_losses])), 4)
            stats["fit_loss_last"] = round(float(np.mean([last for _, last in self.fit_losses])), 4)
        return stats

    @cached_property
    def _probe_embeddings(self) -> np.ndarray:
        """The off-topic probes, encoded once (every bank of a many-bank eval is calibrated against them)."""
        return self.encoder.encode(OFF_TOPIC_PROBES)

    # ---- content cache -------------------------------------------------------------------------------------

    def _cache_key(self, text: str, atoms: list[AtomRecord]) -> str:
        # the atoms, not the atomizer's name: a fit has one row per atom and routes its questions over their
        # keys, so a document cut differently (another atomizer or version) refits
        reranker = self.router.identity  # and its head: the picks the atoms are fitted in
        routing = {} if reranker is None else {"head": asdict(self.router.head)}
        identity = {"v": STUDY_VERSION, "model": self.base.to_dict(), "monolithic": self.monolithic,
                    "reranker": None if reranker is None else reranker.sha256, **routing,
                    "config": asdict(self.config), "text": text,
                    "atoms": [(a.text, a.retrieval_text) for a in atoms]}
        if self.device.dtype != "float32":  # float32 keys stay as they were: caches made before --dtype hold
            identity["dtype"] = self.device.dtype
        if getattr(self.model.config, "final_logit_softcapping", None):  # Gemma-2: fits made before the fit
            identity["softcap"] = True  # applied the cap (training.student.output_logits) are not reused
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def _load(self, key: str) -> tuple[dict[str, torch.Tensor], list[float]] | None:
        path = self.cache_dir / f"{key}.safetensors"
        if not self.config.cache or not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            positives = json.loads((self.cache_dir / f"{key}.json").read_text())["positive_weights"]
        except (OSError, ValueError, KeyError) as err:
            logger.warning("ignoring unreadable study cache entry %s (%s)", key, err)
            return None
        return tensors, positives

    def _save(self, key: str, tensors: dict[str, torch.Tensor], positives: list[float]) -> None:
        if not self.config.cache:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.cache_dir / f"{key}.safetensors") as tmp:
            save_file(tensors, str(tmp))
        atomic_write_text(self.cache_dir / f"{key}.json", json.dumps({"positive_weights": positives}))
