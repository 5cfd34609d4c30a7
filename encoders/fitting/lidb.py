"""HyperDreamBooth's Lightweight DreamBooth (LiDB): layers, aux matrices, fit, hypernetwork, export.

LiDB (Ruiz et al., arXiv 2307.06949; no official code; ``METHODS.md`` s.5) is a
rank-1 LoRA further factorised through **frozen random** matrices::

    dW (out x in) = up (out x r) @ down (r x in)
    down (r x in) = down_train (r x a) @ down_aux (a x in)      a = 100
    up (out x r)  = up_aux (out x b) @ up_train (b x r)         b = 50

Only ``down_train`` and ``up_train`` train: ``r * (a + b)`` = 150 numbers per
layer at r = 1. The layers (:func:`lidb_layers`) are the attention q/k/v/out
linears of the UNet (``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``,
``to_out.0``) and of every CLIP text encoder (``self_attn.q_proj``, ``k_proj``,
``v_proj``, ``out_proj``), found by module-name pattern in
``named_modules()`` order, named with the diffusers component prefix
(``unet.``, ``text_encoder.``, ``text_encoder_2.``): SD1.5 has 128 + 48 = 176
layers, 26,400 parameters; SDXL 560 + 48 + 128 = 736 layers, 110,400.

**Aux matrices** (:func:`aux_matrices`) are regenerated from the stored seed,
so an artifact holds only the train factors, the seed and the layer list. The
exact generator, in layer order, for each layer ``(out, in)``::

    g = torch.Generator("cpu").manual_seed(seed)          # once, for all layers
    M = torch.randn(a, in, generator=g, dtype=float64)    # then, per layer:
    N = torch.randn(b, out, generator=g, dtype=float64)
    down_aux = orth_rows(M)       # (a, in)
    up_aux = orth_rows(N).T       # (out, b)

where ``orth_rows(X)`` (``k x n``) is ``Q.T`` of the reduced QR of ``X.T``
with the signs fixed so ``diag(R) > 0`` (QR is unique then, whatever LAPACK
does): its rows are orthonormal (norm 1, the "constant norm"). When ``k > n``
(only in the tiny test models, whose layers are narrower than 100) rows
cannot be orthogonal; ``orth_rows`` then returns the QR of ``X`` itself
(orthonormal columns). Computed in float64 on one CPU thread, stored float32.

**Fitting** (:func:`fit_lidb`): the eps-MSE loss on the frozen model with the
LoRA installed (:func:`installed`), the same loop as Celeb Basis
(:func:`encoders.fitting.core.run_fit`), prompts from the textual-inversion
templates with ``"sks face"``. Two recipes: the *fast* rank-relaxed
fine-tune (rank 4, 40 steps, starting from the hypernetwork's prediction when
a trained hypernetwork is present, else from the LoRA zero init) and the
*from-scratch* fit (rank 1, 400 steps). Our learning rates are not published
values (the paper gives none we could verify); they are :data:`FAST_FIT` and
:data:`SCRATCH_FIT`.

**Hypernetwork** (:class:`LidbHypernetwork`): a ViT encoder of the face
image, then a transformer decoder over one token per layer (the weight
tokens, starting from theta_0 = 0) that refines the prediction iteratively,
``theta_k = theta_{k-1} + T(f, theta_{k-1})``. :func:`train_hypernetwork`
trains it (L2 to pre-optimised LiDB weights, plus the diffusion loss when a
model is given) for users who have data; no pretrained one exists.

**Export** (:meth:`LidbWeights.to_diffusers`): a standard diffusers/PEFT
LoRA state dict (``<layer>.lora_A.weight`` = down ``(r, in)``,
``<layer>.lora_B.weight`` = up ``(out, r)``) that ``pipe.load_lora_weights``
loads at scale 1 (no alphas: PEFT's alpha defaults to the rank).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.fitting.core import (
    DiffusionModel,
    FitConfig,
    FitResult,
    Objective,
    run_fit,
    single_thread,
)

A_DIM = 100  # a: input-side aux width
B_DIM = 50  # b: output-side aux width
FAST_RANK = 4  # the rank-relaxed fine-tune's rank
IDENTIFIER = "sks face"  # the rare-token identifier the prompts use
FAST_FIT = FitConfig(steps=40, lr=1e-3, checkpoint_every=10, paste_scale=(1.0, 1.0))
SCRATCH_FIT = FitConfig(steps=400, lr=1e-3, checkpoint_every=50, paste_scale=(1.0, 1.0))

UNET_LINEAR = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
TEXT_LINEAR = re.compile(r"encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
TEXT_PREFIXES = ("text_encoder", "text_encoder_2")

Shapes = Mapping[str, tuple[int, int]]  # layer name -> (out, in)


# -- layers ---------------------------------------------------------------------------------
def lidb_layers(unet: nn.Module, text_encoders: Sequence[nn.Module]) -> dict[str, tuple[int, int]]:
    """The LiDB layers of a UNet and its text encoder(s): ``{name: (out, in)}`` in order."""
    out: dict[str, tuple[int, int]] = {}
    parts = [("unet", unet, UNET_LINEAR)] + [
        (prefix, enc, TEXT_LINEAR) for prefix, enc in zip(TEXT_PREFIXES, text_encoders,
                                                          strict=False)]
    for prefix, module, pattern in parts:
        for name, m in module.named_modules():
            if pattern.search(name):
                if not isinstance(m, nn.Linear):
                    raise TypeError(f"{prefix}.{name} is a {type(m).__name__}, not a Linear")
                out[f"{prefix}.{canonical_name(prefix, name)}"] = (m.out_features,
                                                                    m.in_features)
    return out


def canonical_name(prefix: str, name: str) -> str:
    """Text-encoder module names in the standard (diffusers LoRA file) form.

    transformers 5 flattened ``CLIPTextModel`` (``encoder.layers.N...``) while
    ``CLIPTextModelWithProjection`` keeps ``text_model.encoder.layers.N...``;
    LoRA files and our artifacts always say ``text_model.encoder...``, so an
    artifact's layer list does not depend on the transformers version.
    """
    if prefix != "unet" and name.startswith("encoder."):
        return "text_model." + name
    return name


def resolve(root: nn.Module, name: str) -> nn.Module:
    """The module a canonical name points at, in either transformers layout."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        if name.startswith("text_model."):
            return root.get_submodule(name[len("text_model."):])
        raise


def model_layers(model: DiffusionModel) -> dict[str, tuple[int, int]]:
    return lidb_layers(model.unet, [enc for _, enc in model.encoders])


def layers_from_folder(folder: str | Path) -> dict[str, tuple[int, int]]:
    """The layer shapes of a diffusers folder, from its configs alone (meta device, no weights)."""
    import transformers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = Path(folder)
    encoders = []
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        for prefix in TEXT_PREFIXES:
            if (folder / prefix / "config.json").exists():
                cfg = CLIPTextConfig.from_pretrained(folder / prefix)
                arch = (cfg.architectures or ["CLIPTextModel"])[0]
                encoders.append(getattr(transformers, arch)(cfg))
    return lidb_layers(unet, encoders)


def parameter_count(layers: Sequence[str] | Shapes, rank: int = 1) -> int:
    return len(layers) * rank * (A_DIM + B_DIM)


# -- aux matrices ---------------------------------------------------------------------------
def orth_rows(x: torch.Tensor) -> torch.Tensor:
    """``(k, n)`` -> rows orthonormal (``k <= n``), else columns orthonormal; unique QR."""
    k, n = x.shape
    if k <= n:
        q, r = torch.linalg.qr(x.T)  # q: (n, k)
        return (q * torch.sign(torch.diagonal(r))).T
    q, r = torch.linalg.qr(x)  # q: (k, n)
    return q * torch.sign(torch.diagonal(r))


def aux_matrices(seed: int, shapes: Sequence[tuple[int, int]]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(down_aux (a, in), up_aux (out, b))]`` per layer, from ``seed`` (module docstring)."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    out = []
    # One thread: LAPACK's multi-threaded float64 QR of these thin matrices is
    # ~1000x slower on a busy CPU, and one thread makes the bits independent
    # of the machine's core count.
    with single_thread():
        for d_out, d_in in shapes:
            m = torch.randn(A_DIM, d_in, generator=g, dtype=torch.float64)
            n = torch.randn(B_DIM, d_out, generator=g, dtype=torch.float64)
            out.append((orth_rows(m).float(), orth_rows(n).T.float().contiguous()))
    return out


# -- weights --------------------------------------------------------------------------------
@dataclass
class LidbWeights:
    """Train factors of every layer, the aux seed and the layer names (tensor order)."""

    layers: list[str]
    down_train: torch.Tensor  # (L, r, a)
    up_train: torch.Tensor  # (L, b, r)
    seed: int

    @property
    def rank(self) -> int:
        return int(self.down_train.shape[1])

    @property
    def num_params(self) -> int:
        return self.down_train.numel() + self.up_train.numel()

    @classmethod
    def init(cls, layers: Sequence[str], *, rank: int = 1, seed: int = 0,
             init_seed: int | None = None) -> LidbWeights:
        """LoRA's init: ``down_train`` random (std 1/sqrt(a)), ``up_train`` zero (dW = 0)."""
        g = torch.Generator().manual_seed(seed if init_seed is None else init_seed)
        down = torch.randn(len(layers), rank, A_DIM, generator=g) / A_DIM ** 0.5
        return cls(list(layers), down, torch.zeros(len(layers), B_DIM, rank), int(seed))

    def relaxed(self, rank: int, *, init_seed: int = 0) -> LidbWeights:
        """The same dW at a higher train rank: extra down rows random, extra up columns zero."""
        if rank < self.rank:
            raise ValueError("relaxing cannot lower the rank")
        extra = LidbWeights.init(self.layers, rank=rank - self.rank, seed=self.seed,
                                 init_seed=init_seed)
        return LidbWeights(self.layers, torch.cat([self.down_train, extra.down_train], 1),
                           torch.cat([self.up_train, extra.up_train], 2), self.seed)

    def aux(self, shapes: Shapes) -> list[tuple[torch.Tensor, torch.Tensor]]:
        missing = [n for n in self.layers if n not in shapes]
        if missing:
            raise ValueError(f"{len(missing)} LiDB layers are not in this model, e.g. {missing[0]}")
        return aux_matrices(self.seed, [shapes[n] for n in self.layers])

    def factors(self, shapes: Shapes) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(layer, down (r, in), up (out, r))`` per layer: the PEFT LoRA factors."""
        for i, (down_aux, up_aux) in enumerate(self.aux(shapes)):
            yield (self.layers[i], self.down_train[i].float() @ down_aux,
                   up_aux @ self.up_train[i].float())

    def deltas(self, shapes: Shapes) -> dict[str, torch.Tensor]:
        """``{layer: dW (out, in)}``."""
        return {name: up @ down for name, down, up in self.factors(shapes)}

    def to_diffusers(self, shapes: Shapes) -> dict[str, torch.Tensor]:
        """A diffusers/PEFT LoRA state dict (``pytorch_lora_weights.safetensors`` keys)."""
        out = {}
        for name, down, up in self.factors(shapes):
            out[f"{name}.lora_A.weight"] = down.contiguous()
            out[f"{name}.lora_B.weight"] = up.contiguous()
        return out

    def payload(self, *, model_id: str) -> bytes:
        from vault import codec

        return codec.encode("lidb", {
            "down_train": np.ascontiguousarray(self.down_train.detach().float().cpu().numpy()),
            "up_train": np.ascontiguousarray(self.up_train.detach().float().cpu().numpy())},
            {"model_id": model_id, "seed": str(self.seed), "layers": json.dumps(self.layers)})

    @classmethod
    def from_artifact(cls, decoded) -> LidbWeights:
        """From a decoded ``lidb`` artifact (:func:`vault.codec.decode`)."""
        meta = decoded.metadata
        return cls(json.loads(meta["layers"]),
                   torch.from_numpy(np.array(decoded.tensors["down_train"], dtype=np.float32)),
                   torch.from_numpy(np.array(decoded.tensors["up_train"], dtype=np.float32)),
                   int(meta["seed"]))


# -- applying -------------------------------------------------------------------------------
class LidbLinear(nn.Module):
    """``base(x) + x down_aux^T down_train^T up_train^T up_aux^T`` (LiDB factors, trainable)."""

    def __init__(self, base: nn.Linear, index: int, down_train: nn.Parameter,
                 up_train: nn.Parameter, down_aux: torch.Tensor, up_aux: torch.Tensor) -> None:
        super().__init__()
        self.base, self.index = base, index
        # Shared (L, ...) parameters, indexed: one optimiser tensor for all layers.
        self._train = (down_train, up_train)
        self.register_buffer("down_aux", down_aux.to(base.weight), persistent=False)
        self.register_buffer("up_aux", up_aux.to(base.weight), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down_train, up_train = self._train
        h = x @ self.down_aux.T  # (..., a)
        h = h @ down_train[self.index].T.to(h)  # (..., r)
        h = h @ up_train[self.index].T.to(h)  # (..., b)
        return self.base(x) + h @ self.up_aux.T  # (..., out)


def _modules(model: DiffusionModel) -> dict[str, nn.Module]:
    roots = {"unet": model.unet}
    for prefix, (_, enc) in zip(TEXT_PREFIXES, model.encoders, strict=False):
        roots[prefix] = enc
    return roots


@contextlib.contextmanager
def installed(model: DiffusionModel, layers: Sequence[str], down_train: torch.Tensor,
              up_train: torch.Tensor, seed: int) -> Iterator[None]:
    """Swap each LiDB layer's Linear for a :class:`LidbLinear` for the block's duration."""
    roots = _modules(model)
    shapes = model_layers(model)
    weights = LidbWeights(list(layers), down_train, up_train, seed)
    swapped = []
    try:
        for i, (down_aux, up_aux) in enumerate(weights.aux(shapes)):
            prefix, _, path = layers[i].partition(".")
            parent_path, _, attr = path.rpartition(".")
            parent = resolve(roots[prefix], parent_path)
            base = getattr(parent, attr)
            setattr(parent, attr, LidbLinear(base, i, down_train, up_train, down_aux, up_aux))
            swapped.append((parent, attr, base))
        yield
    finally:
        for parent, attr, base in reversed(swapped):
            setattr(parent, attr, base)


@contextlib.contextmanager
def applied_deltas(modules: Mapping[str, nn.Module], deltas: Mapping[str, torch.Tensor],
                   scale: float = 1.0) -> Iterator[None]:
    """Add ``scale * dW`` to each layer's weight in place; restore the originals after."""
    saved = []
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                prefix, _, path = name.partition(".")
                lin = resolve(modules[prefix], path)
                saved.append((lin, lin.weight.detach().clone()))
                lin.weight.add_(delta.to(lin.weight) * scale)
        yield
    finally:
        with torch.no_grad():
            for lin, w in saved:
                lin.weight.copy_(w)


# -- fitting --------------------------------------------------------------------------------
class _LidbObjective(Objective):
    def __init__(self, start: LidbWeights) -> None:
        self.layers, self.seed = start.layers, start.seed
        self.down = nn.Parameter(start.down_train.detach().clone().float())
        self.up = nn.Parameter(start.up_train.detach().clone().float())

    def parameters(self) -> list[nn.Parameter]:
        return [self.down, self.up]

    def installed(self, model):
        return installed(model, self.layers, self.down, self.up, self.seed)

    def conditioning(self, model, subjects, prompts, resolution):
        return model.encode(prompts, resolution=resolution)

    def state_dict(self) -> dict:
        return {"down": self.down.detach().clone(), "up": self.up.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.down.copy_(state["down"])
            self.up.copy_(state["up"])

    def weights(self) -> LidbWeights:
        return LidbWeights(self.layers, self.down.detach().clone(), self.up.detach().clone(),
                           self.seed)


def fit_lidb(model: DiffusionModel, images: Sequence[torch.Tensor], cfg: FitConfig = FAST_FIT,
             *, rank: int = FAST_RANK, seed: int = 0, start: LidbWeights | None = None,
             resume: bytes | None = None, save: Callable[[int, bytes], None] | None = None,
             progress: Callable[[int, int, float], None] | None = None
             ) -> tuple[LidbWeights, FitResult]:
    """Fit LiDB weights of train rank ``rank`` on one identity's ``images``.

    ``start`` (a hypernetwork prediction, rank 1) is relaxed to ``rank``;
    without it the fit starts from LoRA's zero-delta init with aux seed ``seed``.
    """
    layers = list(model_layers(model))
    if start is None:
        start = LidbWeights.init(layers, rank=1, seed=seed)
    elif start.layers != layers:
        raise ValueError("the start weights were made for another layer list")
    start = start.relaxed(rank, init_seed=cfg.seed) if rank > start.rank else start
    objective = _LidbObjective(start)
    result = run_fit(model, objective, [list(images)], cfg,
                     prompt=lambda s, template: template.format(IDENTIFIER),
                     resume=resume, save=save, progress=progress)
    return objective.weights(), result


# -- hypernetwork ---------------------------------------------------------------------------
@dataclass(frozen=True)
class HyperConfig:
    """Hypernetwork sizes (the paper's ViT-H-sized encoder is far larger; these are ours)."""

    image_size: int = 224
    patch: int = 16
    dim: int = 384
    heads: int = 6
    encoder_depth: int = 6
    decoder_depth: int = 4
    iterations: int = 4  # refinement steps theta_k = theta_{k-1} + T(f, theta_{k-1})
    rank: int = 1
    aux_seed: int = 0  # the aux matrices its targets were expressed in


class LidbHypernetwork(nn.Module):
    """Face image -> LiDB train factors, by iterative refinement of per-layer weight tokens."""

    def __init__(self, layers: Sequence[str], cfg: HyperConfig = HyperConfig()) -> None:
        super().__init__()
        self.cfg, self.layers = cfg, list(layers)
        n_patches = (cfg.image_size // cfg.patch) ** 2
        self.per_layer = cfg.rank * (A_DIM + B_DIM)
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch, cfg.patch)
        self.pos = nn.Parameter(torch.randn(1, n_patches, cfg.dim) * 0.02)
        enc = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 4 * cfg.dim, dropout=0.0,
                                         batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, cfg.encoder_depth)
        self.weight_in = nn.Linear(self.per_layer, cfg.dim)
        self.layer_embed = nn.Parameter(torch.randn(1, len(self.layers), cfg.dim) * 0.02)
        dec = nn.TransformerDecoderLayer(cfg.dim, cfg.heads, 4 * cfg.dim, dropout=0.0,
                                         batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(dec, cfg.decoder_depth)
        self.head = nn.Linear(cfg.dim, self.per_layer)
        # Zero head: the first iterate predicts no change; refinement starts from theta_0 = 0.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, S, S)`` in [0, 1] -> the iterates ``[(B, L, r*(a+b))] x iterations``."""
        x = F.interpolate(images, size=(self.cfg.image_size,) * 2, mode="bilinear",
                          align_corners=False) * 2 - 1
        f = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, P, dim)
        f = self.encoder(f)
        theta = images.new_zeros(images.shape[0], len(self.layers), self.per_layer)
        iterates = []
        for _ in range(self.cfg.iterations):
            tokens = self.weight_in(theta) + self.layer_embed  # (B, L, dim)
            theta = theta + self.head(self.decoder(tokens, f))
            iterates.append(theta)
        return iterates

    def split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, r*(a+b))`` -> ``down_train (L, r, a)``, ``up_train (L, b, r)``."""
        r = self.cfg.rank
        down = theta[:, : r * A_DIM].reshape(-1, r, A_DIM)
        up = theta[:, r * A_DIM:].reshape(-1, B_DIM, r)
        return down, up

    def flatten(self, w: LidbWeights) -> torch.Tensor:
        return torch.cat([w.down_train.reshape(len(w.layers), -1),
                          w.up_train.reshape(len(w.layers), -1)], dim=1)


def predict_weights(net: LidbHypernetwork, image: torch.Tensor) -> LidbWeights:
    """The hypernetwork's LiDB weights for one face image ``(3, h, w)``."""
    net.eval()
    with torch.no_grad():
        theta = net(image[None].float())[-1][0]
    down, up = net.split(theta)
    return LidbWeights(net.layers, down, up, net.cfg.aux_seed)


def train_hypernetwork(net: LidbHypernetwork,
                       samples: Sequence[tuple[torch.Tensor, LidbWeights]], *,
                       steps: int = 1000, lr: float = 1e-4, batch_size: int = 4, seed: int = 0,
                       model: DiffusionModel | None = None, diffusion_weight: float = 1.0,
                       progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Train ``net`` on ``(face image, pre-optimised LiDB weights)`` pairs.

    Loss: L2 between every iterate and the pre-optimised weights (the paper's
    weight-space loss), plus, when ``model`` is given, ``diffusion_weight`` x
    the eps-MSE of the final prediction installed in the model on the
    sample's own image (the paper's diffusion loss). All targets must use the
    net's aux seed and layer list. Returns the per-step losses.
    """
    for _, w in samples:
        if w.layers != net.layers or w.seed != net.cfg.aux_seed or w.rank != net.cfg.rank:
            raise ValueError("every target must share the net's layers, aux seed and rank")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    losses = []
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(samples), (min(batch_size, len(samples)),), generator=g)
        images = torch.stack([F.interpolate(samples[i][0][None], size=(net.cfg.image_size,) * 2,
                                            mode="bilinear", align_corners=False)[0]
                              for i in idx.tolist()])
        target = torch.stack([net.flatten(samples[i][1]) for i in idx.tolist()])
        iterates = net(images)
        loss = sum(F.mse_loss(t, target) for t in iterates) / len(iterates)
        if model is not None:
            down, up = net.split(iterates[-1][0])
            with installed(model, net.layers, down, up, net.cfg.aux_seed):
                size = model.resolution
                pix = F.interpolate(images[:1], size=(size, size), mode="bilinear",
                                    align_corners=False)
                hidden, added = model.encode([f"a photo of {IDENTIFIER}"], resolution=size)
                loss = loss + diffusion_weight * model.eps_loss(model.latents(pix, g), hidden,
                                                                added, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    net.eval()
    return losses


def save_hypernetwork(net: LidbHypernetwork, path: str | Path) -> Path:
    """Write ``net`` as safetensors, its config and layer list in the metadata."""
    import safetensors.torch

    path = Path(path)
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                                str(path), metadata={"config": json.dumps(asdict(net.cfg)),
                                                     "layers": json.dumps(net.layers)})
    return path


def load_hypernetwork(path: str | Path) -> LidbHypernetwork:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    net = LidbHypernetwork(json.loads(meta["layers"]), HyperConfig(**json.loads(meta["config"])))
    net.load_state_dict(state)
    return net.eval()


__all__ = [
    "A_DIM",
    "B_DIM",
    "FAST_FIT",
    "FAST_RANK",
    "SCRATCH_FIT",
    "HyperConfig",
    "LidbHypernetwork",
    "LidbLinear",
    "LidbWeights",
    "applied_deltas",
    "aux_matrices",
    "canonical_name",
    "fit_lidb",
    "installed",
    "layers_from_folder",
    "lidb_layers",
    "load_hypernetwork",
    "model_layers",
    "orth_rows",
    "parameter_count",
    "predict_weights",
    "resolve",
    "save_hypernetwork",
    "train_hypernetwork",
]
