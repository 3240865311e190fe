"""The web UI's routes under `/ui`: pages rendered from `web`'s templates, reusing the REST
routes' own functions (create, update, delete, describe, logs, GPUs, keys) with the signed-in
caller, so the UI can do nothing the API would refuse. `router` gathers the feature modules'
routers and runs the charts' sampler in its lifespan; `root` redirects `/` to the UI. Both are
mounted by `api.main`.

    respond         pages, redirects and request helpers every route uses
    signin          sign-in and sign-out
    pages           endpoints list, endpoint page (live parts, logs), GPUs, tasks
    endpoint_forms  new, edit and delete an endpoint
    keys            API keys
    playground      chat page and its streamed completions
    operators       usage (and its CSV) and the audit log
    models          model files, Hugging Face cache models and images: upload, delete, prune
    sampler         counters into Redis for the charts (the lifespan)
"""

from __future__ import annotations

from fastapi import APIRouter

from api.routes.ui import endpoint_forms, keys, models, operators, pages, playground, signin
from api.routes.ui.pages import root
from api.routes.ui.respond import PageRefusedError, bad_request, refused
from api.routes.ui.sampler import sampling

__all__ = ["PageRefusedError", "bad_request", "refused", "root", "router"]

router = APIRouter(include_in_schema=False, lifespan=sampling)
router.include_router(signin.router)
router.include_router(endpoint_forms.router)  # before pages: /endpoints/new is no endpoint id
router.include_router(pages.router)
router.include_router(keys.router)
router.include_router(playground.router)
router.include_router(operators.router)
router.include_router(models.router)
