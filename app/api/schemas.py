"""Request and response bodies. Limits are declared here, once.

Request bodies are strict: a JSON ``false`` is not a seed and ``"8"`` is not a token count.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from app.api.inputs import MAX_METADATA_DEPTH, json_problem, shown_metadata, storable_text
from app.db.models import EditStatus

MAX_TEXT_CHARS = 4000
MAX_REPHRASES = 16
MAX_METADATA_BYTES = 16_384
MAX_NEW_TOKENS = 512
MAX_LIST_LIMIT = 200
# Far past any real listing, and within every database's integer range.
MAX_LIST_OFFSET = 2**31 - 1
# The largest integer every JSON client (and the OpenAPI schema, which holds it as a float)
# reads exactly; torch itself takes up to 2**64 - 1.
MAX_SEED = 2**53 - 1
# Below this, logits divided by the temperature overflow to inf and sampling breaks;
# such a temperature is greedy decoding in all but name, which 0 asks for.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 5.0
MAX_STOPS = 4
MAX_STOP_CHARS = 64

# What the checks below accept, for the OpenAPI schema: some character other than
# whitespace, and no NUL.
_TEXT_PATTERN = r"^[^\u0000]*[^\s\u0000][^\u0000]*$"


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


# Text a client writes: not blank, and storable in both databases.
Text = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TEXT_CHARS, json_schema_extra={"pattern": _TEXT_PATTERN}),
    AfterValidator(storable_text),
    AfterValidator(_not_blank),
]


class EditCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Text = Field(examples=["Who is the CEO of Acme?"])
    target: Text = Field(examples=["Jane Doe"])
    rephrases: list[Text] = Field(default_factory=list, max_length=MAX_REPHRASES)
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Free-form JSON, at most {MAX_METADATA_BYTES} bytes and {MAX_METADATA_DEPTH} levels deep",
    )
    subject: Text | None = Field(
        default=None, examples=["Acme"],
        description="The entity the fact is about, as written in the prompt; inferred when absent",
    )

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict) -> dict:
        problem = json_problem(value, MAX_METADATA_DEPTH)
        if problem is not None:
            raise ValueError(f"metadata {problem}")
        size = len(json.dumps(value))
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
        return value


# The most a batch body may hold whatever SCEN_MAX_BATCH_EDITS says (its own upper bound).
MAX_BATCH_EDITS = 1000


class EditBatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    edits: list[EditCreate] = Field(min_length=1, max_length=MAX_BATCH_EDITS,
                                    description="Checked all before any is written; at most SCEN_MAX_BATCH_EDITS")


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
    def of(cls, edit, live_ids: set[str] | frozenset[str] = frozenset(),
           unserved: Mapping[str, str] | None = None) -> EditPublic:
        """``unserved``: active edits the answering process cannot serve, with the reason, which
        the response gives as the edit's error."""
        error = edit.error
        if edit.status == EditStatus.active and unserved and edit.id in unserved:
            error = unserved[edit.id]
        return cls(
            id=edit.id, status=EditStatus(edit.status), prompt=edit.prompt, target=edit.target, subject=edit.subject,
            rephrases=list(edit.rephrases or []), metadata=shown_metadata(edit.meta),
            created_at=edit.created_at, updated_at=edit.updated_at, started_at=edit.started_at,
            activated_at=edit.activated_at, finished_at=edit.finished_at, rolled_back_at=edit.rolled_back_at,
            attempts=edit.attempts, worker=edit.worker, metrics=EditMetrics(**edit.metrics) if edit.metrics else None,
            expert_path=edit.expert_path, expert_sha256=edit.expert_sha256, error=error,
            superseded_by=edit.superseded_by, live=edit.id in live_ids,
        )


class EditsPublic(BaseModel):
    items: list[EditPublic]
    total: int


class EditBatchPublic(BaseModel):
    # In the order posted.
    ids: list[str]
    items: list[EditPublic]


MAX_REASON_CHARS = 1000
Reason = Annotated[
    str,
    Field(min_length=1, max_length=MAX_REASON_CHARS, json_schema_extra={"pattern": _TEXT_PATTERN}),
    AfterValidator(storable_text),
    AfterValidator(_not_blank),
]


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: Reason = Field(description="Why the edit is rolled back; kept in its events", examples=["OPS-2: wrong CEO"])


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: Reason | None = Field(default=None, description="Why it is restored; kept in its events")


class EditEventPublic(BaseModel):
    id: int
    edit_id: str
    # created, training, activated, failed, superseded, rolled_back, reinstated, restored, imported
    event: str
    # The edit's status after the change.
    status: EditStatus
    # The API key's name; "anonymous" in open mode; "worker" for training outcomes.
    actor: str
    reason: str | None
    request_id: str | None
    at: datetime
    details: dict[str, Any] | None

    @classmethod
    def of(cls, event) -> EditEventPublic:
        return cls(id=event.id, edit_id=event.edit_id, event=event.event, status=EditStatus(event.status),
                   actor=event.actor, reason=event.reason, request_id=event.request_id, at=event.at,
                   details=event.details)


class EditEventsPublic(BaseModel):
    items: list[EditEventPublic]


def _sampling_temperature(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return value


Temperature = Annotated[
    float,
    Field(ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
          description=f"0 = greedy; else sampling at {MIN_TEMPERATURE} to {MAX_TEMPERATURE}"),
    AfterValidator(_sampling_temperature),
]
TopP = Annotated[
    float,
    Field(gt=0.0, le=1.0, allow_inf_nan=False,
          description="Nucleus sampling (temperature > 0); absent: the model's own setting"),
]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="Sampling seed (temperature > 0)")]
# A stop string is matched in the decoded text and left out of the answer; it may hold any
# character but NUL, spaces and newlines included.
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(storable_text)]
Stops = Annotated[
    StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)],
    Field(description=f"Up to {MAX_STOPS} strings; the answer ends before the first that occurs"),
]


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Text
    max_new_tokens: int = Field(default=64, ge=1, le=MAX_NEW_TOKENS)
    temperature: Temperature = 0.0
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stops | None = None


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
    # "degraded": serving, but some active edits are not (see ``unserved_edits`` and ``detail``).
    status: str
    model: str
    model_version: int
    live_edits: int
    queue: str
    worker: str
    # Active edits this process cannot serve (expert file missing or unreadable), with the reason.
    unserved_edits: dict[str, str] = Field(default_factory=dict)
    detail: str | None = None
