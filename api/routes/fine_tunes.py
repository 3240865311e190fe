"""LLM Engine's routes one box does not serve, which answer 404 saying so (and what to use
instead) in LLM Engine's `{"detail": ...}`, which its clients raise as their NotFoundError
with this message: fine-tunes (`/v1/llm/fine-tunes`..., `llmengine.FineTune`), batch jobs of a
Docker image and their bundles, model bundles and triggers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from fastapi import APIRouter

from api.deps import require
from appliance.errors import NotFoundError

NOT_AVAILABLE = (
    "fine-tuning is not available on this appliance: it serves models and does not train "
    "them. Fine-tune elsewhere, put the weights in the models directory and create an "
    "endpoint with checkpoint_path"
)
BATCH_JOBS = (
    "batch jobs of a Docker image are not available on this appliance: it runs no job "
    "containers. Batches of completions run on an endpoint's replicas: POST "
    "/v1/llm/batch-completions or /v2/batch-completions (LLM Engine), or /v1/batches (OpenAI)"
)
BUNDLES = (
    "model bundles are not available on this appliance: an endpoint is made from its model "
    "or image, not a bundle. Create one with POST /v1/llm/model-endpoints"
)
TRIGGERS = (
    "triggers are not available on this appliance: it runs no scheduled batch jobs. Send "
    "batches of completions when they are due: POST /v1/llm/batch-completions or /v1/batches"
)
UNSERVED = {  # route prefix -> what it answers
    "/v1/llm/fine-tunes": NOT_AVAILABLE,
    "/v1/docker-image-batch-jobs": BATCH_JOBS,
    "/v1/batch-jobs": BATCH_JOBS,
    "/v1/docker-image-batch-job-bundles": BATCH_JOBS,
    "/v1/model-bundles": BUNDLES,
    "/v2/model-bundles": BUNDLES,
    "/v1/triggers": TRIGGERS,
}
METHODS = ["GET", "POST", "PUT", "DELETE"]

router = APIRouter(tags=["llm-endpoints"], dependencies=[require("manage")])


def _refusal(message: str) -> Callable[[], NoReturn]:
    def unserved() -> NoReturn:
        raise NotFoundError(message)

    return unserved


for _prefix, _message in UNSERVED.items():
    for _path in (_prefix, _prefix + "/{rest:path}"):
        router.add_api_route(
            _path,
            _refusal(_message),
            methods=METHODS,
            include_in_schema=False,
            response_model=None,
        )
