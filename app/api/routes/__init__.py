from fastapi import APIRouter, Depends

from app.api.deps import reject_unknown_query
from app.api.routes import edits, generate, health, openai

api_router = APIRouter(dependencies=[Depends(reject_unknown_query)])
api_router.include_router(edits.router)
api_router.include_router(generate.router)
api_router.include_router(health.router)
api_router.include_router(openai.router)
