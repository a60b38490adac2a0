"""Retrieval evaluation: embeddings -> similarity matrix -> R@K / ranks, plus modality-gap diagnostics.

METHODS.md "Evaluation" (known protocol): image->text and text->image R@1/5/10, rSum = sum of the six,
k captions per image (caption j belongs to image j // k); COCO reports the 5-fold 1K average and the
full 5K. **Ties count against the model**: a ground truth tied with a negative is ranked below it, so
a collapsed model (all scores equal) scores at the bottom, never 100.

Ranks are comparison counts (how many negatives score >= the ground truth); no argsort of the matrix
is ever formed. On the CPU (float32/float64) the counts come from a fused kernel
(``trainables/rank_kernel.py``) that reads each row of the matrix from memory once for both
directions; elsewhere (CUDA, half precision) from vectorised torch over row chunks of the matrix with
a bounded amount of scratch memory. Both give identical ranks.

NaN never helps the model: a NaN ground-truth score ranks last, and a NaN negative ranks above the
ground truth (both fall out of counting ``not (negative < gt)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.precision import full_precision, upcast

RECALL_AT = (1, 5, 10)
# Scratch memory the rank computation may use per chunk (~130 rows of a 5K x 25K matrix). Kept
# small on purpose: cache-sized chunks measured 2-3x faster on CPU than 256 MiB ones, whose
# temporaries fall out of cache and are page-faulted in afresh every chunk.
DEFAULT_MEMORY_BUDGET = 16 * 2**20
# Per matrix element in a chunk: a bool comparison result (1 byte) plus the int32 copy that torch's
# sum over a bool tensor materialises (4 bytes).
_SCRATCH_BYTES_PER_ELEMENT = 5
UNIFORMITY_MAX_POINTS = 2000

ScoreFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------------
# Ranks and recall
# --------------------------------------------------------------------------------------------------


def _check_sims(sims: Tensor, captions_per_image: int) -> None:
    """Raise if ``sims`` is not ``[N, k*N]`` with ``N >= 1``."""
    if sims.dim() != 2:
        raise ValueError(f"similarity matrix must be 2-D [n_images, n_captions], "
                         f"got {tuple(sims.shape)}")
    n_images, n_captions = sims.shape
    if captions_per_image < 1 or n_images < 1 or n_captions != captions_per_image * n_images:
        raise ValueError(
            f"similarity matrix {tuple(sims.shape)} does not have captions_per_image="
            f"{captions_per_image} columns per image row; check the split's caption count"
        )


def rows_per_chunk(n_columns: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Number of similarity rows whose comparison scratch (``[rows, n_columns]``) fits the budget."""
    return max(1, memory_budget // (_SCRATCH_BYTES_PER_ELEMENT * max(1, n_columns)))


RANK_BACKENDS = ("auto", "fused", "torch")


def pessimistic_ranks(
    sims: Tensor, captions_per_image: int = 5, chunk_rows: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """1-based ranks with ties counted against the model.

    sims: ``[N, k*N]``, caption j belongs to image j // k (any float dtype, any device; may be a
    strided view). Returns ``(i2t [N], t2i [k*N])`` int64 on ``sims.device``:
    i2t[i] = 1 + #{negative captions j : s[i, j] >= max over i's k ground truths};
    t2i[j] = 1 + #{negative images i : s[i, j] >= s[j // k, j]}.

    ``backend``: ``"fused"`` = the one-pass CPU kernel (float32/float64 CPU tensors only),
    ``"torch"`` = row chunks of ``chunk_rows`` rows (default: as many as ``memory_budget`` bytes of
    scratch allow), ``"auto"`` = fused where it applies, torch elsewhere.
    """
    _check_sims(sims, captions_per_image)
    if backend not in RANK_BACKENDS:
        raise ValueError(f"unknown rank backend {backend!r}; choose one of {', '.join(RANK_BACKENDS)}")
    fusable = sims.device.type == "cpu" and sims.dtype in (torch.float32, torch.float64)
    if backend == "fused" and not fusable:
        raise ValueError(f"the fused rank kernel needs a float32/float64 CPU matrix, got {sims.dtype} "
                         f"on {sims.device}")
    if backend == "fused" or (backend == "auto" and fusable):
        return _fused_ranks(sims.detach(), captions_per_image)
    step = chunk_rows or rows_per_chunk(sims.shape[1], memory_budget)
    return _chunked_ranks(sims, captions_per_image, step)


def _fused_ranks(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``pessimistic_ranks`` through ``trainables.rank_kernel`` (CPU, float32/float64)."""
    from trainables.rank_kernel import below_counts  # numba loads only when something is evaluated

    n_images, n_captions = sims.shape
    captions = torch.arange(n_captions)
    gt = sims[captions // k, captions]  # [M] score of each caption's own image (a contiguous copy)
    gt_by_image = gt.view(n_images, k)
    # The best ground truth decides the rank; an all-NaN ground-truth set becomes -inf (rank last).
    best = gt_by_image.nan_to_num(nan=float("-inf")).amax(1)  # [N]
    below_row, below_col = below_counts(sims.numpy(), best.numpy(), gt.numpy(), torch.get_num_threads())
    below_gt = (gt_by_image < best[:, None]).sum(1)  # ground truths are not negatives: take them out
    i2t = n_captions - k - (torch.from_numpy(below_row) - below_gt) + 1
    t2i = n_images - torch.from_numpy(below_col)  # = 1 + negatives not below the ground truth
    return i2t, t2i


def _chunked_ranks(sims: Tensor, k: int, step: int) -> tuple[Tensor, Tensor]:
    """``pessimistic_ranks`` in vectorised torch over blocks of ``step`` rows (any device/dtype)."""
    n_images, n_captions = sims.shape
    captions = torch.arange(n_captions, device=sims.device)
    gt_t2i = sims[captions // k, captions]  # [M] score of each caption's own image
    below_t2i = torch.zeros(n_captions, dtype=torch.int64, device=sims.device)
    i2t = torch.empty(n_images, dtype=torch.int64, device=sims.device)
    for start in range(0, n_images, step):
        block = sims[start:start + step]  # [c, M] view, no copy
        i2t[start:start + block.shape[0]] = _i2t_chunk_ranks(block, start, k)
        # Count "strictly below" so that NaN scores (never below anything) count against the model.
        below_t2i += (block < gt_t2i).sum(0, dtype=torch.int32)
    t2i = n_images - below_t2i  # = 1 + negatives not below the ground truth
    return i2t, t2i


def _i2t_chunk_ranks(block: Tensor, start: int, k: int) -> Tensor:
    """Ranks ``[c]`` of image queries ``start .. start+c-1`` from their rows ``block [c, M]``."""
    rows = torch.arange(block.shape[0], device=block.device)
    gt_cols = (start + rows)[:, None] * k + torch.arange(k, device=block.device)  # [c, k]
    gt = block.gather(1, gt_cols)  # [c, k]
    # The best ground truth decides the rank; an all-NaN ground-truth set becomes -inf (rank last).
    best = gt.nan_to_num(nan=float("-inf")).amax(1, keepdim=True)  # [c, 1]
    below_all = (block < best).sum(1, dtype=torch.int32)
    below_gt = (gt < best).sum(1, dtype=torch.int32)
    n_negatives = block.shape[1] - k
    return (n_negatives - (below_all - below_gt) + 1).long()


def rank_summary(ranks: Tensor, prefix: str) -> dict[str, float]:
    """R@1/5/10 (percent), median and mean rank of 1-based ``ranks [Q]``.

    Median follows the field's evaluators: floor of numpy's median (mean of the middle two), here
    numpy's own (a partition, not the full sort ``torch.quantile`` does).
    """
    ranks = ranks.detach().cpu().numpy()  # [Q] integers: every count and sum below is exact
    out = {f"{prefix}_r{at}": 100.0 * np.count_nonzero(ranks <= at) / ranks.size for at in RECALL_AT}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)))
    out[f"{prefix}_meanr"] = float(ranks.mean(dtype=np.float64))
    return out


def retrieval_metrics(
    sims: Tensor, captions_per_image: int = 5, chunk_rows: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET, backend: str = "auto",
) -> dict[str, float]:
    """Bidirectional retrieval metrics of ``sims [N, k*N]`` (caption j belongs to image j // k).

    Returns ``i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10`` (percent), ``rsum`` (sum of the
    six) and ``i2t_medr, i2t_meanr, t2i_medr, t2i_meanr`` (1-based ranks). ``backend``,
    ``chunk_rows`` and ``memory_budget`` are those of ``pessimistic_ranks``; results do not depend on
    them.
    """
    i2t, t2i = pessimistic_ranks(sims, captions_per_image, chunk_rows, memory_budget, backend)
    out = {**rank_summary(i2t, "i2t"), **rank_summary(t2i, "t2i")}
    out["rsum"] = sum(out[f"{d}_r{at}"] for d in ("i2t", "t2i") for at in RECALL_AT)
    return out


def coco_5fold_metrics(
    sims: Tensor, captions_per_image: int = 5, fold_images: int = 1000, chunk_rows: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET, backend: str = "auto",
) -> dict[str, float]:
    """Average of every ``retrieval_metrics`` value over the folds of ``fold_images`` images.

    Fold f is the square block ``sims[f*F:(f+1)*F, f*F*k:(f+1)*F*k]`` (COCO 5K -> five 1K folds,
    each image ranked only against its fold's captions). Backend and chunking as ``retrieval_metrics``.
    """
    _check_sims(sims, captions_per_image)
    n_images = sims.shape[0]
    if n_images % fold_images:
        raise ValueError(f"{n_images} images do not split into folds of {fold_images} images")
    n_cap = fold_images * captions_per_image
    folds = [
        retrieval_metrics(sims[f * fold_images:(f + 1) * fold_images, f * n_cap:(f + 1) * n_cap],
                          captions_per_image, chunk_rows, memory_budget, backend)
        for f in range(n_images // fold_images)
    ]
    return {name: sum(m[name] for m in folds) / len(folds) for name in folds[0]}


def evaluate_similarity(
    sims: Tensor, captions_per_image: int = 5, coco_folds: bool = False, fold_images: int = 1000,
    chunk_rows: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET, backend: str = "auto",
) -> dict[str, float]:
    """Metrics on the whole matrix, plus ``"1k_" + name`` fold averages when ``coco_folds``."""
    out = retrieval_metrics(sims, captions_per_image, chunk_rows, memory_budget, backend)
    if coco_folds:
        folds = coco_5fold_metrics(sims, captions_per_image, fold_images, chunk_rows, memory_budget,
                                   backend)
        out.update({f"1k_{name}": value for name, value in folds.items()})
    return out


# --------------------------------------------------------------------------------------------------
# Similarity matrix
# --------------------------------------------------------------------------------------------------


def dot_score(img: Tensor, txt: Tensor) -> Tensor:
    """Default score: ``img [c, d] @ txt [M, d].T -> [c, M]`` (cosine for l2-normalised embeddings)."""
    return img @ txt.T


def similarity_chunks(
    img_emb: Tensor, txt_emb: Tensor, chunk_rows: int = 1024, device: torch.device | str | None = None,
    score_fn: ScoreFn | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, scores [c, M])`` for image rows ``start .. start+c-1`` against all captions.

    img_emb ``[N, d]``, txt_emb ``[M, d]``; the scores are on ``device`` (default: img_emb's).
    ``score_fn(img_chunk [c, d], txt [M, d]) -> [c, M]`` replaces the dot product for models whose
    similarity is not one. Scored in float32 with autocast off, whatever the caller's autocast:
    bf16 cosines are quantised to ~0.004, enough to tie ranks (``trainables/precision.py``).
    """
    device = torch.device(device) if device is not None else img_emb.device
    score_fn = score_fn or dot_score
    txt = upcast(txt_emb.to(device))  # moved once; only image rows travel per chunk
    for start in range(0, img_emb.shape[0], chunk_rows):
        with full_precision(device):
            scores = score_fn(upcast(img_emb[start:start + chunk_rows].to(device)), txt)
        yield start, scores


@torch.no_grad()
def chunked_similarity(
    img_emb: Tensor, txt_emb: Tensor, chunk_rows: int = 1024, device: torch.device | str | None = None,
    score_fn: ScoreFn | None = None,
) -> Tensor:
    """The full ``[N, M]`` float32 CPU similarity matrix, computed in row chunks on ``device``.

    The output is allocated once (5K x 25K = 0.5 GB) and filled chunk by chunk, so the device
    only ever holds one ``[chunk_rows, M]`` block.
    """
    out = torch.empty(img_emb.shape[0], txt_emb.shape[0], dtype=torch.float32)
    for start, block in similarity_chunks(img_emb, txt_emb, chunk_rows, device, score_fn):
        out[start:start + block.shape[0]] = block.float().cpu()
    return out


# --------------------------------------------------------------------------------------------------
# Encoding a split
# --------------------------------------------------------------------------------------------------


def _encode_loader(encode: Callable[..., Mapping[str, Tensor]], loader: Iterable[Mapping[str, Tensor]],
                   keys: tuple[str, str], device: torch.device | str) -> Tensor:
    """Concatenate ``encode(*batch[keys])["emb"]`` over the loader -> ``[n, d]`` float32 on CPU."""
    embs = [encode(*(batch[key].to(device, non_blocking=True) for key in keys))["emb"].float().cpu()
            for batch in loader]
    if not embs:
        raise ValueError("evaluation loader yielded no batches")
    return torch.cat(embs)


def encode_split(
    model: nn.Module, image_loader: Iterable[Mapping[str, Tensor]],
    caption_loader: Iterable[Mapping[str, Tensor]], device: torch.device | str,
) -> tuple[Tensor, Tensor]:
    """Embed a split: ``(img_emb [N, d], txt_emb [k*N, d])``, float32 on CPU, in loader order.

    Uses ``model.encode_image(images, region_mask)["emb"]`` and
    ``model.encode_text(input_ids, attention_mask)["emb"]`` (docs/architecture.md) in eval mode and
    without gradients; every submodule's previous train/eval flag is restored afterwards. The loaders
    must not shuffle: caption j is matched to image j // k by position.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            img = _encode_loader(model.encode_image, image_loader, ("images", "region_mask"), device)
            txt = _encode_loader(model.encode_text, caption_loader, ("input_ids", "attention_mask"),
                                 device)
    finally:
        for module, training in modes:
            module.training = training
    return img, txt


# --------------------------------------------------------------------------------------------------
# Modality gap (SPEC.md "Tracking": centroid distance, alignment, uniformity)
# --------------------------------------------------------------------------------------------------


def uniformity(
    x: Tensor, t: float = 2.0, max_points: int = UNIFORMITY_MAX_POINTS, seed: int = 0,
) -> float:
    """Wang & Isola (2020) uniformity ``log E_{u != v} exp(-t ||u - v||^2)`` of rows of ``x [n, d]``.

    Lower is more uniform (0 = collapsed to one point); NaN with fewer than two rows (no pairs).
    Rows beyond ``max_points`` are subsampled with a fixed generator so the value is reproducible
    and the pair count bounded (~2M pairs).
    """
    if x.shape[0] < 2:
        return float("nan")  # undefined, and a one-image smoke split must not crash evaluation
    if x.shape[0] > max_points:
        generator = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.shape[0], generator=generator)[:max_points]]
    sq_dist = torch.pdist(x.double(), p=2).pow(2)  # [n(n-1)/2] distinct pairs
    # log-mean-exp via logsumexp: exp(-t d^2) underflows for well-spread embeddings.
    log_count = torch.log(torch.tensor(float(sq_dist.numel()), dtype=torch.float64))
    return (torch.logsumexp(-t * sq_dist, 0) - log_count).item()


def modality_gap(img_emb: Tensor, txt_emb: Tensor, captions_per_image: int = 5) -> dict[str, float]:
    """Gap diagnostics of ``img_emb [N, d]`` and ``txt_emb [k*N, d]`` (caption j -> image j // k).

    All on l2-normalised embeddings: ``gap_centroid_dist`` = ||mean(img) - mean(txt)||_2;
    ``alignment`` = E ||f(x) - g(y)||^2 over matched pairs (Wang & Isola 2020, alpha = 2);
    ``uniformity_img`` / ``uniformity_txt`` within each modality (t = 2, see ``uniformity``).
    """
    n_images, k = img_emb.shape[0], captions_per_image
    if txt_emb.shape[0] != k * n_images or txt_emb.shape[1] != img_emb.shape[1]:
        raise ValueError(f"text embeddings {tuple(txt_emb.shape)} do not match image embeddings "
                         f"{tuple(img_emb.shape)} with captions_per_image={k}")
    img = F.normalize(img_emb.float(), dim=1)
    txt = F.normalize(txt_emb.float(), dim=1)
    matched = txt.view(n_images, k, -1) - img[:, None, :]  # [N, k, d] caption minus its image
    return {
        "gap_centroid_dist": (img.mean(0) - txt.mean(0)).norm().item(),
        "alignment": matched.pow(2).sum(-1).mean().item(),
        "uniformity_img": uniformity(img),
        "uniformity_txt": uniformity(txt),
    }


# --------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------


def evaluate(
    model: nn.Module, image_loader: Iterable[Mapping[str, Tensor]],
    caption_loader: Iterable[Mapping[str, Tensor]], device: torch.device | str,
    captions_per_image: int = 5, coco_folds: bool = False, fold_images: int = 1000,
    score_fn: ScoreFn | None = None,
) -> dict[str, float]:
    """Encode a split, build its similarity matrix, and return retrieval metrics + modality gap.

    Keys: those of ``evaluate_similarity`` (with ``1k_*`` when ``coco_folds``) and ``modality_gap``.
    """
    img, txt = encode_split(model, image_loader, caption_loader, device)
    sims = chunked_similarity(img, txt, device=device, score_fn=score_fn)
    out = evaluate_similarity(sims, captions_per_image, coco_folds, fold_images)
    out.update(modality_gap(img, txt, captions_per_image))
    return {name: float(value) for name, value in out.items()}
