"""`/v1/storage/hf-downloads`: download a Hugging Face model into the cache ahead of time,
without an endpoint, and read how far it got (`manage` scope). The builder does the work, in
the same job an endpoint of that model would wait on."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from api import hf_downloads
from api.deps import AddressDep, CallerDep, StateDep, require
from api.hf_downloads import HfDownloadCreate

router = APIRouter(
    prefix="/v1/storage/hf-downloads", tags=["storage"], dependencies=[require("manage")]
)


@router.post("", status_code=202)
def create_hf_download(
    body: HfDownloadCreate, caller: CallerDep, state: StateDep, address: AddressDep
) -> dict[str, Any]:
    """Starts (or, after a failure, retries) the download; answers its state, `pending`."""
    return hf_downloads.request_download(
        body, caller, state.redis, state.engine, state.settings, address
    )


@router.get("")
def read_hf_downloads(caller: CallerDep, state: StateDep) -> dict[str, Any]:
    """The downloads the key's team asked for (every team's for an administrator), with the
    teams that asked (`requested_by`)."""
    return hf_downloads.read_downloads(caller, state.redis, state.settings)


@router.get("/{repository:path}")
def read_hf_download(
    repository: str,
    caller: CallerDep,
    state: StateDep,
    revision: str = Query("main", max_length=200, description="The revision asked for."),
) -> dict[str, Any]:
    """One download: `state` pending, downloading, done, failed (`message` says why) or
    removed (deleted from the cache since), and `progress` (bytes and files done of the
    total). Another team's download answers 404, as one never asked for does."""
    return hf_downloads.read_download(repository, revision, caller, state.redis, state.settings)
