"""Training-loader throughput (samples/s) on features of the BUTD shape, against what a step consumes.

    python -m benchmarks.loader                              # 30,000 images (8.8 GB in a temp dir)
    python -m benchmarks.loader --data /tmp/butd             # write the features there once, then reuse
    python -m benchmarks.loader --images 5000 --workers 0,2  # smaller file, same per-image shape

Data: ``--images`` x 36 regions x 2048 float32 features (uniform noise: throughput does not depend
on the values) and 5 synthetic-benchmark captions per image, memory-mapped by ``PrecompSplit`` as in
training. Throughput is per sample, so the image count matters only for page-cache effects; the
script checks free disk space first and says how many images fit.

Measured, at ``--batch`` captions per batch (one sample = one caption with its image):

1. **loader** (``--loader-threads`` torch threads, default 1 as in a 1-CPU Ray trial):
   ``build_train_loader`` (MiniLM's tokenizer, region dropout on, unique images) with each of
   ``--workers``; the time to the first batch (worker start-up), then samples/s over the next
   ``--batches`` batches (the same batches every time). Once *cold*, after the feature file was
   dropped from the page cache (``posix_fadvise(DONTNEED)``, no root needed; the resident share
   before the pass is printed from ``mincore``), then *warm* in ``--rounds`` rounds that rotate the
   settings, so drifting machine load hits all alike (medians). With CUDA, pinned memory on and
   off, each batch copied to the GPU by ``device_batch``; on a CPU-only PyTorch pinning does not
   exist and the loader alone is timed.
2. **the old per-item path** (each caption's image copied to float32, dropped and stacked on the
   host; the code before ``device_batch``), warm, 0 workers, in the same rounds (a quarter of the
   batches): the before figure.
3. **the parts** of one batch, warm, in this process: the fancy-index gather, the tokenisation,
   and ``device_batch`` on the CPU (move + region dropout + upcast; on a GPU this runs there).
4. **the CPU step**: base method, batch ``--batch``, on a loader batch of this shape passed through
   ``device_batch``; MiniLM frozen with its hidden states cached (``model.freeze_text``: the step
   then runs only the image encoder and the text projection, so it is the fastest, most demanding
   consumer; the hidden states are random, of the batch's token lengths), and MiniLM fine-tuned
   (the default) for reference; ``--threads`` torch threads, median and fastest of ``--steps`` (the
   target compares the loader with the fastest: load here only ever slows a step). Then CPU
   training end to end (loader + ``device_batch`` + frozen step, ``--steps`` steps) with each of
   ``--workers`` in rotated rounds: whether workers pay for the cores they take from the step.
5. **a GPU step's need** (derived, not measured here: no GPU): one step's FLOPs
   (``torch.utils.flop_counter``) and kernel-launching ops (a dispatch-mode counter; views excluded)
   are counted here, forward, backward, grad clip and AdamW in their multi-tensor form as on CUDA.
   At batch 128 an eager step on an H200 is bound by launching its ops, not by its FLOPs, so the step
   time is taken as the longer of ops x ``--launch-us`` (an assumed per-op host cost) and FLOPs at the
   H200's dense bf16 peak (989 TFLOP/s, NVIDIA's datasheet); samples/s = batch / that. The pooling's
   GRUs are left out of the ops: the CPU unrolls them per time step, cuDNN runs each as a few kernels.
   ``benchmarks/gpu_check.py`` measures the real figure on a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

from benchmarks._common import command, record

REGIONS, FEATURE_DIM, CAPTIONS_PER_IMAGE = 36, 2048, 5  # bottom-up-attention (BUTD) precomp features
WRITE_CHUNK = 256  # images per write: 75 MB of float32
REGION_DROPOUT = 0.2  # DataConfig's default
H200_BF16_DENSE_FLOPS = 989e12  # NVIDIA H200 (and H100 SXM) datasheet, dense BF16 tensor core; not measured
TARGET = 5  # the loader alone must deliver at least 5x what a CPU step consumes


# ------------------------------------------------------------------------------------------ the data


def feature_bytes(images: int) -> int:
    return images * REGIONS * FEATURE_DIM * 4


def check_disk(root: Path, images: int) -> None:
    """Refuse to start a write that cannot fit (with 1 GB to spare), naming how many images would."""
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    if feature_bytes(images) + 2**30 > free:
        fits = max((free - 2**30) // feature_bytes(1), 0)
        sys.exit(f"error: {images:,} images need {feature_bytes(images) / 1e9:.1f} GB but {root} has "
                 f"{free / 1e9:.1f} GB free; pass --images {fits:,} or less (same per-image shape)")


def write_butd(root: Path, images: int, seed: int = 0) -> Path:
    """``root/train_{ims.npy,caps.txt}``: ``[images, 36, 2048]`` float32 features (uniform noise, written
    in chunks straight into the .npy file) and 5 synthetic-benchmark captions per image."""
    from trainables.data.synth import SynthParams, caption, sample_scene

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    features = np.lib.format.open_memmap(root / "train_ims.npy.tmp", mode="w+", dtype=np.float32,
                                         shape=(images, REGIONS, FEATURE_DIM))
    for start in range(0, images, WRITE_CHUNK):
        stop = min(start + WRITE_CHUNK, images)
        features[start:stop] = rng.random((stop - start, REGIONS, FEATURE_DIM), dtype=np.float32)
    features.flush()
    del features
    params = SynthParams()
    scenes = (sample_scene(rng, params) for _ in range(images))
    lines = [caption(rng, scene, params.attribute_drop)
             for scene in scenes for _ in range(CAPTIONS_PER_IMAGE)]
    (root / "train_caps.txt").write_text("\n".join(lines) + "\n")
    os.replace(root / "train_ims.npy.tmp", root / "train_ims.npy")
    return root


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to drop ``path``'s clean pages (any user may; pages still mapped stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_share(path: Path) -> float | None:
    """Share of ``path``'s pages in the page cache (``mincore`` on a fresh, untouched mapping)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        pages = -(-mapped.size // os.sysconf("SC_PAGE_SIZE"))
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(mapped.ctypes.data), ctypes.c_size_t(mapped.size), vector) != 0:
            return None
        return float((np.frombuffer(vector, dtype=np.uint8) & 1).mean())
    except (OSError, AttributeError):
        return None


# -------------------------------------------------------------------------------------- the loader


def loader_pass(root: Path, tokenizer, workers: int, pin: bool, batch: int, batches: int,
                device: torch.device) -> dict:
    """One fresh loader: seconds to its first batch, then samples/s over ``batches`` more (each copied
    to ``device`` with ``device_batch`` when it is a GPU)."""
    from trainables.config import DataConfig
    from trainables.data import PrecompSplit, build_train_loader, device_batch, set_epoch

    split = PrecompSplit(root, "train")
    cfg = DataConfig(root=str(root), num_workers=workers, region_dropout=REGION_DROPOUT)
    loader = build_train_loader(cfg, split, tokenizer, batch, seed=0, pin_memory=pin)
    set_epoch(loader, 0)
    def consume(b: dict) -> dict:
        return device_batch(b, device, REGION_DROPOUT) if device.type == "cuda" else b

    start = time.perf_counter()
    iterator = iter(loader)
    consume(next(iterator))
    first = time.perf_counter() - start
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += len(consume(next(iterator))["image_ids"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = samples / (time.perf_counter() - start)
    del iterator, loader, split  # shuts the workers down and unmaps the file before the next cold pass
    gc.collect()
    return {"first_s": first, "rate": rate}


def rotated(names: list, rounds: int, measure) -> dict:
    """``{name: [measure(name) per round]}``; each round measures every name once, in an order that
    rotates per round, so drifting machine load hits all of them alike."""
    out: dict = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(measure(name))
    return out


def loader_table(root: Path, tokenizer, args, device: torch.device) -> tuple[list[dict], float]:
    """One cold pass per setting, then ``--rounds`` rotated warm passes of every setting and of the
    old per-item path; returns the rows and the per-item path's median warm samples/s."""
    pins = (False, True) if device.type == "cuda" else (False,)
    settings = [(workers, pin) for workers in args.workers for pin in pins]
    features = root / "train_ims.npy"
    cold = {}
    for workers, pin in settings:
        drop_page_cache(features)
        resident = resident_share(features)
        cold[workers, pin] = loader_pass(root, tokenizer, workers, pin, args.batch, args.batches, device)
        share = "?" if resident is None else f"{resident:.1%}"
        print(f"cold, workers {workers} pin {pin}: {cold[workers, pin]['rate']:,.0f} samples/s (first batch "
              f"{cold[workers, pin]['first_s']:.2f} s; {share} of the file cached before)", flush=True)

    def measure(setting):
        if setting == "per-item":
            # ~50x slower: a quarter of the batches keep the round short
            return {"rate": per_item_rate(root, tokenizer, args.batch, max(args.batches // 4, 2))}
        return loader_pass(root, tokenizer, *setting, args.batch, args.batches, device)

    warm = rotated([*settings, "per-item"], args.rounds, measure)
    rows = []
    for workers, pin in settings:
        passes = warm[workers, pin]
        rows.append({"workers": workers, "pin": pin, "cold": cold[workers, pin],
                     "warm": {"rate": statistics.median(p["rate"] for p in passes),
                              "first_s": statistics.median(p["first_s"] for p in passes)}})
        print(f"warm, workers {workers} pin {pin}: " + ", ".join(f"{p['rate']:,.0f}" for p in passes)
              + " samples/s", flush=True)
    per_item = [p["rate"] for p in warm["per-item"]]
    print("warm, old per-item path, 0 workers: " + ", ".join(f"{r:,.0f}" for r in per_item) + " samples/s")
    return rows, statistics.median(per_item)


# ---------------------------------------------------------------------- the old per-item path


class PerItemCaptions(Dataset):
    """The training dataset before ``device_batch``: item ``j`` = caption ``j``'s image copied to
    float32 on its own and region-dropped on the host (kept regions first), plus its caption."""

    def __init__(self, split, p: float):
        self.split, self.p = split, p

    def __getitem__(self, j: int) -> dict:
        i = self.split.image_of_caption(j)
        features = self.split.image(i)
        rng = np.random.default_rng([0, 0, j])
        keep = rng.random(features.shape[0]) >= self.p
        if not keep.any():
            keep[rng.integers(features.shape[0])] = True
        images = torch.zeros(features.shape, dtype=torch.float32)
        images[: int(keep.sum())] = torch.from_numpy(np.asarray(features[keep], dtype=np.float32))
        return {"images": images, "region_mask": torch.arange(features.shape[0]) < int(keep.sum()),
                "caption": self.split.caption(j), "image_id": i}


class StackCollate:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        tokens = self.tokenizer([item["caption"] for item in items], padding=True, truncation=True,
                                max_length=40, return_tensors="pt")
        return {"images": torch.stack([item["images"] for item in items]),
                "region_mask": torch.stack([item["region_mask"] for item in items]),
                "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                "image_ids": torch.tensor([item["image_id"] for item in items])}


def per_item_rate(root: Path, tokenizer, batch: int, batches: int) -> float:
    """Warm samples/s of the old per-item path, 0 workers (the same batches as the loader's)."""
    from trainables.data import PrecompSplit, UniqueImageBatchSampler

    split = PrecompSplit(root, "train")
    sampler = UniqueImageBatchSampler(split.n_images, split.captions_per_image, batch, seed=0)
    loader = DataLoader(PerItemCaptions(split, REGION_DROPOUT), batch_sampler=sampler,
                        collate_fn=StackCollate(tokenizer))
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    samples = sum(len(next(iterator)["image_ids"]) for _ in range(batches))
    return samples / (time.perf_counter() - start)


# --------------------------------------------------------------------------------- parts and the step


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def batch_parts(root: Path, tokenizer, batch: int, repeats: int) -> tuple[dict, dict]:
    """(milliseconds per batch of the gather, the tokenisation and ``device_batch`` on the CPU, warm;
    one host batch from the loader)."""
    from trainables.config import DataConfig
    from trainables.data import PrecompSplit, build_train_loader, device_batch
    from trainables.data.loader import CaptionText, gather_images

    split = PrecompSplit(root, "train")
    host = next(iter(build_train_loader(DataConfig(root=str(root)), split, tokenizer, batch, seed=0)))
    image_ids = host["image_ids"].numpy()
    captions = image_ids * CAPTIONS_PER_IMAGE
    text = CaptionText(split, tokenizer, 40)
    cpu = torch.device("cpu")
    parts = {"gather": median_ms(lambda: gather_images(split.images, image_ids), repeats),
             "tokenise": median_ms(lambda: text(captions), repeats),
             "device_batch": median_ms(lambda: device_batch(host, cpu, REGION_DROPOUT), repeats)}
    return parts, host


def step_batch(host: dict, hidden_size: int | None) -> dict:
    """``host`` through ``device_batch`` on the CPU; with ``hidden_size``, the token ids replaced by
    random cached hidden states ``[B, L, H]`` (what a frozen, cached encoder's batch carries)."""
    from trainables.data import device_batch

    batch = device_batch(host, torch.device("cpu"), REGION_DROPOUT)
    if hidden_size:
        gen = torch.Generator().manual_seed(0)
        batch["input_ids"] = torch.randn(*batch["attention_mask"].shape, hidden_size, generator=gen)
        batch["input_ids"] *= batch["attention_mask"].unsqueeze(-1)
    return batch


class KernelCounter(TorchDispatchMode):
    """Counts the ops that would each launch at least one GPU kernel (views launch none)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def count_step(stepper, batch: dict) -> tuple[float, int, int]:
    """(FLOPs, ops, GRU ops) of one full step as CUDA would run it: forward, backward, and grad clip +
    AdamW in their multi-tensor (foreach) form, CUDA's default. GRU ops: how many of the ops are the
    pooling's GRUs, which the CPU unrolls per time step and cuDNN runs as a few kernels each."""
    from torch.utils.flop_counter import FlopCounterMode

    model = stepper.model
    optimiser = torch.optim.AdamW(model.parameters(), foreach=True)
    grus = [m for m in model.modules() if isinstance(m, torch.nn.RNNBase)]
    inputs = []
    hooks = [gru.register_forward_hook(lambda module, args, out: inputs.append((module, args[0])))
             for gru in grus]
    with FlopCounterMode(display=False) as flops, KernelCounter() as kernels:
        loss = model.loss_terms(model(batch), batch["image_ids"], epoch=1).total()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0, foreach=True)
        optimiser.step()
    for hook in hooks:
        hook.remove()
    with KernelCounter() as gru_kernels:  # each GRU again, forward + backward, on the input it had
        for module, x in inputs:
            module(x.detach())[0].sum().backward()
    model.zero_grad(set_to_none=True)
    return flops.get_total_flops(), kernels.ops, gru_kernels.ops


def frozen_stepper(batch_size: int, frozen: bool):
    """(``Stepper`` of the base method with MiniLM, hidden size when ``frozen`` else None)."""
    from benchmarks._steps import Stepper
    from trainables.config import JobConfig, ModelConfig, TrainConfig

    job = JobConfig(method="base", model=ModelConfig(text_encoder="minilm", freeze_text=frozen),
                    train=TrainConfig(batch_size=batch_size))
    stepper = Stepper(job, FEATURE_DIM)
    return stepper, stepper.model.text_encoder.backbone.config.hidden_size if frozen else None


def step_figures(host: dict, batch_size: int, frozen: bool, steps: int) -> dict:
    """Median wall time of ``device_batch`` + one full step (``benchmarks._steps.Stepper``) on the
    CPU, and the step's FLOPs and kernel-launching ops."""
    stepper, hidden = frozen_stepper(batch_size, frozen)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        stepper.step(step_batch(host, hidden))
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    flops, ops, gru_ops = count_step(stepper, step_batch(host, hidden))
    return {"seconds": statistics.median(times), "best": min(times), "flops": flops, "ops": ops,
            "gru_ops": gru_ops}


def training_rate(root: Path, tokenizer, workers: int, batch_size: int, steps: int) -> float:
    """Samples/s of CPU training end to end (loader + ``device_batch`` + frozen-MiniLM step), warm,
    over ``steps`` steps after the first: whether loader workers pay for the CPU they take."""
    from trainables.config import DataConfig
    from trainables.data import PrecompSplit, build_train_loader, set_epoch

    stepper, hidden = frozen_stepper(batch_size, frozen=True)
    loader = build_train_loader(DataConfig(root=str(root), num_workers=workers), PrecompSplit(root, "train"),
                                tokenizer, batch_size, seed=0)
    set_epoch(loader, 0)
    iterator = iter(loader)
    stepper.step(step_batch(next(iterator), hidden))
    start = time.perf_counter()
    for _ in range(steps):
        stepper.step(step_batch(next(iterator), hidden))
    rate = steps * batch_size / (time.perf_counter() - start)
    del iterator, loader
    gc.collect()
    return rate


def gpu_step_seconds(step: dict, launch_us: float) -> float:
    """A GPU step's time, derived: the longer of launching its ops one by one (eager PyTorch; the
    GRUs' unrolled ops left out, as cuDNN runs them fused) and computing its FLOPs at the H200's
    dense bf16 peak. Both parts err fast, so the samples/s it implies err high."""
    return max((step["ops"] - step["gru_ops"]) * launch_us * 1e-6, step["flops"] / H200_BF16_DENSE_FLOPS)


# ---------------------------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30_000, help="train images (F30K has 29,000)")
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset directory, kept: reused if it holds the features, else written there "
                             "(default: a temp dir, removed at the end)")
    parser.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default=[0, 2, 4])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader pass")
    parser.add_argument("--steps", type=int, default=5, help="timed CPU steps (median; per round end to end)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rotated rounds of the warm and end-to-end runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the CPU step")
    parser.add_argument("--loader-threads", type=int, default=1,
                        help="torch threads while the loader is timed")
    parser.add_argument("--launch-us", type=float, default=10.0,
                        help="assumed host time per op of an eager PyTorch step on a GPU (dispatch + launch)")
    parser.add_argument("--record", default=None, help="append the figures (JSON lines) to this file")
    return parser.parse_args(argv)


def dataset(args: argparse.Namespace, scratch: Path) -> Path:
    root = args.data or scratch / "butd"
    if not (root / "train_ims.npy").is_file():
        check_disk(root, args.images)
        print(f"writing {args.images:,} x {REGIONS} x {FEATURE_DIM} float32 features "
              f"({feature_bytes(args.images) / 1e9:.1f} GB) to {root} ...", flush=True)
        write_butd(root, args.images)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from trainables.data import PrecompSplit
    from trainables.malloc import keep_freed_memory
    from trainables.text_models import load_tokenizer

    keep_freed_memory()  # as fit() does: large batch buffers are reused, not faulted in again
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    scratch = Path(tempfile.mkdtemp(prefix="itm-loader-"))
    try:
        root = dataset(args, scratch)
        images = PrecompSplit(root, "train").n_images
        tokenizer = load_tokenizer("minilm")
        load_before = os.getloadavg()[0]
        print(f"[{images:,} images x {REGIONS} x {FEATURE_DIM} float32, batch {args.batch}, "
              f"{os.cpu_count()} CPUs, device {device}, torch {torch.__version__}, load {load_before:.1f}]",
              flush=True)
        # One torch thread while the loader runs (a 1-CPU Ray trial's count): with two, OpenMP's
        # wake-ups on this loaded 2-core machine slowed the old per-item path's tiny ops ~100x.
        torch.set_num_threads(args.loader_threads)
        rows, before = loader_table(root, tokenizer, args, device)
        parts, host = batch_parts(root, tokenizer, args.batch, repeats=10)
        print("one batch, warm: " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()), flush=True)
        torch.set_num_threads(args.threads)
        steps = {frozen: step_figures(host, args.batch, frozen, args.steps) for frozen in (True, False)}
        for frozen, s in steps.items():
            print(f"CPU step ({'frozen+cached' if frozen else 'fine-tuned'} MiniLM, {args.threads} threads): "
                  f"median {s['seconds'] * 1e3:.0f} ms = {args.batch / s['seconds']:,.0f} samples/s, best "
                  f"{s['best'] * 1e3:.0f} ms = {args.batch / s['best']:,.0f} samples/s; "
                  f"{s['flops'] / 1e9:.1f} GFLOP and {s['ops']} kernel-launching ops per step "
                  f"({s['gru_ops']} of them the GRUs')", flush=True)
        runs = rotated(args.workers, args.rounds,
                       lambda w: training_rate(root, tokenizer, w, args.batch, args.steps))
        print("CPU training end to end (frozen MiniLM), per round: " + "; ".join(
            f"{w} workers " + ", ".join(f"{r:,.0f}" for r in rates) for w, rates in runs.items())
              + " samples/s")
        report(args, argv, images, rows, before, parts, steps, runs, load_before)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # a --data directory stays
    return 0


def report(args, argv, images: int, rows: list[dict], before: float, parts: dict, steps: dict,
           training: dict, load_before: float) -> None:
    cmd = command("benchmarks.loader", argv)
    size = f"{images:,} x {REGIONS} x {FEATURE_DIM} float32, batch {args.batch}"
    # The fastest frozen step: the most the CPU step consumes (load on this machine only slows it).
    step_rate = args.batch / steps[True]["best"]
    for row in rows:
        pin = f", pin_memory {row['pin']}" if row["pin"] else ""
        record(args.record, f"loader samples/s, {row['workers']} workers{pin} ({size})",
               f"cold {row['cold']['rate']:,.0f}, warm {row['warm']['rate']:,.0f} "
               f"(= {row['warm']['rate'] / step_rate:.1f}x the fastest frozen-MiniLM CPU step; first batch "
               f"{row['cold']['first_s']:.2f} s cold)", cmd)
    record(args.record, f"old per-item loader path, 0 workers, warm ({size})", f"{before:,.0f} samples/s",
           cmd)
    record(args.record, "one batch's parts, warm",
           ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()), cmd)
    for frozen, s in steps.items():
        name = "MiniLM frozen, hidden states cached" if frozen else "MiniLM fine-tuned"
        gpu = gpu_step_seconds(s, args.launch_us)
        record(args.record,
               f"CPU step, base, {name} ({args.threads} threads, batch {args.batch}, incl. device_batch)",
               f"median {s['seconds'] * 1e3:.0f} ms = {args.batch / s['seconds']:,.0f} samples/s; best "
               f"{s['best'] * 1e3:.0f} ms = {args.batch / s['best']:,.0f} samples/s", cmd)
        record(args.record, f"GPU step need, base, {name}, batch {args.batch} (derived, not measured: "
               f"max({s['ops'] - s['gru_ops']} ops counted here x {args.launch_us:g} us assumed per op, "
               f"{s['flops'] / 1e9:.1f} GFLOP counted here / 989 TFLOP/s H200 bf16 dense peak, NVIDIA "
               f"datasheet))",
               f"{gpu * 1e3:.1f} ms/step = {args.batch / gpu:,.0f} samples/s", cmd)
    record(args.record, f"CPU training end to end, base, MiniLM frozen + cached ({args.threads} threads, "
           f"batch {args.batch}; loader + device_batch + step)",
           "; ".join(f"{w} workers median {statistics.median(r):,.0f}, best {max(r):,.0f}"
                     for w, r in training.items()) + " samples/s", cmd)
    best = max(row["warm"]["rate"] for row in rows)
    print(f"target: loader >= {TARGET}x the fastest CPU step's {step_rate:,.0f} samples/s = "
          f"{TARGET * step_rate:,.0f}: "
          f"best warm {best:,.0f} ({'met' if best >= TARGET * step_rate else 'NOT met'}); "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    sys.exit(main())
