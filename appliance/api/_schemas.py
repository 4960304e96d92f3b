"""The wire models of the HTTP API (docs/CONTRACT.md §2): what a client may send."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TaskIn(BaseModel):
    """A task submission."""

    model_config = ConfigDict(extra="forbid", strict=True)

    module: str = Field(max_length=256 * 1024)
    function: str = Field(max_length=100)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)
    secrets: list[str] = Field(default_factory=list, max_length=32)
    imports: list[str] = Field(default_factory=list, max_length=32)


class WorkflowIn(BaseModel):
    """A workflow submission: steps shaped like tasks, run in order, each receiving the
    previous step's result as its first positional argument."""

    model_config = ConfigDict(extra="forbid", strict=True)

    steps: list[TaskIn] = Field(min_length=1, max_length=100)
