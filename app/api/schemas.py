"""Request and response bodies. Limits are declared here, once."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.db.models import EditStatus

MAX_TEXT_CHARS = 4000
MAX_REPHRASES = 16
MAX_METADATA_BYTES = 16_384
MAX_NEW_TOKENS = 512
MAX_LIST_LIMIT = 200


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


class EditCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, examples=["Who is the CEO of Acme?"])
    target: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, examples=["Jane Doe"])
    rephrases: list[str] = Field(default_factory=list, max_length=MAX_REPHRASES)
    metadata: dict[str, Any] = Field(default_factory=dict)
    subject: str | None = Field(
        default=None, min_length=1, max_length=MAX_TEXT_CHARS, examples=["Acme"],
        description="The entity the fact is about, as written in the prompt; inferred when absent",
    )

    @field_validator("prompt", "target", "subject")
    @classmethod
    def _blank(cls, value: str | None) -> str | None:
        return None if value is None else _not_blank(value)

    @field_validator("rephrases")
    @classmethod
    def _rephrases(cls, values: list[str]) -> list[str]:
        for i, value in enumerate(values):
            if not value.strip():
                raise ValueError(f"rephrases[{i}] must not be empty or only whitespace")
            if len(value) > MAX_TEXT_CHARS:
                raise ValueError(f"rephrases[{i}] has {len(value)} characters; the limit is {MAX_TEXT_CHARS}")
        return values

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict) -> dict:
        size = len(json.dumps(value))
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
        return value


class EditMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    steps: int | None = None
    seconds: float | None = None
    loss: float | None = None
    activation: float | None = None
    rephrase_activations: list[float] = Field(default_factory=list)
    # The subject the engine trained on: the one posted, or the one it inferred.
    subject: str | None = None


class EditPublic(BaseModel):
    id: str
    status: EditStatus
    prompt: str
    target: str
    # As posted; the subject the engine used is ``metrics.subject``.
    subject: str | None
    rephrases: list[str]
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    activated_at: datetime | None
    finished_at: datetime | None
    rolled_back_at: datetime | None
    attempts: int
    # The worker that last took the edit.
    worker: str | None
    metrics: EditMetrics | None
    expert_path: str | None
    expert_sha256: str | None
    error: str | None
    # The newer edit of the same prompt that replaced this one.
    superseded_by: str | None
    # Whether the API process that answered routes to this edit right now.
    live: bool

    @classmethod
    def of(cls, edit, live_ids: set[str] | frozenset[str] = frozenset()) -> EditPublic:
        return cls(
            id=edit.id, status=EditStatus(edit.status), prompt=edit.prompt, target=edit.target, subject=edit.subject,
            rephrases=list(edit.rephrases or []), metadata=dict(edit.meta or {}),
            created_at=edit.created_at, updated_at=edit.updated_at, started_at=edit.started_at,
            activated_at=edit.activated_at, finished_at=edit.finished_at, rolled_back_at=edit.rolled_back_at,
            attempts=edit.attempts, worker=edit.worker, metrics=EditMetrics(**edit.metrics) if edit.metrics else None,
            expert_path=edit.expert_path, expert_sha256=edit.expert_sha256, error=edit.error,
            superseded_by=edit.superseded_by, live=edit.id in live_ids,
        )


class EditsPublic(BaseModel):
    items: list[EditPublic]
    total: int


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    max_new_tokens: int = Field(default=64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0, description="0 = greedy")
    seed: int | None = Field(default=None, ge=0, description="Sampling seed (temperature > 0)")

    @field_validator("prompt")
    @classmethod
    def _blank(cls, value: str) -> str:
        return _not_blank(value)


class Routing(BaseModel):
    edit_id: str | None
    activation: float


class GenerateResponse(BaseModel):
    text: str
    routing: Routing
    model_version: int


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    model: str
    model_version: int
    live_edits: int
    queue: str
    worker: str
