"""Shared base of the methods whose artifacts are fitted against a base model.

Celeb Basis coefficients and LiDB weights only mean something for the base
model they were optimised against, so an identity qualifies only with an
artifact whose ``model_id`` is this pipeline's base model.
"""

from __future__ import annotations

from collections.abc import Sequence

from generators.methods.base import IdentityMethod, IdentityRequest
from vault.errors import InvalidInput


class FittedMethod(IdentityMethod):
    """An IdentityMethod whose artifact must match ``base_model_id``."""

    base_model_id: str = ""

    def problem(self, request: IdentityRequest) -> str | None:
        kind = self.artifact_kind
        arts = request.artifacts_of(kind)
        if not arts:
            return (f"{request.handle} has no {kind} artifact (fit one with `idvault "
                    f"personalize {request.handle} --kind {kind}`)")
        if any(a["model_id"] == self.base_model_id for a in arts):
            return None
        return (f"{request.handle}'s {kind} artifact was fitted against "
                f"{', '.join(sorted(a['model_id'] for a in arts))}, but this base model is "
                f"{self.base_model_id}; fit it again against this base model")

    def select(self, requests: Sequence[IdentityRequest]) -> None:
        for r in requests:
            why = self.problem(r)
            if why:
                raise InvalidInput(why, handle=r.handle)
            r.artifact = next(a for a in r.artifacts_of(self.artifact_kind)
                              if a["model_id"] == self.base_model_id)
