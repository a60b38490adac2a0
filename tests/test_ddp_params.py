"""DDP without ``find_unused_parameters`` (``trainables/distributed.py`` ``wrap_ddp``): every method,
switch and ablation row builds only parameters its loss reaches, text encoders carry no pooler, and
two gloo ranks train every shipped study that way; each rank draws its own noise.

DDP's "unused parameter" is one that gets no gradient in a step, i.e. ``grad is None`` after one
backward, which is what the single-process test checks. The two-rank steps (``train_shipped``) run
inside ``tests/test_distributed.py``'s gloo processes, which start anyway, with a model that has an
unused parameter as the control that they would fail.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch

from tests.test_distributed import IMAGE_DIM, global_batch, half
from trainables.config import JobConfig, ModelConfig, TrainConfig
from trainables.distributed import rank_seed, wrap_ddp
from trainables.loop import TrainStep
from trainables.methods import METHODS, build_model, get_method

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def switch_variants(method: str) -> list[tuple[str, dict]]:
    """The section's defaults, each boolean flipped, each other value of a choice, and every
    ablation row of the method: one thing changed at a time."""
    spec = get_method(method)
    variants = [("default", {})]
    if spec.section is None:
        return variants
    for name, field in spec.section.model_fields.items():
        if field.annotation is bool:
            variants.append((f"{name}={not field.default}", {name: not field.default}))
        elif typing.get_origin(field.annotation) is typing.Literal:
            variants += [(f"{name}={value}", {name: value}) for value in typing.get_args(field.annotation)
                         if value != field.default]
    return variants + [(row.name, row.overrides) for row in spec.ablations if row.method == method]


CASES = [(method, label, overrides, train, model)
         for method in METHODS for label, overrides in switch_variants(method)
         for train, model in [({"loss": "triplet"}, {})]
         + ([({"loss": "infonce"}, {}), ({}, {"freeze_text": True})] if label == "default" else [])]


def tiny_job(method: str, overrides: dict, train: dict | None = None, model: dict | None = None) -> JobConfig:
    spec = get_method(method)
    params = spec.parse_section(overrides).model_dump() if spec.section else {}
    return JobConfig(method=method, model=ModelConfig(text_encoder="tiny", embed_dim=32, **(model or {})),
                     train=TrainConfig(**(train or {})), method_params=params)


@pytest.mark.parametrize("method, label, overrides, train, model", CASES,
                         ids=["-".join([c[0], c[1], *map(str, {**c[3], **c[4]}.values())]) for c in CASES])
def test_every_parameter_gets_a_gradient(method, label, overrides, train, model):
    torch.manual_seed(0)
    built = build_model(tiny_job(method, overrides, train, model), IMAGE_DIM).train()
    batch = half(global_batch(), 0)
    TrainStep(built)(batch, 1).total().backward()
    unused = [name for name, p in built.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == [], f"{method} {label}: DDP without find_unused_parameters would fail on {unused}"


def test_minilm_loads_without_its_pooler_and_without_a_load_report(capfd):
    from trainables.text_models import load_text_model

    model = load_text_model("minilm")
    assert model.pooler is None and not [n for n, _ in model.named_parameters() if "pooler" in n]
    assert "LOAD REPORT" not in capfd.readouterr().err
    out = model(input_ids=torch.tensor([[101, 2000, 102]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert out.last_hidden_state.shape == (1, 3, 384)


class Stop(Exception):
    pass


@pytest.mark.parametrize("rank", [0, 1])
def test_fit_reseeds_every_rank_but_0_once_the_model_is_built(rank, smoke_study, monkeypatch):
    """Identical initial weights on every rank, then rank r > 0 draws from ``rank_seed(seed, r)``
    (CDDS's noise and dropout were the same on every rank); rank 0 draws as a one-process run."""
    from trainables import loop

    calls = []
    monkeypatch.setattr(loop, "seed_everything", lambda seed: calls.append(("seed", seed)))
    build = loop.build_model
    monkeypatch.setattr(loop, "build_model", lambda *a: calls.append(("build",)) or build(*a))

    class Reporter:  # stops fit once the optimizer exists, before any data is loaded for training
        world_size = 2

        def latest_checkpoint(self):
            raise Stop

    Reporter.rank = rank
    job = smoke_study("method=cdds", "train.seed=5").job()
    with pytest.raises(Stop):
        loop.fit(job, Reporter())
    assert calls == [("seed", 5), ("build",)] + ([("seed", rank_seed(5, rank))] if rank else [])


def test_rank_seeds_keep_rank_0_and_differ_across_ranks():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, rank) for rank in range(1, 9)} | {rank_seed(8, 1), rank_seed(-1, 1)}
    assert len(seeds) == 10 and 7 not in seeds
    assert rank_seed(7, 1) == rank_seed(7, 1)  # the same in every process


def shipped_jobs() -> dict[str, JobConfig]:
    """Every shipped study's method, section and loss at test size (tiny encoder, embed_dim 32),
    once each (three studies run DIAS alike)."""
    from study.config import load_study

    jobs = {}
    for path in sorted(STUDIES.glob("*.yaml")):
        small = ["model.text_encoder=tiny", "model.embed_dim=32", "model.freeze_text=false"]
        job = load_study(path, small).job()
        what = (job.method, repr(job.method_params), job.train.loss, job.model.pooling)
        jobs.setdefault(what, (path.stem, job))
    return dict(jobs.values())


class UnusedParameter(torch.nn.Module):
    """The control: a step that leaves one parameter without a gradient."""

    def __init__(self, model):
        super().__init__()
        self.step, self.unused = TrainStep(model), torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch, epoch):
        return self.step(batch, epoch)


def ddp_steps(net: torch.nn.Module, batch: dict) -> None:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(2):  # DDP finds an unused parameter when the next step starts
        optimizer.zero_grad(set_to_none=True)
        net(batch, 1).total().backward()
        optimizer.step()


def train_shipped(method: str, rank: int) -> dict:
    """Inside a gloo rank (``tests/test_distributed.py`` spawns them, so no extra start-up): two DDP
    steps of every shipped study of ``method`` through ``wrap_ddp``, as ``fit`` seeds them, and for
    ``base`` the control. Returns each study's parameters after the steps and the control's error."""
    torch.set_default_dtype(torch.float32)
    batch = half(global_batch(), rank)
    result = {"trained": {}, "control": ""}
    for name, job in shipped_jobs().items():
        if job.method != method:
            continue
        torch.manual_seed(job.train.seed)
        model = build_model(job, IMAGE_DIM).train()
        torch.manual_seed(rank_seed(job.train.seed, rank))
        ddp_steps(wrap_ddp(TrainStep(model), torch.device("cpu")), batch)
        result["trained"][name] = [p.detach().clone() for p in model.parameters()]
    if method == "base":
        torch.manual_seed(0)
        control = wrap_ddp(UnusedParameter(build_model(tiny_job("base", {}), IMAGE_DIM)), torch.device("cpu"))
        try:
            ddp_steps(control, batch)
        except RuntimeError as err:
            result["control"] = str(err)
    return result


def check_shipped(method: str, ranks: list[dict]) -> None:
    """Both ranks trained every shipped study of ``method`` and kept equal replicas; the control (an
    unused parameter) is what DDP without ``find_unused_parameters`` refuses."""
    expected = sorted(name for name, job in shipped_jobs().items() if job.method == method)
    for result in ranks:
        assert sorted(result["trained"]) == expected and expected
        if method == "base":
            assert "finished reduction" in result["control"], result["control"]
    for name in expected:
        replicas = zip(ranks[0]["trained"][name], ranks[1]["trained"][name])
        assert all(torch.equal(a, b) for a, b in replicas), name


def test_the_shipped_studies_cover_every_method():
    assert {job.method for job in shipped_jobs().values()} == set(METHODS)
