"""IP-Adapter-FaceID Plus v2 for SDXL: its image projection model and the strict reader of
``ip-adapter-faceid-plusv2_sdxl.bin`` (h94/IP-Adapter-FaceID).

Official layout (tencent-ailab/IP-Adapter ``ip_adapter/ip_adapter_faceid.py`` classes
``ProjPlusModel`` / ``IPAdapterFaceIDPlusXL``, ``ip_adapter/attention_processor_faceid.py``;
diffusers 0.42 ``IPAdapterFaceIDPlusImageProjection`` and ``load_ip_adapter``):

* The file is a pickled dict with exactly ``image_proj`` and ``ip_adapter`` (read here only
  with ``torch.load(weights_only=True)``), or a safetensors file holding the same tensors
  flat, prefixed ``image_proj.`` / ``ip_adapter.`` (as both the official code and diffusers
  read it).
* ``image_proj`` is ``ProjPlusModel`` (:class:`FaceIDPlusProjection`): ``proj`` =
  ``Linear(512, 1024)``, GELU, ``Linear(1024, 4 x 2048)``; ``norm`` = ``LayerNorm(2048)``;
  ``perceiver_resampler`` = the face perceiver (dim 2048, depth 4, 32 heads x 64, CLIP
  ViT-H/14 width 1280 in, 2048 out, feed-forward x4). Forward: ``x = norm(proj(id)
  .reshape(-1, 4, 2048))``, ``out = perceiver(x, clip)``, and with the shortcut (Plus
  **v2**) ``out = x + s_scale * out``: 4 tokens of 2048 per face.
* ``ip_adapter`` is keyed by index into ``unet.attn_processors`` (the official code loads
  it into ``ModuleList(unet.attn_processors.values())``): ``<i>.to_{q,k,v,out}_lora.{down,
  up}.weight`` (``LoRALinearLayer``, rank 128, no alpha) on all 140 SDXL processors and
  ``<i>.to_{k,v}_ip.weight`` on the 70 cross-attention ones (odd ``i``). The layout is
  StoryMaker's, so :func:`generators.lora.plan_storymaker_lora` maps and checks it.

``docs/manifests/ip_adapter_faceid_plusv2_sdxl.json`` records every key and shape of the
full-size file; a test rebuilds it from :func:`checkpoint_layout` on the meta device.

Variant detection (:func:`detect_variant`), from the keys and shapes alone:

* ``perceiver_resampler.*`` in ``image_proj``: FaceID **Plus**. Plus and PlusV2 have the
  same layout -- V2 differs only in using the shortcut at inference -- so the keys cannot
  tell them apart. h94 published Plus (v1) for SD1.5 only; the one SDXL Plus file is
  PlusV2, so an SDXL Plus layout is taken as V2 (and the file must carry PlusV2's name,
  :data:`encoders.id.checkpoints.CHECKPOINTS`).
* only ``proj.0``/``proj.2``/``norm``: plain FaceID (``MLPProjModel``, no CLIP branch);
  16 tokens and no LoRA is FaceID-Portrait. ``latents`` (a Resampler: IP-Adapter Plus,
  InstantID's ``ip-adapter.bin``) or ``proj.weight`` / ``proj.3.weight`` (CLIP-image
  IP-Adapters) are not FaceID at all.
* SDXL vs SD1.5: the token width (``norm.weight``; else the IP projections' input width),
  2048 vs 768.

Everything that is not FaceID-PlusV2 SDXL with its LoRA is refused with what it is and what
to use instead. A real file is then checked against the official sizes
(:class:`FaceIDConfig`); idvault's listed stand-ins (``idvault-stand-ins.json``, see
:func:`encoders.id.checkpoints.is_stand_in`) come in tiny sizes for tiny UNets and are
checked against the sizes read from their own shapes (:meth:`FaceIDConfig.from_shapes`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from encoders.id.checkpoints import (
    compare_layout,
    file_digest,
    file_problem,
    is_stand_in,
    layout_error,
    read_pickle_checkpoint,
    shapes_of,
)
from encoders.id.clip_vision import TINY_VIT_H
from encoders.id.photomaker import FacePerceiverResampler
from generators.lora import PROJECTIONS, LoraPlan, attention_linears, plan_storymaker_lora
from vault.errors import ModelUnavailable

__all__ = [
    "OFFICIAL_FILE",
    "OFFICIAL_LORA_RANK",
    "SDXL_CROSS_DIM",
    "SOURCE",
    "TINY_FACEID",
    "FaceIDCheckpoint",
    "FaceIDConfig",
    "FaceIDPlusProjection",
    "FaceIDVariant",
    "checkpoint_layout",
    "config_for",
    "detect_variant",
    "expected_image_proj_layout",
    "ip_adapter_layout",
    "load_faceid",
    "plan_faceid_ip_adapter",
    "read_faceid_checkpoint",
]

SOURCE = "https://huggingface.co/h94/IP-Adapter-FaceID"
OFFICIAL_FILE = "ip-adapter-faceid-plusv2_sdxl.bin"
OFFICIAL_LORA_RANK = 128  # IPAdapterFaceID*(lora_rank=128)
SDXL_CROSS_DIM = 2048  # 768 + 1280 text widths
SD15_CROSS_DIM = 768
LABEL = "IP-Adapter-FaceID"


# -- the projection model -----------------------------------------------------------------


@dataclass(frozen=True)
class FaceIDConfig:
    """Sizes of ``ProjPlusModel``; the defaults are the official SDXL ones."""

    cross_attention_dim: int = SDXL_CROSS_DIM  # token width
    id_embeddings_dim: int = 512  # buffalo_l ArcFace
    clip_embeddings_dim: int = 1280  # CLIP ViT-H/14 hidden size
    num_tokens: int = 4  # tokens per face
    proj_hidden: int | None = None  # official: id_embeddings_dim x 2 = 1024
    depth: int = 4  # perceiver layers
    dim_head: int = 64
    heads: int | None = None  # official: cross_attention_dim // 64 = 32
    ff_mult: float = 4

    @property
    def num_heads(self) -> int:
        return self.heads or self.cross_attention_dim // self.dim_head

    @property
    def hidden(self) -> int:
        return self.proj_hidden or self.id_embeddings_dim * 2

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> FaceIDConfig:
        """The sizes an ``image_proj`` state dict was built with (idvault's stand-ins come in
        several: the tiny generation SDXL's 2048-wide tokens, the conformance test's
        diffusers-loadable ones). Head size 64 as official when the width allows.
        KeyError / ValueError when the shapes are not a ``ProjPlusModel``'s."""
        width = shapes["norm.weight"][0]
        hidden, id_dim = shapes["proj.0.weight"]
        inner = shapes["perceiver_resampler.layers.0.0.to_q.weight"][0]
        dim_head = 64 if inner % 64 == 0 else inner
        depth = len({k.split(".")[2] for k in shapes
                     if k.startswith("perceiver_resampler.layers.")})
        return cls(cross_attention_dim=width, id_embeddings_dim=id_dim,
                   clip_embeddings_dim=shapes["perceiver_resampler.proj_in.weight"][1],
                   num_tokens=shapes["proj.2.weight"][0] // width, proj_hidden=hidden,
                   depth=depth, dim_head=dim_head, heads=inner // dim_head,
                   ff_mult=shapes["perceiver_resampler.layers.0.1.1.weight"][0] / width)


# The generation stand-in's sizes (generators.standins.faceid, for the tiny SDXL whose
# tokens are 2048 wide): the tiny CLIP tower's width, one small perceiver layer.
TINY_FACEID = FaceIDConfig(clip_embeddings_dim=TINY_VIT_H.hidden_size, proj_hidden=16,
                           depth=1, heads=1, ff_mult=1 / 64)


class FaceIDPlusProjection(nn.Module):
    """``ProjPlusModel``: ``proj``, ``norm`` and ``perceiver_resampler``, the official names."""

    def __init__(self, config: FaceIDConfig = FaceIDConfig()) -> None:
        super().__init__()
        c = self.config = config
        d = c.cross_attention_dim
        self.proj = nn.Sequential(nn.Linear(c.id_embeddings_dim, c.hidden), nn.GELU(),
                                  nn.Linear(c.hidden, d * c.num_tokens))
        self.norm = nn.LayerNorm(d)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=d, depth=c.depth, dim_head=c.dim_head, heads=c.num_heads,
            embedding_dim=c.clip_embeddings_dim, output_dim=d, ff_mult=c.ff_mult)

    def id_tokens(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 512) normed ArcFace -> (B, 4, D): the tokens before the CLIP branch."""
        c = self.config
        x = self.proj(id_embeds).reshape(-1, c.num_tokens, c.cross_attention_dim)
        return self.norm(x)

    def forward(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor, *,
                shortcut: bool = False, scale: float = 1.0) -> torch.Tensor:
        """(B, 512) + (B, positions, clip_dim) face-crop CLIP -> (B, 4, D).

        ``shortcut`` / ``scale`` are the official ``shortcut`` / ``s_scale`` (V2: True, 1.0;
        the official class defaults to False, its SDXL ``generate`` to True)."""
        x = self.id_tokens(id_embeds)  # (B, 4, D)
        out = self.perceiver_resampler(x, clip_embeds)  # (B, 4, D)
        return x + scale * out if shortcut else out


@functools.lru_cache(maxsize=8)
def expected_image_proj_layout(config: FaceIDConfig = FaceIDConfig()
                               ) -> dict[str, tuple[int, ...]]:
    """Every ``image_proj`` name and shape for ``config`` (built on the meta device)."""
    with torch.device("meta"):
        return shapes_of(FaceIDPlusProjection(config).state_dict())


def ip_adapter_layout(unet: nn.Module, rank: int = OFFICIAL_LORA_RANK
                      ) -> dict[str, tuple[int, ...]]:
    """The ``ip_adapter`` names and shapes that fit ``unet`` (any device, meta included):
    the rank-``rank`` LoRA on every processor, IP projections on every cross-attention."""
    linears = attention_linears(unet)
    out: dict[str, tuple[int, ...]] = {}
    for i, name in enumerate(unet.attn_processors):
        prefix = name.removesuffix(".processor")
        for proj, suffix in PROJECTIONS.items():
            out_f, in_f = linears[f"{prefix}.{suffix}"]
            out[f"{i}.to_{proj}_lora.down.weight"] = (rank, in_f)
            out[f"{i}.to_{proj}_lora.up.weight"] = (out_f, rank)
        if prefix.endswith("attn2"):
            for proj in ("k", "v"):
                out[f"{i}.to_{proj}_ip.weight"] = linears[f"{prefix}.to_{proj}"]
    return out


def checkpoint_layout(unet: nn.Module, config: FaceIDConfig = FaceIDConfig(),
                      rank: int = OFFICIAL_LORA_RANK) -> dict[str, tuple[int, ...]]:
    """The whole file's layout for ``unet``, flat with the safetensors prefixes."""
    out = {f"image_proj.{k}": v for k, v in expected_image_proj_layout(config).items()}
    out.update({f"ip_adapter.{k}": v for k, v in ip_adapter_layout(unet, rank).items()})
    return out


def config_for(path: Path | str, image_proj: Mapping[str, tuple[int, ...]]) -> FaceIDConfig:
    """The official sizes; for idvault's listed stand-ins, the sizes they were built with."""
    if not is_stand_in(path):
        return FaceIDConfig()
    try:
        return FaceIDConfig.from_shapes(image_proj)
    except (KeyError, ValueError, IndexError):
        raise ModelUnavailable(f"{path}: a listed stand-in whose image_proj is not a "
                               "ProjPlusModel layout", path=str(path)) from None


# -- variants -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceIDVariant:
    """What a checkpoint is, from its keys and shapes (see the module docstring)."""

    family: str  # faceid-plus | faceid | faceid-portrait | resampler | ip-adapter | unknown
    base: str  # sdxl | sd15 | unknown
    cross_attention_dim: int | None
    num_tokens: int | None
    lora: bool  # ip_adapter carries the LoRA

    @property
    def description(self) -> str:
        base = {"sdxl": "SDXL", "sd15": "SD1.5"}.get(
            self.base, f"an unknown base model (token width {self.cross_attention_dim})")
        what = {
            "faceid-plus": "IP-Adapter-FaceID Plus / PlusV2 (one layout)",
            "faceid": "IP-Adapter-FaceID (ArcFace MLP projection only, no CLIP perceiver)",
            "faceid-portrait": "IP-Adapter-FaceID-Portrait (16 tokens, no LoRA)",
            "resampler": "an IP-Adapter with a Resampler projection (IP-Adapter Plus, or "
                         "InstantID's ip-adapter.bin), not FaceID",
            "ip-adapter": "a CLIP-image IP-Adapter (not FaceID)",
        }.get(self.family, "not an IP-Adapter layout idvault knows")
        return f"{what} for {base}"

    @property
    def is_plusv2_sdxl(self) -> bool:
        return self.family == "faceid-plus" and self.base == "sdxl" and self.lora


_MLP_KEYS = {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight",
             "norm.bias"}


def detect_variant(image_proj: Mapping[str, tuple[int, ...]],
                   ip_adapter: Mapping[str, tuple[int, ...]]) -> FaceIDVariant:
    """Classify a checkpoint from the shapes of its two parts (never raises)."""
    keys = set(image_proj)
    lora = any("_lora." in k for k in ip_adapter)
    if "norm.weight" in image_proj and len(image_proj["norm.weight"]) == 1:
        width = int(image_proj["norm.weight"][0])
    else:
        ip = [s for k, s in ip_adapter.items() if k.endswith("to_k_ip.weight") and len(s) == 2]
        width = int(ip[0][1]) if ip else None
    tokens = None
    if width and len(image_proj.get("proj.2.weight", ())) == 2:
        tokens = int(image_proj["proj.2.weight"][0]) // width
    if any(k.startswith("perceiver_resampler.") for k in keys):
        family = "faceid-plus"
    elif keys == _MLP_KEYS:
        family = "faceid-portrait" if tokens == 16 and not lora else "faceid"
    elif "latents" in keys:
        family = "resampler"
    elif "proj.weight" in keys or "proj.3.weight" in keys:
        family = "ip-adapter"
    else:
        family = "unknown"
    base = {SDXL_CROSS_DIM: "sdxl", SD15_CROSS_DIM: "sd15"}.get(width, "unknown")
    return FaceIDVariant(family, base, width, tokens, lora)


def _check_variant(path: Path, variant: FaceIDVariant, width: int | None) -> None:
    """FaceID Plus with its LoRA, at token width ``width`` (official: 2048, SDXL; None:
    any, for a stand-in whose sizes are read from it)."""
    plus = variant.family == "faceid-plus"
    fits = width is None or variant.cross_attention_dim == width
    if plus and variant.lora and fits:
        return
    if plus and fits:
        why = ("its ip_adapter has no LoRA, but FaceID-PlusV2 SDXL ships its rank-128 LoRA "
               "in the same file (did the LoRA get split off?)")
    else:
        why = f"it is {variant.description}"
    raise ModelUnavailable(
        f"{path}: not IP-Adapter-FaceID Plus v2 for SDXL: {why}. The faceid method needs "
        f"{OFFICIAL_FILE} from {SOURCE} (image_proj with perceiver_resampler, 2048-wide "
        "tokens, and the LoRA in ip_adapter)", path=str(path), variant=variant.family,
        base=variant.base)


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceIDCheckpoint:
    """A checked checkpoint: where it is, what it is, and its two state dicts."""

    path: Path
    sha256: str
    variant: FaceIDVariant
    config: FaceIDConfig  # the sizes image_proj was checked against
    lora_rank: int
    image_proj: dict[str, torch.Tensor]
    ip_adapter: dict[str, torch.Tensor]

    @property
    def weights_id(self) -> str:
        """``faceid/<file name>@<sha256[:16]>``: provenance and the method's cache key."""
        return f"faceid/{self.path.name}@{self.sha256[:16]}"


_IP_KEY = re.compile(r"^\d+\.(to_(q|k|v|out)_lora\.(down|up)|to_(k|v)_ip)\.weight$")


def _read_parts(path: Path, what: str) -> tuple[dict, dict]:
    """The two state dicts of a ``.bin`` (pickled dict) or ``.safetensors`` (prefixed keys)."""
    if path.suffix == ".safetensors":
        problem = file_problem(path)
        if problem:
            raise ModelUnavailable(f"{what} {path}: {problem}", path=str(path))
        from safetensors import SafetensorError, safe_open

        parts: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
        other = []
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    head, _, rest = key.partition(".")
                    if head in parts and rest:
                        parts[head][rest] = f.get_tensor(key)
                    else:
                        other.append(key)
        except (SafetensorError, OSError) as exc:
            raise ModelUnavailable(f"{what} {path}: not a readable safetensors file ({exc})",
                                   path=str(path)) from None
        if other:
            raise ModelUnavailable(
                f"{what} {path}: {len(other)} key(s) outside image_proj. and ip_adapter.: "
                + ", ".join(sorted(other)[:10]), path=str(path))
        return parts["image_proj"], parts["ip_adapter"]
    obj = read_pickle_checkpoint(path, what)
    keys = sorted(map(str, obj))
    if set(keys) != {"image_proj", "ip_adapter"}:
        hint = ""
        if "image_proj_model" in keys:
            hint = " (that is StoryMaker's mask.bin layout)"
        elif "id_encoder" in keys:
            hint = " (that is a PhotoMaker checkpoint)"
        raise ModelUnavailable(f"{what} {path}: top-level keys are {keys}; expected exactly "
                               f"['image_proj', 'ip_adapter']{hint}", path=str(path))
    for name in ("image_proj", "ip_adapter"):
        part = obj[name]
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor)
                                                 for v in part.values()):
            raise ModelUnavailable(f"{what} {path}: {name} is not a dict of tensors",
                                   path=str(path))
    return dict(obj["image_proj"]), dict(obj["ip_adapter"])


def read_faceid_checkpoint(path: Path | str, config: FaceIDConfig | None = None
                           ) -> FaceIDCheckpoint:
    """Read and check a FaceID-PlusV2 SDXL file: its variant, every ``image_proj`` name and
    shape against ``config`` (default: :func:`config_for`), and the ``ip_adapter`` key
    pattern and one LoRA rank. Fitting ``ip_adapter`` onto a UNet is
    :func:`plan_faceid_ip_adapter`. Every refusal is a ModelUnavailable naming the file."""
    path = Path(path)
    what = "IP-Adapter-FaceID checkpoint"
    image_proj, ip_adapter = _read_parts(path, what)
    variant = detect_variant(shapes_of(image_proj), shapes_of(ip_adapter))
    if config is None and is_stand_in(path):
        _check_variant(path, variant, None)  # then its sizes can be read from it
    config = config_for(path, shapes_of(image_proj)) if config is None else config
    _check_variant(path, variant, config.cross_attention_dim)
    report = compare_layout(expected_image_proj_layout(config), shapes_of(image_proj))
    if not report.ok:
        raise layout_error("IP-Adapter-FaceID Plus v2 image_proj", path, report)
    bad = sorted(k for k in ip_adapter if not _IP_KEY.match(k))
    if bad:
        raise ModelUnavailable(
            f"{path}: ip_adapter keys must be <index>.to_*_lora.down|up.weight or "
            f"<index>.to_k_ip|to_v_ip.weight; found {len(bad)} other(s): "
            + ", ".join(bad[:10]), path=str(path), unexpected=bad)
    ranks = sorted({int(v.shape[0]) if ".down." in k else int(v.shape[-1])
                    for k, v in ip_adapter.items() if "_lora." in k and v.ndim == 2})
    if len(ranks) != 1:
        raise ModelUnavailable(f"{path}: the ip_adapter LoRA has ranks {ranks}; expected one "
                               f"rank throughout (official: {OFFICIAL_LORA_RANK})",
                               path=str(path))
    return FaceIDCheckpoint(path, file_digest(path), variant, config, ranks[0], image_proj,
                            ip_adapter)


def plan_faceid_ip_adapter(shapes: Mapping[str, tuple[int, ...]], unet: nn.Module, *,
                           source: str = "ip_adapter") -> LoraPlan:
    """Map ``ip_adapter`` onto ``unet`` (meta included): every processor's eight LoRA
    tensors and every cross-attention's ``to_k_ip``/``to_v_ip``, every shape checked
    against the linear it lands on; ModelUnavailable lists every problem."""
    return plan_storymaker_lora(shapes, list(unet.attn_processors), attention_linears(unet),
                                source=source, method="faceid", label=LABEL)


def load_faceid(path: Path | str, config: FaceIDConfig | None = None, *,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                ) -> tuple[FaceIDPlusProjection, FaceIDCheckpoint]:
    """Check ``path`` and load its ``image_proj`` into a :class:`FaceIDPlusProjection`."""
    info = read_faceid_checkpoint(path, config)
    state = {k: v.to(device=device, dtype=dtype) for k, v in info.image_proj.items()}
    with torch.device("meta"):
        model = FaceIDPlusProjection(info.config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False), info
