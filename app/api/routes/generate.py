from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api.auth import require_reader
from app.api.deps import JsonBody, ServiceDep, get_served
from app.api.schemas import GenerateRequest, GenerateResponse, Routing, stop_strings
from app.live.generation import Sampling

router = APIRouter(tags=["generate"])


@router.post("/generate", response_model=GenerateResponse,
             dependencies=[Depends(require_reader), JsonBody, Depends(get_served)])
async def generate(body: GenerateRequest, service: ServiceDep) -> GenerateResponse:
    """Answer with the live model (role reader); concurrent requests share model calls."""
    sampling = Sampling(body.max_new_tokens, body.temperature, body.top_p, body.seed, stop_strings(body.stop))
    result = await service.complete(body.prompt, sampling)
    return GenerateResponse(
        text=result.text,
        routing=Routing(edit_id=result.edit_id, activation=result.activation),
        model_version=result.model_version,
    )
