"""The JSON API, version 1: one blueprint per area, all under ``/v1``.

The areas declare their routes with :class:`web.api.blueprint.ApiBlueprint`;
this module only gathers them.
"""

from __future__ import annotations

from flask import Blueprint

from web.api import (
    artifacts,
    audit,
    enrollment,
    generation,
    identities,
    jobs,
    keys,
    meta,
    owner,
    personalization,
    reviews,
)
from web.api.blueprint import ApiBlueprint

# The order of the OpenAPI document's tags.
AREAS = (meta, owner, identities, enrollment, artifacts, reviews, jobs, generation,
         personalization, audit, keys)


def area_blueprints() -> list[ApiBlueprint]:
    return [m.bp for m in AREAS]


def create_api_blueprint() -> Blueprint:
    """The ``/v1`` blueprint with every area registered in it."""
    api = Blueprint("api", __name__, url_prefix="/v1")
    for bp in area_blueprints():
        api.register_blueprint(bp)
    return api
