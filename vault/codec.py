"""Artifact codec: tensors + metadata <-> a validated safetensors payload.

Only safetensors is accepted (never pickle). Every payload is checked against
its kind's schema in :mod:`vault.artifact_kinds` before it is sealed and again
after it is opened: tensor names, dtypes, shapes and symbolic dimensions,
finite values, required metadata and size. A refusal names the tensor (or
metadata key) and the rule it breaks. :func:`stack_rows` validates many
payloads the same way at once, for bulk readers (an index rebuild).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from vault.artifact_kinds import KINDS, KindSchema
from vault.errors import ArtifactRejected

RESERVED_META = ("idvault.kind", "idvault.schema_version")
_LENGTH = struct.Struct("<Q")  # safetensors: the header's length, then the header
_DTYPES = {"F32": "float32", "F16": "float16", "F64": "float64", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}


@dataclass(frozen=True)
class DecodedArtifact:
    kind: str
    schema_version: int
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]

    @property
    def model_id(self) -> str:
        return self.metadata["model_id"]

    @property
    def shapes(self) -> dict[str, list[int]]:
        # By name: safetensors' loader does not promise an order.
        return {k: list(self.tensors[k].shape) for k in sorted(self.tensors)}


def schema(kind: str) -> KindSchema:
    try:
        return KINDS[kind]
    except KeyError:
        raise ArtifactRejected(
            f"unknown artifact kind {kind!r}; kinds are: {', '.join(KINDS)}"
        ) from None


def encode(kind: str, tensors: dict[str, np.ndarray], metadata: dict[str, str],
           *, max_bytes: int | None = None) -> bytes:
    """Validate and serialise an artifact."""
    spec = schema(kind)
    meta = {k: v for k, v in metadata.items() if k not in RESERVED_META}
    meta["idvault.kind"] = kind
    meta["idvault.schema_version"] = str(spec.schema_version)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _check(spec, {k: (str(v.dtype), list(v.shape)) for k, v in arrays.items()}, meta)
    _check_values(spec, arrays)
    payload = safetensors.numpy.save(arrays, metadata=meta)
    _check_size(spec, len(payload), max_bytes)
    return payload


def decode(payload: bytes, *, kind: str | None = None, max_bytes: int | None = None
           ) -> DecodedArtifact:
    """Parse and validate a payload; ``kind`` (when given) must match its own."""
    header = read_header(payload)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactRejected("safetensors metadata must map strings to strings")
    found = meta.get("idvault.kind", kind)
    if found is None:
        raise ArtifactRejected("payload does not say its kind (metadata 'idvault.kind') "
                               "and none was given")
    if kind is not None and found != kind:
        raise ArtifactRejected(f"payload is a {found!r} artifact, not {kind!r}")
    spec = schema(found)
    _check_size(spec, len(payload), max_bytes)
    declared = {}
    for name, info in header.items():
        if not isinstance(info, dict) or "dtype" not in info or "shape" not in info:
            raise ArtifactRejected(f"tensor {name!r}: malformed safetensors entry")
        declared[name] = (_DTYPES.get(info["dtype"], info["dtype"].lower()), list(info["shape"]))
    meta.setdefault("idvault.kind", found)
    meta.setdefault("idvault.schema_version", str(spec.schema_version))
    if meta["idvault.schema_version"] != str(spec.schema_version):
        raise ArtifactRejected(
            f"{found} payload has schema version {meta['idvault.schema_version']!r}; this "
            f"idvault reads version {spec.schema_version}")
    _check(spec, declared, meta)
    try:
        tensors = safetensors.numpy.load(payload)
    except (SafetensorError, ValueError) as exc:
        raise ArtifactRejected(f"not a valid safetensors payload: {exc}") from None
    _check_values(spec, tensors)
    return DecodedArtifact(found, int(meta["idvault.schema_version"]), tensors, meta)


def stack_rows(payloads: Sequence[bytes], *, kind: str, name: str) -> tuple[np.ndarray, list[int]]:
    """Tensor ``name`` of every payload as float32 rows (its last axis), stacked in order,
    and how many rows each payload gave; each payload is validated exactly as
    :func:`decode` validates it, and the first invalid one raises what ``decode`` raises.

    Payloads with the same safetensors header and size (what one encoder writes) pass
    the same schema and safetensors checks, so each such layout is decoded in full once
    and the rest only get the checks that depend on their values (finite, unit norm),
    for all of them at once: a few microseconds a payload instead of ~80.
    """
    spec = schema(kind)
    layouts: dict[tuple[bytes, int], list[int]] = {}  # (length + header, size) -> payloads
    for i, payload in enumerate(payloads):
        if len(payload) < 8:
            decode(payload, kind=kind)  # raises: too short
        (n,) = _LENGTH.unpack_from(payload)
        layouts.setdefault((payload[:8 + n], len(payload)), []).append(i)
    counts = [0] * len(payloads)
    parts: list[tuple[list[int], np.ndarray]] = []
    for (head, size), members in layouts.items():
        first = decode(payloads[members[0]], kind=kind)  # every check, once per layout
        header = json.loads(head[8:])
        arrays = _stacked([payloads[i] for i in members], len(head), header)
        try:
            _check_values(spec, arrays)
        except ArtifactRejected:
            for i in members:  # the first bad payload, with decode's own message
                decode(payloads[i], kind=kind)
            raise
        rows = arrays[name].astype(np.float32).reshape(len(members), -1, first.tensors[name]
                                                        .shape[-1])
        for i in members:
            counts[i] = rows.shape[1]
        parts.append((members, rows))
    width = parts[0][1].shape[-1] if parts else 0
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    out = np.empty((int(offsets[-1]), width), dtype=np.float32)
    for members, rows in parts:
        at = offsets[members][:, None] + np.arange(rows.shape[1])
        out[at.ravel()] = rows.reshape(-1, width)
    return out, counts


def _stacked(payloads: list[bytes], start: int, header: dict) -> dict[str, np.ndarray]:
    """The tensors of same-layout payloads, each with a leading axis over the payloads
    (views of one buffer)."""
    data = b"".join(memoryview(p)[start:] for p in payloads)
    data = np.frombuffer(data, dtype=np.uint8).reshape(len(payloads), -1)
    out = {}
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        out[tensor] = data[:, begin:end].view(dtype).reshape(len(payloads), *info["shape"])
    return out


def read_header(payload: bytes) -> dict:
    """The safetensors JSON header, after refusing anything that is not safetensors."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ArtifactRejected("payload must be bytes")
    payload = bytes(payload)
    if payload[:1] == b"\x80" or payload[:2] == b"PK":
        raise ArtifactRejected(
            "payload is a pickle or torch zip file; only safetensors is accepted "
            "(convert with safetensors.torch.save_file)"
        )
    if len(payload) < 10:
        raise ArtifactRejected(f"payload is {len(payload)} bytes: too short for safetensors")
    (n,) = struct.unpack("<Q", payload[:8])
    if n > len(payload) - 8 or n > 100 << 20:
        raise ArtifactRejected(
            f"not a safetensors payload: header length {n} exceeds the {len(payload)}-byte file"
        )
    try:
        header = json.loads(payload[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactRejected(f"not a safetensors payload: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ArtifactRejected("not a safetensors payload: header is not a JSON object")
    return header


def _check_size(spec: KindSchema, size: int, max_bytes: int | None) -> None:
    limit = min(spec.max_bytes, max_bytes or spec.max_bytes)
    if size > limit:
        raise ArtifactRejected(
            f"{spec.kind} payload is {size} bytes; the limit for this kind is {limit}"
        )


def _check(spec: KindSchema, tensors: dict[str, tuple[str, list[int]]],
           meta: dict[str, str]) -> None:
    problems: list[str] = []
    wanted = {t.name: t for t in spec.tensors}
    for name in sorted(set(tensors) - set(wanted)):
        problems.append(f"tensor {name!r}: not part of a {spec.kind} artifact "
                        f"(expected {', '.join(wanted)})")
    bound: dict[str, tuple[int, str]] = {}
    for name, t in wanted.items():
        if name not in tensors:
            problems.append(f"tensor {name!r}: missing")
            continue
        dtype, shape = tensors[name]
        if dtype not in t.dtypes:
            problems.append(f"tensor {name!r}: dtype {dtype} not allowed "
                            f"(allowed: {', '.join(t.dtypes)})")
        if len(shape) != len(t.shape):
            problems.append(f"tensor {name!r}: shape {tuple(shape)} has {len(shape)} dims, "
                            f"expected {len(t.shape)} {_fmt(t.shape)}")
            continue
        for axis, (want, got) in enumerate(zip(t.shape, shape, strict=True)):
            if isinstance(want, int):
                if got != want:
                    problems.append(f"tensor {name!r}: dim {axis} is {got}, must be {want} "
                                    f"(shape {_fmt(t.shape)})")
                continue
            rule = spec.dims[want]
            if not rule.accepts(got):
                problems.append(f"tensor {name!r}: dim {axis} ({want}) is {got}, must be "
                                f"{rule.rule()}")
            elif want in bound and bound[want][0] != got:
                problems.append(f"tensor {name!r}: dim {axis} ({want}) is {got} but tensor "
                                f"{bound[want][1]!r} has {want}={bound[want][0]}")
            else:
                bound.setdefault(want, (got, name))
    for m in spec.metadata:
        value = meta.get(m.name)
        if not value:
            problems.append(f"metadata {m.name!r}: missing ({m.description})")
        elif m.allowed is not None and value not in m.allowed:
            problems.append(f"metadata {m.name!r}: {value!r} is not one of "
                            f"{', '.join(m.allowed)}")
    if spec.kind == "photomaker" and "tokens" in bound and meta.get("version") in ("v1", "v2"):
        expected = 1 if meta["version"] == "v1" else 2
        if bound["tokens"][0] != expected:
            problems.append(f"tensor 'id_embeds': PhotoMaker {meta['version']} has {expected} "
                            f"token(s) per photo, not {bound['tokens'][0]}")
    if problems:
        raise ArtifactRejected(f"{spec.kind} artifact rejected: " + "; ".join(problems),
                               problems=problems)


def _check_values(spec: KindSchema, arrays: dict[str, np.ndarray]) -> None:
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ArtifactRejected(f"tensor {name!r}: {bad} value(s) are NaN or infinite")
    for name in spec.unit_norm:
        norms = np.linalg.norm(arrays[name].astype(np.float32).reshape(-1, arrays[name].shape[-1]),
                               axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > 1e-2)
        if bad.size:
            raise ArtifactRejected(
                f"tensor {name!r}: row {int(bad[0])} has L2 norm {norms[bad[0]]:.4f}; "
                "it must be L2-normalised (norm 1)")


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
