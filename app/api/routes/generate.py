from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import LiveDep, ServiceDep
from app.api.schemas import GenerateRequest, GenerateResponse, Routing

router = APIRouter(tags=["generate"])


@router.post("/generate", response_model=GenerateResponse,
             responses={422: {"description": "Invalid request"}, 503: {"description": "Not ready"}})
async def generate(body: GenerateRequest, live: LiveDep, service: ServiceDep) -> GenerateResponse:
    """Answer with the live model; concurrent requests share model calls."""
    service.metrics.generate_requests.inc()
    result, version = await service.batcher.submit(body.prompt, body.max_new_tokens, body.temperature, body.seed)
    return GenerateResponse(
        text=result.text,
        routing=Routing(edit_id=result.edit_id, activation=result.activation),
        model_version=version,
    )
