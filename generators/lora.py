"""The identity methods' UNet LoRAs: strict layouts, rank from the tensors, exact apply and restore.

Two official files carry a LoRA over the SDXL UNet's attention, in two layouts:

* **PhotoMaker** ``lora_weights`` (``photomaker-v*.bin``): the old diffusers
  attention-processor format, keyed by module path::

      unet.<processor>.processor.to_{q,k,v,out}_lora.{down,up}.weight

  ``down`` is ``(r, in)``, ``up`` is ``(out, r)``; the rank is unpublished and
  read from the shapes (:func:`encoders.id.photomaker.lora_rank`). The key maps
  onto the linear ``<processor>.to_q`` ... ``<processor>.to_out.0``, exactly as
  diffusers' ``load_lora_weights`` converts it
  (:func:`encoders.id.photomaker.peft_lora_key`). Coverage is not required (the
  manifest only *assumes* all 140 processors are covered).
* **StoryMaker** ``ip_adapter`` (``mask.bin``): keyed by **index** into the
  UNet's processor list (``list(unet.attn_processors)``, the fixed order in
  ``manifests/base_models.json``)::

      <i>.to_{q,k,v,out}_lora.{down,up}.weight    every processor, rank 128
      <i>.to_k_ip.weight, <i>.to_v_ip.weight       odd i (cross-attention) only

  The index is mapped to the processor name through the live UNet's order,
  then onto the same linears. The layout is fixed, so coverage is required:
  every processor's eight LoRA tensors and every cross-attention's two IP
  projections. (The IP projections are planned and checked here but loaded
  by :meth:`generators.regional_attention.RegionalAttention.load_image_projections`.)

Strict: a plan (:func:`plan_photomaker_lora`, :func:`plan_storymaker_lora`)
uses every key, checks every shape against the module it lands on and raises
one :class:`~vault.errors.ModelUnavailable` listing every problem. Planning
needs only shapes, so it runs against a full-size UNet built on the meta
device (the tests do exactly that with the manifests).

Applying (:class:`AppliedLoras`, a context manager) adds ``scale * up @ down``
to each linear for the duration of a generation, several LoRAs additively
(the official pipelines: PhotoMaker fuses its LoRA at weight 1.0; StoryMaker
adds ``0.8 * up(down(x))`` inside its processors). Two ways, same result:

* ``fuse=True`` (default): each touched linear gets a *new* merged weight
  tensor; leaving puts the original ``Parameter`` objects back, so the UNet is
  restored bit for bit (no ``W + d - d`` drift over many generations). Costs
  one extra copy of the touched weights while it runs; the UNet then runs at
  plain speed.
* ``fuse=False``: a forward hook adds ``scale * up(down(x))`` to each touched
  linear's output (the official StoryMaker formulation). No extra weight
  memory; two small matmuls per linear per call.

With ``fuse=True`` a :class:`MergeCache` may keep the merged tensors between
calls: applying the same LoRA objects at the same scales to the same base
weights gives the same tensors, so the next call swaps them in instead of
merging again. An entry is used for a linear only while its base weight is
the same ``Parameter`` with the same version counter, storage, dtype and
device, and the LoRA tensors are unchanged likewise; anything else merges
afresh. It holds one extra copy of the touched weights between calls (what
a call holds while it runs anyway). Only the methods' checkpoint LoRAs
(PhotoMaker, StoryMaker) come through here, never an identity's own data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from vault.errors import InvalidInput, ModelUnavailable

__all__ = [
    "AppliedLoras",
    "LoraPlan",
    "LoraTarget",
    "LoraWeights",
    "MergeCache",
    "attention_linears",
    "plan_photomaker_lora",
    "plan_storymaker_lora",
    "submodule",
]

PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
SHOWN = 8  # problems listed in one error; the rest are counted
_STORY_KEY = re.compile(r"^(?P<index>\d+)\.(?:to_(?P<proj>q|k|v|out)_lora\.(?P<which>down|up)"
                        r"|to_(?P<ip>k|v)_ip)\.weight$")

Shape = tuple[int, ...]


def attention_linears(unet: nn.Module) -> dict[str, tuple[int, int]]:
    """``{"<attention>.to_q": (out, in), ...}`` for every attention processor's four linears.

    In ``unet.attn_processors`` order; works on a UNet built on the meta device.
    """
    out: dict[str, tuple[int, int]] = {}
    for name in unet.attn_processors:
        prefix = name.removesuffix(".processor")
        attn = unet.get_submodule(prefix)
        for suffix in PROJECTIONS.values():
            linear = attn.get_submodule(suffix)
            out[f"{prefix}.{suffix}"] = (linear.out_features, linear.in_features)
    return out


@dataclass(frozen=True)
class LoraTarget:
    """One linear a LoRA lands on: its module path and the two keys that feed it."""

    module: str  # e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0
    down_key: str  # (r, in)
    up_key: str  # (out, r)


@dataclass(frozen=True)
class LoraPlan:
    """A checked mapping of a LoRA state dict onto a UNet's linears."""

    name: str  # photomaker | storymaker
    source: str  # the file it came from, for messages and provenance
    rank: int
    targets: tuple[LoraTarget, ...]
    image_projection_keys: tuple[str, ...] = ()  # StoryMaker's to_k_ip / to_v_ip (loaded elsewhere)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(t.module for t in self.targets)


def _refuse(what: str, source: str, problems: Sequence[str]) -> ModelUnavailable:
    shown = "\n".join(f"  - {p}" for p in problems[:SHOWN])
    more = f"\n  - ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return ModelUnavailable(f"{source}: {what} does not fit this UNet ({len(problems)} "
                            f"problem(s)):\n{shown}{more}", path=source, problems=list(problems))


def _check_pair(problems: list[str], key_down: str, key_up: str, shapes: Mapping[str, Shape],
                module: str, linear: tuple[int, int], rank: int) -> None:
    out_f, in_f = linear
    want = {key_down: (rank, in_f), key_up: (out_f, rank)}
    for key, shape in want.items():
        found = tuple(shapes[key])
        if found != shape:
            problems.append(f"{key}: shape {found}, but {module} is Linear({in_f} -> {out_f}), "
                            f"so rank {rank} needs {shape}")


def plan_photomaker_lora(shapes: Mapping[str, Sequence[int]],
                         linears: Mapping[str, tuple[int, int]], *,
                         source: str = "lora_weights") -> LoraPlan:
    """Map PhotoMaker's ``lora_weights`` onto ``linears`` (from :func:`attention_linears`).

    Every key must be a UNet attention-processor LoRA key whose linear exists
    with matching ``in``/``out``; one rank throughout. Raises ModelUnavailable
    listing every problem.
    """
    from encoders.id.photomaker import inspect_lora, peft_lora_key

    shapes = {k: tuple(v) for k, v in shapes.items()}
    info = inspect_lora(shapes)  # key pattern, down/up pairs, one rank
    problems = list(info.problems)
    rank = info.rank
    targets: list[LoraTarget] = []
    for key in sorted(shapes):
        if not key.endswith("_lora.down.weight") or any(key in p for p in info.problems):
            continue
        if not key.startswith("unet."):
            problems.append(f"{key}: not a UNet key (only unet.* LoRA is supported; a text "
                            "encoder LoRA would be silently ignored)")
            continue
        module = peft_lora_key(key).removesuffix(".lora_A.weight").removeprefix("unet.")
        up_key = key.replace("_lora.down.", "_lora.up.")
        if module not in linears:
            problems.append(f"{key}: this UNet has no attention linear {module}")
            continue
        if rank is not None and up_key in shapes:
            _check_pair(problems, key, up_key, shapes, module, linears[module], rank)
        targets.append(LoraTarget(module, key, up_key))
    if problems or rank is None:
        raise _refuse("PhotoMaker lora_weights", source, problems or ["no rank can be read"])
    return LoraPlan("photomaker", source, rank, tuple(targets))


def plan_storymaker_lora(shapes: Mapping[str, Sequence[int]], processor_order: Sequence[str],
                         linears: Mapping[str, tuple[int, int]], *,
                         source: str = "ip_adapter", method: str = "storymaker",
                         label: str = "StoryMaker") -> LoraPlan:
    """Map StoryMaker's index-keyed ``ip_adapter`` onto the processors of ``processor_order``.

    ``processor_order`` is ``list(unet.attn_processors)``. Every key is used,
    every shape checked, every processor must carry its eight LoRA tensors and
    every cross-attention its ``to_k_ip``/``to_v_ip`` (``(hidden, cross_dim)``,
    the shape of the layer's ``to_k``). Raises ModelUnavailable listing every problem.
    IP-Adapter-FaceID's ``ip_adapter`` has the same layout: ``method`` names the plan,
    ``label`` the file in messages.
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    order = list(processor_order)
    problems: list[str] = []
    ranks: dict[int, int] = {}
    by_index: dict[int, set[str]] = {}
    for key, shape in shapes.items():
        m = _STORY_KEY.match(key)
        if m is None:
            problems.append(f"{key}: not a {label} ip_adapter key (<index>.to_*_lora.down|"
                            "up.weight or <index>.to_k_ip|to_v_ip.weight)")
            continue
        i = int(m["index"])
        if i >= len(order):
            problems.append(f"{key}: index {i}, but this UNet has {len(order)} attention "
                            f"processors (0-{len(order) - 1})")
            continue
        by_index.setdefault(i, set()).add(key)
        if m["which"] and len(shape) == 2:
            r = shape[0] if m["which"] == "down" else shape[1]
            ranks[r] = ranks.get(r, 0) + 1
    if len(ranks) > 1:
        problems.append("inconsistent LoRA ranks: " + ", ".join(
            f"rank {r} in {n} tensor(s)" for r, n in sorted(ranks.items())))
    rank = next(iter(ranks)) if len(ranks) == 1 else None
    targets: list[LoraTarget] = []
    ip_keys: list[str] = []
    for i, name in enumerate(order):
        prefix = name.removesuffix(".processor")
        cross = prefix.endswith("attn2")  # diffusers' naming: attn1 self, attn2 cross
        present = by_index.get(i, set())
        for proj, suffix in PROJECTIONS.items():
            down, up = f"{i}.to_{proj}_lora.down.weight", f"{i}.to_{proj}_lora.up.weight"
            missing = [k for k in (down, up) if k not in present]
            if missing:
                problems.append(f"missing {', '.join(missing)} (processor {i} = {name})")
                continue
            module = f"{prefix}.{suffix}"
            if rank is not None:
                _check_pair(problems, down, up, shapes, module, linears[module], rank)
            targets.append(LoraTarget(module, down, up))
        for proj in ("k", "v"):
            key = f"{i}.to_{proj}_ip.weight"
            if not cross:
                if key in present:
                    problems.append(f"{key}: processor {i} ({name}) is self-attention; IP "
                                    "projections belong on cross-attention (odd indices)")
                continue
            if key not in present:
                problems.append(f"missing {key} (processor {i} = {name})")
                continue
            out_f, in_f = linears[f"{prefix}.to_{proj}"]
            if shapes[key] != (out_f, in_f):
                problems.append(f"{key}: shape {shapes[key]}, expected {(out_f, in_f)} (the "
                                f"shape of {prefix}.to_{proj})")
            ip_keys.append(key)
    if problems or rank is None:
        raise _refuse(f"{label} ip_adapter", source, problems or ["no LoRA tensors"])
    return LoraPlan(method, source, rank, tuple(targets), tuple(ip_keys))


@dataclass(frozen=True)
class LoraWeights:
    """A planned LoRA with its tensors: ``{module: (down (r, in), up (out, r))}``."""

    plan: LoraPlan
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def from_state_dict(cls, plan: LoraPlan, state: Mapping[str, torch.Tensor], *,
                        device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> LoraWeights:
        """Take the plan's tensors from ``state`` (cast: the official files mix bf16/fp16)."""
        tensors = {}
        for t in plan.targets:
            tensors[t.module] = (state[t.down_key].to(device=device, dtype=dtype),
                                 state[t.down_key.replace("_lora.down.", "_lora.up.")]
                                 .to(device=device, dtype=dtype))
        return cls(plan, tensors)

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def rank(self) -> int:
        return self.plan.rank


class AppliedLoras:
    """Adds ``scale * up @ down`` of several LoRAs to a UNet's linears while in use.

    ::

        with AppliedLoras(unet, [(photomaker_lora, 1.0), (storymaker_lora, 0.8)]):
            ...  # every forward sees W + sum(scale * up @ down)
        # the UNet holds its original Parameter objects again

    See the module docstring for ``fuse`` and ``cache`` (a :class:`MergeCache`
    to reuse merged weights from an earlier use). Re-entry is refused; the
    LoRAs' tensors are moved to each linear's device and dtype.
    """

    def __init__(self, unet: nn.Module, loras: Sequence[tuple[LoraWeights, float]], *,
                 fuse: bool = True, cache: MergeCache | None = None) -> None:
        self.unet = unet
        self.loras = [(w, float(s)) for w, s in loras if float(s) != 0.0]
        self.fuse = fuse
        self.cache = cache if fuse else None
        self._saved: dict[str, tuple[nn.Module, nn.Parameter]] | None = None
        self._hooks: list = []

    def _groups(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
        groups: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for weights, scale in self.loras:
            for module, (down, up) in weights.tensors.items():
                groups.setdefault(module, []).append((down, up, scale))
        return groups

    def __enter__(self) -> Self:
        if self._saved is not None or self._hooks:
            raise InvalidInput("these LoRAs are already applied")
        self._saved = {}
        entry = self.cache.entry(self.loras) if self.cache is not None else None
        try:
            for module_name, parts in self._groups().items():
                linear = submodule(self.unet, module_name)
                w = linear.weight
                if self.fuse:
                    merged = entry.get(module_name, w, parts) if entry is not None else None
                    if merged is None:
                        merged = nn.Parameter(_merge(w, parts), requires_grad=False)
                        if entry is not None:
                            entry.put(module_name, w, parts, merged)
                    self._saved[module_name] = (linear, w)
                    linear.weight = merged
                else:
                    cast = [(d.to(w.device, w.dtype), u.to(w.device, w.dtype), s)
                            for d, u, s in parts]
                    self._hooks.append(linear.register_forward_hook(_runtime_hook(cast)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        saved, self._saved = self._saved or {}, None
        for linear, original in saved.values():
            linear.weight = original
        hooks, self._hooks = self._hooks, []
        for h in hooks:
            h.remove()


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` through the module dictionaries: a generation resolves
    ~140 paths of ~8 parts each, and the generic lookup's checks cost milliseconds there."""
    module = root
    for part in path.split("."):
        child = module._modules.get(part)
        if child is None:
            return root.get_submodule(path)  # its error names the missing part
        module = child
    return module


def _merge(w: torch.Tensor, parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]
           ) -> torch.Tensor:
    """``w + sum(scale * up @ down)`` as a new tensor in ``w``'s dtype."""
    with torch.no_grad():
        merged = w.detach().to(torch.float32)  # (out, in); fp32 accumulation
        for down, up, scale in parts:
            # merged + scale * up @ down, one kernel, never in place: the original tensor
            # must survive untouched for the restore.
            merged = torch.addmm(merged, up.to(w.device, torch.float32),
                                 down.to(w.device, torch.float32), alpha=scale)
    return merged.to(w.dtype)


def _stamp(t: torch.Tensor) -> tuple:
    # The version counter catches in-place writes through the tensor itself; storage,
    # dtype, device and shape catch .to(), .data assignment and load_state_dict(assign=True).
    return (t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))


class _CacheEntry:
    """Merged weights of one list of (LoRA, scale), per linear, with what they were made from."""

    def __init__(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        self.loras = list(loras)  # strong references: the key holds their id()s
        self.merged: dict[str, tuple[nn.Parameter, tuple, nn.Parameter]] = {}

    @staticmethod
    def _sources(w: torch.Tensor, parts) -> tuple:
        return (_stamp(w),) + tuple((_stamp(d), _stamp(u), s) for d, u, s in parts)

    def get(self, module: str, w: nn.Parameter, parts) -> nn.Parameter | None:
        hit = self.merged.get(module)
        if hit is None:
            return None
        base, sources, merged = hit
        if base is not w or sources != self._sources(w, parts):
            return None
        return merged

    def put(self, module: str, w: nn.Parameter, parts, merged: nn.Parameter) -> None:
        self.merged[module] = (w, self._sources(w, parts), merged)


class MergeCache:
    """Merged LoRA weights kept between :class:`AppliedLoras` uses (see the module docstring).

    Holds the ``entries`` most recently used LoRA lists (default 1: a pipeline
    usually applies one method's LoRA call after call). :meth:`clear` drops
    everything, e.g. after editing base weights through ``.data``, which
    PyTorch does not count as a change.
    """

    def __init__(self, entries: int = 1) -> None:
        if entries < 1:
            raise InvalidInput("a merge cache keeps at least one entry")
        self.entries = entries
        self._entries: dict[tuple, _CacheEntry] = {}

    def entry(self, loras: Sequence[tuple[LoraWeights, float]]) -> _CacheEntry:
        key = tuple((id(w), float(s)) for w, s in loras)
        found = self._entries.pop(key, None)
        if found is None or any(a is not b for (a, _), (b, _) in zip(found.loras, loras,
                                                                     strict=True)):
            found = _CacheEntry(loras)
        self._entries[key] = found  # most recent last
        while len(self._entries) > self.entries:
            del self._entries[next(iter(self._entries))]
        return found

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _runtime_hook(parts: list[tuple[torch.Tensor, torch.Tensor, float]]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (..., in)
        for down, up, scale in parts:
            output = output + scale * F.linear(F.linear(x, down), up)  # (..., out)
        return output

    return hook
