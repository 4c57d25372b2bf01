"""The interactive API docs, served offline: Swagger UI's files come from the pinned
``swagger-ui-bundle`` package, never from a CDN. And the OpenAPI document's error responses:
every status a route can answer is documented with the service's error body."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from app.api.errors import STANDARD_ERRORS, ErrorBody

ASSETS = "/docs/assets"
_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
# Routes whose changes SCEN_RATE_LIMIT_PER_MINUTE counts (app/api/ratelimit.py).
_RATE_LIMITED = {("post", "/edits"), ("post", "/edits/{edit_id}/rollback"), ("post", "/edits/{edit_id}/restore")}
_NO_DEPENDENCIES = {("get", "/health")}


def install_docs(app: FastAPI) -> None:
    """``/docs`` with local assets; the app must be made with ``docs_url=None, redoc_url=None``."""
    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - API docs",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
            # No badge fetched from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = document_errors(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Every operation lists the error statuses it can answer, each with ``ErrorBody``; FastAPI's
    own ``{"detail": [...]}`` 422 body, which this service never sends, is gone."""
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            codes: set[int] = set()
            if op.get("security"):
                codes |= {401, 403}
            if "requestBody" in op:
                codes |= {413, 415, 422}
            if op.get("parameters"):
                codes.add(422)
            if (method, path) in _RATE_LIMITED:
                codes.add(429)
            if (method, path) not in _NO_DEPENDENCIES:
                codes.add(503)
            for code in sorted(codes):
                entry = responses.setdefault(str(code), {"description": STANDARD_ERRORS[code]})
                entry["content"] = {"application/json": {"schema": _ERROR_REF}}
            for code, entry in responses.items():
                if code.startswith(("4", "5")):
                    entry["content"] = {"application/json": {"schema": _ERROR_REF}}
            if 401 in codes:
                responses["401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"},
                                                                    "description": "Bearer"}}
            op["responses"] = dict(sorted(responses.items()))
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    components["ErrorBody"] = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    return schema
