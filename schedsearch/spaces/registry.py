"""Search spaces by name, for the CLI and study configs."""

from __future__ import annotations

from typing import Any

from schedsearch.errors import UserInputError
from schedsearch.spaces.base import ModelStructure, SearchSpace
from schedsearch.spaces.cache_interval import CacheIntervalSpace
from schedsearch.spaces.cache_mask import CacheMaskSpace
from schedsearch.spaces.compensation import CompensationSpace
from schedsearch.spaces.joint import JointSpace
from schedsearch.spaces.policy import PolicySpace
from schedsearch.spaces.solver import SolverSpace

SPACES: dict[str, type[SearchSpace]] = {
    "solver": SolverSpace,
    "cache": CacheMaskSpace,
    "cachequant": CacheIntervalSpace,
    "dc": CompensationSpace,
    "joint": JointSpace,
    "policy": PolicySpace,
}

__all__ = ["SPACES", "make_space"]


def make_space(name: str, structure: ModelStructure, **options: Any) -> SearchSpace:
    """Build the space `name` for a model's structure; `options` are that space's keyword arguments."""
    if name not in SPACES:
        raise UserInputError("--space", f"unknown {name!r}", f"use one of {sorted(SPACES)}")
    try:
        return SPACES[name](structure, **options)
    except TypeError as exc:  # an unknown keyword: say which space rejected it
        raise UserInputError(f"space_options ({name})", str(exc), "drop the unknown option") from exc
    except UserInputError:
        raise
    except ValueError as exc:  # a space's own checks of its options against the model's structure
        raise UserInputError(f"space {name!r}", str(exc), "change the space's options, or use another space") from exc
