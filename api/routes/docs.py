"""The API's reference pages, `/docs` (Swagger UI) and `/redoc` (ReDoc), over `/openapi.json`.

Their scripts come from a CDN, as FastAPI's own pages do, but at a fixed release rather than
FastAPI's floating `@5` and `@2`: these pages run on the appliance's own origin, next to the
web UI a signed-in admin uses, so a script published later under the same major version never
runs there unseen. ReDoc loads no Google Fonts (the box may have no internet; nothing is sent
to a third party for a font).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

SWAGGER_UI = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.17.14"
REDOC_JS = "https://cdn.jsdelivr.net/npm/redoc@2.1.3/bundles/redoc.standalone.js"
TITLE = "Model Engine Appliance"

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{TITLE} - Swagger UI",
        swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css",
    )


@router.get("/redoc")
def redoc() -> HTMLResponse:
    return get_redoc_html(
        openapi_url="/openapi.json",
        title=f"{TITLE} - ReDoc",
        redoc_js_url=REDOC_JS,
        with_google_fonts=False,
    )
