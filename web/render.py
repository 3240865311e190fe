"""The UI's Jinja2 environment: where templates and static files live, the filters the
templates use, and cache-busting asset URLs. Made once by `api.routes.ui`."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from web import views

HERE = Path(__file__).parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
STATIC_URL = "/ui/static"


def _asset_urls() -> dict[str, str]:
    """Each static file's URL with a hash of its content, so browsers cache it for good."""
    urls = {}
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
            urls[path.name] = f"{STATIC_URL}/{path.name}?v={digest}"
    return urls


def _ago(stamp: float | None) -> Markup:
    """A relative time the page's script keeps current (`data-ago`: its seconds when drawn),
    with the clock time as its tooltip."""
    if stamp is None:
        return Markup("—")
    seconds = max(0, int(time.time() - stamp))
    return Markup('<time data-ago="{}" title="{}">{}</time>').format(
        seconds, views.clock(stamp), escape(views.ago_text(seconds))
    )


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=jinja2.select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    urls = _asset_urls()
    env.globals["asset"] = lambda name: urls.get(name, f"{STATIC_URL}/{name}")
    env.filters["ago"] = _ago
    env.filters["clock"] = views.clock
    env.filters["when"] = views.when
    env.filters["size"] = views.size
    env.filters["tone"] = views.tone
    env.filters["endpoint_tone"] = views.endpoint_tone
    return env
