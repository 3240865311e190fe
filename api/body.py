"""The base of every request body the api validates with pydantic.

Pydantic's lax mode takes JSON's `true` and `false` as the numbers 1 and 0, so
`"expires_in_seconds": true` made a key that expired a second later and `"gpus": true` asked for
one GPU. A number field of a `Body` refuses them, naming the field, as it refuses any other
value that is not a number; fields typed `bool`, or that take a bool among other types, keep
them.
"""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationInfo, field_validator


def _numeric(annotation: Any) -> bool:
    """Whether a field of this type takes a number and never a bool."""
    kinds: set[Any] = set()
    pending = [annotation]
    while pending:
        item = pending.pop()
        origin = typing.get_origin(item)
        if origin is Annotated:
            pending.append(typing.get_args(item)[0])
        elif origin is Union or origin is types.UnionType:
            pending.extend(typing.get_args(item))
        else:
            kinds.add(item)
    return bool(kinds & {int, float}) and bool not in kinds and Any not in kinds


@cache
def _numbers(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(
        name for name, field in model.model_fields.items() if _numeric(field.annotation)
    )


class Body(BaseModel):
    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in _numbers(cls):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value
