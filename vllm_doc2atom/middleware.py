"""The ASGI middleware that `--plugin doc2atom` adds to vLLM's API server.

For POST /v1/chat/completions and /v1/completions whose JSON body names an `atom_bank`:
    question -> bank (cached) -> router -> refusal (no model call) or composed adapter registered
    with the engine -> the body's `model` becomes the adapter's name -> vLLM generates with it.
The response carries provenance (the atoms used) in an `x-doc2atom-provenance` header and, for
non-streamed JSON, in a `doc2atom` field. GET /v1/atom_banks lists the banks. Everything else
passes through untouched.

vLLM adds `--middleware` entries outside its own API-key check, so this checks the key first and
lets unauthenticated requests through to vLLM's 401 before doing any work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .errors import BankError
from .openai_io import ROUTED_PATHS, RequestError, error_body, extract_question, refusal_body, refusal_events

logger = logging.getLogger(__name__)

BANKS_PATH = "/v1/atom_banks"
PROVENANCE_HEADER = b"x-doc2atom-provenance"
BANK_ERROR_STATUS = {"not_found": 404, "bad_request": 400, "mismatch": 409, "invalid": 422}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class _Runtime:
    """Per-process serving state, built on the first request from vLLM's app state."""

    settings: Any  # ServeSettings
    banks: Any  # BankStore
    registry: Any  # AdapterRegistry
    routers: Any  # RouterPool


class Doc2AtomMiddleware:
    def __init__(self, app: Callable) -> None:
        self.app = app
        self._serve_settings = None  # ServeSettings, read from vLLM's args on the first request
        self._runtime: _Runtime | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        kind = ROUTED_PATHS.get(path)
        is_banks = method == "GET" and path == BANKS_PATH
        if not (is_banks or (method == "POST" and kind)) or not self._authorized(scope):
            return await self.app(scope, receive, send)  # vLLM answers (a 401 if unauthenticated)
        runtime = self._runtime_for(scope)
        if is_banks:
            banks = await asyncio.to_thread(runtime.banks.list)
            return await _send_body(send, 200, json.dumps({"object": "list", "data": banks}).encode())

        body = await _read_body(receive)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            payload = None
        if not isinstance(payload, dict) or "atom_bank" not in payload:
            return await self.app(scope, _replay(body, receive), send)
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._serve(runtime, scope, receive, tracking_send, kind, payload)
        except (RequestError, BankError) as exc:
            status = exc.status if isinstance(exc, RequestError) else BANK_ERROR_STATUS.get(exc.kind, 400)
            param = exc.param if isinstance(exc, RequestError) else "atom_bank"
            _metrics().requests.labels("error").inc()
            logger.info("doc2atom: %d %s", status, exc)
            await _send_body(send, status, error_body(str(exc), status, param))
        except Exception:
            _metrics().requests.labels("error").inc()
            logger.exception("doc2atom: request failed")
            if started:
                raise
            await _send_body(send, 500, error_body("doc2atom could not serve this request (see the server log)", 500))

    async def _serve(self, rt: _Runtime, scope: Scope, receive: Receive, send: Send, kind: str,
                     payload: dict[str, Any]) -> None:
        from .adapter_registry import AdapterRejected
        from .composer import adapter_identity, compose, fit_rank_budget

        bank_name = payload.pop("atom_bank")
        question = extract_question(kind, payload)
        bank = await asyncio.to_thread(rt.banks.get, bank_name)
        start = time.perf_counter()
        result = await asyncio.to_thread(rt.routers.route, bank, question)
        _metrics().route_seconds.observe(time.perf_counter() - start)
        provenance: dict[str, Any] = {"atom_bank": bank_name, "refused": result.refused,
                                      "atoms": [r.provenance() for r in result.kept]}
        if result.refused:
            _metrics().requests.labels("refused").inc()
            logger.info("doc2atom bank=%s atoms=0 refused=True mode=%s", bank_name, rt.settings.on_refusal)
            if rt.settings.on_refusal == "refuse":
                return await _send_refusal(send, kind, payload, rt.settings.refusal_message, provenance)
            return await self._forward(scope, receive, send, payload, provenance)

        used, dropped = fit_rank_budget(result.selection, bank.spec.micro_rank, rt.settings.max_lora_rank)
        if not used:
            raise RequestError(f"atoms of bank {bank_name!r} have rank {bank.spec.micro_rank}, above the server's "
                               f"--max-lora-rank {rt.settings.max_lora_rank}", status=409, param="atom_bank")
        name, int_id = adapter_identity(bank.fingerprint, used)
        kept_rows = {row for row, _ in used}
        provenance["atoms"] = [r.provenance() for r in result.kept if r.index in kept_rows]
        if dropped:
            provenance["dropped_for_rank"] = [bank.atoms[row].id for row, _ in dropped]
        start = time.perf_counter()
        try:
            lora, hit = await rt.registry.acquire(name, int_id, lambda: compose(bank, used, rt.settings.max_lora_rank))
        except AdapterRejected as exc:
            raise RequestError(str(exc), status=500) from exc
        compose_ms = (time.perf_counter() - start) * 1e3
        metrics = _metrics()
        metrics.requests.labels("routed").inc()
        metrics.adapter_cache.labels("hit" if hit else "miss").inc()
        metrics.atoms.observe(len(used))
        if not hit:
            metrics.compose_seconds.observe(compose_ms / 1e3)
        provenance.update(adapter=name, rank=len(used) * bank.spec.micro_rank, cache_hit=hit)
        logger.info("doc2atom bank=%s atoms=%d refused=False compose_ms=%.1f cache_hit=%s adapter=%s",
                    bank_name, len(used), compose_ms, hit, name)
        payload["model"] = lora.lora_name
        try:
            await self._forward(scope, receive, send, payload, provenance)
        finally:
            await rt.registry.release(name)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, payload: dict[str, Any],
                       provenance: dict[str, Any]) -> None:
        """Hand the rewritten request to vLLM; add provenance to its response."""
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}
        header_value = json.dumps(provenance, separators=(",", ":")).encode()
        buffered: dict[str, Any] = {}

        async def send_with_provenance(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                response_headers = list(message.get("headers", []))
                content_type = dict(response_headers).get(b"content-type", b"")
                if message["status"] == 200 and content_type.startswith(b"application/json"):
                    buffered["start"] = {**message, "headers": response_headers}  # rewritten at the end
                    buffered["body"] = b""
                    return
                return await send({**message, "headers": response_headers + [(PROVENANCE_HEADER, header_value)]})
            if message["type"] == "http.response.body" and "start" in buffered:
                buffered["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                return await _send_body(send, 200, _with_provenance(buffered["body"], provenance),
                                        [(PROVENANCE_HEADER, header_value)])
            await send(message)

        await self.app(scope, _replay(body, receive), send_with_provenance)

    def _authorized(self, scope: Scope) -> bool:
        keys = self._settings(scope).api_keys
        if not keys:
            return True
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        return any(secrets.compare_digest(token.encode(), k.encode()) for k in keys)

    def _settings(self, scope: Scope):
        if self._serve_settings is None:
            from .settings import ServeSettings

            self._serve_settings = ServeSettings.from_args(scope["app"].state.args)
        return self._serve_settings

    def _runtime_for(self, scope: Scope) -> _Runtime:
        if self._runtime is None:
            from .adapter_registry import AdapterRegistry
            from .bank_store import BankStore
            from .fingerprint import BaseModelFingerprint
            from .router import RouterConfig, RouterPool

            state = scope["app"].state
            settings = self._settings(scope)
            served = BaseModelFingerprint.from_config(state.engine_client.model_config.hf_config.to_dict(),
                                                      name=str(state.args.model))
            registry = AdapterRegistry(settings.adapter_dir, settings.adapter_cache_size, state.engine_client,
                                       state.openai_serving_models, remove_from_engine=not settings.shared_engine)
            routers = RouterPool(RouterConfig(top_k=settings.top_k, threshold=settings.threshold,
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


def _metrics():
    from .metrics import metrics

    return metrics()


def _with_provenance(body: bytes, provenance: dict[str, Any]) -> bytes:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body
    if isinstance(data, dict) and "choices" in data:
        data["doc2atom"] = provenance
        return json.dumps(data).encode()
    return body


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the already-read body once, then defers to the client (disconnects)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_body(send: Send, status: int, body: bytes, headers: list | None = None,
                     content_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
                + (headers or [])})
    await send({"type": "http.response.body", "body": body})


async def _send_refusal(send: Send, kind: str, payload: dict[str, Any], message: str,
                        provenance: dict[str, Any]) -> None:
    header = [(PROVENANCE_HEADER, json.dumps(provenance, separators=(",", ":")).encode())]
    if not payload.get("stream"):
        return await _send_body(send, 200, refusal_body(kind, payload, message, provenance), header)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")] + header})
    for event in refusal_events(kind, payload, message, provenance):
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
