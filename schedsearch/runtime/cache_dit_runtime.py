"""cache-dit (PyPI `cache-dit`, 1.5.x; an optional extra) as a runtime policy: DBCache with its TaylorSeer
calibrator, enabled through cache-dit's own `enable_cache` and configs, never re-implemented."""

from __future__ import annotations

import importlib.util

from schedsearch.errors import UnavailableError

CACHE_DIT_RANGE = ">=1.5,<1.6"


class CacheDitUnavailableError(UnavailableError):
    """cache-dit is not installed: the message names the extra."""


def require_cache_dit(field: str) -> None:
    """Refuse a cache-dit policy or export before any work when the library is missing."""
    if importlib.util.find_spec("cache_dit") is None:
        raise CacheDitUnavailableError(field, "needs cache-dit, which is not installed",
                                       f'pip install "schedsearch[cache-dit]" (cache-dit {CACHE_DIT_RANGE})')
