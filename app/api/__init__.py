"""The HTTP API: FastAPI app factory, routers, schemas and the /generate batcher."""
