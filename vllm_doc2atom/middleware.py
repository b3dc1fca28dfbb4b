"""The ASGI middleware that `--plugin doc2atom` adds to vLLM's API server.

For POST /v1/chat/completions, /v1/completions and /v1/responses whose JSON body names an `atom_bank`
(one bank or a list of banks routed together):
    vLLM's own request checks -> question -> bank(s) (cached) -> router -> refusal (no model call) or
    composed adapter registered with the engine -> the body's `model` becomes the adapter's name -> vLLM
    generates with it (optionally with the routed atoms' text before the question: `atom_evidence`).
The response carries provenance (the atoms used) in an `x-doc2atom-provenance` header and, for
non-streamed JSON, in a `doc2atom` field. GET /v1/atom_banks lists the banks. Any other endpoint that is
sent an `atom_bank` answers 400 (never the base model, as if the bank had answered). Composed adapters are
internal: hidden from GET /v1/models, and a request naming one directly gets vLLM's 404.

vLLM adds `--middleware` entries outside its own API-key check, so this checks the key first, exactly as
vLLM will, and lets unauthenticated requests through to vLLM's 401 before doing any work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from .asgi import Receive, Scope, Send, parse_json, read_body, replay, rewriting_json, send_body
from .errors import BankError, BankErrorKind, RequestError
from .openai_io import (
    RESPONSE_OBJECTS,
    ROUTED_PATHS,
    error_body,
    extract_question,
    refusal_body,
    refusal_events,
    with_evidence,
)
from .settings import REQUEST_EVIDENCE

logger = logging.getLogger(__name__)

BANKS_PATH = "/v1/atom_banks"
MODELS_PATH = "/v1/models"
GUARDED_PREFIX = "/v1"  # where vLLM checks the API key (vllm.entrypoints.serve.middleware.authenticate)
PROVENANCE_HEADER = b"x-doc2atom-provenance"
PLUGIN_FIELDS = ("atom_bank", "atom_evidence")
COMPOSED_NAME = re.compile(r"d2a-[0-9a-f]{24}")
# The router reads at most this much of a question: a sentence encoder truncates far earlier, and a
# multi-megabyte question must not cost seconds of CPU before vLLM's own length check answers it.
MAX_ROUTED_CHARS = 4096
PROMPT_LOGPROBS_ON_CPU = ("log-probs of the prompt (`prompt_logprobs`, or `echo` with log-probs) are not available "
                          "from this CPU server: vLLM's CPU LoRA kernels fail on them, and doc2atom serves with "
                          "LoRA on; ask for the generated tokens' `logprobs` instead")


@dataclass
class _Runtime:
    """Per-process serving state, built on the first request from vLLM's app state."""

    settings: Any  # ServeSettings
    banks: Any  # BankStore
    registry: Any  # AdapterRegistry
    routers: Any  # RouterPool


class Doc2AtomMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._serve_settings = None  # ServeSettings, read from vLLM's args on the first request
        self._authenticator = None  # vLLM's own API-key check
        self._runtime: _Runtime | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method = scope["method"]
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if not self._authorized(scope, path):
            return await self.app(scope, receive, send)  # vLLM answers 401
        if method == "GET" and path == MODELS_PATH:
            return await self.app(scope, receive, rewriting_json(send, _without_composed_adapters))
        if method == "GET" and path == BANKS_PATH:
            banks = await asyncio.to_thread(self._runtime_for(scope).banks.list)
            return await send_body(send, 200, json.dumps({"object": "list", "data": banks}).encode())
        if method != "POST":
            return await self.app(scope, receive, send)

        body = await read_body(receive)
        payload = parse_json(body)
        if not isinstance(payload, dict):
            return await self.app(scope, replay(body, receive), send)  # vLLM answers what it answers
        model = payload.get("model")
        if isinstance(model, str) and COMPOSED_NAME.fullmatch(model):
            message = f"The model `{model}` does not exist."  # vLLM's words for an unknown model
            return await send_body(send, 404, error_body(message, 404, "model"))
        kind = ROUTED_PATHS.get(path)
        if kind is not None and ("prompt_logprobs" in payload or "echo" in payload):  # any request: LoRA is on
            from .vllm_checks import scores_prompt_on_cpu

            if scores_prompt_on_cpu(scope, kind, payload):
                return await send_body(send, 400, error_body(PROMPT_LOGPROBS_ON_CPU, 400, "prompt_logprobs"))
        if not any(field in payload for field in PLUGIN_FIELDS):
            return await self.app(scope, replay(body, receive), send)
        if kind is None:
            message = (f"`atom_bank` is not served on {path[:100]}; send it to "
                       + ", ".join(ROUTED_PATHS) + " (nothing was answered from the bank)")
            return await send_body(send, 400, error_body(message, 400, "atom_bank"))
        await self._serve_safely(self._runtime_for(scope), scope, receive, send, kind, payload)

    async def _serve_safely(self, rt: _Runtime, scope: Scope, receive: Receive, send: Send, kind: str,
                            payload: dict[str, Any]) -> None:
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._serve(rt, scope, receive, tracking_send, kind, payload)
        except (RequestError, BankError) as exc:
            status = exc.status if isinstance(exc, RequestError) else exc.kind.http_status
            param = exc.param if isinstance(exc, RequestError) else "atom_bank"
            _metrics().requests.labels("error").inc()
            logger.info("doc2atom: %d %s", status, str(exc)[:500])
            await send_body(send, status, error_body(str(exc), status, param))
        except Exception:
            _metrics().requests.labels("error").inc()
            logger.exception("doc2atom: request failed")
            if started:
                raise
            await send_body(send, 500, error_body("doc2atom could not serve this request (see the server log)", 500))

    async def _serve(self, rt: _Runtime, scope: Scope, receive: Receive, send: Send, kind: str,
                     payload: dict[str, Any]) -> None:
        from .vllm_checks import vllm_rejection

        if "atom_bank" not in payload:
            raise RequestError("`atom_evidence` needs an `atom_bank`", param="atom_evidence")
        bank_names = payload.pop("atom_bank")
        evidence = payload.pop("atom_evidence", None)
        if evidence is not None and (not isinstance(evidence, (bool, str)) or evidence not in REQUEST_EVIDENCE):
            raise RequestError('`atom_evidence` must be true, false or "only"', param="atom_evidence")
        # Every request, routed or not: a routed one has its `model` rewritten to the adapter, so vLLM would
        # never check the client's; and nothing is composed or registered for a request vLLM would refuse.
        rejection = await vllm_rejection(scope, kind, payload)
        if rejection is not None:
            return await rejection(scope, receive, send)
        question = extract_question(kind, payload)[:MAX_ROUTED_CHARS]
        use_evidence = rt.settings.evidence if evidence is None else REQUEST_EVIDENCE[evidence]
        for attempt in range(2):
            try:
                return await self._answer(rt, scope, receive, send, kind, payload, bank_names, question,
                                          use_evidence)
            except BankError as exc:
                if exc.kind != BankErrorKind.STALE or attempt:
                    raise
                logger.info("doc2atom: bank changed while answering, routing again: %s", exc)

    async def _answer(self, rt: _Runtime, scope: Scope, receive: Receive, send: Send, kind: str,
                      payload: dict[str, Any], bank_names: Any, question: str, use_evidence: str) -> None:
        from .adapter_registry import AdapterRejected
        from .answer_plan import Action, plan_answer
        from .composer import compose

        get = rt.banks.get_many if isinstance(bank_names, list) else rt.banks.get
        bank = await asyncio.to_thread(get, bank_names)
        start = time.perf_counter()
        result = await asyncio.to_thread(rt.routers.route, bank, question)
        _metrics().route_seconds.observe(time.perf_counter() - start)
        settings = rt.settings
        plan = plan_answer(bank, bank_names, result, use_evidence, settings.on_refusal, settings.max_lora_rank)
        if plan.action is not Action.ADAPTER:
            _metrics().requests.labels("refused" if result.refused else "routed").inc()
            logger.info("doc2atom bank=%s atoms=%d refused=%s mode=%s", bank_names, len(result.kept),
                        result.refused, plan.action.value)
            if plan.action is Action.REFUSE:
                return await _send_refusal(send, kind, payload, settings.refusal_message, plan.provenance)
            if plan.evidence:
                payload = with_evidence(kind, payload, plan.evidence)
            return await self._forward(scope, receive, send, payload, plan.provenance)

        start = time.perf_counter()
        try:
            lora, hit = await rt.registry.acquire(plan.adapter_name, plan.adapter_id,
                                                  lambda: compose(bank, plan.selection, settings.max_lora_rank))
        except AdapterRejected as exc:
            raise RequestError(str(exc), status=500) from exc
        compose_ms = (time.perf_counter() - start) * 1e3
        _record_adapter_use(len(plan.selection), hit, compose_ms)
        plan.provenance["cache_hit"] = hit
        logger.info("doc2atom bank=%s atoms=%d refused=False compose_ms=%.1f cache_hit=%s adapter=%s",
                    bank_names, len(plan.selection), compose_ms, hit, plan.adapter_name)
        payload["model"] = lora.lora_name
        if plan.evidence:
            payload = with_evidence(kind, payload, plan.evidence)
        try:
            await self._forward(scope, receive, send, payload, plan.provenance)
        finally:
            await rt.registry.release(plan.adapter_name)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, payload: dict[str, Any],
                       provenance: dict[str, Any]) -> None:
        """Hand the rewritten request to vLLM; add provenance to its response."""
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        header = [(PROVENANCE_HEADER, json.dumps(provenance, separators=(",", ":")).encode())]

        def add_provenance(data: Any) -> Any:
            if isinstance(data, dict) and data.get("object") in RESPONSE_OBJECTS:
                data["doc2atom"] = provenance
            return data

        await self.app(scope, replay(body, receive), rewriting_json(send, add_provenance, header))

    def _authorized(self, scope: Scope, path: str) -> bool:
        """vLLM's own API-key check (same header, same comparison), for the paths vLLM guards."""
        settings = self._settings(scope)
        if not settings.api_keys or not path.startswith(GUARDED_PREFIX) or scope["method"] == "OPTIONS":
            return True
        if self._authenticator is None:
            from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

            self._authenticator = AuthenticationMiddleware(self.app, list(settings.api_keys))
        from starlette.datastructures import Headers

        return self._authenticator.verify_token(Headers(scope=scope))

    def _settings(self, scope: Scope):
        if self._serve_settings is None:
            from .settings import ServeSettings

            self._serve_settings = ServeSettings.from_args(scope["app"].state.args)
        return self._serve_settings

    def _runtime_for(self, scope: Scope) -> _Runtime:
        if self._runtime is None:
            from .adapter_registry import AdapterRegistry, claim_adapter_dir
            from .bank_store import BankStore
            from .fingerprint import BaseModelFingerprint
            from .router import RouterConfig, RouterPool

            state = scope["app"].state
            settings = self._settings(scope)
            served = BaseModelFingerprint.from_config(state.engine_client.model_config.hf_config.to_dict(),
                                                      name=str(state.args.model))
            claim_adapter_dir(settings.adapter_dir)
            registry = AdapterRegistry(settings.adapter_dir, settings.adapter_cache_size, state.engine_client,
                                       state.openai_serving_models, remove_from_engine=not settings.shared_engine)
            routers = RouterPool(RouterConfig(top_k=settings.top_k, threshold_override=settings.threshold,
                                              stage2=settings.stage2))
            self._runtime = _Runtime(settings, BankStore(settings.bank_root, served), registry, routers)
            _log_like_vllm()
            logger.info("doc2atom: serving banks under %s (adapters in %s)", settings.bank_root, settings.adapter_dir)
        return self._runtime


def _log_like_vllm() -> None:
    """Send this package's INFO lines to vLLM's log handlers (vLLM configures only its own logger)."""
    package = logging.getLogger("vllm_doc2atom")
    if not package.handlers and not logging.getLogger().handlers:
        package.handlers = list(logging.getLogger("vllm").handlers)
        package.setLevel(logging.INFO)
        package.propagate = False


def _without_composed_adapters(models: Any) -> Any:
    """GET /v1/models without the composed adapters (internal: a request that names one gets a 404)."""
    if isinstance(models, dict) and isinstance(models.get("data"), list):
        models["data"] = [m for m in models["data"]
                          if not (isinstance(m, dict) and COMPOSED_NAME.fullmatch(str(m.get("id", ""))))]
    return models


def _metrics():
    from .metrics import metrics

    return metrics()


def _record_adapter_use(atoms: int, cache_hit: bool, compose_ms: float) -> None:
    metrics = _metrics()
    metrics.requests.labels("routed").inc()
    metrics.adapter_cache.labels("hit" if cache_hit else "miss").inc()
    metrics.atoms.observe(atoms)
    if not cache_hit:
        metrics.compose_seconds.observe(compose_ms / 1e3)


async def _send_refusal(send: Send, kind: str, payload: dict[str, Any], message: str,
                        provenance: dict[str, Any]) -> None:
    header = [(PROVENANCE_HEADER, json.dumps(provenance, separators=(",", ":")).encode())]
    if not payload.get("stream"):
        return await send_body(send, 200, refusal_body(kind, payload, message, provenance), header)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")] + header})
    for event in refusal_events(kind, payload, message, provenance):
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
