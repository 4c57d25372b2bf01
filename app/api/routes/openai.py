"""OpenAI-compatible endpoints: the live model, routed through SCEN exactly as ``/generate``.

The routing decision travels in the body's ``scen`` field (every chunk of a stream too) and in
the ``X-Scen-Edit-Id`` (empty when the base model answered), ``X-Scen-Activation`` and
``X-Scen-Model-Version`` headers, which a stream sends once its prompt has been routed.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.auth import require_reader
from app.api.deps import JsonBody, ServedDep, ServiceDep, get_served
from app.api.errors import ModelNotFound, errors
from app.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatRequest,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    ScenRouting,
    TextCompletion,
    Usage,
)
from app.api.schemas import stop_strings
from app.api.service import Service
from app.api.streaming import TokenStream
from app.live import ServedModel
from app.live.generation import Completion, Delta, Finished, Routed, Sampling
from app.scen.chats import Chat, Message, Prompt

log = logging.getLogger(__name__)

# Role reader, like /generate.
router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_reader), Depends(get_served)])

_ERRORS = errors(e404="The model is not served here", e422="Invalid request (n other than 1 included)")


@router.get("/models", response_model=ModelList)
def list_models(service: ServiceDep, served: ServedDep) -> ModelList:
    """The one model this service answers with, live edits included."""
    return ModelList(data=[ModelCard(id=served.model_name, created=service.started_at)])


@router.post("/completions", response_model=TextCompletion, responses=_ERRORS, dependencies=[JsonBody])
async def create_completion(body: CompletionRequest, service: ServiceDep, served: ServedDep) -> Response:
    """The prompt is asked as ``/generate`` asks it: as the user's turn of the chat template."""
    answer = _Answer.of(body.model, served, chat=False)
    sampling = _sampling(body, body.token_budget)
    if body.stream:
        return await _streamed(service, body.prompt, sampling, answer, _include_usage(body))
    result = await service.complete(body.prompt, sampling)
    completion = TextCompletion(
        id=answer.id, created=answer.created, model=answer.model, usage=_usage(result), scen=_scen(result),
        choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
    )
    return JSONResponse(completion.model_dump(mode="json"), headers=_headers(_scen(result)))


@router.post("/chat/completions", response_model=ChatCompletion, responses=_ERRORS, dependencies=[JsonBody])
async def create_chat_completion(body: ChatRequest, service: ServiceDep, served: ServedDep) -> Response:
    """The messages go through the model's chat template; the answer is routed on the last user
    message. A chat of one user message is exactly ``/generate``'s prompt."""
    answer = _Answer.of(body.model, served, chat=True)
    sampling = _sampling(body, body.token_budget)
    prompt = Chat(tuple(Message("system" if m.role == "developer" else m.role, m.content) for m in body.messages))
    if body.stream:
        return await _streamed(service, prompt, sampling, answer, _include_usage(body))
    result = await service.complete(prompt, sampling)
    completion = ChatCompletion(
        id=answer.id, created=answer.created, model=answer.model, usage=_usage(result), scen=_scen(result),
        choices=[ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
    )
    return JSONResponse(completion.model_dump(mode="json"), headers=_headers(_scen(result)))


# ---- shared ----------------------------------------------------------------------------------------

@dataclass
class _Answer:
    id: str
    created: int
    model: str
    chat: bool

    @classmethod
    def of(cls, model: str, served: ServedModel, chat: bool) -> _Answer:
        if model != served.model_name:
            raise ModelNotFound(f"model {model!r} is not served here; GET /v1/models lists the one that is")
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, chat)


def _sampling(body: CompletionRequest | ChatRequest, max_tokens: int) -> Sampling:
    return Sampling(max_tokens, body.temperature, body.top_p, body.seed, stop_strings(body.stop))


def _include_usage(body: CompletionRequest | ChatRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _usage(result: Completion) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens)


def _scen(result: Completion | Routed) -> ScenRouting:
    if isinstance(result, Routed):
        return ScenRouting(edit_id=result.route.edit_id, activation=result.route.activation,
                           model_version=result.model_version)
    return ScenRouting(edit_id=result.edit_id, activation=result.activation, model_version=result.model_version)


def _headers(scen: ScenRouting) -> dict[str, str]:
    return {
        "X-Scen-Edit-Id": scen.edit_id or "",
        "X-Scen-Activation": repr(scen.activation),
        "X-Scen-Model-Version": str(scen.model_version),
    }


# ---- streaming -------------------------------------------------------------------------------------

async def _streamed(service: Service, prompt: Prompt, sampling: Sampling, answer: _Answer,
                    include_usage: bool) -> StreamingResponse:
    # Waits for the prompt to be routed, so the headers can say where it went, and a failure
    # before the first token is still an ordinary error response.
    stream, routed = await service.stream(prompt, sampling)
    scen = _scen(routed)
    chunks = _Chunks(answer, scen.model_dump(mode="json"), include_usage)
    headers = {**_headers(scen), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_events(stream, routed, chunks), media_type="text/event-stream", headers=headers)


async def _events(stream: TokenStream, routed: Routed, chunks: _Chunks) -> AsyncIterator[str]:
    try:
        if chunks.answer.chat:  # OpenAI opens a chat stream with the role
            yield _sse(chunks.choice("", role=True))
        async for event in stream.events():
            if isinstance(event, Delta):
                yield _sse(chunks.choice(event.text))
            elif isinstance(event, Finished):
                yield _sse(chunks.choice(None, finish=event.finish_reason))
                if chunks.include_usage:
                    yield _sse(chunks.usage(routed.prompt_tokens, event.completion_tokens))
        yield "data: [DONE]\n\n"
    except Exception:
        # The status line has gone out: the failure can only be told in the stream, in the
        # service's error body, and the stream ends without [DONE].
        log.exception("a streamed generation failed")
        yield _sse({"error": "internal error", "error_type": "internal_error"})
    finally:
        stream.cancel()  # a client that went away frees the model at its next token


@dataclass
class _Chunks:
    """OpenAI's chunk objects for one answer."""

    answer: _Answer
    scen: dict[str, Any]
    include_usage: bool

    def choice(self, text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.answer.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice |= {"finish_reason": finish, "logprobs": None}
        return self._chunk([choice], usage=None)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self._chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                      "total_tokens": prompt_tokens + completion_tokens})

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.answer.id, "object": "chat.completion.chunk" if self.answer.chat else "text_completion",
            "created": self.answer.created, "model": self.answer.model, "choices": choices, "scen": self.scen,
        }
        if self.include_usage:  # OpenAI: null in every chunk but the last
            chunk["usage"] = usage
        return chunk


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
