"""Registry-driven tests: every registered method and every ablation row is tested the moment it
is registered (shapes, finite loss, gradients, overfitting one batch, switches removing terms)."""

from __future__ import annotations

import pytest
import torch

from trainables.config import JobConfig, ModelConfig, TrainConfig
from trainables.errors import ConfigError
from trainables.loop import fit
from trainables.methods import METHODS, build_model, get_method
from trainables.reporters import LocalReporter

IMAGE_DIM, B, R, L = 16, 6, 5, 7
ROWS = [(name, row) for name, spec in METHODS.items() for row in spec.ablations]


def job_for(method: str, overrides: dict | None = None, **train) -> JobConfig:
    spec = get_method(method)
    params = spec.parse_section(overrides or {}).model_dump() if spec.section else {}
    return JobConfig(method=method, model=ModelConfig(text_encoder="tiny", embed_dim=32),
                     train=TrainConfig(**{"loss": "infonce", **train}), method_params=params)


def random_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    region_mask = torch.ones(B, R, dtype=torch.bool)
    region_mask[0, 3:] = False
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, 4:] = 0
    return {"images": torch.randn(B, R, IMAGE_DIM, generator=g), "region_mask": region_mask,
            "input_ids": torch.randint(1000, 2000, (B, L), generator=g), "attention_mask": attention_mask,
            "image_ids": torch.tensor([0, 1, 2, 3, 4, 4])}  # the last two captions share an image


def losses_of(job: JobConfig, batch, seed: int = 0, epoch: int = 1):
    torch.manual_seed(seed)
    model = build_model(job, IMAGE_DIM)
    out = model(batch)
    return model, out, model.loss_terms(out, batch["image_ids"], epoch)


def test_unknown_method_is_one_line_listing_valid_ones():
    with pytest.raises(ConfigError, match="valid methods: base, dias, cdds"):
        get_method("clip")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shapes_finite_loss_and_gradients_reach_every_parameter(method):
    model, out, losses = losses_of(job_for(method), random_batch())
    assert out["img_emb"].shape == (B, 32) and out["txt_emb"].shape == (B, 32)
    assert torch.allclose(out["img_emb"].norm(dim=-1), torch.ones(B), atol=1e-5)
    assert all(torch.isfinite(term) for term in losses.terms.values())
    losses.total().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert missing == []


@pytest.mark.parametrize("method", sorted(METHODS))
def test_encoders_score_each_modality_alone(method):
    """Retrieval encodes images and captions separately (5K x 25K), so neither may see the other."""
    torch.manual_seed(0)
    model = build_model(job_for(method), IMAGE_DIM).eval()
    batch = random_batch()
    with torch.no_grad():
        img = model.encode_image(batch["images"], batch["region_mask"])["emb"]
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"])["emb"]
        alone = model.encode_image(batch["images"][:2], batch["region_mask"][:2])["emb"]
        sims = model.similarity(img, txt)
    assert sims.shape == (B, B) and torch.allclose(alone, img[:2], atol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_batch_overfits(method):
    torch.manual_seed(0)
    job = job_for(method, lr=1e-3)
    model = build_model(job, IMAGE_DIM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = random_batch()
    first = None
    for _ in range(40):
        loss = model.loss_terms(model(batch), batch["image_ids"], 1).total()
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(batch)
        sims = model.similarity(out["img_emb"], out["txt_emb"])
    assert loss.item() < 0.5 * first
    assert (sims.argmax(1)[:4] == torch.arange(4)).all()  # every image finds its own caption


@pytest.mark.parametrize("method, row", [(m, r) for m, r in ROWS if r.method == m and r.overrides],
                         ids=lambda x: getattr(x, "name", x))
def test_each_ablation_switch_changes_the_loss(method, row):
    batch = random_batch()
    _, _, full = losses_of(job_for(method), batch)
    _, _, ablated = losses_of(job_for(method, row.overrides), batch)
    removed = set(full.terms) - set(ablated.terms)
    changed = not torch.isclose(full.total(), ablated.total())
    assert removed or changed, f"{row.name} neither removes a term nor changes the loss"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_lists_full_first_and_base_last(method):
    rows = METHODS[method].ablations
    assert rows[-1].method == "base" and (method == "base" or rows[0].name == "full")
    for row in rows:  # every override is a valid value of the section
        get_method(row.method).parse_section(row.overrides)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in sorted(METHODS) if m != "base"])
def test_short_training_run_improves_rsum(method, smoke_study, tmp_path):
    from tests.test_training import untrained_rsum

    job = smoke_study(f"method={method}", "train.epochs=2").job()
    history = fit(job, LocalReporter(tmp_path / method))
    before = untrained_rsum(job)
    assert history[-1]["rsum"] > max(1.5 * before, before + 15)
    assert len([key for key in history[-1] if key.startswith("loss_")]) >= 3  # every term is logged by name
