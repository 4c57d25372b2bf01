from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api.deps import ServiceDep, get_served
from app.api.schemas import GenerateRequest, GenerateResponse, Routing

router = APIRouter(tags=["generate"])


@router.post("/generate", response_model=GenerateResponse, dependencies=[Depends(get_served)],
             responses={422: {"description": "Invalid request"}, 503: {"description": "Not ready"}})
async def generate_text(body: GenerateRequest, service: ServiceDep) -> GenerateResponse:
    """Answer with the live model; concurrent requests share model calls."""
    result, version = await service.generate(body.prompt, body.max_new_tokens, body.temperature, body.seed)
    return GenerateResponse(
        text=result.text,
        routing=Routing(edit_id=result.edit_id, activation=result.activation),
        model_version=version,
    )
