"""CDDS: the UNet's wiring, the pure maths against naive loops, gradchecks, the retrieval score, the term
budget at the shipped defaults, and the model's switches and rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables.budget import term_budget
from trainables.config import JobConfig, ModelConfig, TrainConfig
from trainables.errors import ConfigError
from trainables.methods.cdds import SPEC, CddsModel, DualPathUNet, build
from trainables.methods.cdds import losses as cl
from trainables.methods.cdds.model import token_diagnostics
from trainables.methods.cdds.unet import PreNormLayer, attention_keys

IMAGE_DIM = 20
TERM_SWITCHES = {  # switch -> the terms it removes (noise has no term: see test_noise_only_in_training)
    "use_modality_loss": {"m"},
    "use_completeness": {"f", "x"},
    "use_sampling": {"x"},
    "decouple": {"m", "f", "x"},  # no modality path: nothing for L_m, L_f, L_x to read
    "use_unet": {"m", "f", "x"},
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


def make_model(seed: int = 0, loss: str = "triplet", **params) -> CddsModel:
    torch.manual_seed(seed)
    job = JobConfig(method="cdds", model=ModelConfig(text_encoder="tiny", embed_dim=32),
                    train=TrainConfig(batch_size=4, loss=loss), method_params=params)
    return build(job, IMAGE_DIM)


def square_batch(batch: int = 6, tokens: int = 4, seed: int = 0) -> dict:
    """No padding and as many regions as words, so both modalities have N = batch * tokens valid tokens."""
    gen = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(batch, tokens, IMAGE_DIM, generator=gen),
            "region_mask": torch.ones(batch, tokens, dtype=torch.bool),
            "input_ids": torch.randint(1000, 5000, (batch, tokens), generator=gen),
            "attention_mask": torch.ones(batch, tokens, dtype=torch.long), "image_ids": torch.arange(batch)}


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


def naive_related_semantics(source, target, alpha, tau, temperature, relative, kl_temperature=1.0,
                            kl_relative=True, k=None):
    """W and gate of CDDS 2 with explicit loops over column pairs (numpy, float64)."""
    k = k or min(len(source), len(target))

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
        tau_s = kl_temperature * np.sqrt(kl[i].var() + 1e-12) if kl_relative else kl_temperature
        logits = -kl[i] / tau_s
        prob = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
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
    levels = unet.encode(x, mask)
    assert len(levels) == depth + 1 and levels[0] is x
    skips, bottom = levels[-2::-1], levels[-1].unsqueeze(0)  # one group
    reference = unet.semantic(bottom, skips, mask)
    torch.testing.assert_close(reference, unet(x, mask)["semantic"])
    for k in range(depth):  # every level's skip reaches the output
        zeroed = [torch.zeros_like(s) if i == k else s for i, s in enumerate(skips)]
        assert not torch.allclose(unet.semantic(bottom, zeroed, mask), reference, atol=1e-4)
    no_skips = unet.semantic(bottom, [torch.zeros_like(s) for s in skips], mask)
    assert not torch.allclose(no_skips, reference, atol=1e-4)
    with pytest.raises(ValueError):  # one skip per level, no more, no fewer
        unet.semantic(bottom, skips[:-1], mask)


def test_unet_noise_groups_match_a_loop_over_groups():
    """The z groups ride along as a leading dim (skips and key mask broadcast, the last level's second
    feed-forward map runs on the mean): the same as decoding each noisy copy alone and averaging."""
    torch.manual_seed(0)
    z, std = 3, 0.3
    unet = DualPathUNet(16, 2, 2, noise_groups=z, noise_std=std).train()
    x, mask = torch.randn(2, 5, 16), torch.tensor([[True] * 5, [True, True, False, False, False]])
    torch.manual_seed(1)
    grouped = unet(x, mask)
    torch.manual_seed(1)  # the noise is the forward's only random draw: replay it group by group
    noise = torch.randn(z, *x.shape)
    levels = unet.encode(x, mask)
    noise = noise * std * levels[-1].std(-1, unbiased=False, keepdim=True)  # σ relative to each token's std
    for name, decoder in (("semantic", unet.semantic), ("modality", unet.modality)):
        looped = torch.stack([decoder((levels[-1] + noise[g]).unsqueeze(0), levels[-2::-1], mask)
                              for g in range(z)]).mean(0)
        torch.testing.assert_close(grouped[name][mask], looped[mask])
    assert not torch.allclose(grouped["semantic"], unet.eval()(x, mask)["semantic"])


@pytest.mark.parametrize("groups", [None, 3])
def test_prenorm_layer_is_torchs_transformer_layer(groups):
    """``PreNormLayer`` (fused attention on a broadcast key mask, optional group mean) computes what
    ``nn.TransformerEncoderLayer.forward`` computes with a key padding mask, gradients included; a
    sample without valid tokens attends to all of its tokens instead of producing NaN."""
    torch.manual_seed(2)
    layer = PreNormLayer(16, 4).double()
    assert set(layer.state_dict()) == set(torch.nn.TransformerEncoderLayer(16, 4).state_dict())
    lead = (groups, 3) if groups else (3,)
    x = torch.randn(*lead, 5, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5, [False] * 5])
    keys = attention_keys(mask)
    fast = layer(x, keys, average_groups=groups is not None)
    flat = x.reshape(-1, 5, 16)
    padding = ~keys.repeat(groups or 1, 1)
    slow = torch.nn.TransformerEncoderLayer.forward(layer, flat, src_key_padding_mask=padding)
    slow = slow.reshape(x.shape).mean(0) if groups else slow
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(fast).all()
    cotangent = torch.randn_like(fast)
    fast_grads = torch.autograd.grad((fast * cotangent).sum(), [x, *layer.parameters()])
    slow_grads = torch.autograd.grad((slow * cotangent).sum(), [x, *layer.parameters()])
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_unet_without_modality_path_has_one_decoder():
    unet = DualPathUNet(16, 2, 2, modality_path=False)
    assert unet.modality is None
    assert set(unet(torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool))) == {"semantic"}


def test_noise_is_relative_to_each_tokens_std():
    """σ is in units of each token's feature std: scaling a token scales its noise, and the empirical
    noise std over many groups is σ times that token's std."""
    unet = DualPathUNet(8, 2, 1, noise_groups=4000, noise_std=0.5).train()
    scales = torch.tensor([[[0.1]], [[10.0]]])
    bottom = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0)) * scales
    torch.manual_seed(0)
    noisy = unet.add_noise(bottom)
    assert noisy.shape == (4000, 2, 3, 8)
    noise = noisy - bottom
    ratio = noise.std((0, 3)) / bottom.std(-1, unbiased=False)  # [2, 3]: per token
    torch.testing.assert_close(ratio, torch.full((2, 3), 0.5), atol=0.02, rtol=0)
    torch.manual_seed(0)
    scaled = unet.add_noise(3 * bottom)
    torch.testing.assert_close(scaled, 3 * noisy)  # same draw, three times the noise


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


def test_masked_sort_is_the_sort_of_the_valid_rows():
    """``sort_columns`` with a mask = sorting ``values[valid]``: the first n order statistics, each
    valid row's rank / (n − 1), and lookups / resampling / sampling that read only those rows, so
    padding can hold anything (even NaN) without reaching a value or a gradient."""
    gen = torch.Generator().manual_seed(21)
    values = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([True, False, True, True, False, True, True, False, True])
    padded = torch.where(valid.unsqueeze(1), values, float("nan"))
    ordered, positions, count = cl.sort_columns(padded, valid)
    kept = values[valid]
    assert int(count) == 6 and (ordered[6:] == 0).all()
    torch.testing.assert_close(ordered[:6], kept.sort(0).values)
    torch.testing.assert_close(positions[valid], cl.quantile_positions(kept))
    target = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    weights = row_stochastic(4, seed=5)
    torch.testing.assert_close(cl.resample_sorted(ordered, 7, count), cl.resample_columns(kept, 7))
    torch.testing.assert_close(cl.sample_sorted(ordered, weights, cl.quantile_positions(target), count),
                               cl.distribution_sample(target, kept, weights))
    torch.testing.assert_close(cl.sample_sorted(cl.sort_columns(target)[0], weights, positions[valid]),
                               cl.distribution_sample(kept, target, weights))
    (grad,) = torch.autograd.grad(cl.resample_sorted(ordered, 7, count).sum(), values)
    assert torch.isfinite(grad).all() and (grad[~valid] == 0).all() and (grad[valid] != 0).any()


def test_gradcheck_masked_sort_and_lookup():
    values, logits = _inputs((7, 3), (3, 3), seed=22)
    valid = torch.tensor([True, True, False, True, True, False, True])
    positions = torch.rand(5, 3, generator=torch.Generator().manual_seed(23), dtype=torch.float64)

    def sampled(v, w):
        ordered, _, count = cl.sort_columns(v, valid)
        return cl.sample_sorted(ordered, w.softmax(1), positions, count)
    assert torch.autograd.gradcheck(sampled, (values, logits))


def naive_apply_transport(values: np.ndarray, knots: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Column by column and value by value: piecewise-linear through (knots -> table), clamped."""
    out = np.zeros_like(values)
    for i in range(values.shape[1]):
        for n in range(values.shape[0]):
            out[n, i] = np.interp(values[n, i], knots[:, i], table[:, i])
    return out


def test_apply_transport_matches_naive_loop_and_clamps():
    gen = torch.Generator().manual_seed(15)
    knots = torch.randn(7, 4, generator=gen, dtype=torch.float64).sort(0).values
    table = torch.randn(7, 4, generator=gen, dtype=torch.float64).sort(0).values
    values = 3 * torch.randn(5, 6, 4, generator=gen, dtype=torch.float64)  # [..., d], many outside the knots
    fast = cl.apply_transport(values, knots, table)
    slow = naive_apply_transport(values.reshape(-1, 4).numpy(), knots.numpy(), table.numpy()).reshape(5, 6, 4)
    np.testing.assert_allclose(fast.numpy(), slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cl.apply_transport(knots, knots, table), table)  # exact at the knots
    assert (fast.diff(dim=0).sign() * values.diff(dim=0).sign() >= 0).all()  # monotone per column


def test_apply_transport_on_tied_knots_takes_the_end_of_the_run():
    knots = torch.tensor([[0.0], [1.0], [1.0], [2.0]])
    table = torch.tensor([[0.0], [10.0], [20.0], [30.0]])
    mapped = cl.apply_transport(torch.tensor([[-1.0], [0.5], [1.0], [1.5], [3.0]]), knots, table)
    torch.testing.assert_close(mapped.squeeze(1), torch.tensor([0.0, 5.0, 20.0, 25.0, 30.0]))


@pytest.mark.parametrize("n_target", [4, 9])
def test_transport_table_reproduces_the_batch_sampling_map(n_target):
    """With K = N_s positions the value map of the tables is exactly the batch's rank map: what the
    retrieval score computes from running quantiles is what L_s computes on the batch."""
    gen = torch.Generator().manual_seed(16)
    source = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    target = torch.randn(n_target, 4, generator=gen, dtype=torch.float64) * 2 + 1
    weights = row_stochastic(4, seed=4)
    knots, table = cl.transport_table(source, target, weights, num_positions=7)
    torch.testing.assert_close(cl.apply_transport(source, knots, table),
                               cl.distribution_sample(source, target, weights))
    # on tables already at K positions (running quantiles) it is (source, target @ Wᵀ)
    again = cl.transport_table(knots, cl.resample_columns(target, 7), weights, 7)
    torch.testing.assert_close(again[0], knots)
    torch.testing.assert_close(again[1], table)


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


@pytest.mark.parametrize("kl_relative, kl_temperature", [(True, 0.5), (False, 1e-2)])
def test_related_semantics_with_kl_temperature_matches_naive_loop(kl_relative, kl_temperature):
    gen = torch.Generator().manual_seed(13)
    source = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    target = 2 * torch.randn(6, 5, generator=gen, dtype=torch.float64) ** 3
    alpha = torch.linspace(-0.5, 1.5, 5, dtype=torch.float64)
    weights, gate = cl.related_semantics(source, target, alpha, 0.7, 0.3, True, kl_temperature, kl_relative,
                                         num_positions=4)
    slow_w, slow_gate = naive_related_semantics(source.numpy(), target.numpy(), alpha.numpy(), 0.7, 0.3, True,
                                                kl_temperature, kl_relative, k=4)
    np.testing.assert_allclose(gate.numpy(), slow_gate, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(weights.numpy(), slow_w, rtol=1e-9, atol=1e-12)


def test_related_probability_is_invariant_to_affine_rescaling_of_each_row():
    """With τ_S = kl_temperature · std_j S_ij, P depends on S only through each row's z-scores."""
    gen = torch.Generator().manual_seed(14)
    kl = torch.rand(6, 8, generator=gen, dtype=torch.float64) * 3e-2
    scale = torch.rand(6, 1, generator=gen, dtype=torch.float64) * 100 + 1e-3
    shift = torch.randn(6, 1, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(cl.related_probability(scale * kl + shift), cl.related_probability(kl))
    literal = cl.related_probability(kl, 1.0, relative=False)  # the spec's softmax(−S)
    torch.testing.assert_close(literal, torch.softmax(-kl, dim=1))
    assert not torch.allclose(cl.related_probability(scale * kl, 1.0, relative=False), literal)


def realistic_kl() -> torch.Tensor:
    """S between the semantic token columns of a fresh model on a random batch (d = 32, K = 64)."""
    model = make_model().eval()
    with torch.no_grad():
        out = model(build_batch(batch=4, regions=8, text_lengths=(9, 6, 8, 7)))
        v, t = out["img_tokens"][out["img_mask"]], out["txt_tokens"][out["txt_mask"]]
        return cl.kl_matrix(cl.column_log_distributions(v, 64, 1.0), cl.column_log_distributions(t, 64, 1.0))


def test_related_probability_is_not_uniform_on_realistic_inputs():
    """Raw KL values are small (~1e-3), so the literal softmax(−S) is flat; τ_S from the row spread
    is not, and a smaller kl_temperature concentrates P on fewer columns."""
    kl = realistic_kl()
    assert float(kl.max()) < 0.5
    literal = cl.related_probability(kl, 1.0, relative=False)
    assert float((literal.amax(1) / literal.amin(1)).max()) < 1.5  # the defect: nearly uniform
    scaled = cl.related_probability(kl)
    assert float((scaled.amax(1) / scaled.amin(1)).median()) > 10
    supports = [float(cl.effective_support(cl.related_probability(kl, tau))) for tau in (4.0, 1.0, 0.5, 0.25)]
    assert all(a > b for a, b in zip(supports, supports[1:])), supports
    assert supports[1] < 0.9 * 32


def test_sharp_gate_keeps_the_mass_of_w_inside_the_kept_set():
    """T → 0 makes the gate the indicator P > κ; then W's mass lies in the kept set and its effective
    support is about the size of that set."""
    kl = realistic_kl()
    alpha = torch.ones(32)
    inside = {}
    for temperature in (0.5, 0.1, 0.001):
        weights, gate = cl.related_weights(kl, alpha, temperature)
        inside[temperature] = float((weights * (gate > 0.5)).sum(1).mean())
    kept = (gate > 0.5).sum(1).float()
    assert inside[0.001] > 0.999 and inside[0.1] > 0.9 > inside[0.5]
    assert abs(float(cl.effective_support(weights)) - float(kept.mean())) < 0.5 + 0.1 * float(kept.mean())


def test_effective_support_counts_columns():
    d = 6
    assert float(cl.effective_support(torch.eye(d))) == pytest.approx(1.0)
    assert float(cl.effective_support(torch.full((d, d), 1 / d))) == pytest.approx(d)
    weights = row_stochastic(d, seed=3)
    weights[0] = torch.tensor([0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64)  # zeros count as no mass
    naive = np.mean([np.exp(-sum(w * np.log(w) for w in row if w > 0)) for row in weights.numpy()])
    assert float(cl.effective_support(weights)) == pytest.approx(naive, rel=1e-12)


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


def naive_reduce_samples(values: np.ndarray, mask: np.ndarray, reduction: str) -> float:
    per_sample = [values[b][mask[b]].mean() if mask[b].any() else 0.0 for b in range(len(values))]
    return float(np.sum(per_sample) if reduction == "sum" else np.mean(per_sample))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduce_samples_matches_naive_loop(reduction):
    gen = torch.Generator().manual_seed(17)
    values = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=gen) > 0.4
    mask[2] = False  # a sample without valid tokens counts 0
    fast = float(cl.reduce_samples(values, mask, reduction))
    assert fast == pytest.approx(naive_reduce_samples(values.numpy(), mask.numpy(), reduction), rel=1e-12)


def test_reduce_samples_weighs_samples_not_tokens_or_batch_size():
    """A sample's weight is fixed: repeating its tokens changes nothing, and repeating the batch
    doubles the sum (each sample keeps its weight next to a summed L_s) and keeps the mean."""
    values = torch.tensor([[1.0, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    assert float(cl.reduce_samples(values, mask)) == 7.0  # (1 + 3) / 2 + 5
    repeated = torch.tensor([[1.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 0.0]])
    assert float(cl.reduce_samples(repeated, torch.tensor([[True] * 4, [True, True, True, False]]))) == 7.0
    doubled = cl.reduce_samples(values.repeat(2, 1), mask.repeat(2, 1))
    assert float(doubled) == 14.0
    assert float(cl.reduce_samples(values.repeat(2, 1), mask.repeat(2, 1), "mean")) == 3.5
    with pytest.raises(ValueError, match="reduction"):
        cl.reduce_samples(values, mask, "token")


def test_completeness_and_modality_losses_match_naive_loops():
    gen = torch.Generator().manual_seed(18)
    recon, target, modality = (torch.randn(3, 5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True, False, False, False, False]])
    err = ((recon - target) ** 2).mean(-1).numpy()
    assert float(cl.completeness_loss(recon, target, mask)) == pytest.approx(
        naive_reduce_samples(err, mask.numpy(), "sum"), rel=1e-12)
    kl = np.zeros((3, 5))
    for b in range(3):
        probs = [np.exp(m) / np.exp(m).sum() for m in modality[b].numpy()]
        mean = np.mean([probs[n] for n in range(5) if mask[b, n]], axis=0)
        for n in range(5):
            kl[b, n] = np.sum(probs[n] * np.log(probs[n] / mean))
    assert float(cl.modality_consistency_loss(modality, mask, "mean")) == pytest.approx(
        naive_reduce_samples(kl, mask.numpy(), "mean"), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Gradchecks (float64)
# ---------------------------------------------------------------------------------------------

def _inputs(*shapes, seed=8):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("kl_relative", [True, False])
def test_gradcheck_related_semantics(relative, kl_relative):
    source, target = _inputs((5, 3), (4, 3))
    alpha = torch.tensor([0.2, 0.8, 1.1], dtype=torch.float64, requires_grad=True)
    temperature = 0.7 if relative else 0.3
    kl_temperature = 0.5 if kl_relative else 0.05

    def fn(s, t, a):  # W
        return cl.related_semantics(s, t, a, 0.8, temperature, relative, kl_temperature, kl_relative, 6)[0]

    assert torch.autograd.gradcheck(fn, (source, target, alpha))


def test_gradcheck_related_probability():
    (kl,) = _inputs((4, 5))
    assert torch.autograd.gradcheck(lambda s: cl.related_probability(s.abs() * 1e-2, 0.7), (kl,))


def test_gradcheck_apply_transport():
    values, table = _inputs((3, 2, 4), (6, 4))
    knots = torch.linspace(-2, 2, 6, dtype=torch.float64).unsqueeze(1).repeat(1, 4)
    assert torch.autograd.gradcheck(lambda v, t: cl.apply_transport(v, knots, t), (values, table))


def test_gradcheck_quantile_mapping_through_gathered_values():
    source = torch.randn(7, 3, dtype=torch.float64)  # ranks only: no gradient by design
    target, logits = _inputs((5, 3), (3, 3))
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: cl.distribution_sample(source, t, eye), (target,))
    assert torch.autograd.gradcheck(lambda t, w: cl.distribution_sample(source, t, w.softmax(1)), (target, logits))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradcheck_modality_and_completeness_losses(reduction):
    modality, recon, target = _inputs((2, 4, 5), (2, 4, 5), (2, 4, 5))
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert torch.autograd.gradcheck(lambda m: cl.modality_consistency_loss(m, mask, reduction), (modality,))
    assert torch.autograd.gradcheck(lambda r, t: cl.completeness_loss(r, t, mask, reduction), (recon, target))


# ---------------------------------------------------------------------------------------------
# The whole step against a slow, literal reference (what the optimised code must reproduce)
# ---------------------------------------------------------------------------------------------

def naive_layer(layer: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torch's own pre-norm layer forward; a sample without valid tokens attends to all of them."""
    padding = ~mask & mask.any(1, keepdim=True)
    return torch.nn.TransformerEncoderLayer.forward(layer, x, src_key_padding_mask=padding)


def naive_unet(unet: DualPathUNet, tokens: torch.Tensor, mask: torch.Tensor) -> dict:
    """CDDS 1 literally: encoder levels, then per noise group and decoder the linear map on the
    concatenation [D; skip] level by level, then the mean over groups. Draws the noise as the model
    does (one [z, B, N, d] normal draw after encoding), so a replayed seed gives the same noise."""
    levels = [tokens]
    for layer in unet.encoder:
        levels.append(naive_layer(layer, levels[-1], mask))
    bottoms = [levels[-1]]
    if unet.training and unet.noise_std > 0:
        noise = torch.randn((unet.noise_groups, *tokens.shape), dtype=tokens.dtype)
        scale = unet.noise_std * levels[-1].detach().std(-1, unbiased=False, keepdim=True)
        bottoms = list(levels[-1] + noise * scale)
    out = {}
    for name in ("semantic", "modality"):
        decoder = getattr(unet, name)
        if decoder is None:
            continue
        decoded = []
        for bottom in bottoms:
            d = bottom
            for level, skip in zip(decoder.levels, levels[-2::-1]):
                weight = torch.cat([level.from_previous.weight, level.from_skip.weight], dim=1)
                fused = F.linear(torch.cat([d, skip], -1), weight, level.from_previous.bias)
                d = naive_layer(level.layer, fused, mask)
            decoded.append(d)
        out[name] = torch.stack(decoded).mean(0)
    return out


def naive_quantile(column: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One column's empirical quantile at positions u: linear between its order statistics."""
    ordered = column.sort().values
    index = u * (len(ordered) - 1)
    lower = index.floor().long().clamp(0, len(ordered) - 1)
    upper = (lower + 1).clamp(max=len(ordered) - 1)
    frac = index - lower
    return ordered[lower] * (1 - frac) + ordered[upper] * frac


def naive_sample(source: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor, p) -> tuple:
    """CDDS 2 + 3 for one side on valid tokens [N_s, d], [N_t, d]: column distributions at K
    positions, the [d, d, K] KL, P, κ, gate and W row by row, and X[n, i] = Σ_j W_ij Q_j(F_i(n))
    as an explicit [N_s, d, d] sum. -> (X [N_s, d], W [d, d])."""
    d, k = source.shape[1], p.quantile_positions
    u = torch.linspace(0, 1, k, dtype=source.dtype)
    log_c = [torch.stack([torch.log_softmax(naive_quantile(x[:, i], u) / p.column_temperature, 0)
                          for i in range(d)]) for x in (source, target)]
    kl = (log_c[0].exp()[:, None] * (log_c[0][:, None] - log_c[1][None])).sum(-1)
    rows = []
    for i in range(d):
        tau = p.kl_temperature * ((kl[i].var(unbiased=False) + 1e-12).sqrt() if p.kl_scale == "std" else 1.0)
        prob = torch.softmax(-kl[i] / tau, 0)
        std = (prob.var(unbiased=False) + 1e-12).sqrt()
        scale = p.mask_temperature * (std if p.mask_scale == "std" else 1.0)
        kept = prob * torch.sigmoid((prob - (prob.mean() + alpha[i] * std)) / scale)
        rows.append(kept / kept.sum())
    weights = torch.stack(rows)
    ranks = source.detach().argsort(dim=0, stable=True).argsort(dim=0, stable=True)
    positions = ranks.to(source.dtype) / max(len(source) - 1, 1)
    mapped = torch.stack([naive_quantile(target[:, j], positions) for j in range(d)], -1)  # [N_s, d_i, d_j]
    return (mapped * weights).sum(-1), weights


def naive_loss_terms(model: CddsModel, batch: dict) -> tuple[dict, dict, dict]:
    """CDDS's forward and loss terms written out plainly: (terms, stats, running quantiles). Shares
    only the base parts (encoders, pooling, alignment loss) and the constraint losses, which have
    their own naive tests above, with the model."""
    p = model.params
    encoders = {"img": lambda: (model.image_encoder(batch["images"]), batch["region_mask"], "image"),
                "txt": lambda: (model.text_encoder(batch["input_ids"], batch["attention_mask"]),
                                batch["attention_mask"].bool(), "text")}
    parts = {}
    for side, encode in encoders.items():  # image first: its noise is drawn before the text dropout
        raw, mask, name = encode()
        unet = getattr(model, f"{name}_unet", None)
        decoded = naive_unet(unet, raw, mask) if unet else {"semantic": raw}
        parts[side] = {"raw": raw, "mask": mask, **decoded}
    pools = {"img": model.image_pool, "txt": model.text_pool}
    emb = {side: F.normalize(pools[side](part["semantic"], part["mask"]), dim=-1)
           for side, part in parts.items()}
    ids, reduction = batch["image_ids"], "sum" if model.align.kind == "triplet" else "mean"
    stats, quantiles, x = {}, {}, {}
    if p.use_sampling:
        v = parts["img"]["semantic"][parts["img"]["mask"]]
        t = parts["txt"]["semantic"][parts["txt"]["mask"]]
        for side, (source, target) in {"img": (v, t), "txt": (t, v)}.items():
            mapped, weights = naive_sample(source, target, getattr(model, f"threshold_{side}"), p)
            x[side] = torch.zeros_like(parts[side]["semantic"]).index_put((parts[side]["mask"],), mapped)
            entropy = -(weights * weights.clamp_min(1e-300).log()).sum(1)
            stats[f"support_{side}"] = entropy.exp().mean()
            u = torch.linspace(0, 1, p.quantile_positions, dtype=source.dtype)
            quantiles[side] = torch.stack([naive_quantile(column.detach(), u) for column in source.t()], 1)
        stats["threshold_alpha"] = torch.cat([model.threshold_img, model.threshold_txt]).mean()
        x_emb = {side: F.normalize(pools[side](x[side], parts[side]["mask"]), dim=-1) for side in x}
        pairs = ([(emb["img"], x_emb["txt"]), (x_emb["img"], emb["txt"])] if p.semantic_loss == "cross"
                 else [(emb["img"], x_emb["img"]), (x_emb["txt"], emb["txt"])])
        terms = {"s": sum(model.align(a @ b.t(), ids, 1) for a, b in pairs) / 2}
    else:
        terms = {"s": model.align(emb["img"] @ emb["txt"].t(), ids, 1)}
    if "modality" in parts["img"]:
        if p.use_modality_loss:
            terms["m"] = sum(cl.modality_consistency_loss(parts[s]["modality"], parts[s]["mask"], reduction)
                             for s in parts)
        if p.use_completeness:
            for term, weight, comp in (("f", model.w_s, {s: parts[s]["semantic"] for s in parts}),
                                       ("x", getattr(model, "w_x", None), x)):
                if comp:
                    terms[term] = sum(cl.completeness_loss(weight * comp[s] + model.w_m * part["modality"],
                                                           part["raw"].detach(), part["mask"], reduction)
                                      for s, part in parts.items())
    for name in ("w_s", "w_m", "w_x"):
        if hasattr(model, name):
            stats[name] = getattr(model, name)
    if p.use_unet:
        for side, part in parts.items():
            mask = part["mask"]
            cos = F.cosine_similarity(part["semantic"][mask], part["raw"][mask], dim=-1)
            stats[f"sem_cos_{side}"] = cos.mean()
            if "modality" in part:
                ratio = part["modality"][mask].norm(dim=-1) / part["raw"][mask].norm(dim=-1)
                stats[f"mod_ratio_{side}"] = ratio.mean()
    return terms, {k: v.detach() for k, v in stats.items()}, quantiles


REFERENCE_CONFIGS = [{"unet_depth": depth, "noise_groups": z} for depth in (1, 2, 3) for z in (1, 4)] + [
    {switch: False} for switch in ("use_modality_loss", "use_completeness", "use_sampling", "decouple",
                                   "use_unet", "use_noise", "threshold_learnable")] + [
    {"semantic_loss": "self", "kl_scale": "raw", "mask_scale": "raw", "mask_temperature": 1e-3}]


def step_results(model: CddsModel, batch: dict, step) -> tuple[dict, dict, dict, dict]:
    """(terms, stats, gradients, running quantiles) of one training step computed by ``step``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same noise (and text dropout) for both computations
    terms, stats, quantiles = step(model, batch)
    sum(model.params.model_dump().get(f"alpha_{k}", 1.0) * v for k, v in terms.items()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return terms, stats, grads, quantiles


def optimised_step(model: CddsModel, batch: dict) -> tuple[dict, dict, dict]:
    """The model's own step; its running quantiles after this first batch are the batch's tables."""
    losses = model.loss_terms(model(batch), batch["image_ids"], epoch=1)
    quantiles = {}
    if model.params.use_sampling:
        quantiles = {"img": model.quantiles_img.clone(), "txt": model.quantiles_txt.clone()}
    return losses.terms, losses.stats, quantiles


@pytest.mark.parametrize("params", REFERENCE_CONFIGS,
                         ids=lambda params: ",".join(f"{k}={v}" for k, v in params.items()))
def test_training_step_matches_the_naive_reference(params):
    """Loss terms, every parameter's gradient, the stats and the running quantiles of one training
    step (noise on, float64) equal the literal reference's: fused attention, the groups as a leading
    dim, the last level's feed-forward map on the mean, one masked sort per modality and masked
    statistics change no value."""
    model = make_model(**params).double().train()
    batch = build_batch()
    batch["images"] = batch["images"].double()
    fast = step_results(model, batch, optimised_step)
    slow = step_results(model, batch, naive_loss_terms)
    for got, want in zip(fast, slow):
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10, msg=name)


def test_training_step_matches_the_naive_reference_in_float32():
    """The same in float32, the precision training runs in, up to rounding: the gate and the
    std-relative temperatures amplify it (measured: gradients 3e-4 apart in norm, values 1e-5)."""
    model = make_model(loss="infonce").train()
    batch = build_batch()
    fast_terms, fast_stats, fast_grads, fast_quantiles = step_results(model, batch, optimised_step)
    terms, stats, grads, quantiles = step_results(model, batch, naive_loss_terms)
    for got, want in ((fast_terms, terms), (fast_stats, stats), (fast_quantiles, quantiles)):
        for name in want:
            torch.testing.assert_close(got[name], want[name].detach(), rtol=1e-4, atol=1e-6, msg=name)
    assert set(fast_grads) == set(grads)
    fast_vector, slow_vector = (torch.cat([g[name].flatten() for name in grads]) for g in (fast_grads, grads))
    assert (fast_vector - slow_vector).norm() <= 2e-3 * slow_vector.norm()


def test_loss_terms_need_no_data_dependent_shapes_or_host_reads():
    """Every shape in ``loss_terms`` follows from the input shapes and nothing is read back to the
    host: under FakeTensorMode (no values at all) nonzero, boolean indexing, ``.item()`` or
    ``float()`` would raise. On a GPU each of those would stall the step on a device sync."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = make_model().train()
    batch = build_batch()
    out = {name: value.detach() for name, value in model(batch).items()}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = {name: mode.from_tensor(value) for name, value in out.items()}
    with mode:
        losses = model.loss_terms(fake, mode.from_tensor(batch["image_ids"]), epoch=1)
    assert set(losses.terms) == {"s", "m", "f", "x"}
    assert all(isinstance(value, torch.Tensor) and value.dim() == 0 for value in losses.stats.values())


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", range(1, 7))
def test_model_shapes_for_every_depth(depth):
    model = make_model(unet_depth=depth, noise_groups=2)
    batch = build_batch()
    out = model(batch)
    assert out["img_tokens"].shape == out["img_mod"].shape == (4, 5, 32)
    assert out["txt_tokens"].shape == out["txt_mod"].shape == (4, 7, 32)
    assert out["img_emb"].shape == out["txt_emb"].shape == (4, 32)
    sampled = model.sample(out)
    assert sampled["img_x"].shape == (4, 5, 32) and sampled["txt_x"].shape == (4, 7, 32)
    assert sampled["img_x_emb"].shape == sampled["txt_x_emb"].shape == (4, 32)
    assert (sampled["img_x"][~out["img_mask"]] == 0).all() and (sampled["txt_x"][~out["txt_mask"]] == 0).all()
    assert torch.isfinite(model.loss_terms(out, batch["image_ids"], epoch=1).total())


def test_forward_is_per_sample():
    """Under DDP the loop gathers ``forward``'s outputs before ``loss_terms``: every output must have the
    batch first and each sample's rows may not depend on the rest of the batch (batch statistics live
    in ``loss_terms``)."""
    batch = build_batch()
    model = make_model().eval()
    with torch.no_grad():
        out = model(batch)
        part = model({k: v[1:3] for k, v in batch.items()})
    assert set(part) == set(out)
    for name, value in out.items():
        assert value.shape[0] == 4, name
        piece = part[name]
        width = piece.shape[1] if piece.dim() > 1 else None  # captions are cut to their own longest
        torch.testing.assert_close(piece, value[1:3, :width] if width else value[1:3], msg=name)


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
    model = make_model(alpha_m=0.3, alpha_f=0.25, alpha_x=2.0)
    batch = build_batch()
    losses = model.loss_terms(model(batch), batch["image_ids"], epoch=1)
    assert losses.weights == {"s": 1.0, "m": 0.3, "f": 0.25, "x": 2.0}  # α_s is fixed at 1
    assert set(losses.stats) == {"support_img", "support_txt", "threshold_alpha", "w_s", "w_m", "w_x",
                                 "sem_cos_img", "sem_cos_txt", "mod_ratio_img", "mod_ratio_txt"}
    assert 1.0 <= losses.stats["support_img"] < 32 and 1.0 <= losses.stats["support_txt"] < 32
    assert losses.stats["threshold_alpha"] == 1.0 and losses.stats["w_x"] == 1.0


def test_constraints_reduce_over_samples_as_the_alignment_loss_does():
    """The hinge sums over its queries, InfoNCE averages: L_m, L_f, L_x follow, so their per-sample
    weight next to L_s is the same under both losses and every batch size."""
    batch = build_batch()
    triplet, infonce = make_model().eval(), make_model(loss="infonce").eval()
    infonce.load_state_dict(triplet.state_dict(), strict=False)
    with torch.no_grad():
        summed = triplet.loss_terms(triplet(batch), batch["image_ids"], 1).terms
        averaged = infonce.loss_terms(infonce(batch), batch["image_ids"], 1).terms
    for name in ("m", "f", "x"):
        torch.testing.assert_close(summed[name], 4 * averaged[name])


def test_collapse_diagnostics_detect_a_copying_semantic_path_and_a_vanishing_modality_path():
    raw = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(19))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    copied = {"img_raw": raw, "img_tokens": 2 * raw, "img_mod": torch.zeros_like(raw), "img_mask": mask}
    assert token_diagnostics(copied, "img") == pytest.approx({"sem_cos_img": 1.0, "mod_ratio_img": 0.0})
    flipped = {**copied, "img_tokens": -raw, "img_mod": 0.5 * raw}
    assert token_diagnostics(flipped, "img") == pytest.approx({"sem_cos_img": -1.0, "mod_ratio_img": 0.5})
    no_unet = make_model(use_unet=False)
    batch = build_batch()
    stats = no_unet.loss_terms(no_unet(batch), batch["image_ids"], 1).stats
    assert not any(k.startswith(("sem_cos", "mod_ratio")) for k in stats)  # V^s is V by construction


@pytest.mark.parametrize("seed", [0, 1])
def test_term_budget_at_shipped_defaults(seed):
    """METHODS.md "Term budget": at the shipped defaults every weighted term moves the shared encoders
    by 1 % to 80 % of the total (fresh model, after the warm-up epoch; measured 2–43 %)."""
    torch.manual_seed(seed)
    job = JobConfig(method="cdds", model=ModelConfig(text_encoder="tiny", embed_dim=32), train=TrainConfig())
    model = build(job, IMAGE_DIM)
    gen = torch.Generator().manual_seed(seed)
    b, r, length = 16, 6, 8
    batch = {"images": torch.randn(b, r, IMAGE_DIM, generator=gen),
             "region_mask": torch.ones(b, r, dtype=torch.bool),
             "input_ids": torch.randint(1000, 5000, (b, length), generator=gen),
             "attention_mask": torch.ones(b, length, dtype=torch.long), "image_ids": torch.arange(b)}
    losses = model.loss_terms(model(batch), batch["image_ids"], epoch=1)
    budget = term_budget(losses.terms, losses.weights, model.shared_parameters())
    shares = {k.removeprefix("budget/"): v for k, v in budget.items() if k.startswith("budget/")}
    assert set(shares) == {"s", "m", "f", "x"}
    assert all(0.01 <= share <= 0.80 for share in shares.values()), shares


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
    direct = model.align(model.similarity(out["img_emb"], out["txt_emb"]), batch["image_ids"], 1)
    losses = model.loss_terms(out, batch["image_ids"], 1)
    torch.testing.assert_close(losses.terms["s"], direct)
    assert "support_img" not in losses.stats
    assert not any(name.startswith(("threshold", "quantile")) for name, _ in model.named_parameters())
    assert not any(name.startswith("quantile") for name, _ in model.named_buffers())
    with torch.no_grad():  # retrieval scores what it trains: v^s · t^s
        img = model.encode_image(batch["images"], batch["region_mask"])
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(img["emb"], out["img_emb"])
    torch.testing.assert_close(txt["emb"], out["txt_emb"])


def parameter_count(module: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for name, p in module.named_parameters() if name.startswith(prefix))


def test_without_decoupling_is_capacity_matched_and_has_no_modality_path():
    """The "w/o decoupling" row keeps each UNet's encoder and semantic decoder: the full model minus
    exactly the modality decoders (and the mixing weights that only reconstructions use)."""
    batch = build_batch()
    full, row = make_model(), make_model(decouple=False)
    assert not any(".modality." in name for name, _ in row.named_parameters())
    assert row.image_unet.modality is None and row.text_unet.modality is None
    modality = parameter_count(full.image_unet.modality) + parameter_count(full.text_unet.modality)
    assert parameter_count(row) == parameter_count(full) - modality - 3  # w_s, w_m, w_x
    image_modality = parameter_count(full.image_unet.modality)
    assert parameter_count(row, "image_unet") == parameter_count(full, "image_unet") - image_modality
    out = row(batch)
    assert "img_mod" not in out and "txt_mod" not in out
    assert set(row.loss_terms(out, batch["image_ids"], 1).terms) == {"s"}


def test_without_unet_uses_the_backbone_tokens():
    batch = build_batch()
    model = make_model(use_unet=False).eval()
    out = model(batch)
    assert not any(name.startswith(("image_unet", "text_unet")) for name, _ in model.named_parameters())
    assert not hasattr(model, "image_unet") and not hasattr(model, "text_unet")
    assert out["img_tokens"] is out["img_raw"] and "img_mod" not in out
    pooled = F.normalize(model.image_pool(out["img_raw"], out["img_mask"]), dim=-1)
    torch.testing.assert_close(out["img_emb"], pooled)
    assert set(model.loss_terms(out, batch["image_ids"], 1).terms) == {"s"}  # sampling acts on V, T


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
    model = make_model().train()
    model.loss_terms(model(batch), batch["image_ids"], 1)  # one training batch: running quantiles exist
    model.eval()
    with torch.no_grad():
        out = model(batch)
        full_img = model.encode_image(batch["images"], batch["region_mask"])
        img = model.encode_image(batch["images"][1:3], batch["region_mask"][1:3])
        txt = model.encode_text(batch["input_ids"][2:], batch["attention_mask"][2:])
        full_txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(img["sem_emb"], out["img_emb"][1:3])
    torch.testing.assert_close(txt["sem_emb"], out["txt_emb"][2:])
    torch.testing.assert_close(img["emb"], full_img["emb"][1:3])
    torch.testing.assert_close(txt["emb"], full_txt["emb"][2:])
    torch.testing.assert_close(img["emb"].norm(dim=-1), torch.ones(2))


def test_fixed_threshold_is_a_buffer():
    model = make_model(threshold_learnable=False, threshold_alpha=2.0)
    assert not any(name.startswith("threshold") for name, _ in model.named_parameters())
    assert float(model.threshold_img.mean()) == 2.0 and "threshold_txt" in model.state_dict()


# ---------------------------------------------------------------------------------------------
# Retrieval: the score L_s trains, from running quantiles (CDDS 5)
# ---------------------------------------------------------------------------------------------

def test_running_quantiles_average_then_track_training_batches():
    model = make_model(quantile_momentum=0.25).train()
    batches = [build_batch(seed=s) for s in range(6)]
    seen = []
    for batch in batches:
        out = model(batch)
        seen.append(cl.resample_columns(out["img_tokens"][out["img_mask"]].detach(), 64))
        model.loss_terms(out, batch["image_ids"], 1)
    expected = seen[0]
    for n, table in enumerate(seen[1:], start=2):  # weight max(1/n, momentum)
        expected = expected + max(1 / n, 0.25) * (table - expected)
    assert int(model.quantile_updates) == 6
    torch.testing.assert_close(model.quantiles_img, expected)
    assert (model.quantiles_img.diff(dim=0) >= 0).all() and (model.quantiles_txt.diff(dim=0) >= 0).all()
    model.eval()
    batch = build_batch(seed=9)
    model.loss_terms(model(batch), batch["image_ids"], 1)  # evaluation never moves them
    assert int(model.quantile_updates) == 6


def test_retrieval_score_is_the_average_of_the_two_trained_pairings():
    """emb = [v^s, v^x]/√2 and [t^x, t^s]/√2, so one dot product is ½(v^s·t^x + v^x·t^s): what cross
    L_s trains. Before the first training batch v^x = v^s and t^x = t^s, so it is v^s·t^s."""
    batch = build_batch()
    model = make_model().eval()
    with torch.no_grad():
        img = model.encode_image(batch["images"], batch["region_mask"])
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
        direct = img["sem_emb"] @ txt["sem_emb"].t()
        torch.testing.assert_close(model.similarity(img["emb"], txt["emb"]), direct)
        model.train()
        model.loss_terms(model(batch), batch["image_ids"], 1)
        model.eval()
        img = model.encode_image(batch["images"], batch["region_mask"])
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
        v_x = model.running_sample(img["tokens"], img["mask"], "img")
        t_x = model.running_sample(txt["tokens"], txt["mask"], "txt")
    assert img["emb"].shape == txt["emb"].shape == (4, 64)
    torch.testing.assert_close(img["emb"].norm(dim=-1), torch.ones(4))
    expected = (img["sem_emb"] @ t_x.t() + v_x @ txt["sem_emb"].t()) / 2
    torch.testing.assert_close(model.similarity(img["emb"], txt["emb"]), expected)
    assert not torch.allclose(t_x, txt["sem_emb"], atol=1e-3)


def test_running_sample_reproduces_the_training_batch_sampling():
    """With quantiles from one batch and K = its token count, retrieval's v^x, t^x of that batch are
    exactly the pooled V^x, T^x that L_s sees in training (same W, same quantile map)."""
    batch = square_batch(batch=6, tokens=4)  # 24 valid tokens per modality
    model = make_model(quantile_positions=24).eval()
    with torch.no_grad():
        out = model(batch)
        model.update_quantiles(out["img_tokens"].flatten(0, 1), out["txt_tokens"].flatten(0, 1))
        sampled = model.sample(out)
        v_x = model.running_sample(out["img_tokens"], out["img_mask"], "img")
        t_x = model.running_sample(out["txt_tokens"], out["txt_mask"], "txt")
    torch.testing.assert_close(v_x, sampled["img_x_emb"])
    torch.testing.assert_close(t_x, sampled["txt_x_emb"])


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"unet_depth": 0}, {"unet_depth": 7}, {"alpha_f": -0.5}, {"noise_groups": 0},
                                 {"semantic_loss": "both"}, {"mask_temperature": 0}, {"kl_temperature": 0},
                                 {"kl_scale": "log"}, {"quantile_positions": 1}, {"quantile_momentum": 0},
                                 {"alpha_s": 1.0}, {"typo": 1}])
def test_section_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match="cdds"):
        SPEC.parse_section(bad)


def test_heads_must_divide_embed_dim():
    with pytest.raises(ConfigError, match="num_heads"):
        make_model(num_heads=5)
    make_model(num_heads=5, use_unet=False)  # no UNet, nothing to divide


def test_registered_rows_and_search_keys_parse():
    for ablation in SPEC.ablations:
        if ablation.method == "cdds":
            SPEC.parse_section(ablation.overrides)
    assert set(SPEC.searchable) <= set(SPEC.section.model_fields)
    assert "alpha_s" not in SPEC.section.model_fields  # fixed at 1: under Adam only weight ratios matter


def test_each_row_switches_one_thing():
    rows = {row.name: row.overrides for row in SPEC.ablations if row.method == "cdds"}
    assert rows["full"] == {}
    assert all(len(overrides) == 1 for name, overrides in rows.items() if name != "full")
    assert rows["w/o decoupling"] == {"decouple": False} and rows["w/o UNet"] == {"use_unet": False}
