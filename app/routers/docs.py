"""/docs (Swagger UI) and /redoc, served with no CDN: every asset comes from app/static/vendor.

The pages carry no inline script (the Swagger UI start-up lives in app/static/docs/swagger-init.js) and
send a Content-Security-Policy that lets the browser fetch from this server only.
"""
from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
ASSETS_URL = "/docs-assets"

# Swagger UI and ReDoc style themselves with inline styles and data: images; ReDoc searches in a blob worker.
DOCS_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'self'; "
            "base-uri 'none'; form-action 'self'")

router = APIRouter(include_in_schema=False)


def mount_docs_assets(app) -> None:
    """Serve the vendored Swagger UI / ReDoc files and the page script under /docs-assets."""
    for folder in ("vendor", "docs"):
        app.mount(f"{ASSETS_URL}/{folder}", StaticFiles(directory=STATIC / folder), name=f"docs-assets-{folder}")


def _page(title: str, head: str, body: str) -> HTMLResponse:
    html = (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{escape(title)}</title>\n'
            f"{head}</head>\n<body>\n{body}</body>\n</html>\n")
    return HTMLResponse(html, headers={"Content-Security-Policy": DOCS_CSP, "Cache-Control": "no-cache"})


def _urls(request: Request) -> tuple[str, str]:
    """The assets base URL and the OpenAPI document's URL, both under the app's root_path."""
    root = request.scope.get("root_path", "")
    return f"{root}{ASSETS_URL}", f"{root}{request.app.openapi_url}"


def _favicon(assets: str) -> str:
    return f'<link rel="icon" type="image/png" href="{assets}/vendor/swagger-ui/favicon-32x32.png">\n'


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    """Interactive API docs (Swagger UI), with an Authorize button for the API key."""
    assets, openapi_url = _urls(request)
    return _page(f"{request.app.title} - API docs",
                 _favicon(assets) + f'<link rel="stylesheet" href="{assets}/vendor/swagger-ui/swagger-ui.css">\n',
                 f'<div id="swagger-ui" data-openapi-url="{escape(openapi_url)}"></div>\n'
                 f'<script src="{assets}/vendor/swagger-ui/swagger-ui-bundle.js"></script>\n'
                 f'<script src="{assets}/docs/swagger-init.js"></script>\n')


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    """The same API reference, rendered by ReDoc."""
    assets, openapi_url = _urls(request)
    return _page(f"{request.app.title} - API reference",
                 _favicon(assets),
                 f'<redoc spec-url="{escape(openapi_url)}"></redoc>\n'
                 f'<script src="{assets}/vendor/redoc/redoc.standalone.js"></script>\n')
