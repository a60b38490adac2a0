"""CDDS: the UNet's wiring, the pure maths against naive loops, gradchecks, and the model's switches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables.config import JobConfig, ModelConfig, TrainConfig
from trainables.errors import ConfigError
from trainables.methods.cdds import SPEC, CddsModel, DualPathUNet, build
from trainables.methods.cdds import losses as cl

IMAGE_DIM = 20
TERM_SWITCHES = {  # switch -> the terms it removes (noise has no term: see test_noise_only_in_training)
    "use_modality_loss": {"m"},
    "use_completeness": {"f", "x"},
    "use_sampling": {"x"},
    "decouple": {"m", "f", "x"},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add overhead, and on a busy 2-CPU runner
    (Ray tests alongside) OpenMP spinning made this file 8x slower. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Helpers and naive references
# ---------------------------------------------------------------------------------------------

def build_batch(batch: int = 4, regions: int = 5, text_lengths=(7, 3, 5, 1), seed: int = 0) -> dict:
    """A batch in the loader's contract (docs/architecture.md) with odd counts, padding, a 1-token caption."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(text_lengths[:batch])
    max_len = int(lengths.max())
    attention_mask = (torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
    region_mask = torch.ones(batch, regions, dtype=torch.bool)
    region_mask[-1, regions // 2:] = False  # dropped regions in the last image
    return {"images": torch.randn(batch, regions, IMAGE_DIM, generator=gen), "region_mask": region_mask,
            "input_ids": torch.randint(1000, 5000, (batch, max_len), generator=gen) * attention_mask,
            "attention_mask": attention_mask, "image_ids": torch.arange(batch)}


def make_model(seed: int = 0, **params) -> CddsModel:
    torch.manual_seed(seed)
    job = JobConfig(method="cdds", model=ModelConfig(text_encoder="tiny", embed_dim=32),
                    train=TrainConfig(batch_size=4), method_params=params)
    return build(job, IMAGE_DIM)


def naive_distribution_sample(source: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """X[n, i] = Σ_j W_ij Q_j(F_i(source[n, i])), one column and one token at a time."""
    n_s, d = source.shape
    n_t = target.shape[0]
    out = np.zeros_like(source)
    for i in range(d):
        order = list(np.argsort(source[:, i], kind="stable"))
        for n in range(n_s):
            u = order.index(n) / max(n_s - 1, 1)
            for j in range(d):
                column = np.sort(target[:, j])
                out[n, i] += weights[i, j] * np.interp(u * (n_t - 1), np.arange(n_t), column)
    return out


def naive_related_semantics(source, target, alpha, tau, temperature, relative):
    """W and gate of CDDS 2 with explicit loops over column pairs (numpy, float64)."""
    k = min(len(source), len(target))

    def column_dist(column: np.ndarray) -> np.ndarray:
        ordered = np.sort(column)
        at = np.interp(np.linspace(0, 1, k) * (len(column) - 1), np.arange(len(column)), ordered)
        e = np.exp(at / tau - (at / tau).max())
        return e / e.sum()

    d = source.shape[1]
    kl = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            p, q = column_dist(source[:, i]), column_dist(target[:, j])
            kl[i, j] = float(np.sum(p * (np.log(p) - np.log(q))))
    weights, gates = np.zeros((d, d)), np.zeros((d, d))
    for i in range(d):
        prob = np.exp(-kl[i]) / np.exp(-kl[i]).sum()
        std = np.sqrt(prob.var() + 1e-12)
        kappa = prob.mean() + alpha[i] * std
        scale = temperature * std if relative else temperature
        gates[i] = 1 / (1 + np.exp(-(prob - kappa) / scale))
        weights[i] = prob * gates[i] / (prob * gates[i]).sum()
    return weights, gates


def row_stochastic(d: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).softmax(1)


def grads_ok(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters whose gradient is missing, zero or non-finite."""
    return [name for name, p in model.named_parameters() if p.requires_grad and
            (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]


# ---------------------------------------------------------------------------------------------
# Dual-path UNet
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", range(1, 7))
@pytest.mark.parametrize("tokens", [1, 7])
def test_unet_shapes_and_padding_for_every_depth(depth, tokens):
    torch.manual_seed(0)
    unet = DualPathUNet(16, 2, depth, noise_groups=3, noise_std=0.1).eval()
    x = torch.randn(2, tokens, 16)
    mask = torch.ones(2, tokens, dtype=torch.bool)
    mask[1, (tokens + 1) // 2:] = False
    out = unet(x, mask)
    assert set(out) == {"semantic", "modality"}
    assert all(v.shape == x.shape and torch.isfinite(v).all() for v in out.values())
    moved = x.masked_fill(~mask.unsqueeze(-1), 5.0)  # padding must not leak into valid tokens
    out2 = unet(moved, mask)
    for name in out:
        torch.testing.assert_close(out2[name][mask], out[name][mask])
    unet.train()  # the noisy path folds z into the batch and must give the same shape back
    assert unet(x, mask)["semantic"].shape == x.shape


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_unet_skip_wiring(depth):
    torch.manual_seed(0)
    unet = DualPathUNet(16, 2, depth).eval()
    assert len(unet.encoder) == depth
    assert len(unet.semantic.levels) == depth and len(unet.modality.levels) == depth
    x, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    padding = ~mask
    levels = unet.encode(x, padding)
    assert len(levels) == depth + 1 and levels[0] is x
    skips = levels[-2::-1]
    reference = unet.semantic(levels[-1], skips, padding)
    torch.testing.assert_close(reference, unet(x, mask)["semantic"])
    for k in range(depth):  # every level's skip reaches the output
        zeroed = [torch.zeros_like(s) if i == k else s for i, s in enumerate(skips)]
        assert not torch.allclose(unet.semantic(levels[-1], zeroed, padding), reference, atol=1e-4)
    no_skips = unet.semantic(levels[-1], [torch.zeros_like(s) for s in skips], padding)
    assert not torch.allclose(no_skips, reference, atol=1e-4)
    with pytest.raises(ValueError):  # one skip per level, no more, no fewer
        unet.semantic(levels[-1], skips[:-1], padding)


def test_unet_noise_groups_fold_matches_a_loop_over_groups():
    torch.manual_seed(0)
    z, std = 3, 0.3
    unet = DualPathUNet(16, 2, 2, noise_groups=z, noise_std=std).train()
    x, mask = torch.randn(2, 5, 16), torch.tensor([[True] * 5, [True, True, False, False, False]])
    torch.manual_seed(1)
    folded = unet(x, mask)
    torch.manual_seed(1)  # the noise is the forward's only random draw: replay it group by group
    noise = torch.randn(z, *x.shape) * std
    padding = ~mask
    levels = unet.encode(x, padding)
    for name, decoder in (("semantic", unet.semantic), ("modality", unet.modality)):
        looped = torch.stack([decoder(levels[-1] + noise[g], levels[-2::-1], padding) for g in range(z)]).mean(0)
        torch.testing.assert_close(folded[name][mask], looped[mask])
    assert not torch.allclose(folded["semantic"], unet.eval()(x, mask)["semantic"])


def test_unet_without_modality_path_has_one_decoder():
    unet = DualPathUNet(16, 2, 2, modality_path=False)
    assert unet.modality is None
    assert set(unet(torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool))) == {"semantic"}


# ---------------------------------------------------------------------------------------------
# Quantile mapping and distribution sampling (CDDS 3)
# ---------------------------------------------------------------------------------------------

def test_identity_sampling_preserves_rank_order_and_target_values():
    gen = torch.Generator().manual_seed(1)
    source, target = torch.randn(9, 4, generator=gen), 3 * torch.randn(6, 4, generator=gen) + 2
    mapped = cl.distribution_sample(source, target, torch.eye(4))  # W = I: the plain quantile map
    assert mapped.shape == source.shape
    assert torch.equal(mapped.argsort(0), source.argsort(0))
    assert (mapped.amin(0) == target.amin(0)).all() and (mapped.amax(0) == target.amax(0)).all()


def test_identity_sampling_onto_itself_is_identity():
    x, eye = torch.randn(11, 5, generator=torch.Generator().manual_seed(2)), torch.eye(5)
    torch.testing.assert_close(cl.distribution_sample(x, x, eye), x)
    torch.testing.assert_close(cl.distribution_sample(x, x.flip(0), eye), x)  # only target values matter


@pytest.mark.parametrize("n_source,n_target", [(7, 5), (5, 7), (6, 6), (1, 3), (4, 1)])
def test_distribution_sample_matches_naive_loop(n_source, n_target):
    gen = torch.Generator().manual_seed(n_source * 10 + n_target)
    source = torch.randn(n_source, 4, generator=gen, dtype=torch.float64)
    target = torch.randn(n_target, 4, generator=gen, dtype=torch.float64)
    weights = row_stochastic(4)
    fast = cl.distribution_sample(source, target, weights)
    slow = naive_distribution_sample(source.numpy(), target.numpy(), weights.numpy())
    np.testing.assert_allclose(fast.numpy(), slow, rtol=1e-10, atol=1e-12)
    if min(n_source, n_target) > 1:  # a 1-row target maps every value to the same constant
        assert torch.equal(fast.argsort(0), source.argsort(0))


# ---------------------------------------------------------------------------------------------
# Related-semantics identification (CDDS 2)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("n_source,n_target", [(9, 6), (5, 8)])
def test_related_semantics_matches_naive_loop(relative, n_source, n_target):
    gen = torch.Generator().manual_seed(3)
    source = torch.randn(n_source, 5, generator=gen, dtype=torch.float64)
    target = 2 * torch.randn(n_target, 5, generator=gen, dtype=torch.float64)
    alpha = torch.linspace(-0.5, 1.5, 5, dtype=torch.float64)
    temperature = 0.5 if relative else 1e-2
    weights, gate = cl.related_semantics(source, target, alpha, 0.7, temperature, relative)
    slow_w, slow_gate = naive_related_semantics(source.numpy(), target.numpy(), alpha.numpy(), 0.7,
                                                temperature, relative)
    np.testing.assert_allclose(gate.numpy(), slow_gate, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(weights.numpy(), slow_w, rtol=1e-9, atol=1e-12)


def test_kl_matrix_is_zero_on_identical_columns_and_positive_elsewhere():
    log_p = torch.randn(4, 6, generator=torch.Generator().manual_seed(9)).log_softmax(1)
    kl = cl.kl_matrix(log_p, log_p)
    torch.testing.assert_close(kl.diagonal(), torch.zeros(4), atol=1e-6, rtol=0)
    assert (kl + torch.eye(4) > 1e-6).all()


def test_related_weights_row_normalised_and_alpha_sparsifies():
    gen = torch.Generator().manual_seed(4)
    source, target = torch.randn(40, 32, generator=gen), torch.randn(30, 32, generator=gen)
    densities = []
    for alpha in (-1.0, 0.0, 1.0, 2.0):
        weights, gate = cl.related_semantics(source, target, torch.full((32,), alpha), 1.0, 0.5)
        torch.testing.assert_close(weights.sum(1), torch.ones(32))
        assert (weights >= 0).all()
        densities.append(float((gate > 0.5).float().mean()))
    assert all(a > b for a, b in zip(densities, densities[1:])), densities


def test_mask_scale_changes_softness_not_the_kept_set():
    kl = torch.rand(16, 16, generator=torch.Generator().manual_seed(5))
    alpha = torch.ones(16)
    w_std, gate_std = cl.related_weights(kl, alpha, 0.5, relative=True)
    w_raw, gate_raw = cl.related_weights(kl, alpha, 0.5, relative=False)
    assert torch.equal(gate_std > 0.5, gate_raw > 0.5)
    assert not torch.allclose(w_std, w_raw)


# ---------------------------------------------------------------------------------------------
# L_m, L_f, L_x (CDDS 4)
# ---------------------------------------------------------------------------------------------

def test_completeness_is_exactly_zero_for_exact_reconstruction():
    gen = torch.Generator().manual_seed(6)
    sem, mod = torch.randn(3, 5, 8, generator=gen), torch.randn(3, 5, 8, generator=gen)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    target = 0.7 * sem + 1.3 * mod
    target_padded = target.masked_fill(~mask.unsqueeze(-1), 100.0)  # padding never counts
    assert cl.completeness_loss(0.7 * sem + 1.3 * mod, target_padded, mask).item() == 0.0
    assert cl.completeness_loss(0.7 * sem + 1.2 * mod, target, mask).item() > 0.0


def test_modality_loss_zero_iff_tokens_share_their_modality_component():
    gen = torch.Generator().manual_seed(7)
    shared = torch.randn(3, 1, 8, generator=gen).expand(3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    varied = shared.clone()
    varied[1, 3:] = torch.randn(2, 8, generator=gen)  # only padded tokens differ
    assert abs(cl.modality_consistency_loss(varied, mask).item()) < 1e-6
    varied[1, 0, 0] += 1.0  # (a shift of all dims would leave the softmax unchanged)
    assert cl.modality_consistency_loss(varied, mask).item() > 1e-3


# ---------------------------------------------------------------------------------------------
# Gradchecks (float64)
# ---------------------------------------------------------------------------------------------

def _inputs(*shapes, seed=8):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("relative", [True, False])
def test_gradcheck_related_semantics(relative):
    source, target = _inputs((5, 3), (4, 3))
    alpha = torch.tensor([0.2, 0.8, 1.1], dtype=torch.float64, requires_grad=True)
    temperature = 0.7 if relative else 0.3
    fn = lambda s, t, a: cl.related_semantics(s, t, a, 0.8, temperature, relative)[0]  # noqa: E731  (W)
    assert torch.autograd.gradcheck(fn, (source, target, alpha))


def test_gradcheck_quantile_mapping_through_gathered_values():
    source = torch.randn(7, 3, dtype=torch.float64)  # ranks only: no gradient by design
    target, logits = _inputs((5, 3), (3, 3))
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: cl.distribution_sample(source, t, eye), (target,))
    assert torch.autograd.gradcheck(lambda t, w: cl.distribution_sample(source, t, w.softmax(1)), (target, logits))


def test_gradcheck_modality_and_completeness_losses():
    modality, recon, target = _inputs((2, 4, 5), (2, 4, 5), (2, 4, 5))
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert torch.autograd.gradcheck(lambda m: cl.modality_consistency_loss(m, mask), (modality,))
    assert torch.autograd.gradcheck(lambda r, t: cl.completeness_loss(r, t, mask), (recon, target))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", range(1, 7))
def test_model_shapes_for_every_depth(depth):
    model = make_model(unet_depth=depth, noise_groups=2)
    batch = build_batch()
    out = model(batch)
    assert out["img_tokens"].shape == out["img_x"].shape == out["img_mod"].shape == (4, 5, 32)
    assert out["txt_tokens"].shape == out["txt_x"].shape == out["txt_mod"].shape == (4, 7, 32)
    for key in ("img_emb", "txt_emb", "img_x_emb", "txt_x_emb"):
        assert out[key].shape == (4, 32)
    assert (out["img_x"][~out["img_mask"]] == 0).all() and (out["txt_x"][~out["txt_mask"]] == 0).all()
    assert torch.isfinite(model.loss_terms(out, batch["image_ids"], epoch=1).total())


@pytest.mark.parametrize("ablation", [a for a in SPEC.ablations if a.method == "cdds"], ids=lambda a: a.name)
def test_loss_finite_and_every_parameter_learns(ablation):
    model = make_model(**ablation.overrides).train()
    batch = build_batch()
    losses = model.loss_terms(model(batch), batch["image_ids"], epoch=1)
    assert set(losses.weights) == set(losses.terms)
    total = losses.total()
    assert torch.isfinite(total)
    total.backward()
    assert grads_ok(model) == []


def test_batch_of_two_has_no_nan():
    model = make_model().train()
    batch = build_batch(batch=2, regions=1, text_lengths=(1, 2))
    losses = model.loss_terms(model(batch), batch["image_ids"], epoch=1)
    assert all(torch.isfinite(v) for v in losses.terms.values())
    losses.total().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_terms_weights_and_stats():
    model = make_model(alpha_s=2.0, alpha_m=0.3, alpha_f=0.25)
    batch = build_batch()
    losses = model.loss_terms(model(batch), batch["image_ids"], epoch=1)
    assert losses.weights == {"s": 2.0, "m": 0.3, "f": 0.25, "x": 0.75}
    assert set(losses.stats) == {"density_img", "density_txt", "threshold_alpha", "w_s", "w_m", "w_x"}
    assert 0.0 < losses.stats["density_img"] < 1.0 and 0.0 < losses.stats["density_txt"] < 1.0
    assert losses.stats["threshold_alpha"] == 1.0 and losses.stats["w_x"] == 1.0


@pytest.mark.parametrize("switch", sorted(TERM_SWITCHES))
def test_every_switch_removes_its_term(switch):
    batch = build_batch()
    full = make_model().eval()  # eval: no noise, so both models see the same tokens
    ablated = make_model(**{switch: False}).eval()
    missing, _ = ablated.load_state_dict(full.state_dict(), strict=False)
    assert missing == []  # the ablated model is a sub-model of the full one
    full_out, ablated_out = full(batch), ablated(batch)
    full_terms = full.loss_terms(full_out, batch["image_ids"], epoch=1)
    ablated_terms = ablated.loss_terms(ablated_out, batch["image_ids"], epoch=1)
    assert set(ablated_terms.terms) == set(full_terms.terms) - TERM_SWITCHES[switch]
    assert not torch.isclose(ablated_terms.total(), full_terms.total())
    if switch in ("use_modality_loss", "use_completeness"):  # the rest of the loss is untouched
        kept = sum(full_terms.weights[k] * full_terms.terms[k] for k in ablated_terms.terms)
        torch.testing.assert_close(ablated_terms.total(), kept)


def test_without_sampling_aligns_semantic_components_directly():
    batch = build_batch()
    model = make_model(use_sampling=False).eval()
    out = model(batch)
    assert "img_x" not in out and "density_img" not in out
    direct = model.align(model.similarity(out["img_emb"], out["txt_emb"]), batch["image_ids"], 1)
    torch.testing.assert_close(model.loss_terms(out, batch["image_ids"], 1).terms["s"], direct)
    assert not any(name.startswith("threshold") for name, _ in model.named_parameters())


def test_without_decoupling_uses_the_backbone_tokens():
    batch = build_batch()
    model = make_model(decouple=False).eval()
    out = model(batch)
    assert not any(name.startswith(("image_unet", "text_unet")) for name, _ in model.named_parameters())
    assert out["img_tokens"] is out["img_raw"] and "img_mod" not in out
    pooled = F.normalize(model.image_pool(out["img_raw"], out["img_mask"]), dim=-1)
    torch.testing.assert_close(out["img_emb"], pooled)
    assert "img_x" in out  # sampling still acts, now on V and T (docs: "w/o decoupling")


def test_noise_only_in_training():
    batch = build_batch()
    model = make_model(noise_groups=3, noise_std=0.5)
    model.eval()
    torch.testing.assert_close(model(batch)["img_emb"], model(batch)["img_emb"], rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(batch)["img_emb"], model(batch)["img_emb"])
    quiet = make_model(noise_groups=3, noise_std=0.5, use_noise=False).train()
    # Image side: the text backbone has its own (BERT) dropout in training, the image side has none.
    torch.testing.assert_close(quiet(batch)["img_emb"], quiet(batch)["img_emb"], rtol=0, atol=0)


def test_encoders_are_per_modality_and_per_sample():
    batch = build_batch()
    model = make_model().eval()
    with torch.no_grad():
        out = model(batch)
        img = model.encode_image(batch["images"][1:3], batch["region_mask"][1:3])
        txt = model.encode_text(batch["input_ids"][2:], batch["attention_mask"][2:])
    torch.testing.assert_close(img["emb"], out["img_emb"][1:3])
    torch.testing.assert_close(txt["emb"], out["txt_emb"][2:])
    torch.testing.assert_close(img["emb"].norm(dim=-1), torch.ones(2))


def test_fixed_threshold_is_a_buffer():
    model = make_model(threshold_learnable=False, threshold_alpha=2.0)
    assert not any(name.startswith("threshold") for name, _ in model.named_parameters())
    assert float(model.threshold_img.mean()) == 2.0 and "threshold_txt" in model.state_dict()


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"unet_depth": 0}, {"unet_depth": 7}, {"alpha_f": 1.5}, {"noise_groups": 0},
                                 {"semantic_loss": "both"}, {"mask_temperature": 0}, {"typo": 1}])
def test_section_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match="cdds"):
        SPEC.parse_section(bad)


def test_heads_must_divide_embed_dim():
    with pytest.raises(ConfigError, match="num_heads"):
        make_model(num_heads=5)
    make_model(num_heads=5, decouple=False)  # no UNet, nothing to divide


def test_registered_rows_and_search_keys_parse():
    for ablation in SPEC.ablations:
        if ablation.method == "cdds":
            SPEC.parse_section(ablation.overrides)
    assert set(SPEC.searchable) <= set(SPEC.section.model_fields)
