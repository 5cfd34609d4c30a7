"""InstantID's two files: the face adapter ``ip-adapter.bin`` and the IdentityNet ControlNet.

Official layout (InstantX/InstantID on Hugging Face; InstantID/InstantID
``pipeline_stable_diffusion_xl_instantid.py``, ``ip_adapter/resampler.py``,
``ip_adapter/attention_processor.py``):

* ``ip-adapter.bin`` is a pickled dict with exactly ``image_proj`` and ``ip_adapter`` (read
  here only with ``torch.load(weights_only=True)``).
* ``image_proj`` is IP-Adapter's ``Resampler(dim=1280, depth=4, dim_head=64, heads=20,
  num_queries=16, embedding_dim=512, output_dim=unet.config.cross_attention_dim (2048),
  ff_mult=4)`` (``set_image_proj_model``): 16 learned queries (``latents``) attend to the
  ``proj_in`` of the face embeddings ``(1, photos, 512)``; ``layers.N.0`` is the perceiver
  attention, ``layers.N.1`` the feed-forward; ``norm_out(proj_out(latents))`` gives 16
  tokens of 2048. :class:`encoders.id.photomaker.Resampler` is the same module, names included.
* ``ip_adapter`` is keyed by index into ``unet.attn_processors`` (the official code loads it
  into ``ModuleList(unet.attn_processors.values())``): ``<i>.to_k_ip.weight`` and
  ``<i>.to_v_ip.weight`` on the 70 SDXL cross-attention processors (odd ``i``, 1 to 139),
  each ``(hidden, 2048)`` like the layer's ``to_k``; no LoRA, no other key.
* ``ControlNetModel/`` is a diffusers ``ControlNetModel`` folder (``config.json`` and
  ``diffusion_pytorch_model.safetensors``): the SDXL encoder half (blocks 320/640/1280,
  cross-attention 2048, ``text_time`` added conditioning) whose cross-attention reads the
  16 image tokens instead of the prompt (``encoder_hidden_states=prompt_image_emb``).

Telling files apart. ``ip-adapter.bin`` is also the name of other IP-Adapters' files. The
reader names what a file is when it is not InstantID's (:func:`describe_ip_adapter`): a
Resampler over 512-wide face embeddings is InstantID's; over CLIP image features (768 to
1664 wide) it is IP-Adapter Plus; ``proj.weight`` + ``norm.weight`` is the plain
IP-Adapter; ``proj.0``/``perceiver_resampler`` are IP-Adapter-FaceID; LoRA keys in
``ip_adapter`` are FaceID's or StoryMaker's. :data:`encoders.id.checkpoints.CHECKPOINTS`
looks in the ``InstantID`` folder first.

Strictness. Every key and shape of both parts of ``ip-adapter.bin`` is checked against the
module and the UNet it will run in; the ControlNet's ``config.json`` must fit the base
UNet (:func:`controlnet_fit_problems`: the residuals' channels and resolutions, the
cross-attention width, the added conditioning) and its weights must hold exactly the keys
and shapes of the model that config builds (diffusers' ``from_pretrained`` would only
warn). Every refusal is a :class:`~vault.errors.ModelUnavailable` naming the file.
``docs/manifests/instantid_ip_adapter.json`` and ``instantid_controlnet.json`` record the
full-size layouts; a test rebuilds them on the meta device.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from encoders.id.checkpoints import (
    DIFFUSERS_WEIGHTS,
    compare_layout,
    file_problem,
    is_stand_in,
    layout_error,
    read_pickle_checkpoint,
    shapes_of,
)
from encoders.id.photomaker import Resampler
from encoders.library_output import quiet_libraries
from generators.lora import attention_linears
from vault.errors import ModelUnavailable

__all__ = [
    "CONTROLNET_FIT_KEYS",
    "CONTROLNET_WEIGHTS",
    "INSTANTID",
    "OFFICIAL_CONTROLNET_CONFIG",
    "TINY_INSTANTID",
    "InstantIDAdapter",
    "InstantIDConfig",
    "build_image_proj",
    "config_for",
    "controlnet_fit_problems",
    "controlnet_layout",
    "controlnet_weights_file",
    "describe_ip_adapter",
    "image_proj_layout",
    "ip_adapter_layout",
    "load_controlnet",
    "read_controlnet_config",
    "read_ip_adapter",
]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class InstantIDConfig:
    """The image projection's sizes (official: ``set_image_proj_model``)."""

    dim: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    num_queries: int = 16  # image tokens per identity
    embedding_dim: int = 512  # antelopev2 (glintr100) embedding width
    output_dim: int = 2048  # the UNet's cross-attention width
    ff_mult: int = 4


INSTANTID = InstantIDConfig()
# The stand-ins' sizes: diffusers' loader infers heads as width // 64 and builds depth 4, so
# the tiny projection keeps both (conformance tests load it with load_ip_adapter).
TINY_INSTANTID = InstantIDConfig(dim=128, heads=2)


def config_for(path: Path | str) -> InstantIDConfig:
    """The tiny sizes for idvault's stand-in files, the official ones for everything else."""
    return TINY_INSTANTID if is_stand_in(path) else INSTANTID


def build_image_proj(config: InstantIDConfig = INSTANTID) -> Resampler:
    """The ``image_proj`` module (random weights until loaded)."""
    return Resampler(dim=config.dim, depth=config.depth, dim_head=config.dim_head,
                     heads=config.heads, num_queries=config.num_queries,
                     embedding_dim=config.embedding_dim, output_dim=config.output_dim,
                     ff_mult=config.ff_mult)


def image_proj_layout(config: InstantIDConfig = INSTANTID) -> dict[str, Shape]:
    """Every ``image_proj`` key and shape (built on the meta device)."""
    with torch.device("meta"):
        return shapes_of(build_image_proj(config).state_dict())


def ip_adapter_layout(unet: nn.Module) -> dict[str, Shape]:
    """``<i>.to_k_ip.weight`` / ``<i>.to_v_ip.weight`` -> ``(hidden, cross_dim)`` for every
    cross-attention processor ``i`` of ``unet.attn_processors`` (works on the meta device)."""
    linears = attention_linears(unet)
    out: dict[str, Shape] = {}
    for i, name in enumerate(unet.attn_processors):
        prefix = name.removesuffix(".processor")
        if not prefix.endswith("attn2"):
            continue
        for proj in ("k", "v"):
            out[f"{i}.to_{proj}_ip.weight"] = linears[f"{prefix}.to_{proj}"]
    return out


# -- ip-adapter.bin ----------------------------------------------------------------------------


def describe_ip_adapter(image_proj: Mapping[str, Shape],
                        ip_adapter: Mapping[str, Shape]) -> str | None:
    """What kind of IP-Adapter these parts are when they are not InstantID's, else None."""
    if any("_lora." in k for k in ip_adapter):
        return ("its ip_adapter carries LoRA weights (IP-Adapter-FaceID or StoryMaker); "
                "InstantID's holds only to_k_ip/to_v_ip")
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        width = image_proj["proj_in.weight"][1]
        if width != INSTANTID.embedding_dim:
            return (f"its image_proj is an IP-Adapter Plus Resampler over {width}-wide CLIP "
                    f"image features; InstantID's reads {INSTANTID.embedding_dim}-wide face "
                    "embeddings")
        return None
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return "its image_proj is IP-Adapter-FaceID Plus's (proj + perceiver_resampler)"
    if "proj.0.weight" in image_proj:
        return "its image_proj is IP-Adapter-FaceID's MLP (proj.0, proj.2, norm)"
    if "proj.weight" in image_proj and "norm.weight" in image_proj:
        return ("its image_proj is the plain IP-Adapter's (one linear over a pooled CLIP "
                "image embedding)")
    return None


@dataclass
class InstantIDAdapter:
    """``ip-adapter.bin`` loaded: the projection and the index-keyed IP projections."""

    config: InstantIDConfig
    image_proj: Resampler  # eval mode, on the method's device and dtype
    projections: dict[str, torch.Tensor]  # "<i>.to_k_ip.weight" -> (hidden, cross_dim)


def _parts(path: Path) -> tuple[dict, dict]:
    obj = read_pickle_checkpoint(path, "InstantID ip-adapter.bin")
    keys = set(obj)
    if keys != {"image_proj", "ip_adapter"}:
        hint = ""
        if "image_proj_model" in keys:
            hint = " (image_proj_model: a StoryMaker mask.bin)"
        elif "id_encoder" in keys:
            hint = " (id_encoder: a PhotoMaker checkpoint)"
        raise ModelUnavailable(
            f"{path}: not InstantID's ip-adapter.bin: it holds {sorted(map(str, keys))}{hint}; "
            "InstantID's holds exactly image_proj and ip_adapter (download it from "
            "https://huggingface.co/InstantX/InstantID into DIR/InstantID)", path=str(path))
    parts = []
    for part in ("image_proj", "ip_adapter"):
        state = obj[part]
        if not isinstance(state, Mapping) or not all(
                isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelUnavailable(f"{path}: {part} is not a state dict of tensors",
                                   path=str(path))
        parts.append(dict(state))
    return parts[0], parts[1]


def read_ip_adapter(path: Path | str, unet: nn.Module, config: InstantIDConfig | None = None,
                    *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> InstantIDAdapter:
    """Read ``ip-adapter.bin`` strictly for ``unet`` (every key and shape of both parts)."""
    path = Path(path)
    config = config or config_for(path)
    image_proj, ip_adapter = _parts(path)
    found_proj, found_ip = shapes_of(image_proj), shapes_of(ip_adapter)
    what = describe_ip_adapter(found_proj, found_ip)
    if what:
        raise ModelUnavailable(f"{path}: not InstantID's ip-adapter.bin: {what}. Put "
                               "InstantID's in DIR/InstantID (https://huggingface.co/InstantX/"
                               "InstantID)", path=str(path))
    proj_report = compare_layout(image_proj_layout(config), found_proj)
    if not proj_report.ok:
        raise layout_error(f"InstantID image_proj (Resampler of width {config.dim}, "
                           f"{config.depth} layers, {config.num_queries} queries, "
                           f"{config.embedding_dim} -> {config.output_dim})", path, proj_report)
    ip_report = compare_layout(ip_adapter_layout(unet), found_ip)
    if not ip_report.ok:
        raise layout_error("InstantID ip_adapter (to_k_ip/to_v_ip of every cross-attention "
                           "processor of this UNet)", path, ip_report)
    module = build_image_proj(config)
    module.load_state_dict(image_proj, strict=True)
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    projections = {k: v.to(device=device, dtype=dtype) for k, v in ip_adapter.items()}
    return InstantIDAdapter(config, module, projections)


# -- the IdentityNet ControlNet --------------------------------------------------------------

# InstantX/InstantID ControlNetModel/config.json (diffusers 0.21.2), less _name_or_path.
OFFICIAL_CONTROLNET_CONFIG: dict = {
    "_class_name": "ControlNetModel",
    "_diffusers_version": "0.21.2",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# What must equal the base UNet's config: the residuals' number, channels and resolutions
# (blocks, layers, down-sampling), the time/added conditioning the ControlNet shares with
# the UNet, and the input. Cross-attention width is checked against the image tokens.
CONTROLNET_FIT_KEYS = ("in_channels", "block_out_channels", "down_block_types",
                       "layers_per_block", "addition_embed_type", "addition_time_embed_dim",
                       "projection_class_embeddings_input_dim", "flip_sin_to_cos",
                       "freq_shift")
CONTROLNET_WEIGHTS = DIFFUSERS_WEIGHTS  # safetensors first


def _same(a: object, b: object) -> bool:
    """Equal, a JSON list and a config tuple alike."""
    def plain(v: object) -> object:
        return list(v) if isinstance(v, (list, tuple)) else v

    return plain(a) == plain(b)


def controlnet_fit_problems(config: Mapping, unet_config: Mapping, *,
                            token_width: int | None = None) -> list[str]:
    """Why a ControlNet of ``config`` cannot feed residuals to the UNet of ``unet_config``
    and read ``token_width``-wide image tokens (empty: it fits)."""
    problems = []
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        problems.append(f"_class_name is {config.get('_class_name')!r}, not ControlNetModel")
    for key in CONTROLNET_FIT_KEYS:
        if not _same(config.get(key), unet_config.get(key)):
            problems.append(f"{key} is {config.get(key)!r}, the base UNet's is "
                            f"{unet_config.get(key)!r}")
    width = token_width if token_width is not None else unet_config.get("cross_attention_dim")
    if config.get("cross_attention_dim") != width:
        problems.append(f"cross_attention_dim is {config.get('cross_attention_dim')!r}, the "
                        f"image tokens are {width} wide")
    if config.get("conditioning_channels", 3) != 3:
        problems.append(f"conditioning_channels is {config.get('conditioning_channels')!r}; "
                        "the keypoint image is RGB (3)")
    if config.get("global_pool_conditions"):
        problems.append("global_pool_conditions is true (guess mode), which InstantID's "
                        "IdentityNet does not use")
    return problems


def read_controlnet_config(folder: Path | str) -> dict:
    """``folder/config.json`` as a dict; ModelUnavailable when absent or not a ControlNet."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise ModelUnavailable(f"{path}: cannot be read ({exc.strerror or exc})",
                               path=str(path)) from None
    except ValueError as exc:
        raise ModelUnavailable(f"{path}: not JSON ({exc})", path=str(path)) from None
    if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
        kind = config.get("_class_name") if isinstance(config, dict) else None
        raise ModelUnavailable(f"{path}: describes a {kind!r}, not a diffusers ControlNetModel "
                               "(InstantID's ControlNetModel/config.json)", path=str(path))
    return config


def _build_controlnet(config: Mapping, device: torch.device | str):
    from diffusers import ControlNetModel

    with quiet_libraries(), torch.device(device):
        return ControlNetModel.from_config(dict(config))


def controlnet_layout(config: Mapping) -> dict[str, Shape]:
    """Every key and shape of the ControlNet ``config`` builds (on the meta device)."""
    return shapes_of(_build_controlnet(config, "meta").state_dict())


def controlnet_weights_file(folder: Path | str) -> Path:
    """The weights file of a ControlNet folder (safetensors preferred)."""
    folder = Path(folder)
    for name in CONTROLNET_WEIGHTS:
        if (folder / name).exists():
            issue = file_problem(folder / name)
            if issue:
                raise ModelUnavailable(f"{folder / name}: {issue}", path=str(folder / name))
            return folder / name
    raise ModelUnavailable(f"{folder}: no {' or '.join(CONTROLNET_WEIGHTS)}",
                           path=str(folder))


def _weights_shapes(path: Path) -> dict[str, Shape]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # a truncated or foreign file
            raise ModelUnavailable(f"{path}: not a readable safetensors file ({exc})",
                                   path=str(path)) from None
    return shapes_of(read_pickle_checkpoint(path, "IdentityNet ControlNet weights"))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return read_pickle_checkpoint(path, "IdentityNet ControlNet weights")


def load_controlnet(folder: Path | str, unet: nn.Module, *, token_width: int,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The IdentityNet ``ControlNetModel`` of ``folder``, checked to fit ``unet`` and read
    strictly: the config first, then every key and shape (before any tensor is read)."""
    folder = Path(folder)
    config = read_controlnet_config(folder)
    try:
        model = _build_controlnet(config, "meta")  # config defaults filled in, no memory
    except (TypeError, ValueError) as exc:
        raise ModelUnavailable(f"{folder / 'config.json'}: diffusers cannot build a "
                               f"ControlNetModel from it ({exc})", path=str(folder)) from None
    problems = controlnet_fit_problems(dict(model.config), dict(unet.config),
                                       token_width=token_width)
    if problems:
        raise ModelUnavailable(
            f"{folder / 'config.json'}: this ControlNet does not fit the base model's UNet:\n"
            + "\n".join(f"  - {p}" for p in problems), path=str(folder), problems=problems)
    weights = controlnet_weights_file(folder)
    report = compare_layout(shapes_of(model.state_dict()), _weights_shapes(weights))
    if not report.ok:
        raise layout_error("ControlNetModel its config.json describes", weights, report)
    model.load_state_dict(_weights(weights), strict=True, assign=True)
    with quiet_libraries():  # diffusers' notice about casting with to() (nothing to keep fp32)
        model = model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)
