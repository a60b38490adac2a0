"""Speed of ``retrieval_metrics`` vs the field's per-query argsort loop on a COCO-5K-sized matrix.

    python -m benchmarks.eval_speed                 # 5,000 x 25,000 (COCO 5K), from the repo root
    python -m benchmarks.eval_speed --images 1000   # quick check (COCO 1K fold size)

The reference is written the way the reference evaluators (VSE++/SCAN/VSE-infinity ``i2t``/``t2i``)
are: one ``np.argsort(...)[::-1]`` per query, then the position of the ground truth. The matrix is
float64 noise plus a planted signal on each caption's own image, so recalls are mid-range and exact
ties (where the loop's arbitrary tie order and our pessimistic one could differ) do not occur; the
numbers must then be identical. The float32 run shows the usual evaluation dtype.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from trainables.evaluation import (
    DEFAULT_MEMORY_BUDGET,
    pessimistic_ranks,
    rank_summary,
    retrieval_metrics,
    rows_per_chunk,
)


def reference_ranks(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The field's loop: 1-based ranks ``(i2t [N], t2i [k*N])`` from one argsort per query."""
    n_images = sims.shape[0]
    i2t = np.zeros(n_images, dtype=np.int64)
    for index in range(n_images):
        inds = np.argsort(sims[index])[::-1]
        i2t[index] = min(np.where(inds == i)[0][0] for i in range(k * index, k * index + k))
    sims_t = sims.T
    t2i = np.zeros(k * n_images, dtype=np.int64)
    for index in range(n_images):
        for i in range(k):
            inds = np.argsort(sims_t[k * index + i])[::-1]
            t2i[k * index + i] = np.where(inds == index)[0][0]
    return i2t + 1, t2i + 1


def planted_sims(n_images: int, k: int, signal: float, seed: int) -> torch.Tensor:
    """``[N, k*N]`` float64 standard-normal scores, plus ``signal`` where caption j is image j // k's."""
    sims = torch.randn(n_images, n_images * k, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)
    captions = torch.arange(n_images * k)
    sims[captions // k, captions] += signal
    return sims


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def best_time(repeats: int, fn, *args, **kwargs):
    """``(result, fastest wall time of repeats)`` — the minimum is the least noisy estimate."""
    runs = [timed(fn, *args, **kwargs) for _ in range(repeats)]
    return runs[0][0], min(t for _, t in runs)


def print_metrics(title: str, metrics: dict[str, float]) -> None:
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr")
    print(f"{title:>10}: " + "  ".join(f"{key}={metrics[key]:.2f}" for key in keys))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="number of images N (captions = k*N)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--signal", type=float, default=3.0, help="score added to matched pairs")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of the fast paths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (the numpy loop uses one; default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, k = args.images, args.captions_per_image

    sims = planted_sims(n, k, args.signal, args.seed)
    sims32 = sims.float()
    print(f"matrix {n} x {n * k}, torch threads {torch.get_num_threads()}, "
          f"chunk rows {rows_per_chunk(n * k)} (budget {DEFAULT_MEMORY_BUDGET / 2**20:.0f} MiB)")

    _, t_pass64 = best_time(args.repeats, torch.sum, sims)
    _, t_pass32 = best_time(args.repeats, torch.sum, sims32)
    ours, t_ours64 = best_time(args.repeats, retrieval_metrics, sims, k)
    ours32, t_ours32 = best_time(args.repeats, retrieval_metrics, sims32, k)
    (ref_i2t, ref_t2i), t_ref = timed(reference_ranks, sims.numpy(), k)

    i2t, t2i = pessimistic_ranks(sims, k)
    assert np.array_equal(i2t.numpy(), ref_i2t) and np.array_equal(t2i.numpy(), ref_t2i), "ranks differ"
    ref = {**rank_summary(torch.from_numpy(ref_i2t), "i2t"),
           **rank_summary(torch.from_numpy(ref_t2i), "t2i")}
    ref["rsum"] = sum(ref[f"{d}_r{at}"] for d in ("i2t", "t2i") for at in (1, 5, 10))
    assert ours == ref, "metrics differ"
    print_metrics("reference", ref)
    print_metrics("ours f64", ours)
    print_metrics("ours f32", ours32)

    print(f"one memory pass (sims.sum): float64 {t_pass64:.3f} s, float32 {t_pass32:.3f} s")
    print(f"retrieval_metrics:          float64 {t_ours64:.3f} s, float32 {t_ours32:.3f} s")
    print(f"argsort loop reference:     float64 {t_ref:.2f} s")
    print(f"speed-up vs loop: {t_ref / t_ours64:.0f}x (float64), {t_ref / t_ours32:.0f}x (float32); "
          f"retrieval_metrics = {t_ours32 / t_pass32:.0f} memory passes (float32)")
    print("identical ranks and metrics: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
