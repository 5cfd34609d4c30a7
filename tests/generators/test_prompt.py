"""Prompt parsing, token positions and owner-scoped pre-flight checks (generators.prompt)."""

from __future__ import annotations

from pathlib import Path

import pytest

from generators.prompt import (
    PromptConfig,
    parse_prompt,
    resolve_identities,
    token_positions,
)
from tests.helpers import consent, face_payload
from vault import audit
from vault.config import Settings
from vault.errors import (
    ConsentWithdrawn,
    InvalidInput,
    NotFound,
    PurposeNotGranted,
)
from vault.handles import Handle
from vault.vault import Vault


def test_two_mentions_with_class_word_and_default() -> None:
    p = parse_prompt("@smiths/ana:girl and @smiths/ben hiking in the alps, watercolor")
    assert p.identities == (Handle("smiths", "ana"), Handle("smiths", "ben"))
    assert p.handles == ("smiths/ana", "smiths/ben")
    assert p.scene_text == "girl and person hiking in the alps, watercolor"
    ana, ben = p.mentions
    assert (ana.class_word, ana.placeholder, ana.order, ana.identity) == ("girl", "girl", 0, 0)
    assert (ben.class_word, ben.placeholder, ben.order, ben.identity) == (None, "person", 1, 1)
    assert p.prompt[slice(*ana.span)] == "@smiths/ana:girl"
    assert p.prompt[slice(*ben.span)] == "@smiths/ben"
    assert p.scene_text[slice(*ana.scene_span)] == "girl"
    assert p.scene_text[slice(*ben.scene_span)] == "person"
    assert p.class_words == ("girl", "person")


def test_default_class_word_is_configurable() -> None:
    p = parse_prompt("portrait of @smiths/ana", PromptConfig(default_class_word="woman"))
    assert p.scene_text == "portrait of woman"


def test_sentence_dot_possessive_and_punctuation_end_a_mention() -> None:
    p = parse_prompt("(@smiths/ana's dog) runs with @northlight/kai-2.")
    assert p.handles == ("smiths/ana", "northlight/kai-2")
    assert p.scene_text == "(person's dog) runs with person."


def test_at_signs_that_are_not_mentions_stay_text() -> None:
    p = parse_prompt("mail ana@example.com, meet @ noon")
    assert p.mentions == ()
    assert p.scene_text == "mail ana@example.com, meet @ noon"


def test_repeated_mentions_are_one_identity_sharing_the_class_word() -> None:
    p = parse_prompt("@smiths/ana and @smiths/ben; later @smiths/ana:girl again")
    assert p.handles == ("smiths/ana", "smiths/ben")
    assert [m.identity for m in p.mentions] == [0, 1, 0]
    # The first mention inherits the class word given at the third.
    assert p.scene_text == "girl and person; later girl again"
    assert [m.order for m in p.mentions_of("smiths/ana")] == [0, 2]


def test_conflicting_class_words_are_rejected() -> None:
    with pytest.raises(InvalidInput, match="two class words"):
        parse_prompt("@smiths/ana:girl with @smiths/ana:woman")


@pytest.mark.parametrize("prompt, bad", [
    ("photo of @Smiths/Ana in rain", "@Smiths/Ana"),
    ("photo of @smiths alone", "@smiths"),
    ("@smiths/ana/extra hiking", "@smiths/ana/extra"),
    ("@smiths/ana:Girl hiking", "@smiths/ana:Girl"),
    ("@smiths/ana: hiking", "@smiths/ana:"),
    ("@@smiths/ana hiking", "@@smiths/ana"),
    ("@smiths/admin hiking", "@smiths/admin"),
    ("@smiths/ana+friend hiking", "@smiths/ana+friend"),
])
def test_bad_mentions_name_the_mention(prompt: str, bad: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_prompt(prompt)
    assert repr(bad) in str(err.value)
    assert err.value.details["mention"] == bad


def test_max_identities() -> None:
    with pytest.raises(InvalidInput, match="at most 1"):
        parse_prompt("@smiths/ana and @smiths/ben", PromptConfig(max_identities=1))


def test_render_with_another_filling_reports_spans() -> None:
    p = parse_prompt("@smiths/ana:girl and @smiths/ben at sunset")
    text, spans = p.render(lambda m: f"{m.placeholder} img")
    assert text == "girl img and person img at sunset"
    assert [text[a:b] for a, b in spans] == ["girl img", "person img"]


def test_prompt_digest_is_of_the_raw_prompt() -> None:
    import hashlib

    p = parse_prompt("@smiths/ana at the beach")
    assert p.prompt_sha256 == hashlib.sha256(b"@smiths/ana at the beach").hexdigest()


def test_token_positions_point_at_the_placeholder_tokens() -> None:
    from generators.standins.pipelines import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    p = parse_prompt("a photo of @smiths/ana:girl and @smiths/ben:man hiking")
    (girl,), (man,) = token_positions(tok, p.scene_text, [m.scene_span for m in p.mentions])
    ids = tok(p.scene_text).input_ids
    assert tok.convert_ids_to_tokens([ids[girl], ids[man]]) == ["girl</w>", "man</w>"]
    assert girl == 4  # <|startoftext|> a photo of girl


def test_token_positions_refuse_mentions_beyond_the_context() -> None:
    from generators.standins.pipelines import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    p = parse_prompt("photo " * 80 + "@smiths/ana")
    with pytest.raises(InvalidInput, match="77-token limit"):
        token_positions(tok, p.scene_text, [p.mentions[0].scene_span])


# -- owner scoping and consent ---------------------------------------------------------
@pytest.fixture
def vault(tmp_path: Path):
    v = Vault.init(Settings(data_dir=tmp_path / "vault"), actor="test")
    v.add_owner("smiths", "family", actor="test")
    v.add_owner("northlight", "studio", erase_policy="retain", actor="test")
    v.create_identity("smiths/ana", consent(), actor="test")
    v.create_identity("smiths/ben", consent(purposes=["enroll", "generate", "commercial"]),
                      actor="test")
    v.create_identity("northlight/kai", consent(), actor="test")
    v.put_artifact("smiths/ana", "face", face_payload(seed=1), actor="test")
    yield v
    v.dispose()


def test_resolve_own_identities_without_decrypting(vault: Vault) -> None:
    p = parse_prompt("@smiths/ana and @smiths/ben")
    ana, ben = resolve_identities(vault, p, owner="smiths")
    assert ana.handle == "smiths/ana"
    assert ana.consent_id == vault.describe("smiths/ana")["consent"]["id"]
    assert [a["kind"] for a in ana.artifacts] == ["face"]
    assert ana.artifacts[0]["sha256"] == vault.describe("smiths/ana")["artifacts"][0]["sha256"]
    assert ben.artifacts == ()
    with vault.session() as s:  # metadata only: nothing was decrypted, so no read event
        actions = [e.action for e in audit.events(s)]
    assert "artifact.write" in actions and "artifact.read" not in actions


def test_another_owners_handle_is_indistinguishable_from_an_unknown_one(vault: Vault) -> None:
    with pytest.raises(NotFound) as foreign:
        resolve_identities(vault, parse_prompt("@northlight/kai"), owner="smiths")
    with pytest.raises(NotFound) as unknown:
        resolve_identities(vault, parse_prompt("@northlight/nobody"), owner="smiths")
    with pytest.raises(NotFound) as unknown_own:
        resolve_identities(vault, parse_prompt("@smiths/nobody"), owner="smiths")
    assert type(foreign.value) is type(unknown.value) is NotFound
    assert str(foreign.value) == "no identity northlight/kai"
    assert str(unknown.value) == "no identity northlight/nobody"
    assert str(unknown_own.value) == "no identity smiths/nobody"
    assert foreign.value.details == unknown.value.details
    # Unscoped (the local administrator), the same handle resolves.
    assert resolve_identities(vault, ["northlight/kai"], owner=None)[0].handle == "northlight/kai"


def test_purpose_not_granted_names_the_identity(vault: Vault) -> None:
    with pytest.raises(PurposeNotGranted, match="smiths/ana"):
        resolve_identities(vault, ["smiths/ben", "smiths/ana"], owner="smiths",
                           purposes=("generate", "commercial"))
    assert len(resolve_identities(vault, ["smiths/ben"], owner="smiths",
                                  purposes=("generate", "commercial"))) == 1


def test_withdrawn_consent_blocks_resolution(vault: Vault) -> None:
    vault.withdraw_consent("northlight/kai", actor="test")  # retained: the record stays
    with pytest.raises(ConsentWithdrawn, match="northlight/kai"):
        resolve_identities(vault, ["northlight/kai"], owner="northlight")
