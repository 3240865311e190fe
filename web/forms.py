"""The endpoint forms: form fields to request bodies, and validation errors back to the form
field they belong to, so each message shows next to its field; an endpoint's spec as the edit
form shows it. Used by `api.routes.ui`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from appliance.errors import validation_message
from appliance.models import Endpoint
from web import views

# form field -> request field (LLM Engine's create/update body)
REQUEST_FIELDS = {
    "name": "name",
    "framework": "inference_framework",
    "model": "model_name",
    "context": "max_model_len",
    "gpus": "gpus",
    "min_replicas": "min_workers",
    "max_replicas": "max_workers",
    "concurrency": "per_worker",
    "endpoint_type": "endpoint_type",
    "cpus": "cpus",
    "memory": "memory",
    "idle_timeout": "idle_timeout_seconds",
    "public": "public_inference",
}
# request or domain error field -> form field
FORM_FIELDS = {request: form for form, request in REQUEST_FIELDS.items()} | {
    "model": "model",
    "checkpoint_path": "model",
    "num_shards": "gpus",
}
# request field -> the label the form shows it under, for messages that name fields
LABELS = {
    "min_workers": "Min replicas",
    "max_workers": "Max replicas",
    "per_worker": "Requests per replica",
    "max_model_len": "Context length",
    "idle_timeout_seconds": "Idle timeout",
    "cpus": "CPUs",
    "gpus": "GPUs",
}
FIELD_NAMES = re.compile(r"\b(" + "|".join(LABELS) + r")\b")
EDITABLE = (
    "model",
    "context",
    "gpus",
    "min_replicas",
    "max_replicas",
    "concurrency",
    "cpus",
    "memory",
    "idle_timeout",
    "public",
)
FRIENDLY = {
    ("name", "string_too_long"): "At most 63 characters.",
    ("name", "missing"): "Give the endpoint a name.",
    ("model", "missing"): "Name a model: a Hugging Face id or a file in the models directory.",
    ("model", "string_too_short"): "Name a model: a Hugging Face id or a file in the models "
    "directory.",
    ("context", "int_parsing"): "Enter a number of tokens (once set, it can be changed but not "
    "emptied).",
}
NUMBER_ERRORS = {"int_parsing", "int_type", "float_parsing", "int_from_float"}
BOUNDS = {
    "greater_than_equal": ("ge", "Must be {} or more."),
    "greater_than": ("gt", "Must be more than {}."),
    "less_than_equal": ("le", "Must be {} or less."),
    "less_than": ("lt", "Must be less than {}."),
}
DEFAULTS = {
    "framework": "llamacpp",
    "context": "",
    "gpus": "0",
    "min_replicas": "1",
    "max_replicas": "1",
    "concurrency": "2",
    "endpoint_type": "streaming",
    "cpus": "",
    "memory": "",
    "idle_timeout": "",
    "public": "",  # private unless asked: only the team's keys may call a new endpoint
}


def _values(form: Mapping[str, str], names: Iterable[str]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in names:
        value = str(form.get(name, "")).strip()
        if name == "public":
            body[REQUEST_FIELDS[name]] = value == "on"
        elif value:
            body[REQUEST_FIELDS[name]] = value
    return body


def create_request(form: Mapping[str, str]) -> dict[str, Any]:
    """A create body from the form; empty fields are left to the server's defaults."""
    return _values(form, REQUEST_FIELDS)


def update_request(form: Mapping[str, str], current: Mapping[str, str]) -> dict[str, Any]:
    """An update body with only the fields the user changed, so an unchanged model name is
    not resolved again (and nothing rolls that need not)."""
    changed = [
        name
        for name in EDITABLE
        if str(form.get(name, "")).strip() != str(current.get(name, "")).strip()
    ]
    body = _values(form, changed)
    if "context" in changed and "max_model_len" not in body:
        body["max_model_len"] = ""  # emptied: refused (FRIENDLY), rather than ignored
    return body


def current_values(endpoint: Endpoint) -> dict[str, str]:
    """An endpoint's spec as the edit form shows it."""
    return {
        "name": endpoint.name,
        "framework": endpoint.framework,
        "model": views.short_model(endpoint.model),
        "context": str(endpoint.args.get("max_model_len") or ""),
        "gpus": str(endpoint.gpus),
        "min_replicas": str(endpoint.min_replicas),
        "max_replicas": str(endpoint.max_replicas),
        "concurrency": str(endpoint.target_concurrency),
        "endpoint_type": endpoint.endpoint_type,
        "cpus": cpus_text(endpoint.cpus),
        "memory": memory_text(endpoint.memory_bytes),
        "idle_timeout": str(endpoint.idle_timeout_s),
        "public": "on" if endpoint.public_inference else "",
    }


def form_field(field: str | None) -> str:
    """The form field an error belongs to; "" for the form as a whole."""
    return FORM_FIELDS.get(field or "", "")


def form_message(message: str) -> str:
    """A message that names request fields, with the form's labels for them."""
    return FIELD_NAMES.sub(lambda found: LABELS[found.group(1)], message)


def validation_errors(errors: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Pydantic's errors as {form field: message}, first message per field."""
    out: dict[str, str] = {}
    for error in errors:
        loc = error.get("loc") or ("",)
        field = form_field(str(loc[0]))
        kind = str(error.get("type", ""))
        if (field, kind) in FRIENDLY:
            message = FRIENDLY[(field, kind)]
        elif kind in NUMBER_ERRORS:
            message = "Enter a whole number."
        elif kind in BOUNDS and BOUNDS[kind][0] in (error.get("ctx") or {}):
            bound, text = BOUNDS[kind]
            message = text.format(error["ctx"][bound])
        else:
            message = form_message(validation_message(error))
        out.setdefault(field, message)
    return out


def memory_text(n: int) -> str:
    """Bytes as the form shows them: 4Gi, 512Mi or a byte count."""
    for unit, factor in (("Gi", 2**30), ("Mi", 2**20)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def cpus_text(cpus: float) -> str:
    return f"{cpus:g}"
