"""Base alignment losses and pooling: properties that could fail, plus gradchecks in float64."""

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from trainables.losses import hinge_triplet, infonce, same_image_mask
from trainables.model import AlignmentLoss
from trainables.pooling import GPO, MaxPool, MeanPool, positional_encoding


def hinge_reference(sims, image_ids, margin, hardest):
    """Naive double loop over (query, negative) pairs."""
    n = len(sims)
    total = 0.0
    for i in range(n):
        costs_t = [max(0.0, margin + sims[i][j] - sims[i][i]) for j in range(n) if image_ids[j] != image_ids[i]]
        costs_i = [max(0.0, margin + sims[j][i] - sims[i][i]) for j in range(n) if image_ids[j] != image_ids[i]]
        if hardest:
            total += max(costs_t, default=0.0) + max(costs_i, default=0.0)
        else:
            total += sum(costs_t) + sum(costs_i)
    return total


def test_hinge_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(7, 7, generator=g, dtype=torch.float64) * 2 - 1
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 4])
    for hardest in (True, False):
        got = hinge_triplet(sims, same_image_mask(ids), 0.2, hardest)
        want = hinge_reference(sims.tolist(), ids.tolist(), 0.2, hardest)
        assert abs(got.item() - want) < 1e-9


def test_hinge_zero_once_positives_beat_negatives_by_the_margin():
    sims = torch.full((4, 4), 0.1)
    sims.fill_diagonal_(0.31)  # 0.21 > margin 0.2
    assert hinge_triplet(sims, same_image_mask(torch.arange(4)), 0.2).item() == 0.0
    sims.fill_diagonal_(0.29)  # inside the margin: positive loss
    assert hinge_triplet(sims, same_image_mask(torch.arange(4)), 0.2).item() > 0.0


def test_same_image_pairs_are_never_negatives():
    sims = torch.eye(3) * 0.5
    sims[0, 1] = sims[1, 0] = 0.9  # a "negative" scoring above the positive ...
    shared = torch.tensor([7, 7, 8])  # ... but it is another caption of the same image
    assert hinge_triplet(sims, same_image_mask(shared), 0.2).item() == 0.0
    assert hinge_triplet(sims, same_image_mask(torch.arange(3)), 0.2).item() > 0.0


def test_warmup_sums_all_negatives_then_hardest():
    g = torch.Generator().manual_seed(1)
    sims = torch.rand(6, 6, generator=g)
    ids = torch.arange(6)
    loss = AlignmentLoss("triplet", margin=0.2, warmup_epochs=1)
    warm, hard = loss(sims, ids, epoch=0), loss(sims, ids, epoch=1)
    assert torch.isclose(warm, hinge_triplet(sims, same_image_mask(ids), 0.2, hardest=False))
    assert torch.isclose(hard, hinge_triplet(sims, same_image_mask(ids), 0.2, hardest=True))
    assert warm > hard


def test_hinge_gradient_pushes_positive_up_and_hardest_negative_down():
    sims = torch.tensor([[0.5, 0.6, 0.1], [0.0, 0.5, 0.1], [0.2, 0.1, 0.9]], requires_grad=True)
    hinge_triplet(sims, same_image_mask(torch.arange(3)), 0.2).backward()
    assert sims.grad[0, 0] < 0 and sims.grad[0, 1] > 0  # descent raises the positive, lowers the negative


def test_hinge_and_infonce_gradcheck():
    g = torch.Generator().manual_seed(2)
    sims = (torch.rand(5, 5, generator=g, dtype=torch.float64) - 0.5).requires_grad_()
    mask = same_image_mask(torch.tensor([0, 1, 1, 2, 3]))
    assert torch.autograd.gradcheck(lambda s: hinge_triplet(s, mask, 0.2, hardest=False), (sims,))
    assert torch.autograd.gradcheck(lambda s: hinge_triplet(s, mask, 0.2, hardest=True), (sims,))
    temperature = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: infonce(s, mask, t), (sims, temperature))


def test_infonce_lower_for_aligned_pairs_and_masks_shared_images():
    ids = torch.arange(4)
    aligned = torch.eye(4)
    shuffled = aligned[[1, 0, 3, 2]]
    assert infonce(aligned, same_image_mask(ids), 0.1) < infonce(shuffled, same_image_mask(ids), 0.1)
    # With both off-diagonal pairs sharing the image, the competing column is masked out of the softmax.
    sims = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert infonce(sims, same_image_mask(torch.tensor([5, 5])), 0.1).item() < 1e-6


def test_pooling_respects_the_mask():
    tokens = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    garbage = tokens.clone()
    garbage[~mask] = 1e6  # padded positions must not leak into any pooling
    for pool in (MeanPool(), MaxPool(), GPO()):
        assert torch.allclose(pool(tokens, mask), pool(garbage, mask), atol=1e-5)
    assert torch.allclose(MeanPool()(tokens, mask)[2], tokens[2, 0])


def test_gpo_is_permutation_invariant_and_between_min_and_max():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 6, 8, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    gpo = GPO()
    pooled = gpo(tokens, mask)
    assert torch.allclose(pooled, gpo(tokens[:, torch.randperm(6)], mask), atol=1e-6)
    assert (pooled <= tokens.amax(1) + 1e-5).all() and (pooled >= tokens.amin(1) - 1e-5).all()


def test_gpo_weights_sum_to_one_over_valid_ranks():
    gpo = GPO()
    weights = gpo.rank_weights(torch.tensor([2, 5, 1]), max_len=5).squeeze(-1)
    assert torch.allclose(weights.sum(1), torch.ones(3), atol=1e-5)
    assert weights[0, 2:].abs().max() < 1e-6 and weights[2, 1:].abs().max() < 1e-6


def test_gpo_gradcheck():
    gpo = GPO().double()
    tokens = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda t: gpo(t, mask), (tokens,))


def packed_gpo_reference(gpo: GPO, tokens, mask):
    """VSE∞'s GPO as this project first wrote it: lengths on the host, a packed BiGRU per sample."""
    lengths = mask.sum(1).clamp_min(1)
    max_len = int(lengths.max())
    ordered = tokens.masked_fill(~mask.unsqueeze(-1), torch.finfo(tokens.dtype).min)
    ordered = ordered.sort(dim=1, descending=True).values[:, :max_len]
    valid = (torch.arange(max_len).expand(len(lengths), max_len) < lengths.unsqueeze(1)).unsqueeze(-1)
    ordered = ordered.masked_fill(~valid, 0.0)
    pes = positional_encoding(max_len, gpo.d_pe, tokens.device, tokens.dtype).expand(len(lengths), -1, -1)
    packed = pack_padded_sequence(pes * valid, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = pad_packed_sequence(gpo.gru(packed)[0], batch_first=True, total_length=max_len)
    half = out.shape[-1] // 2
    scores = gpo.linear((out[..., :half] + out[..., half:]) / 2).masked_fill(~valid, -1e4)
    return (ordered * torch.softmax(scores / 0.1, dim=1)).sum(1)


def test_gpo_matches_the_packed_per_sample_bigru_values_and_gradients():
    """The length table (no host lengths) gives VSE∞'s packed BiGRU's numbers: every length from 1
    to the full width, an empty sample, padding wider than the longest sample."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(9, 11, 8, generator=g)
    lengths = torch.tensor([1, 2, 3, 5, 8, 9, 10, 0, 4])  # none uses all 11 slots
    mask = torch.arange(11).unsqueeze(0) < lengths.unsqueeze(1)
    mask = mask[:, torch.randperm(11, generator=g)]  # valid tokens anywhere, not only first
    torch.manual_seed(0)
    gpo = GPO()
    probe = torch.randn(9, 8, generator=g) * (lengths > 0).unsqueeze(1)  # the empty sample pools to -3e38
    fast = gpo(tokens, mask)
    fast_grads = torch.autograd.grad((fast * probe).sum(), list(gpo.parameters()))
    slow = packed_gpo_reference(gpo, tokens, mask)
    slow_grads = torch.autograd.grad((slow * probe).sum(), list(gpo.parameters()))
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    for got, want in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
