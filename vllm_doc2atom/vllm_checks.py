"""vLLM's own checks of a generation request, run before the plugin does any work for it.

A request that names an `atom_bank` is routed, composed and — when refused — answered without a model
call, so vLLM would never see it. Each one is therefore first put through what vLLM's endpoint does
before it generates: its pydantic request model, the served-model check, prompt rendering (chat template,
tokenizer, context length) and the sampling parameters. The error response is vLLM's own, built by vLLM's
exception handlers, so a client cannot tell the plugin answered it. Imported lazily (vLLM's API server only).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

Scope = dict[str, Any]


# Fields whose parsed value the plugin reads itself (refusals): vLLM's coercions apply ("stream": "no" is false).
NORMALIZED_FIELDS = ("n", "stream", "stream_options")


async def vllm_rejection(scope: Scope, kind: str, payload: dict[str, Any]) -> Any | None:
    """The response vLLM would give this request instead of generating (a starlette Response), or None.

    On None, the fields the plugin reads itself (NORMALIZED_FIELDS) are rewritten in `payload` to the
    values vLLM parsed them as."""
    from pydantic import ValidationError
    from starlette.requests import Request

    request = Request(scope)
    try:
        parsed = _parse(request, kind, payload)  # what FastAPI does before vLLM's route runs
    except ValidationError as exc:
        from fastapi.exceptions import RequestValidationError

        errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()]
        return await _handled(request, RequestValidationError(errors))
    except Exception as exc:  # noqa: BLE001 - vLLM's handlers decide the status of every exception
        return await _handled(request, exc)
    try:
        error = await _check(request.app.state, kind, parsed)
    except Exception as exc:  # noqa: BLE001
        return await _handled(request, exc)
    if error is not None:
        from fastapi.responses import JSONResponse

        return JSONResponse(content=error.model_dump(), status_code=error.error.code)
    for name in NORMALIZED_FIELDS:
        if name in payload:
            value = getattr(parsed, name, None)
            payload[name] = value.model_dump() if hasattr(value, "model_dump") else value
    return None


def scores_prompt_on_cpu(scope: Scope, kind: str, payload: dict[str, Any]) -> bool:
    """Whether this request asks for log-probs over its prompt (`prompt_logprobs`, or `echo` with log-probs)
    from a CPU engine. The plugin always serves with LoRA on, and vLLM's CPU LoRA logits layer maps one adapter
    per sequence, not per prompt token: such a request kills the engine (seen with vLLM 0.32)."""
    if kind not in ("chat", "completion") or not ("prompt_logprobs" in payload or "echo" in payload):
        return False
    from starlette.requests import Request

    try:
        parsed = _parse(Request(scope), kind, payload)
    except Exception:  # noqa: BLE001 - vLLM answers its own validation error
        return False
    echoed = parsed.top_logprobs if kind == "chat" else parsed.logprobs  # what vLLM scores the prompt with
    if parsed.prompt_logprobs is None and not (parsed.echo and echoed is not None):
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _parse(request: Any, kind: str, payload: dict[str, Any]) -> Any:
    from fastapi.exceptions import RequestValidationError

    media_type = request.headers.get("content-type", "").lower().split(";", 1)[0]
    if media_type != "application/json":
        raise RequestValidationError(errors=["Unsupported Media Type: Only 'application/json' is allowed"])
    if kind == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as Model
    elif kind == "completion":
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as Model
    else:
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as Model
    return Model.model_validate(payload)


async def _check(state: Any, kind: str, parsed: Any) -> Any | None:
    """vLLM's ErrorResponse for a parsed request, None if vLLM would generate; raises what vLLM's route raises."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

    if kind == "chat":
        handler = _handler(state, "openai_serving_chat", "Chat Completions")
        rendered = await handler.render_chat_request(parsed)
        inputs = rendered if isinstance(rendered, ErrorResponse) else rendered[1]
        max_tokens = (parsed.max_completion_tokens if parsed.max_completion_tokens is not None
                      else parsed.max_tokens)
        truncate = parsed.truncate_prompt_tokens
    elif kind == "completion":
        handler = _handler(state, "openai_serving_completion", "Completions")
        if parsed.stream and parsed.use_beam_search:
            return handler.create_error_response("Streaming is not currently supported with beam search")
        inputs = await handler.render_completion_request(parsed)
        max_tokens, truncate = parsed.max_tokens, parsed.truncate_prompt_tokens
    else:
        handler = _handler(state, "openai_serving_responses", "Responses")
        inputs = await handler._check_model(parsed) or handler._validate_create_responses_input(parsed)
        if inputs is None:
            rendered = await handler._render_resolved_response_inputs(parsed, None)
            inputs = rendered if isinstance(rendered, ErrorResponse) else [rendered.engine_input]
        max_tokens = parsed.max_output_tokens
        truncate = -1 if parsed.truncation != "disabled" else None
    if isinstance(inputs, ErrorResponse):
        return inputs
    for engine_input in inputs:
        limit = get_max_tokens(handler.model_config.max_model_len, max_tokens,
                               handler._extract_prompt_len(engine_input), handler.default_sampling_params,
                               handler.override_max_tokens, truncate_prompt_tokens=truncate)
        if getattr(parsed, "use_beam_search", False):
            parsed.to_beam_search_params(limit, handler.default_sampling_params)
        else:
            parsed.to_sampling_params(limit, handler.default_sampling_params)
    return None


def _handler(state: Any, attribute: str, api: str) -> Any:
    handler = getattr(state, attribute, None)
    if handler is None:
        raise NotImplementedError(f"The model does not support {api} API")
    return handler


async def _handled(request: Any, exc: Exception) -> Any:
    """What the app's exception handler for this exception type answers (the most specific one, as starlette)."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return await handlers[cls](request, exc)
    logger.exception("doc2atom: no vLLM handler for %s", type(exc).__name__, exc_info=exc)
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": "Internal Server Error", "type": "InternalServerError",
                                   "param": None, "code": 500}}, status_code=500)
