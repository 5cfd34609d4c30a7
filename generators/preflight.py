"""The checks of a generation that need no model, made before torch is imported.

``idvault generate`` runs :func:`preflight` first, so that a bad ``--method``, an
unknown or other owner's handle, a consent that does not grant the use, or an
identity without an artifact the chosen method reads is reported in well under
a second instead of after the ML stack and the base model load. Metadata only:
nothing is decrypted and nothing is written to the audit log.
:class:`~generators.compose.ComposePipeline` makes the same checks again when it
runs (the vault may change in between), plus those that need the weights (an
artifact made with a checkpoint the models folder holds, a method's room).

Torch-free on purpose; a test runs the commands in a fresh interpreter and
checks that torch was never imported.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from generators.prompt import ResolvedIdentity, parse_prompt, resolve_identities
from vault.errors import InvalidInput

__all__ = ["FITTED_METHODS", "METHOD_KINDS", "check_artifacts", "check_method_choice",
           "missing_artifact", "preflight"]

# Method name -> the artifact kind it reads: the built-in methods of
# generators.methods.METHODS, named here because importing that package imports torch
# (a test keeps the two equal).
METHOD_KINDS: dict[str, str] = {
    "photomaker": "photomaker", "storymaker": "storymaker", "faceid": "faceid",
    "instantid": "instantid", "celeb_basis": "celeb_basis", "lidb": "lidb"}
# Their artifacts come from `idvault personalize`, the others' from `idvault enroll`.
FITTED_METHODS = ("celeb_basis", "lidb")


def check_method_choice(method: str | Mapping[str, str], handles: Sequence[str],
                        known: Collection[str] = METHOD_KINDS) -> None:
    """The ``method`` argument names ``known`` methods (default: the built-in ones),
    for identities the prompt mentions."""
    names = [method] if isinstance(method, str) else list(dict(method).values())
    unknown = sorted({n for n in names if n != "auto" and n not in known})
    if unknown:
        raise InvalidInput(f"unknown method {', '.join(unknown)}; methods: auto, "
                           f"{', '.join(known)}")
    if not isinstance(method, str):
        extra = sorted({k.lstrip("@") for k in method} - set(handles))
        if extra:
            raise InvalidInput(f"methods given for identities the prompt does not "
                               f"mention: {', '.join(extra)}")


def missing_artifact(handle: str, kind: str) -> str:
    """Why ``handle`` cannot use the method that reads ``kind``, and how to fix it."""
    if kind in FITTED_METHODS:
        return (f"{handle} has no {kind} artifact (fit one with `idvault personalize "
                f"{handle} --kind {kind}`)")
    return f"{handle} has no {kind} artifact (enroll with --kinds {kind})"


def check_artifacts(identities: Sequence[ResolvedIdentity],
                    method: str | Mapping[str, str]) -> None:
    """Each identity holds an artifact of its chosen method's kind; with ``auto``, of some
    method's kind. InvalidInput naming the identity and the command that makes one."""
    given = ({} if isinstance(method, str)
             else {k.lstrip("@"): v for k, v in method.items()})
    usable = set(METHOD_KINDS.values())
    for identity in identities:
        chosen = method if isinstance(method, str) else given.get(identity.handle, "auto")
        kinds = {a["kind"] for a in identity.artifacts}
        if chosen != "auto":
            if METHOD_KINDS[chosen] not in kinds:
                raise InvalidInput(missing_artifact(identity.handle, METHOD_KINDS[chosen]),
                                   handle=identity.handle)
        elif not kinds & usable:
            raise InvalidInput(
                f"{identity.handle} cannot be generated with any method: it has no artifact "
                f"a method reads ({', '.join(METHOD_KINDS.values())}); add one with `idvault "
                f"add-kinds {identity.handle} PHOTOS --kinds photomaker` (or storymaker, "
                f"faceid, instantid), or fit one with `idvault personalize`",
                handle=identity.handle)


def preflight(vault, prompt: str, *, method: str | Mapping[str, str] = "auto",
              owner: str | None = None, commercial: bool = False) -> list[ResolvedIdentity]:
    """Parse ``prompt`` and check, from the vault's metadata, everything about its
    identities that needs no model; returns them resolved. Raises what the pipeline
    would (InvalidInput, NotFound, ConsentError, Conflict)."""
    parsed = parse_prompt(prompt)
    check_method_choice(method, parsed.handles)
    purposes = ("generate", "commercial") if commercial else ("generate",)
    resolved = resolve_identities(vault, parsed, owner=owner, purposes=purposes)
    check_artifacts(resolved, method)
    return resolved
