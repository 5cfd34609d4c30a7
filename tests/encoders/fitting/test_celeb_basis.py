"""Celeb Basis: construction vs a plain re-computation, import/store, mapper math, TI export, fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoders.fitting import celeb_basis as cb
from encoders.fitting import textual_inversion as ti
from encoders.fitting.core import DiffusionModel, FitConfig
from vault.errors import NotFound

pytestmark = pytest.mark.usefixtures("one_torch_thread")






@pytest.fixture(scope="module")
def model(tiny_sd15):
    return DiffusionModel.from_pretrained(tiny_sd15)


def test_the_names_list_is_large_and_unique():
    names = cb.read_names()
    assert len(cb.canonical_names(names)) >= 600
    assert len(names) == len(set(names))


def _plain_basis(names, tokenizer, table: np.ndarray, k: int = 512):
    """The method written out with numpy, name by name."""
    names = sorted({n.strip() for n in names if n.strip()})
    special = set(tokenizer.all_special_ids)
    out = []
    for pos in (1, 2):
        rows = []
        for n in names:
            ids = tokenizer(n).input_ids
            if pos < len(ids) and ids[pos] < 49406 and ids[pos] not in special:
                rows.append(table[ids[pos]].astype(np.float64))
        rows = np.stack(rows)
        mean = rows.mean(0)
        _, s, vt = np.linalg.svd(rows - mean, full_matrices=False)
        out.append((mean, s, vt[:k]))
    return out


def test_basis_matches_a_plain_recomputation(model):
    tokenizer, encoder = model.encoders[0]
    names = cb.read_names() + ["  Albert Einstein ", "Albert Einstein"]  # duplicates collapse
    basis = cb.build_basis(names, model.encoders)
    t = basis.tensors["text_encoder"]
    dim = t.shape[-1]
    assert t.shape == (2, 513, dim)
    table = encoder.get_input_embeddings().weight.detach().numpy()
    for k, (mean, s, vt) in enumerate(_plain_basis(names, tokenizer, table)):
        np.testing.assert_allclose(t[k, 0].numpy(), mean, atol=1e-6)
        n = vt.shape[0]  # = dim for the 32-d tiny table: the rest is zero padding
        got = t[k, 1:1 + n].double().numpy()
        # Singular vectors are defined up to sign: compare |<ours, theirs>| per vector
        # where the singular values are distinct (all of them, for random tables).
        assert np.all(np.diff(s) < 0)
        np.testing.assert_allclose(np.abs((got * vt).sum(1)), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)  # unit norm
        assert float(t[k, 1 + n:].abs().max()) == 0.0
    # Content-addressed: the same inputs give the same id; another names list another.
    assert cb.build_basis(names, model.encoders).id == basis.id
    assert cb.build_basis(names[:-50], model.encoders).id != basis.id


def test_one_token_names_skip_the_special_token_at_position_2(model):
    tokenizer, encoder = model.encoders[0]
    table = encoder.get_input_embeddings().weight.detach()
    rows = cb.position_rows(["a", "the", "man woman"], tokenizer, table)
    assert rows[0].shape[0] == 3 and rows[1].shape[0] == 1  # only "man woman" has position 2


def test_official_shaped_basis_imports_and_round_trips_through_the_store(vault, tmp_path):
    g = torch.Generator().manual_seed(0)
    official = torch.randn(2, 513, 768, generator=g)
    path = tmp_path / "celeb_basis.pt"
    torch.save(official, path)
    basis = cb.import_official_basis(path)
    with vault.session() as s:
        assert cb.store_basis(s, basis) == basis.id
        assert cb.store_basis(s, basis) == basis.id  # idempotent
    with vault.session() as s:
        loaded = cb.load_basis(s, basis.id)
    assert torch.equal(loaded.tensors["text_encoder"], official)
    assert loaded.id == basis.id and loaded.source.startswith("official:celeb_basis.pt")
    torch.testing.assert_close(loaded.mean(), official[:, 0])
    with vault.session() as s, pytest.raises(NotFound):
        cb.load_basis(s, "0" * 64)
    torch.save(torch.randn(2, 10, 768), tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        cb.import_official_basis(tmp_path / "bad.pt")


def test_equal_linear_and_the_mapping_math():
    mapper = cb.CoefficientMapper(seed=1)
    lin = mapper.linear
    assert lin.weight.shape == (1024, 512)
    assert abs(float(lin.weight.std()) - 1.0) < 0.01 and float(lin.bias.abs().max()) == 0.0
    face = F.normalize(torch.randn(3, 512), dim=-1)
    with torch.no_grad():
        lin.bias.normal_()
        coef = mapper(face)
        # By hand: weight scaled by 1/sqrt(512) at run time, LeakyReLU(0.2), two unit halves.
        x = face @ (lin.weight / 512 ** 0.5).T + lin.bias
        x = torch.where(x >= 0, x, 0.2 * x).view(3, 2, 512)
        expected = x / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(coef, expected)
    torch.testing.assert_close(coef.norm(dim=-1), torch.ones(3, 2))
    basis = cb.CelebBasisObject({"text_encoder": torch.randn(2, 513, 16)}, "t", "s")
    emb = cb.token_embeddings(coef, basis)
    assert emb.shape == (3, 2, 16)
    for k in range(2):
        torch.testing.assert_close(emb[:, k], coef[:, k] @ basis.basis()[k] + basis.mean()[k])


def test_textual_inversion_export_loads_into_diffusers(tiny_sd15, model, tmp_path):
    from diffusers import StableDiffusionPipeline

    basis = cb.default_basis(model)
    coef = F.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(2)), dim=-1)
    token = ti.default_token("smiths/ana")
    path = ti.write(tmp_path / "ana.safetensors", coef, basis, token)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    assert ti.load_into(pipe, path) == token
    # The pipeline expands a multi-vector token before tokenizing: "<t>" -> "<t> <t>_1".
    prompt = pipe.maybe_convert_prompt(f"a photo of {token}", pipe.tokenizer)
    ids = pipe.tokenizer(prompt).input_ids
    new = [pipe.tokenizer.convert_tokens_to_ids(t) for t in (token, f"{token}_1")]
    assert new[0] in ids and new[1] in ids
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    expected = cb.token_embeddings(coef, basis)
    torch.testing.assert_close(table[new], expected)
    # And the prompt encoding equals ours with the two embeddings written over a placeholder.
    theirs = pipe.text_encoder(torch.tensor([pipe.tokenizer(
        prompt, padding="max_length", max_length=77).input_ids]))[0]
    ours, _ = model.encode(["a photo of <id>"], overrides=[expected])
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def _fixed_loss(model, basis, coef, images, seed=123):
    """The eps loss on a fixed batch (same views, noise and timesteps every call)."""
    from encoders.fitting.core import augment

    g = torch.Generator().manual_seed(seed)
    cfg = FitConfig()
    views = torch.stack([augment(images[i % len(images)], model.resolution, g, cfg)
                         for i in range(6)])
    with torch.no_grad():
        z = model.latents(views, g)
        emb = cb.token_embeddings(coef.expand(6, 2, 512), basis)
        hidden, added = model.encode(["a photo of a face of <id> person"] * 6, overrides=[emb])
        return float(model.eps_loss(z, hidden, added, g))


def test_a_tiny_fit_decreases_the_loss_and_is_reproducible(model):
    basis = cb.default_basis(model)
    g = torch.Generator().manual_seed(7)
    images = [[torch.rand(3, 40, 40, generator=g)], [torch.rand(3, 40, 40, generator=g)]]
    faces = [F.normalize(torch.randn(1, 512, generator=g), dim=-1) for _ in range(2)]
    cfg = FitConfig(steps=5, seed=1, checkpoint_every=0, lr=5e-2)
    a = cb.fit_coefficients(model, basis, faces, images, cfg)  # joint: 2 ids x 5 steps
    b = cb.fit_coefficients(model, basis, faces, images, cfg)
    assert a.fit.steps == 10 and a.fit.losses == b.fit.losses
    assert torch.equal(a.coefficients, b.coefficients)
    assert a.coefficients.shape == (2, 2, 512)
    # An EMA of unit vectors: norm at most 1, close to 1 while the mapper moves slowly.
    norms = a.coefficients.norm(dim=-1)
    assert bool((norms <= 1 + 1e-5).all()) and bool((norms > 0.5).all())
    before = cb.CoefficientMapper(seed=1)(torch.cat(faces)).detach()
    after = a.mapper(torch.cat(faces)).detach()
    assert _fixed_loss(model, basis, after[0], images[0]) < _fixed_loss(model, basis, before[0],
                                                                        images[0])


def test_sdxl_has_a_basis_per_text_encoder_fits_and_exports(tmp_path):
    from encoders.fitting import lidb
    from generators.standins.pipelines import build_tiny_sdxl

    model = DiffusionModel(build_tiny_sdxl())
    basis = cb.default_basis(model)
    assert basis.encoders == ["text_encoder", "text_encoder_2"]
    images = [[torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))]]
    face = F.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    fit = cb.fit_coefficients(model, basis, [face], images,
                              FitConfig(steps=2, checkpoint_every=0))
    coef = fit.coefficients[0]
    path = ti.write(tmp_path / "x.safetensors", coef, basis, "<idvault-x>")
    token = ti.load_into(model.pipe, path)
    for key, (tokenizer, encoder) in zip(("text_encoder", "text_encoder_2"), model.encoders,
                                         strict=True):
        new = tokenizer.convert_tokens_to_ids([token, f"{token}_1"])
        torch.testing.assert_close(encoder.get_input_embeddings().weight[new].detach(),
                                   cb.token_embeddings(coef, basis, key))
    # LiDB covers the UNet and both text encoders.
    layers = lidb.model_layers(model)
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.") for k in layers)
    w, result = lidb.fit_lidb(model, images[0], FitConfig(steps=2, checkpoint_every=0), rank=1)
    assert w.layers == list(layers) and len(result.losses) == 2
