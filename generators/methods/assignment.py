"""Which identity method serves each identity of a prompt: the caller's choice, or
``auto`` (one method for everyone when one can, else per identity the first in the
preference order that serves it and has room). Decided from metadata alone, before any
weight is loaded or artifact decrypted. Methods mix freely in one image, image-token
methods included (each is its own adapter in regional attention); each method's own
limit (``max_identities``: StoryMaker's character slots) still holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from generators.methods.base import IdentityMethod, IdentityRequest
from generators.preflight import check_method_choice
from vault.errors import InvalidInput, ModelUnavailable

# check_method_choice lives in the torch-free generators.preflight (the CLI runs it before
# importing torch); re-exported here beside assign_methods, which the pipeline runs after it.
__all__ = ["assign_methods", "check_method_choice"]


def assign_methods(methods: Mapping[str, IdentityMethod], requests: list[IdentityRequest],
                   method: str | Mapping[str, str], preference: Sequence[str]
                   ) -> dict[str, list[IdentityRequest]]:
    """A method and an artifact per identity, grouped by method; raises before anything is
    decrypted. ``method``: ``auto``, a method name, or a mapping handle -> method."""
    if not requests:
        return {}
    if isinstance(method, str) and method != "auto":
        wanted = {r.index: method for r in requests}
    else:
        given = {} if isinstance(method, str) else {k.lstrip("@"): v for k, v in method.items()}
        wanted = {r.index: given[r.handle] for r in requests
                  if given.get(r.handle, "auto") != "auto"}
        open_ = [r for r in requests if r.index not in wanted]
        wanted.update(_auto(methods, open_, fixed=wanted, preference=preference))
    groups: dict[str, list[IdentityRequest]] = {}
    for r in requests:
        r.method = wanted[r.index]
        groups.setdefault(r.method, []).append(r)
    for name, members in groups.items():
        methods[name].select(members)  # refuses more identities than the method has room for
    return groups


def _auto(methods: Mapping[str, IdentityMethod], open_: list[IdentityRequest], *,
          fixed: dict[int, str], preference: Sequence[str]) -> dict[int, str]:
    """``--method auto``: one method for every open identity if one serves them all, else
    per identity the first in the preference order that serves it and has room."""
    if not open_:
        return {}
    order = [n for n in preference if n in methods]
    order += [n for n in methods if n not in order]
    reasons: dict[int, list[str]] = {r.index: [] for r in open_}
    missing: list[ModelUnavailable] = []  # methods whose weights are not installed
    absent: set[str] = set()
    serves: dict[str, set[int]] = {}
    room: dict[str, int | None] = {}
    for name in order:
        m = methods[name]
        serves[name] = set()
        try:
            for r in open_:
                why = m.problem(r)
                if why is None:
                    serves[name].add(r.index)
                else:
                    reasons[r.index].append(why)
            limit = m.max_identities()
        except ModelUnavailable as exc:
            missing.append(exc)
            absent.add(name)
            for r in open_:
                reasons[r.index].append(f"{name}: its weights are not in the models folder")
            serves[name], limit = set(), 0
        used = sum(1 for v in fixed.values() if v == name)
        room[name] = None if limit is None else limit - used
    everyone = {r.index for r in open_}
    for name in order:  # one method for all: one kind of conditioning, fewer LoRAs
        if serves[name] == everyone and (room[name] is None or room[name] >= len(open_)):
            return dict.fromkeys(everyone, name)
    out: dict[int, str] = {}
    for r in open_:
        for name in order:
            if r.index in serves[name] and (room[name] is None or room[name] > 0):
                out[r.index] = name
                if room[name] is not None:
                    room[name] -= 1
                break
        else:
            # Every method the identity has an artifact for lacks its weights (methods
            # that need none -- Celeb Basis, LiDB -- count only with an artifact).
            if missing and not any(r.artifacts_of(methods[n].artifact_kind)
                                   for n in order if n not in absent):
                raise ModelUnavailable(
                    "no identity method's weights are in the models folder:\n"
                    + "\n".join(e.message for e in missing))
            text = "; ".join(dict.fromkeys(reasons[r.index])) or "every method is full"
            raise InvalidInput(f"{r.handle} cannot be generated with any method: {text}",
                               handle=r.handle)
    return out
