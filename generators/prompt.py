"""Prompts with identity handles: parsing, owner scoping and pre-flight checks.

Syntax. An identity is mentioned as ``@owner/name``, optionally with a class
word: ``@smiths/ana:girl``. The class word is what the methods put in the
text where the mention stood (PhotoMaker expands and fuses it; StoryMaker
and plain text keep it as the subject word); without one it is
``PromptConfig.default_class_word`` ("person")::

    "@smiths/ana:girl and @smiths/ben hiking in the alps, watercolor"
    -> scene text "girl and person hiking in the alps, watercolor"

A mention starts at an ``@`` that does not follow a letter, digit, ``_``,
``@`` or ``/`` (so ``ana@example.com`` stays plain text) and is followed by
a non-space character; it runs to the next white space, quote or one of
``, ; ! ? ( ) [ ] { } < >``, and trailing dots end a sentence rather than
the handle (``... with @smiths/ana.``). ``'s`` after a handle stays in the text
(``@smiths/ana's dog`` -> ``person's dog``). Anything that starts like a
mention but is not a valid handle is an error naming it, never silently
plain text: a prompt that meant an identity must not quietly generate a
stranger.

Repeated mentions of one handle are allowed and mean the same identity (one
layout box, one set of identity tokens, every mention filled the same way).
They must agree on the class word: a mention without one inherits the class
word given elsewhere; two different class words are an error.

Scoping. :func:`resolve_identities` checks, before any model work, that each
identity exists, belongs to the caller's owner, is active and has consent
for every requested purpose. Another owner's handle gives exactly the same
NotFound as a handle that does not exist, so a caller cannot probe other
owners' rosters.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vault.errors import Conflict, ConsentError, InvalidHandle, InvalidInput, NotFound
from vault.handles import Handle

__all__ = [
    "DEFAULT_CLASS_WORD",
    "Mention",
    "ParsedPrompt",
    "PromptConfig",
    "ResolvedIdentity",
    "parse_prompt",
    "resolve_identities",
    "token_positions",
]

DEFAULT_CLASS_WORD = "person"
CLASS_WORD = re.compile(r"[a-z][a-z-]{0,31}")
# '@' not glued to a word, handle or another '@', then a run of non-separator
# characters (the handle, ':' and the class word). Separators: white space and
# punctuation that cannot occur in a handle.
_MENTION = re.compile(r"(?<![\w@/])@([^\s,;!?()\[\]{}<>\"'`\u2018\u2019\u201c\u201d]+)")


@dataclass(frozen=True)
class PromptConfig:
    default_class_word: str = DEFAULT_CLASS_WORD
    max_identities: int | None = None  # None: no limit here (methods enforce their own)


@dataclass(frozen=True)
class Mention:
    """One ``@owner/name[:class]`` occurrence in a prompt."""

    handle: Handle
    class_word: str | None  # as written at this mention (None: not given here)
    span: tuple[int, int]  # [start, end) in the prompt
    order: int  # 0-based position among all mentions
    identity: int  # index into ParsedPrompt.identities (order of first mention)
    placeholder: str  # the word that replaces it in the scene text
    scene_span: tuple[int, int]  # [start, end) of the placeholder in the scene text


@dataclass(frozen=True)
class ParsedPrompt:
    prompt: str
    mentions: tuple[Mention, ...]
    identities: tuple[Handle, ...]  # distinct, in order of first mention
    class_words: tuple[str, ...]  # per identity: its class word (or the default)
    scene_text: str  # every mention replaced by its placeholder

    @property
    def handles(self) -> tuple[str, ...]:
        """The identities as ``owner/name`` strings (the layout's names)."""
        return tuple(str(h) for h in self.identities)

    @property
    def prompt_sha256(self) -> str:
        return hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()

    def mentions_of(self, identity: int | Handle | str) -> tuple[Mention, ...]:
        if not isinstance(identity, int):
            h = identity if isinstance(identity, Handle) else Handle.parse(str(identity))
            identity = self.identities.index(h)
        return tuple(m for m in self.mentions if m.identity == identity)

    def render(self, fill: Callable[[Mention], str]) -> tuple[str, tuple[tuple[int, int], ...]]:
        """The prompt with each mention replaced by ``fill(mention)``.

        Returns the text and, per mention, the ``[start, end)`` span of its
        replacement, for methods that need another filling than the scene
        text's (e.g. PhotoMaker's ``"girl img"``).
        """
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        length = 0
        for m in self.mentions:
            before = self.prompt[pos:m.span[0]]
            parts.append(before)
            length += len(before)
            text = fill(m)
            parts.append(text)
            spans.append((length, length + len(text)))
            length += len(text)
            pos = m.span[1]
        parts.append(self.prompt[pos:])
        return "".join(parts), tuple(spans)


def parse_prompt(prompt: str, config: PromptConfig = PromptConfig()) -> ParsedPrompt:
    """Find the handles in ``prompt``; InvalidInput names any bad mention."""
    if not isinstance(prompt, str):
        raise InvalidInput("a prompt is text")
    if not CLASS_WORD.fullmatch(config.default_class_word):
        raise InvalidInput(f"default class word {config.default_class_word!r} is not a "
                           "lowercase word")
    raw: list[tuple[Handle, str | None, tuple[int, int]]] = []
    for match in _MENTION.finditer(prompt):
        token = match.group(1).rstrip(".")
        start = match.start()
        end = start + 1 + len(token)
        shown = prompt[start:end] or "@"
        handle_text, sep, class_word = token.partition(":")
        try:
            # Re-add the '@' so a doubled one ("@@smiths/ana") fails instead of being eaten.
            handle = Handle.parse("@" + handle_text)
        except InvalidHandle as exc:
            raise InvalidInput(
                f"bad mention {shown!r} at character {start}: {'; '.join(exc.failed_rules)} "
                "(a mention is @owner/name or @owner/name:classword)",
                mention=shown, start=start) from None
        if sep and not CLASS_WORD.fullmatch(class_word):
            raise InvalidInput(
                f"bad mention {shown!r} at character {start}: the class word after ':' "
                "must be one lowercase word (letters and '-', up to 32), e.g. "
                "@smiths/ana:girl", mention=shown, start=start)
        raw.append((handle, class_word if sep else None, (start, end)))

    identities: list[Handle] = []
    words: dict[Handle, str] = {}
    for handle, word, (start, _) in raw:
        if handle not in identities:
            identities.append(handle)
        if word is not None:
            if handle in words and words[handle] != word:
                raise InvalidInput(
                    f"@{handle} is mentioned with two class words ({words[handle]!r} and "
                    f"{word!r}); one identity has one class word",
                    mention=f"@{handle}:{word}", start=start)
            words[handle] = word
    if config.max_identities is not None and len(identities) > config.max_identities:
        raise InvalidInput(f"the prompt mentions {len(identities)} identities; at most "
                           f"{config.max_identities} are supported")

    mentions: list[Mention] = []
    scene: list[str] = []
    pos = length = 0
    for order, (handle, word, (start, end)) in enumerate(raw):
        before = prompt[pos:start]
        scene.append(before)
        length += len(before)
        placeholder = words.get(handle, config.default_class_word)
        scene.append(placeholder)
        mentions.append(Mention(handle, word, (start, end), order, identities.index(handle),
                                placeholder, (length, length + len(placeholder))))
        length += len(placeholder)
        pos = end
    scene.append(prompt[pos:])
    return ParsedPrompt(prompt, tuple(mentions), tuple(identities),
                        tuple(words.get(h, config.default_class_word) for h in identities),
                        "".join(scene))


def token_positions(tokenizer, text: str, spans: Sequence[tuple[int, int]], *,
                    max_length: int | None = None) -> tuple[tuple[int, ...], ...]:
    """Per character span, the positions of the tokens covering it in the encoded sequence.

    Positions count the begin-of-text token, so they index the text encoder's
    output directly (what ``IdentityTokens.text_positions`` wants). A span
    whose tokens fall beyond ``max_length`` (default: the tokenizer's, 77 for
    CLIP) raises InvalidInput: the identity would silently drop out of a
    truncated prompt.
    """
    max_length = max_length or tokenizer.model_max_length
    enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=max_length)
    offsets = enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    out = []
    for start, end in spans:
        hits = tuple(i for i, (a, b) in enumerate(offsets)
                     if enc["input_ids"][i] not in special and a < end and b > start)
        if not hits:
            raise InvalidInput(
                f"the words at characters {start}-{end} ({text[start:end]!r}) fall beyond the "
                f"{max_length}-token limit of the text encoder; shorten the prompt")
        out.append(hits)
    return tuple(out)


@dataclass(frozen=True)
class ResolvedIdentity:
    """An identity cleared for use: who, under which consent, with which artifacts."""

    handle: str
    identity_id: str  # the identity's stable uid
    consent_id: str
    artifacts: tuple[dict, ...]  # {id, kind, model_id, sha256}; payloads stay sealed


def resolve_identities(vault, identities: ParsedPrompt | Sequence[Handle | str], *,
                       owner: str | None, purposes: Sequence[str] = ("generate",),
                       ) -> list[ResolvedIdentity]:
    """Check each identity before any model work; metadata only, nothing is decrypted.

    ``owner`` is the caller's owner (None: no scoping, for the local
    administrator). A handle of another owner raises the same NotFound as an
    unknown handle. Identities held for review raise Conflict; withdrawn or
    expired consent, or a purpose it does not grant, raise the ConsentError
    subclass with the handle named.
    """
    from vault import identities as identity_service
    from vault.consent import check_use

    handles = (identities.identities if isinstance(identities, ParsedPrompt)
               else [h if isinstance(h, Handle) else Handle.parse(str(h)) for h in identities])
    out = []
    # Read-only: metadata only, so no SQLite write lock to queue for behind other writers.
    with vault.session(read_only=True) as s:
        # Every identity in one query (and one per related table); the checks below then
        # run in order of mention.
        found = identity_service.find_identities(
            s, [h for h in handles if owner is None or h.owner == owner])
        for h in handles:
            identity = found.get(h)
            if identity is None:
                # Another owner's handle gets word for word what an unknown handle gets.
                raise NotFound(f"no identity {h}")
            if identity.status == "held":
                raise Conflict(f"{h} is held for review and cannot be used until the review "
                               "is decided (`idvault review list`)")
            for purpose in purposes:
                try:
                    check_use(identity.consent, purpose)
                except ConsentError as exc:
                    raise type(exc)(f"{h}: {exc.message}", handle=str(h),
                                    purpose=purpose) from None
            out.append(ResolvedIdentity(
                str(h), identity.uid, identity.consent.uid,
                tuple({"id": a.id, "kind": a.kind, "model_id": a.model_id, "sha256": a.sha256}
                      for a in sorted(identity.artifacts, key=lambda a: (a.kind, a.model_id)))))
    return out
