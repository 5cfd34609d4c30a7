"""The declared schema of every artifact kind.

A schema names each tensor with its allowed dtypes and its shape, where a
dimension is a number or a symbol (``"photos"``) bound consistently across
the tensors of one artifact and limited to a range or a set. It also lists the
metadata an artifact must carry (always ``model_id``: which encoder weights or
base model it belongs to). ``idvault artifact kinds --json`` prints these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtypes: tuple[str, ...] = ("float32", "float16")
    description: str = ""


@dataclass(frozen=True)
class DimSpec:
    """Allowed values of a symbolic dimension: a range, or an explicit set."""

    min: int = 1
    max: int = 1
    allowed: tuple[int, ...] | None = None
    description: str = ""

    def accepts(self, value: int) -> bool:
        if self.allowed is not None:
            return value in self.allowed
        return self.min <= value <= self.max

    def rule(self) -> str:
        if self.allowed is not None:
            return "one of " + ", ".join(map(str, self.allowed))
        return f"between {self.min} and {self.max}"


@dataclass(frozen=True)
class MetaSpec:
    name: str
    description: str
    allowed: tuple[str, ...] | None = None


@dataclass(frozen=True)
class KindSchema:
    kind: str
    schema_version: int
    description: str
    tensors: tuple[TensorSpec, ...]
    dims: dict[str, DimSpec] = field(default_factory=dict)
    metadata: tuple[MetaSpec, ...] = ()
    max_bytes: int = 1 << 20
    unit_norm: tuple[str, ...] = ()  # tensors whose rows must have L2 norm 1

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["tensors"] = [
            {**asdict(t), "shape": list(t.shape), "dtypes": list(t.dtypes)} for t in self.tensors
        ]
        return doc


MODEL_ID = MetaSpec("model_id", "the encoder weights or base model this artifact belongs to "
                                "(content hash where possible)")
MAX_PHOTOS = 64
# A faceid artifact keeps the CLIP features of at most this many photos (~0.66 MB each in
# fp16 at ViT-H/14's 257 x 1280); more photos add tokens, not likeness.
FACEID_MAX_PHOTOS = 4
# The kinds computed from photos at enrollment (the others are fitted by jobs, or put).
ENROLL_KINDS = ("face", "photomaker", "storymaker", "faceid", "instantid")

KINDS: dict[str, KindSchema] = {
    s.kind: s
    for s in (
        KindSchema(
            kind="face",
            schema_version=1,
            description="ArcFace embeddings (insightface, 512-d) of each enrolled photo, raw and "
                        "L2-normalised, plus the normalised mean of the identity",
            tensors=(
                TensorSpec("embeddings", ("photos", "dim"), description="raw embedding per photo"),
                TensorSpec("normed", ("photos", "dim"), description="L2-normalised per photo"),
                TensorSpec("mean", ("dim",), description="L2-normalised mean of `normed`"),
            ),
            dims={"photos": DimSpec(1, MAX_PHOTOS, description="enrolled photos"),
                  "dim": DimSpec(allowed=(512,), description="ArcFace embedding size")},
            metadata=(MODEL_ID,),
            max_bytes=1 << 20,
            unit_norm=("normed", "mean"),
        ),
        KindSchema(
            kind="photomaker",
            schema_version=1,
            description="PhotoMaker stacked ID embeddings before class-word fusion: v1 one "
                        "2048-d vector per photo, v2 two 2048-d tokens per photo",
            tensors=(TensorSpec("id_embeds", ("photos", "tokens", 2048)),),
            dims={"photos": DimSpec(1, MAX_PHOTOS, description="enrolled photos"),
                  "tokens": DimSpec(allowed=(1, 2), description="1 for v1, 2 for v2")},
            metadata=(MODEL_ID, MetaSpec("version", "PhotoMaker version", ("v1", "v2"))),
            max_bytes=2 << 20,
        ),
        KindSchema(
            kind="storymaker",
            schema_version=1,
            description="StoryMaker character tokens (4 face + 16 character) before the slot "
                        "position embedding",
            tensors=(TensorSpec("tokens", (20, 2048)),),
            metadata=(MODEL_ID, MetaSpec("crop", "how the character crop was made",
                                         ("mask", "face_box_fallback", "cloth"))),
            max_bytes=1 << 20,
        ),
        KindSchema(
            kind="faceid",
            schema_version=1,
            description="IP-Adapter-FaceID Plus v2 inputs: per photo the L2-normalised "
                        "buffalo_l ArcFace embedding and the CLIP ViT-H/14 penultimate hidden "
                        "states of the 224 px aligned face crop, plus the CLIP features of an "
                        "all-zero image (the official negative); projected at generation",
            tensors=(
                TensorSpec("normed", ("photos", 512), description="normed_embedding per photo"),
                TensorSpec("clip_embeds", ("photos", "positions", "clip_dim"),
                           description="hidden_states[-2] of the aligned face crop per photo"),
                TensorSpec("clip_negative", ("positions", "clip_dim"),
                           description="hidden_states[-2] of an all-zero pixel input"),
            ),
            dims={"photos": DimSpec(1, FACEID_MAX_PHOTOS, description="photos used"),
                  "positions": DimSpec(1, 1025, description="CLIP positions (257 for "
                                                             "ViT-H/14 at 224 px)"),
                  "clip_dim": DimSpec(1, 2048, description="CLIP hidden size (1280)")},
            metadata=(MODEL_ID,
                      MetaSpec("face_model_id", "the ArcFace weights of `normed`"),
                      MetaSpec("clip_model_id", "the CLIP vision tower of `clip_embeds`")),
            max_bytes=8 << 20,
            unit_norm=("normed",),
        ),
        KindSchema(
            kind="instantid",
            schema_version=1,
            description="InstantID inputs: the raw antelopev2 (glintr100) ArcFace embedding "
                        "per photo, and the five keypoints, face box and size of the reference "
                        "photo, redrawn inside the identity's region at generation",
            tensors=(
                TensorSpec("embeddings", ("photos", 512), description="raw embedding per photo"),
                TensorSpec("kps", (5, 2), ("float32",),
                           description="reference photo keypoints (x, y) in pixels: eyes, "
                                       "nose, mouth corners"),
                TensorSpec("bbox", (4,), ("float32",),
                           description="reference face box x0, y0, x1, y1 in pixels"),
                TensorSpec("image_size", (2,), ("float32",),
                           description="reference photo width, height in pixels"),
            ),
            dims={"photos": DimSpec(1, MAX_PHOTOS, description="enrolled photos")},
            metadata=(MODEL_ID,),
            max_bytes=1 << 20,
        ),
        KindSchema(
            kind="celeb_basis",
            schema_version=1,
            description="Celeb Basis coefficients (2 token positions x 512) and the id of the "
                        "basis they index",
            tensors=(TensorSpec("coefficients", (2, 512)),),
            metadata=(MODEL_ID, MetaSpec("basis_id", "content hash of the Celeb Basis object")),
            max_bytes=64 << 10,
        ),
        KindSchema(
            kind="lidb",
            schema_version=1,
            description="HyperDreamBooth Lightweight DreamBooth train factors per layer; the "
                        "frozen aux matrices are regenerated from `seed`",
            tensors=(
                TensorSpec("down_train", ("layers", "rank", 100),
                           description="r x a factor per layer (a = 100)"),
                TensorSpec("up_train", ("layers", 50, "rank"),
                           description="b x r factor per layer (b = 50)"),
            ),
            dims={"layers": DimSpec(1, 2048, description="LoRA'd linear layers"),
                  "rank": DimSpec(1, 16, description="train rank (1 in the paper)")},
            metadata=(MODEL_ID,
                      MetaSpec("seed", "seed of the frozen aux matrices (decimal integer)"),
                      MetaSpec("layers", "JSON list of the layer names, in tensor order")),
            max_bytes=4 << 20,
        ),
    )
}
