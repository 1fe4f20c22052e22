"""What tasks hand each other where a core object is not a plain Prefect result.

The solve task returns its coefficients as JSON (small, readable in the UI and in any result
storage); every consumer decodes them here, so the cache keys and the merge tasks agree.
"""

from __future__ import annotations

from metamerge.engine.coefficients import Coefficients


def solved_payload(coefficients: Coefficients) -> dict:
    return {"json": coefficients.to_json()}


def coefficients_of(solved: dict) -> Coefficients:
    return Coefficients.from_json(solved["json"])
