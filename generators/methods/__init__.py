"""Identity methods: how one identity's stored artifact conditions a generation.

:class:`generators.compose.ComposePipeline` knows nothing about PhotoMaker or
StoryMaker; it asks the method of each identity, through the interface of
:class:`~generators.methods.base.IdentityMethod`, for four things, each optional:

============================  ==================================================
``class_tokens(request)``      how many copies of the class token stand for the
                               identity in the *identity prompt* (PhotoMaker:
                               photos x tokens per photo; default 1: the class
                               word stays as it is)
``fuse_text(embeds, ...)``     replace those positions of the SDXL prompt
                               embedding (PhotoMaker's FuseModule); they become
                               the identity's text-fused tokens, regional
``image_tokens(requests)``     decoupled image tokens for all of the method's
                               identities of one call, with a global block
                               (StoryMaker: bg + slots), regional
``loras()``                    UNet LoRAs to apply while it runs (global)
============================  ==================================================

plus ``text_only_until(steps)``: steps ``i <= n`` use the *text-only prompt*
(the scene text: class word once), as PhotoMaker's ``start_merge_step``.

Before any model work the pipeline calls :meth:`~generators.methods.base.IdentityMethod.problem` (can
this identity use the method: artifact present, made with the weights in the
models folder?) and :meth:`~generators.methods.base.IdentityMethod.select` (pick each identity's
artifact; raise a clear error otherwise); then :meth:`~generators.methods.base.IdentityMethod.load`
(weights, once per pipeline), then decrypts the chosen artifacts.

The optimisation-based methods use three more hooks:

* ``input_embeddings(request)`` (**Celeb Basis**, :mod:`generators.methods.celeb_basis`):
  per text encoder the vectors that replace the class-token copies' *input*
  embeddings (before the transformer); with ``fuses_text()`` true and
  ``class_tokens`` = 2 those positions are the identity's regional tokens.
* ``text_encoder_hooks(requests, scene)`` / ``unet_hooks(requests, scene)``
  (**LiDB**, :mod:`generators.methods.lidb`): context managers active while
  the prompt is encoded / while the UNet denoises; ``scene``
  (:class:`~generators.methods.base.Scene`) tells them the layout masks and the current phase's token
  positions, so a per-identity LoRA can act only inside its region.

:meth:`~generators.methods.base.IdentityMethod.bind` hands every method the pipeline, its vault and
base-model id once; :meth:`~generators.methods.base.IdentityMethod.prepare` runs right after the
chosen artifacts are decrypted (still before any UNet work).

Register a method with :func:`register_method`; ``--method NAME`` and the
``auto`` choice (:data:`DEFAULT_PREFERENCE`) find it by its ``name``.
"""

from __future__ import annotations

from generators.methods.base import IdentityMethod
from generators.methods.celeb_basis import CelebBasisMethod
from generators.methods.faceid import FaceIDMethod
from generators.methods.instantid import InstantIDMethod
from generators.methods.lidb import LidbMethod
from generators.methods.photomaker import PhotoMakerMethod
from generators.methods.storymaker import StoryMakerMethod
from vault.errors import InvalidInput

__all__ = ["DEFAULT_PREFERENCE", "METHODS", "register_method"]

METHODS: dict[str, type[IdentityMethod]] = {}
# ``--method auto``: PhotoMaker first (its artifact pools every enrolled photo and it
# needs no slot), StoryMaker for identities PhotoMaker cannot serve, then the adapters
# (FaceID, then InstantID, which also runs a ControlNet per step), then the fitted methods
# (their artifacts exist only after an ``idvault personalize`` job).
DEFAULT_PREFERENCE: tuple[str, ...] = ("photomaker", "storymaker", "faceid", "instantid",
                                       "celeb_basis", "lidb")


def register_method(cls: type[IdentityMethod]) -> type[IdentityMethod]:
    """Make ``cls`` available under ``cls.name`` (usable as a class decorator)."""
    if not getattr(cls, "name", None) or not getattr(cls, "artifact_kind", None):
        raise InvalidInput("an identity method needs a name and an artifact_kind")
    METHODS[cls.name] = cls
    return cls


for _builtin in (PhotoMakerMethod, StoryMakerMethod, FaceIDMethod, InstantIDMethod,
                 CelebBasisMethod, LidbMethod):
    register_method(_builtin)
