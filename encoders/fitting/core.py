"""The fitting core shared by Celeb Basis and LiDB: a frozen diffusion model, the
augmentation, the optimisation loop with resumable checkpoints, and photo loading.

Two artifact kinds are not computed by a feed-forward encoder but **fitted**
per identity by a short optimisation against a frozen diffusion model
(``docs/personalization.md``):

* ``celeb_basis``: a coefficient mapper (face embedding -> 2 x 512
  coefficients over a Celeb Basis) trained with the diffusion loss
  (:mod:`encoders.fitting.celeb_basis`);
* ``lidb``: HyperDreamBooth's Lightweight DreamBooth train factors over the
  attention linears of the UNet and the text encoder(s) (:mod:`encoders.fitting.lidb`).

This module holds what both share:

* :class:`DiffusionModel`: the frozen components of a diffusers SD1.x or SDXL
  pipeline, prompt encoding with an optional *token override* (two new token
  embeddings written over a placeholder's positions, as textual inversion
  and Celeb Basis need) and the eps-MSE loss;
* :func:`augment`: the official Celeb Basis augmentation (flip, colour jitter
  0.8-1.2, paste at a random scale 0.1-1.0 on a black canvas), drawn from one
  ``torch.Generator`` so a run is reproducible and resumable;
* :func:`run_fit`: the optimisation loop (AdamW, checkpoint every N steps,
  resume from a checkpoint to the same result as an uninterrupted run);
* :func:`load_face_images`: photos decoded safely and cropped square.

The job kinds that run a fit for a stored identity are in
:mod:`encoders.fitting.jobs`.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The textual-inversion template list (imagenet_templates_small of the
# textual_inversion / LDM repos), which Celeb Basis trains with; "{}" is
# replaced by "face of <id> person".
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}",
    "a photo of my {}", "a photo of the cool {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
    "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}",
    "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)
SUBJECT = "face of {} person"
PLACEHOLDER = "<id>"  # stands where the identity's two tokens go


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run a block on one torch thread (float64 LAPACK calls: reproducible bits, and
    multi-threaded QR/SVD of small matrices is far slower on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- config ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitConfig:
    """One fitting run. Defaults are the official Celeb Basis recipe (``METHODS.md`` s.4)."""

    steps: int = 400  # per identity; joint fits of n identities run n x steps
    batch_size: int = 2
    lr: float = 1e-2  # the *effective* lr (LDM's scale_lr already applied)
    weight_decay: float = 1e-2  # torch's AdamW default
    seed: int = 0
    resolution: int | None = None  # None: unet.sample_size x VAE scale (512 on SD1.5)
    flip: bool = True
    jitter: tuple[float, float] = (0.8, 1.2)  # brightness, contrast, saturation factors
    paste_scale: tuple[float, float] = (0.1, 1.0)  # face side / canvas side
    checkpoint_every: int = 50  # steps between resumable checkpoints (0: never)
    max_grad_norm: float | None = None


# -- the frozen diffusion model -------------------------------------------------------------
class DiffusionModel:
    """The frozen parts of an SD1.x or SDXL diffusers pipeline, for fitting.

    ``encoders`` is the list of ``(tokenizer, text_encoder)`` pairs: one for
    SD1.x, two for SDXL (CLIP-L then OpenCLIP bigG). Nothing here is trained;
    LiDB wraps linears of these very modules for the length of a fit.
    """

    def __init__(self, pipe) -> None:
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.encoders: list[tuple[object, nn.Module]] = [(pipe.tokenizer, pipe.text_encoder)]
        if getattr(pipe, "text_encoder_2", None) is not None:
            self.encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
        self.is_sdxl = len(self.encoders) == 2
        # Training noise: the DDPM forward process with the base model's betas
        # (what diffusers' training scripts use whatever the sampling scheduler).
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for m in (self.unet, self.vae, *(enc for _, enc in self.encoders)):
            m.requires_grad_(False)
            m.eval()
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dtype: torch.dtype = torch.float32
                        ) -> DiffusionModel:
        """Load an SD1.x or SDXL diffusers folder (``model_index.json`` says which)."""
        from diffusers import DiffusionPipeline

        from encoders.library_output import quiet_libraries

        # The caller says what loads; the libraries' own bars would only add noise.
        with quiet_libraries():
            pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def text_dims(self) -> list[int]:
        return [int(enc.config.hidden_size) for _, enc in self.encoders]

    # -- prompts --------------------------------------------------------------------------
    @staticmethod
    def token_ids(tokenizer, prompt: str, *, placeholder: str | None = None,
                  n_tokens: int = 2) -> tuple[torch.Tensor, list[int]]:
        """``(77,)`` ids of ``prompt`` and the positions of the placeholder's tokens.

        The placeholder becomes ``n_tokens`` filler ids whose embeddings the
        caller overrides; building the ids around it (rather than adding
        tokens to the vocabulary) leaves the frozen tokenizer and token table
        untouched.
        """
        length = tokenizer.model_max_length
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if placeholder is None or placeholder not in prompt:
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            positions: list[int] = []
        else:
            before, _, after = prompt.partition(placeholder)
            pre = tokenizer(before.strip(), add_special_tokens=False).input_ids if before.strip() else []
            post = tokenizer(after.strip(), add_special_tokens=False).input_ids if after.strip() else []
            # Any ordinary id works as filler: its embedding is overwritten.
            filler = pre[-1] if pre else (post[0] if post else bos)
            ids = pre + [filler] * n_tokens + post
            positions = [1 + len(pre) + i for i in range(n_tokens)]
        ids = [bos] + ids[: length - 2] + [eos]
        ids += [pad] * (length - len(ids))
        if any(p >= length - 1 for p in positions):
            raise ValueError("the placeholder falls beyond the 77-token context")
        return torch.tensor(ids), positions

    def encode(self, prompts: Sequence[str], *,
               overrides: Sequence[torch.Tensor | None] | None = None,
               placeholder: str = PLACEHOLDER, resolution: int | None = None
               ) -> tuple[torch.Tensor, dict | None]:
        """Text conditioning for ``prompts``: ``(B, 77, cross_dim)`` and SDXL's added cond.

        ``overrides[e]`` (``(B, 2, dim_e)`` or ``(2, dim_e)``), when given,
        replaces the raw token embeddings at the placeholder's two positions
        for encoder ``e`` (differentiably: Celeb Basis trains through it).
        """
        hidden_states, pooled = [], None
        for e, (tokenizer, encoder) in enumerate(self.encoders):
            override = None if overrides is None else overrides[e]
            rows = [self.token_ids(tokenizer, p, placeholder=placeholder) for p in prompts]
            ids = torch.stack([r[0] for r in rows]).to(self.unet.device)
            hook = None
            if override is not None:
                mask = torch.zeros(ids.shape, dtype=torch.bool)
                for b, (_, pos) in enumerate(rows):
                    mask[b, pos] = True
                values = override if override.dim() == 3 else override.expand(len(rows), -1, -1)
                values = values[torch.tensor([bool(pos) for _, pos in rows])]

                def write(_module, _inputs, out, mask=mask, values=values):
                    out = out.clone()
                    # The trained values may live on another device than the model (the
                    # mapper stays on the CPU); index assignment needs them on out's.
                    out[mask.to(out.device)] = values.reshape(-1, out.shape[-1]).to(
                        out.device, out.dtype)
                    return out

                hook = encoder.get_input_embeddings().register_forward_hook(write)
            try:
                out = encoder(ids, output_hidden_states=self.is_sdxl)
            finally:
                if hook is not None:
                    hook.remove()
            if self.is_sdxl:
                # SDXL reads both encoders' penultimate hidden states; the
                # pooled (projected) embedding comes from the second.
                hidden_states.append(out.hidden_states[-2])
                if e == 1:
                    pooled = out[0]
            else:
                hidden_states.append(out[0])
        hidden = torch.cat(hidden_states, dim=-1)
        if not self.is_sdxl:
            return hidden, None
        side = resolution or self.resolution
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=hidden.dtype,
                                device=hidden.device).expand(len(prompts), -1)
        return hidden, {"text_embeds": pooled, "time_ids": time_ids}

    # -- loss ------------------------------------------------------------------------------
    def latents(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> scaled VAE latents (a posterior sample)."""
        with torch.no_grad():
            dist = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist
            noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
            z = dist.mean + dist.std * noise
        return z * self.vae.config.scaling_factor

    def eps_loss(self, latents: torch.Tensor, hidden: torch.Tensor, added: dict | None,
                 generator: torch.Generator) -> torch.Tensor:
        """The diffusion (eps-MSE) loss at a random timestep per sample."""
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps,
                          (latents.shape[0],), generator=generator).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=hidden.to(self.unet.dtype),
                         added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), noise.float())


# -- augmentation ---------------------------------------------------------------------------
def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got {image.shape}")
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def augment(image: torch.Tensor, size: int, g: torch.Generator, cfg: FitConfig) -> torch.Tensor:
    """One training view of a face image ``(3, h, w)`` in [0, 1] -> ``(3, size, size)``.

    The official recipe: random horizontal flip, colour jitter (brightness,
    contrast, saturation, each x U(0.8, 1.2)), then the face resized to a
    random fraction U(0.1, 1.0) of the canvas side and pasted at a random
    place on a black canvas, so the model sees faces at every scale.
    """
    x = image
    if cfg.flip and float(torch.rand((), generator=g)) < 0.5:
        x = x.flip(-1)
    lo, hi = cfg.jitter
    x = x * _uniform(g, lo, hi)  # brightness
    mean = x.mean()
    x = (x - mean) * _uniform(g, lo, hi) + mean  # contrast
    grey = x.mean(0, keepdim=True)
    x = ((x - grey) * _uniform(g, lo, hi) + grey).clamp(0, 1)  # saturation
    side = max(1, round(size * _uniform(g, *cfg.paste_scale)))
    h, w = x.shape[1:]
    scale = side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False,
                      antialias=True)[0]
    canvas = torch.zeros(3, size, size)
    top = int(torch.randint(0, size - nh + 1, (), generator=g))
    left = int(torch.randint(0, size - nw + 1, (), generator=g))
    canvas[:, top:top + nh, left:left + nw] = x
    return canvas


# -- the loop -------------------------------------------------------------------------------
class Objective:
    """What a fit trains: its parameters, per-batch conditioning, state and result."""

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def conditioning(self, model: DiffusionModel, subjects: torch.Tensor,
                     prompts: list[str], resolution: int) -> tuple[torch.Tensor, dict | None]:
        raise NotImplementedError

    def installed(self, model: DiffusionModel) -> contextlib.AbstractContextManager:
        """Wrap the model for the fit (LiDB's LoRA); nothing by default."""
        return contextlib.nullcontext()

    def after_step(self) -> None:
        """Called after each optimiser step (EMA updates)."""

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


@dataclass
class FitResult:
    steps: int
    losses: list[float]
    resumed_from: int = 0


def _serialise(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _deserialise(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), weights_only=True)


def run_fit(model: DiffusionModel, objective: Objective, images: Sequence[Sequence[torch.Tensor]],
            cfg: FitConfig, *, prompt: Callable[[int, str], str],
            total_steps: int | None = None, resume: bytes | None = None,
            save: Callable[[int, bytes], None] | None = None,
            progress: Callable[[int, int, float], None] | None = None) -> FitResult:
    """Optimise ``objective`` with the eps-MSE loss on the frozen ``model``.

    ``images[s]`` are subject ``s``'s face images ``(3, h, w)``; each batch
    element draws a subject, one of its images, an augmentation and a template
    (``prompt(subject, template)`` gives the prompt text). ``resume`` is the
    bytes ``save`` was given at a checkpoint; the run then continues from that
    step with the same optimiser, EMA and generator state, and ends where an
    uninterrupted run ends.
    """
    steps = cfg.steps if total_steps is None else total_steps
    size = cfg.resolution or model.resolution
    params = objective.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    start, losses = 0, []
    if resume is not None:
        state = _deserialise(resume)
        objective.load_state_dict(state["objective"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        start, losses = int(state["step"]), list(state["losses"])
    n_subjects = len(images)
    with objective.installed(model):
        for step in range(start, steps):
            subjects = torch.randint(0, n_subjects, (cfg.batch_size,), generator=g)
            views, prompts = [], []
            for s in subjects.tolist():
                pick = int(torch.randint(0, len(images[s]), (), generator=g))
                views.append(augment(images[s][pick], size, g, cfg))
                template = TEMPLATES[int(torch.randint(0, len(TEMPLATES), (), generator=g))]
                prompts.append(prompt(s, template))
            batch = torch.stack(views).to(model.unet.device)
            latents = model.latents(batch, g)
            hidden, added = objective.conditioning(model, subjects, prompts, size)
            loss = model.eps_loss(latents, hidden, added, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            objective.after_step()
            losses.append(float(loss.detach()))
            done = step + 1
            if save is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 \
                    and done < steps:
                save(done, _serialise({"objective": objective.state_dict(),
                                       "optimizer": opt.state_dict(),
                                       "generator": g.get_state(), "step": done,
                                       "losses": losses}))
            if progress is not None:
                progress(done, steps, losses[-1])
    return FitResult(steps, losses, resumed_from=start)


# -- photos ---------------------------------------------------------------------------------
def load_face_images(sources: Sequence[str | Path | tuple[str, bytes]], *,
                     max_side: int = 1024) -> list[torch.Tensor]:
    """Decode photos safely (:func:`encoders.photo.load_photo`) and centre-crop them square.

    ``sources`` are paths or ``(name, encoded bytes)`` pairs. Give face crops
    (the official recipe trains on an aligned face); a whole photo also works
    but wastes the canvas on background.
    """
    from encoders.photo import load_photo

    out = []
    for src in sources:
        if isinstance(src, tuple):
            rgb = load_photo(src[1], name=src[0])
        else:
            rgb = load_photo(Path(src), name=Path(src).name)
        h, w = rgb.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = to_tensor(rgb[top:top + side, left:left + side])
        if side > max_side:
            x = F.interpolate(x[None], size=(max_side, max_side), mode="bilinear",
                              antialias=True, align_corners=False)[0]
        out.append(x)
    if not out:
        raise ValueError("a fit needs at least one photo")
    return out


__all__ = [
    "PLACEHOLDER",
    "SUBJECT",
    "TEMPLATES",
    "DiffusionModel",
    "FitConfig",
    "FitResult",
    "Objective",
    "augment",
    "load_face_images",
    "run_fit",
    "single_thread",
]
