"""Bodies of the OpenAI-compatible endpoints (``/v1/...``).

Requests are strict like every other body here: unknown fields and values of the wrong JSON
type are refused, and each value is bounded as in ``/generate``. Only what the service can
honour is accepted; ``n`` must be 1. Responses follow OpenAI's shapes, plus ``scen``: the
routing decision, which OpenAI clients ignore and SCEN-aware ones read.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.api.schemas import MAX_NEW_TOKENS, MAX_TEXT_CHARS, Seed, Stops, Temperature, Text, TopP
from app.live.generation import FinishReason

MAX_MESSAGES = 64
# Every message may be as long as a /generate prompt, but not the whole chat many times over.
MAX_CHAT_CHARS = 4 * MAX_TEXT_CHARS
DEFAULT_MAX_TOKENS = 64

ModelId = Annotated[str, Field(min_length=1, max_length=256, examples=["SmolLM2-135M-Instruct"])]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(default=False, description="Send a last chunk with the token counts")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelId
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS,
                                   description=f"Default {DEFAULT_MAX_TOKENS}")
    temperature: Temperature = Field(default=0.0, description="0 (the default, as /generate) = greedy")
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stops | None = None
    n: int | None = Field(default=None, description="Only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256, description="Accepted and ignored")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported: one choice per request")
        return value

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def token_budget(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS


class CompletionRequest(_Request):
    prompt: Text = Field(description="Asked as /generate asks it: as the user's turn of the chat template")


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: Text
    name: str | None = Field(default=None, max_length=64, description="Accepted and ignored")


class ChatRequest(_Request):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS,
                                              description="OpenAI's newer name for max_tokens")

    @field_validator("messages")
    @classmethod
    def _chat(cls, messages: list[ChatMessageIn]) -> list[ChatMessageIn]:
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's: the answer is routed on it")
        chars = sum(len(m.content) for m in messages)
        if chars > MAX_CHAT_CHARS:
            raise ValueError(f"the messages hold {chars} characters; the limit is {MAX_CHAT_CHARS}")
        return messages

    @model_validator(mode="after")
    def _one_budget(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def token_budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


# ---- responses -----------------------------------------------------------------------------------

class ScenRouting(BaseModel):
    """Which edit answered (null: the base model), how strongly its neuron fired, and the live
    model version that answered. Also sent as the X-Scen-* response headers."""

    edit_id: str | None
    activation: float
    model_version: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "scen-service"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    scen: ScenRouting


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    scen: ScenRouting
