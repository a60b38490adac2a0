"""Speed of ``retrieval_metrics`` vs the field's per-query argsort loop on a COCO-5K-sized matrix.

    python -m benchmarks.eval_speed                 # 5,000 x 25,000 (COCO 5K), from the repo root
    python -m benchmarks.eval_speed --images 1000   # quick check (COCO 1K fold size)
    python -m benchmarks.eval_speed --full-eval     # + encode/similarity/metrics of a 5K synth split

``retrieval_metrics`` on the float32 matrix is expressed in read passes over that matrix: its time
over the time of ``sims.sum()`` (one streaming read with torch's threads), the two timed round-robin
(fastest of ``--repeats``) because this VM's memory bandwidth drifts by 20% from minute to minute.
Both the fused CPU kernel that CPU evaluation uses (``trainables/rank_kernel.py``) and the chunked
torch backend that runs on CUDA are timed (here both on the CPU; same numbers, asserted). The
machine's bandwidth is printed too: ``sims.sum()``'s, and a 512 MiB ``np.copyto`` (read + write,
counted as 2 x bytes) and ``torch.sum``. ``--full-eval`` writes a synthetic split of
``--images`` test images to a temp dir and times the whole evaluation with the text encoder of
``--text-encoder`` (default the tiny random one; ``minilm`` is the real-size encoding cost)
encoder: encoding both modalities, the chunked similarity matrix and the metrics.

The reference is written the way the reference evaluators (VSE++/SCAN/VSE-infinity ``i2t``/``t2i``)
are: one ``np.argsort(...)[::-1]`` per query, then the position of the ground truth. The matrix is
float64 noise plus a planted signal on each caption's own image, so recalls are mid-range and exact
ties (where the loop's arbitrary tie order and our pessimistic one could differ) do not occur; the
numbers must then be identical. The float32 run shows the usual evaluation dtype.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch

from benchmarks._common import command, record
from trainables.evaluation import (
    DEFAULT_MEMORY_BUDGET,
    pessimistic_ranks,
    rank_summary,
    retrieval_metrics,
    rows_per_chunk,
)

COPY_BYTES = 512 * 2**20  # large enough to defeat every cache level


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


def interleaved(repeats: int, *calls) -> list[tuple[object, float]]:
    """``[(result, fastest wall time)]`` of each ``(fn, *args)``, timed round-robin ``repeats`` times."""
    runs = [[timed(fn, *args) for fn, *args in calls] for _ in range(repeats)]
    return [(runs[0][i][0], min(run[i][1] for run in runs)) for i in range(len(calls))]


def memory_bandwidth(n_bytes: int = COPY_BYTES, repeats: int = 3) -> tuple[float, float]:
    """``(copy, read)`` GB/s on ``n_bytes`` float32 arrays: ``np.copyto`` (bytes read + bytes
    written) and one ``torch.sum`` read pass (torch's threads, as ``retrieval_metrics`` uses)."""
    src = np.ones(n_bytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    _, t_copy = best_time(repeats, np.copyto, dst, src)
    _, t_read = best_time(repeats, torch.sum, torch.from_numpy(src))
    return 2 * n_bytes / t_copy / 1e9, n_bytes / t_read / 1e9


def full_evaluation(n_images: int, k: int, repeats: int, text_encoder: str = "tiny") -> dict[str, float]:
    """Seconds of each evaluation stage on a synthetic split of ``n_images`` with ``text_encoder``."""
    from trainables.config import DataConfig, JobConfig, ModelConfig
    from trainables.data import PrecompSplit, build_eval_loaders, write_synth
    from trainables.evaluation import chunked_similarity, encode_split, evaluate_similarity
    from trainables.methods import build_model
    from trainables.text_models import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="itm-eval-") as root:
        write_synth(root, images=2 * n_images)  # the test split is images // 2
        split = PrecompSplit(root, "test")
        assert split.captions_per_image == k, f"synthetic data has {split.captions_per_image} captions/image"
        job = JobConfig(model=ModelConfig(text_encoder=text_encoder))
        torch.manual_seed(0)
        model = build_model(job, split.feature_dim)
        loaders = build_eval_loaders(DataConfig(root=root), split, load_tokenizer(text_encoder), 256)
        (img, txt), t_encode = best_time(repeats, encode_split, model, *loaders, "cpu")
        sims, t_sims = best_time(repeats, chunked_similarity, img, txt, score_fn=model.similarity)
        _, t_metrics = best_time(repeats, evaluate_similarity, sims, k)
    return {"encode": t_encode, "similarity": t_sims, "metrics": t_metrics}


def print_metrics(title: str, metrics: dict[str, float]) -> None:
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr")
    print(f"{title:>10}: " + "  ".join(f"{key}={metrics[key]:.2f}" for key in keys))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="number of images N (captions = k*N)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--signal", type=float, default=3.0, help="score added to matched pairs")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats of the fast paths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (the numpy loop uses one; default: torch's)")
    parser.add_argument("--full-eval", action="store_true",
                        help="also time encode + similarity + metrics on a synthetic split of --images")
    parser.add_argument("--full-repeats", type=int, default=1, help="timing repeats of --full-eval's stages")
    parser.add_argument("--text-encoder", default="tiny", help="for --full-eval: tiny | minilm | local path")
    parser.add_argument("--record", default=None, help="append the figures (JSON lines) to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, k = args.images, args.captions_per_image

    sims = planted_sims(n, k, args.signal, args.seed)
    sims32 = sims.float()
    print(f"matrix {n} x {n * k}, torch threads {torch.get_num_threads()}, "
          f"chunk rows {rows_per_chunk(n * k)} (budget {DEFAULT_MEMORY_BUDGET / 2**20:.0f} MiB)")

    # Interleaved, so that this VM's drifting memory bandwidth hits the pass and the metrics alike.
    (_, t_pass64), (_, t_pass32), (ours, t_ours64), (ours32, t_ours32), (torch32, t_torch32) = interleaved(
        args.repeats, (torch.sum, sims), (torch.sum, sims32), (retrieval_metrics, sims, k),
        (retrieval_metrics, sims32, k), (partial(retrieval_metrics, backend="torch"), sims32, k))
    assert torch32 == ours32, "fused and torch backends differ"
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
    print(f"retrieval_metrics:          float64 {t_ours64:.3f} s, float32 {t_ours32:.3f} s "
          f"(fused CPU kernel; torch backend, as on CUDA: float32 {t_torch32:.3f} s)")
    print(f"argsort loop reference:     float64 {t_ref:.2f} s")
    print(f"speed-up vs loop: {t_ref / t_ours64:.0f}x (float64), {t_ref / t_ours32:.0f}x (float32); "
          f"retrieval_metrics = {t_ours32 / t_pass32:.1f} memory passes (float32)")
    print("identical ranks and metrics: yes")

    copy_bw, read_bw = memory_bandwidth()
    matrix_bytes = sims32.numel() * 4
    passes, torch_passes = t_ours32 / t_pass32, t_torch32 / t_pass32
    print(f"memory bandwidth (512 MiB): np.copyto {copy_bw:.1f} GB/s (read+write), torch.sum {read_bw:.1f} GB/s "
          f"(read); sims.sum on the {matrix_bytes / 2**20:.0f} MiB float32 matrix {matrix_bytes / t_pass32 / 1e9:.1f} GB/s")
    cmd = command("benchmarks.eval_speed", argv)
    record(args.record, f"`retrieval_metrics` vs per-query argsort loop ({n:,} x {n * k:,})",
           f"{t_ref / t_ours64:.1f}x faster (float64: {t_ours64:.3f} s vs {t_ref:.2f} s), identical numbers", cmd)
    record(args.record, "memory bandwidth (512 MiB float32: np.copyto read+write; torch.sum read)",
           f"{copy_bw:.1f} GB/s copy, {read_bw:.1f} GB/s read", cmd)
    record(args.record, f"`retrieval_metrics` float32 {n:,} x {n * k:,} ({matrix_bytes / 2**20:.0f} MiB) "
           "in read passes over the matrix (`sims.sum()`, timed alongside; target <= 2)",
           f"{t_ours32 * 1e3:.1f} ms = {passes:.2f} passes of {t_pass32 * 1e3:.1f} ms "
           f"({matrix_bytes / t_pass32 / 1e9:.0f} GB/s) with the fused CPU kernel; torch backend as on CUDA: "
           f"{t_torch32 * 1e3:.1f} ms = {torch_passes:.1f} passes", cmd)
    if args.full_eval:
        stages = full_evaluation(n, k, args.full_repeats, args.text_encoder)
        total = sum(stages.values())
        print(f"full evaluation ({args.text_encoder} encoder): " + ", ".join(f"{name} {t:.2f} s" for name, t in stages.items()))
        record(args.record, f"full evaluation of a {n:,}-image split, {args.text_encoder} text encoder "
               "(encode / similarity / metrics)",
               f"{total:.1f} s ({stages['encode']:.1f} / {stages['similarity']:.2f} / {stages['metrics']:.2f} s)",
               cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
