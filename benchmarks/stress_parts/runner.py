"""The client load generator: warm-up, then --concurrency workers sending the mix while the mutator runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from .client import Clients, send
from .common import API_KEY, IN_SCOPE, REQUEST_TIMEOUT, BankNames, StressConfig
from .judge import Outcome, judge
from .mutations import Mutation, Mutator, Progress
from .workload import Mix, Plan


async def run_one(clients: Clients, plan: Plan) -> Outcome:
    start = time.perf_counter()
    reply = await send(clients, plan)
    latency = time.perf_counter() - start
    problems = judge(plan, reply)
    provenance = None
    with contextlib.suppress(ValueError, TypeError):
        provenance = json.loads(reply.header) if reply.header else None
    return Outcome(index=plan.index, category=plan.category, group=plan.group, bank=plan.bank,
                   endpoint=plan.endpoint, stream=plan.stream, n=plan.n, status=reply.status,
                   latency_s=round(latency, 4), expected=reply.status in plan.expect, error=reply.error,
                   body=reply.body, cancelled=reply.cancelled, problems=problems, question=plan.question,
                   texts=[t[:120] for t in reply.texts] if problems and reply.texts else None,
                   provenance=provenance if problems else None)


async def run_all(clients: Clients, plans: list[Plan], concurrency: int, mutator: Mutator
                  ) -> tuple[list[Outcome], list[Mutation], float]:
    progress = Progress()
    outcomes: list[Outcome] = []
    queue = iter(plans)
    started = time.perf_counter()
    step = max(1, len(plans) // 10)
    milestones = mutator.milestones(len(plans))

    async def worker() -> None:
        for plan in queue:  # one shared iterator: each plan is sent once
            overdue = sum(m <= progress.done - concurrency for m in milestones)
            await progress.wait_mutations(overdue)
            outcomes.append(await run_one(clients, plan))
            await progress.step()
            if progress.done % step == 0:
                print(f"  {progress.done}/{len(plans)} requests, {time.perf_counter() - started:.0f} s",
                      file=sys.stderr, flush=True)

    mutations = asyncio.create_task(mutator.run(progress, len(plans), started))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return sorted(outcomes, key=lambda o: o.index), await mutations, wall


def sampling_fields(tiny_model: Path | None) -> dict[str, Any]:
    """ignore_eos: every routed answer generates MAX_TOKENS tokens. For the tiny random model also a -100
    logit bias on the tokens that decode to nothing printable alone (special tokens, UTF-8 fragments): an
    untrained model happily repeats a lone continuation byte, which vLLM's detokenizer never emits, and the
    answer would be empty for a reason that has nothing to do with the plugin."""
    if tiny_model is None:
        return {"ignore_eos": True}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [tokenizer.decode([i], skip_special_tokens=True) for i in range(len(tokenizer))]  # as vLLM does
    silent = [i for i, text in enumerate(texts) if not text or "\ufffd" in text]
    return {"ignore_eos": True, "logit_bias": {str(i): -100 for i in silent}}


async def exercise(url: str, model_dir: Path, names: BankNames, mutator: Mutator, config: StressConfig,
                   rng: random.Random) -> tuple[list[Plan], list[Outcome], list[Mutation], float]:
    limits = httpx.Limits(max_connections=2 * config.concurrency + 4,
                          max_keepalive_connections=config.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT) as http:
        probe = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, http_client=http)
        model = (await probe.models.list()).data[0].id
        sampling = sampling_fields(None if config.model else model_dir)
        clients = Clients(url, model, {API_KEY: probe}, http, sampling)
        plans = Mix(names, model, rng, sampling).plans(config.requests)
        # Warm-up outside the measurement: the encoder loads and kernels compile on the first routed request.
        await run_one(clients, Plan(-1, "warmup", "valid", (200,), "status", bank=names.healthy[0],
                                    question=IN_SCOPE[0]))
        outcomes, mutations, wall = await run_all(clients, plans, config.concurrency, mutator)
    return plans, outcomes, mutations, wall
