"""LLM Engine's fine-tune routes (`/v1/llm/fine-tunes`...), which `llmengine.FineTune` calls:
the appliance serves models and does not train them, so every one answers 404 saying so, in
LLM Engine's `{"detail": ...}`, which the client raises as its NotFoundError with this message.
"""

from __future__ import annotations

from typing import NoReturn

from fastapi import APIRouter

from api.deps import require
from appliance.errors import NotFoundError

router = APIRouter(
    prefix="/v1/llm/fine-tunes", tags=["llm-endpoints"], dependencies=[require("manage")]
)
NOT_AVAILABLE = (
    "fine-tuning is not available on this appliance: it serves models and does not train "
    "them. Fine-tune elsewhere, put the weights in the models directory and create an "
    "endpoint with checkpoint_path"
)
METHODS = ["GET", "POST", "PUT", "DELETE"]


@router.api_route("", methods=METHODS, include_in_schema=False, response_model=None)
@router.api_route("/{rest:path}", methods=METHODS, include_in_schema=False, response_model=None)
def fine_tunes() -> NoReturn:
    raise NotFoundError(NOT_AVAILABLE)
