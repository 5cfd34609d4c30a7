"""Tiny, offline stand-ins for the SDXL and SD1.5 diffusers pipelines, for tests and benches.

No base-model weights exist on the machines idvault is developed and tested on.
This module builds pipelines with the **real component layout** (the same
classes, the same ``model_index.json`` and sub-folders that
``save_pretrained`` writes for the real models) but tiny sizes and random,
seed-fixed weights, so every code path users take (``from_pretrained`` from a
folder, prompt encoding with both SDXL text encoders, the ``text_time``
added conditioning, the UNet's attention-processor names, the VAE decode)
runs in well under a second on a CPU.

**They produce noise, not pictures.** What they preserve is structure:

* UNet: the SDXL block structure (``DownBlock2D`` then two
  ``CrossAttnDownBlock2D``; two ``CrossAttnUpBlock2D`` then ``UpBlock2D``;
  ``layers_per_block`` 2; a mid block with several transformer blocks;
  ``addition_embed_type="text_time"``; linear projections), so
  ``unet.attn_processors`` has the same naming pattern and order as the
  full-size model (``manifests/base_models.json``), only fewer transformer
  blocks per attention. The SD1.5 one mirrors SD1.5 the same way.
* Text: ``CLIPTextModel`` + ``CLIPTextModelWithProjection`` with tiny hidden
  sizes; ``cross_attention_dim`` is their concatenated width, exactly as
  768 + 1280 = 2048 in SDXL.
* Tokenizers: a real CLIP byte-level BPE built offline from a small vocabulary
  (the 256 byte symbols, with and without ``</w>``, plus merges spelling a few
  hundred common prompt words), so **any** prompt tokenizes without unknown
  tokens: a word outside the list falls back to byte pieces.
* VAE: ``AutoencoderKL`` with four blocks, so the scale factor is 8 as in the
  real models (a 64x64 image has an 8x8 latent).

transformers 5 ignores ``CLIPTokenizer(vocab_file=..., merges_file=...)``; the
tokenizers here are built with ``vocab=``/``merges=`` and saved, and load back
with ``from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch

from encoders.library_output import quiet_libraries

__all__ = [
    "COMMON_WORDS",
    "TinySD15Config",
    "TinySDXLConfig",
    "build_tiny_sd15",
    "build_tiny_sdxl",
    "build_tiny_sdxl_unet",
    "tiny_clip_tokenizer",
    "tiny_vocab_and_merges",
    "write_tiny_sd15",
    "write_tiny_sdxl",
]

# Words that become single (or few) BPE tokens: prompt vocabulary of the docs,
# tests and demo, the class words PhotoMaker expands, and PhotoMaker's trigger.
_WORDS = """
a an the and or of in on at to with by for from under over near into
is are be this that it its his her their two three four together
img photo photograph picture portrait image painting drawing sketch illustration render
man woman girl boy person people child kid baby teen adult lady gentleman dog cat
friends family couple group team crowd
hiking walking running sitting standing smiling laughing looking dancing reading
playing eating drinking talking holding wearing riding swimming climbing
alps mountain mountains beach sea ocean lake river forest park city street road garden
room kitchen cafe studio stage field snow rain sky sun sunset sunrise night day morning
evening winter summer spring autumn
watercolor oil pencil charcoal anime cartoon comic pixel art style cinematic photorealistic
realistic detailed high quality best worst low resolution lighting light dark soft warm cold
background foreground close up full body face head hair eyes smile
red orange yellow green blue purple pink brown black white gray grey gold silver
hat cap dress shirt jacket coat suit scarf glasses boots
big small tall short young old happy sad beautiful
blurry ugly deformed bad anatomy extra fingers text watermark lowres jpeg artifacts
"""
COMMON_WORDS = tuple(dict.fromkeys(_WORDS.split()))

SPECIAL_BOS = "<|startoftext|>"
SPECIAL_EOS = "<|endoftext|>"
MAX_LENGTH = 77  # CLIP context length, as in the real models


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable symbol map (the byte-level BPE alphabet)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges the way the BPE model does: lowest rank first, leftmost on ties."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best = min(((ranks[p], i) for i, p in enumerate(pairwise(symbols))
                    if p in ranks), default=None)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def tiny_vocab_and_merges(
    words: tuple[str, ...] = COMMON_WORDS,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list that spell ``words`` and fall back to bytes.

    Layout follows CLIP's: the 256 byte symbols, the same with ``</w>`` (end of
    word), then merged pieces, then ``<|startoftext|>`` and ``<|endoftext|>``
    last. Each word (lowercase ASCII) is run through the merges learnt so far
    and, while it is still in pieces, gets a merge of its first two pieces
    appended: so every listed word is one token, and since a new merge has the
    lowest priority it cannot change how an earlier word splits. Anything
    else falls back to smaller pieces, down to single bytes, which are all
    in the vocabulary: no prompt produces an unknown token.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens: list[str] = alphabet + [c + "</w>" for c in alphabet]
    seen = set(tokens)
    # Pairs, not "a b" strings: the tokenizers backend takes (left, right) tuples.
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            merged = pieces[0] + pieces[1]
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
            pieces = _bpe(pieces, ranks)
    tokens += [SPECIAL_BOS, SPECIAL_EOS]
    return {t: i for i, t in enumerate(tokens)}, list(ranks)


def tiny_clip_tokenizer(*, pad_token: str = SPECIAL_EOS):
    """A real ``CLIPTokenizer`` over the tiny vocabulary (77-token context)."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token,
                         model_max_length=MAX_LENGTH)


@dataclass(frozen=True)
class TinySDXLConfig:
    """Sizes of the tiny SDXL stand-in (the full model's value in comments)."""

    seed: int = 0
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # (320, 640, 1280)
    # Per down block; the first is a DownBlock2D without attention (as in SDXL).
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 2)  # (1, 2, 10)
    attention_head_dim: tuple[int, ...] = (2, 4, 4)  # (5, 10, 20): diffusers' name for heads
    text_hidden: int = 32  # CLIP-L: 768
    text_hidden_2: int = 32  # OpenCLIP bigG: 1280
    projection_dim_2: int = 32  # bigG: 1280 (pooled embedding, part of text_time)
    text_layers: int = 2  # >= 2: SDXL reads the penultimate hidden states
    addition_time_embed_dim: int = 8  # 256
    sample_size: int = 8  # latent side; 8 * vae scale 8 = 64 px default image
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)  # four blocks: scale factor 8

    @property
    def cross_attention_dim(self) -> int:
        # The UNet's context is both encoders' hidden states side by side.
        return self.text_hidden + self.text_hidden_2


@dataclass(frozen=True)
class TinySD15Config:
    """Sizes of the tiny SD1.5 stand-in (the full model's value in comments)."""

    seed: int = 0
    block_out_channels: tuple[int, ...] = (32, 32, 64, 64)  # (320, 640, 1280, 1280)
    attention_head_dim: int = 4  # 8
    text_hidden: int = 32  # CLIP-L: 768 (= cross_attention_dim)
    text_layers: int = 2
    sample_size: int = 8
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)


def sdxl_unet_config(cfg: TinySDXLConfig = TinySDXLConfig()) -> dict:
    """The tiny UNet's config: the SDXL config with tiny sizes (same keys as the manifest)."""
    return {
        "sample_size": cfg.sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": cfg.block_out_channels,
        "layers_per_block": 2,
        "transformer_layers_per_block": cfg.transformer_layers_per_block,
        "attention_head_dim": cfg.attention_head_dim,
        "cross_attention_dim": cfg.cross_attention_dim,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": cfg.addition_time_embed_dim,
        # SDXL: 6 time ids (original size, crop, target size) x 256 + pooled 1280 = 2816.
        "projection_class_embeddings_input_dim": 6 * cfg.addition_time_embed_dim
        + cfg.projection_dim_2,
        "norm_num_groups": 8,
    }


def build_tiny_sdxl_unet(cfg: TinySDXLConfig = TinySDXLConfig()):
    """The tiny SDXL ``UNet2DConditionModel`` alone, seed-fixed, in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(cfg.seed)
    return UNet2DConditionModel(**sdxl_unet_config(cfg)).eval()


def _text_config(hidden: int, layers: int, vocab_size: int, *, projection_dim: int,
                 act: str, bos: int, eos: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        hidden_act=act, projection_dim=projection_dim,
        # Not 2 (the legacy value): the pooled token is found by the real eos id.
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )


def _vae(channels: tuple[int, ...], sample_px: int):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels, layers_per_block=1, norm_num_groups=4,
        sample_size=sample_px,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    # The SDXL base scheduler settings (scheduler_config.json of the release).
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon",
        timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
        use_karras_sigmas=False,
    )


def build_tiny_sdxl(cfg: TinySDXLConfig = TinySDXLConfig()):
    """A ``StableDiffusionXLPipeline`` with tiny random components (in memory)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    # The real SDXL tokenizer_2 pads with "!" rather than <|endoftext|>; keep it.
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    vocab = len(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    text_encoder = CLIPTextModel(_text_config(
        cfg.text_hidden, cfg.text_layers, vocab, projection_dim=cfg.text_hidden,
        act="quick_gelu", bos=bos, eos=eos))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(
        cfg.text_hidden_2, cfg.text_layers, vocab, projection_dim=cfg.projection_dim_2,
        act="gelu", bos=bos, eos=eos))
    unet = build_tiny_sdxl_unet(cfg)
    torch.manual_seed(cfg.seed + 1)
    vae = _vae(cfg.vae_channels, cfg.sample_size * 8)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd15(cfg: TinySD15Config = TinySD15Config()):
    """A ``StableDiffusionPipeline`` with tiny random components (in memory)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(cfg.seed)
    text_encoder = CLIPTextModel(_text_config(
        cfg.text_hidden, cfg.text_layers, len(tokenizer), projection_dim=cfg.text_hidden,
        act="quick_gelu", bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id))
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=cfg.block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=8,
    ).eval()
    torch.manual_seed(cfg.seed + 1)
    vae = _vae(cfg.vae_channels, cfg.sample_size * 8)
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_tiny_sdxl(directory: Path | str, cfg: TinySDXLConfig = TinySDXLConfig()) -> Path:
    """Save the tiny SDXL pipeline with ``save_pretrained``; returns the folder.

    ``StableDiffusionXLPipeline.from_pretrained(directory)`` loads it back
    offline. Deterministic for a given ``cfg``.
    """
    directory = Path(directory)
    with quiet_libraries():
        build_tiny_sdxl(cfg).save_pretrained(directory, safe_serialization=True)
    return directory


def write_tiny_sd15(directory: Path | str, cfg: TinySD15Config = TinySD15Config()) -> Path:
    """Save the tiny SD1.5 pipeline with ``save_pretrained``; returns the folder."""
    directory = Path(directory)
    with quiet_libraries():
        build_tiny_sd15(cfg).save_pretrained(directory, safe_serialization=True)
    return directory
