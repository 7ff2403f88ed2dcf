"""The web page at `/`: search the index by words or by a dropped image, zero-shot a dropped image
against typed labels, and the model's card with its live figures.

Three static files shipped in the package (`ui/`), read once when the app is made and served from
memory by three fixed routes: no route here takes a path, and nothing is fetched from elsewhere
(the page works offline). The page calls the same JSON routes as any client, sending the API key
the person typed, which it keeps in the tab's session storage.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/ui/style.css": ("style.css", "text/css; charset=utf-8")}
# The page's own script and style only, images from this server or the person's own drop (blob:,
# data:); no inline script, no other origin: an injected result path cannot become code.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                           "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


def add_page(app: FastAPI) -> None:
    folder = resources.files("mlx_clip.serve") / "ui"
    for route, (name, media_type) in PAGE_FILES.items():
        app.add_api_route(route, _file_route((folder / name).read_bytes(), media_type), methods=["GET"],
                          include_in_schema=False)


def _file_route(body: bytes, media_type: str):
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff"}

    async def serve_file() -> Response:
        return Response(body, media_type=media_type, headers=headers)

    return serve_file
