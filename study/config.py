"""The study file (SPEC.md "Study file"): one YAML validated with pydantic before Ray starts.

The worker-side sections (data, model, train) and each method's own section come from
``trainables``; this module adds the driver-side ones (search, resources, tracking, storage,
ablation), loads YAML, applies ``--set key=value`` overrides and turns every problem into one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PositiveInt, ValidationError, create_model, field_validator, model_validator

from trainables.config import DataConfig, JobConfig, ModelConfig, Section, TrainConfig
from trainables.errors import ConfigError
from trainables.text_models import RANDOM_BERTS
from trainables.methods import METHODS, get_method


JOB_SECTIONS = ("data", "model", "train")  # the study sections a worker receives as they are

# What the epoch loop reports each epoch (trainables/loop.py, trainables/evaluation.py), so what a
# search can optimise; "loss_<term>" and "budget/<term>" carry each method's own loss-term names.
REPORTED_METRICS = ("rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                    "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr", "loss", "lr", "epoch_time_s",
                    "gap_centroid_dist", "alignment", "uniformity_img", "uniformity_txt")
REPORTED_PREFIXES = ("loss_", "budget/")


Objective = dict[str, Literal["max", "min"]]  # one entry of a multi-objective metric: {name: mode}
WarmStartItem = Literal["defaults"] | dict[str, Any]  # the method's shipped defaults, or a partial config


def check_metric_name(metric: Any) -> str:
    if isinstance(metric, str) and (metric in REPORTED_METRICS or metric.startswith(REPORTED_PREFIXES)
                                    and metric not in REPORTED_PREFIXES):
        return metric
    raise ValueError(f"{metric!r} is not a metric the training loop reports; e.g. rsum, i2t_r1, t2i_r1, "
                     "loss, loss_<term>, gap_centroid_dist, alignment, epoch_time_s")


class PbtConfig(Section):
    """``search.pbt``: Population Based Training (``search.algorithm: pbt``; docs/search.md). The
    mutated values and their resample ranges are the search space's; these say when and how much."""

    perturbation_interval: PositiveInt = 1  # epochs between two exploit/explore steps of a trial
    burn_in: int = Field(0, ge=0)  # epochs before a trial's first exploit/explore step
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # the bottom share clones the top share
    resample_probability: float = Field(0.25, ge=0, le=1)  # else a value is multiplied by 1.2 or 0.8
    # Ray's default (False) exploits as each trial reports; True waits for the whole population at every
    # interval, so the bottom share always clones (what a small population needs to mutate at all).
    synch: bool = False


class SearchConfig(Section):
    space: str | None = None  # YAML search-space file; None = the method's shipped default; "none" = only `params`
    params: dict[str, Any] = Field(default_factory=dict)  # inline additions / overrides of the space
    algorithm: Literal["optuna-tpe", "random", "grid", "pbt"] = "optuna-tpe"
    num_samples: PositiveInt = 16  # trials; with pbt, the population
    # One metric (with `mode`), or several objectives, each with its own mode:
    # [rsum: max, gap_centroid_dist: min] (a Pareto study; `mode` is then not used).
    metric: str | list[Objective] = "rsum"
    mode: Literal["max", "min"] = "max"
    # With several objectives the default is fifo (docs/search.md): ASHA can rank on one metric only.
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(2.0, gt=1)
    seed: int = 0
    # TPE samples its first `startup_trials` trials at random before it models the space; None keeps
    # Optuna's default (10), which is most of a 16-trial budget.
    startup_trials: PositiveInt | None = None
    max_failures: int = Field(1, ge=0)  # retries of a failed trial before it is recorded as failed
    # Trials enqueued before the sampler's own: `defaults` (the method's shipped values of every searched
    # key) and/or partial configs {section.key: value}; the sampler fills in the rest.
    warm_start: list[WarmStartItem] | None = None
    pbt: PbtConfig = PbtConfig()

    @field_validator("metric", mode="before")
    @classmethod
    def _reported_metric(cls, metric: Any) -> Any:
        if not isinstance(metric, list):
            return check_metric_name(metric)
        if len(metric) < 2:
            raise ValueError("a list of objectives needs at least two, e.g. [rsum: max, gap_centroid_dist: min]; "
                             "for one metric write metric: rsum and mode: max")
        names = []
        for item in metric:
            if not (isinstance(item, dict) and len(item) == 1 and next(iter(item.values())) in ("max", "min")):
                raise ValueError(f"objective {item!r} is not one 'name: max' or 'name: min' pair")
            names.append(check_metric_name(next(iter(item))))
        if len(set(names)) < len(names):
            raise ValueError(f"objectives repeat a metric: {', '.join(names)}")
        return metric

    @field_validator("warm_start", mode="before")
    @classmethod
    def _warm_start_list(cls, value: Any) -> Any:
        """``warm_start: defaults`` is short for ``[defaults]``."""
        items = [value] if isinstance(value, (str, dict)) else value
        for item in items or []:
            if item != "defaults" and not isinstance(item, dict):
                raise ValueError(f"{item!r} is neither 'defaults' nor a partial config {{section.key: value}}")
        return items

    @model_validator(mode="before")
    @classmethod
    def _fifo_for_several_objectives(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("metric"), list) and "scheduler" not in data:
            return {**data, "scheduler": "fifo"}
        return data

    @model_validator(mode="after")
    def _algorithm_options(self):
        if self.startup_trials is not None and self.algorithm != "optuna-tpe":
            raise ValueError(f"startup_trials applies to algorithm optuna-tpe only, not {self.algorithm}")
        if self.algorithm == "pbt" and self.multi_objective:
            raise ValueError("PBT ranks a population by one metric: give search.metric one metric, or use "
                             "algorithm optuna-tpe for several objectives")
        if self.algorithm == "grid" and self.multi_objective:
            raise ValueError("several objectives need a sampler (optuna-tpe or random); a grid has none to steer")
        if self.warm_start and self.algorithm in ("grid", "pbt"):
            why = "a grid already runs every point" if self.algorithm == "grid" else \
                "PBT mutates its trials' values while they train, so a warm-start trial would not stay one"
            raise ValueError(f"warm_start applies to optuna-tpe and random ({why})")
        if self.algorithm != "pbt" and self.pbt != PbtConfig():
            raise ValueError(f"search.pbt applies to algorithm pbt, not {self.algorithm}")
        return self

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """``[(metric, mode), ...]``: one pair for a single metric."""
        if isinstance(self.metric, str):
            return [(self.metric, self.mode)]
        return [next(iter(item.items())) for item in self.metric]

    @property
    def multi_objective(self) -> bool:
        return not isinstance(self.metric, str)

    @property
    def primary(self) -> str:
        """The metric a single number is read from: the metric, or the first objective (what ASHA
        ranks on, what the report's history plot draws, the default ``--pick``)."""
        return self.objectives[0][0]

    @property
    def primary_mode(self) -> str:
        return self.objectives[0][1]


class ResourcesConfig(Section):
    workers_per_trial: PositiveInt = 1
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    use_gpu: bool = False  # shorthand: one GPU per worker unless gpus_per_worker says otherwise
    max_concurrent_trials: PositiveInt = 2

    @property
    def gpus(self) -> float:
        return self.gpus_per_worker or (1.0 if self.use_gpu else 0.0)

    @field_validator("gpus_per_worker")
    @classmethod
    def _possible_gpu_layout(cls, gpus: float, info) -> float:
        """Layouts Ray would place but training cannot use, refused before Ray starts: a share
        above one GPU that is not whole GPUs (Ray books 1.5, a process uses one GPU), and several
        DDP workers on fractions, which Ray puts on one GPU, where NCCL refuses to start."""
        if gpus > 1 and not float(gpus).is_integer():
            raise ValueError(f"{gpus:g} GPUs is neither a share of one GPU nor whole GPUs; "
                             "use a fraction up to 1 or a whole number")
        workers = info.data.get("workers_per_trial", 1)
        if 0 < gpus < 1 and workers > 1:
            raise ValueError(f"{workers} DDP workers on {gpus:g} GPU each would share one GPU, which NCCL "
                             "refuses; use gpus_per_worker: 1, or workers_per_trial: 1")
        return gpus


class TrackingConfig(Section):
    uri: str = "sqlite:///mlruns.db"
    experiment: str = "itm-study"


class StorageConfig(Section):
    path: str = "results"  # local dir, NFS path or s3:// (must be shared by all nodes of a cluster)


class AblationConfig(Section):
    variants: list[str] | None = None  # None = the method's registered ablation rows
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    # Which epoch's test metrics a run contributes: the one with the best validation rSum (what
    # papers report) or the last one.
    select: Literal["best_val", "final"] = "best_val"


def _method_sections() -> dict[str, Any]:
    return {name: (spec.section, spec.section()) for name, spec in METHODS.items() if spec.section}


class _StudyBase(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    method: str = "base"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    search: SearchConfig = SearchConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    ablation: AblationConfig = AblationConfig()

    @model_validator(mode="after")
    def _known_method(self):
        get_method(self.method)
        section = getattr(self, self.method, None)
        if section is not None:
            section.check_model(self.model)
        return self

    def method_params(self, method: str | None = None) -> dict:
        section = getattr(self, method or self.method, None)
        return section.model_dump(mode="json") if section is not None else {}

    def job(self) -> JobConfig:
        return JobConfig(method=self.method, data=self.data, model=self.model, train=self.train,
                         method_params=self.method_params())


# One field per registered method section (dias:, cdds:, ...), so a new method needs no edit here.
StudyConfig = create_model("StudyConfig", __base__=_StudyBase, **_method_sections())


def format_validation_error(err: ValidationError, source: str) -> str:
    """The first problem as one line: ``source: section.key: what is wrong``."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        parent = first["loc"][:-1]
        allowed = ", ".join(sorted(_allowed_keys(parent)))
        return f"{source}: unknown key '{where}'; allowed here: {allowed}"
    if first["type"] == "missing":
        return f"{source}: missing required key '{where}'"
    if not where:  # a check across keys (a model validator): its message names them
        return f"{source}: {message}"
    if isinstance(first.get("input"), dict):  # a check across a section's keys: its whole input is noise
        return f"{source}: {where}: {message}"
    return f"{source}: {where}: {message} (got {first.get('input')!r})"


def _allowed_keys(path: tuple) -> list[str]:
    model = StudyConfig
    for part in path:
        annotation = model.model_fields[str(part)].annotation
        model = annotation
    return list(model.model_fields)


def parse_override(item: str) -> tuple[list[str], Any]:
    key, equals, raw = item.partition("=")
    path = key.strip().split(".")
    if not equals or not all(part.strip() for part in path):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return [part.strip() for part in path], value


def set_dotted(raw: dict, values: dict[str, Any], source: str = "--set") -> dict:
    """The one merge of ``{"section.key": value}`` into a nested dict (a study file or a job).

    Missing sections are created; a path through a value that is not a section is a one-line
    error. ``raw`` is changed in place and returned; types are checked when it is validated.
    """
    for name, value in values.items():
        path = name.strip().split(".")
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: '{part}' in {name!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def apply_params(study, params: dict[str, Any], source: str = "search space"):
    """A validated copy of ``study`` with ``{"section.key": value}`` applied."""
    return validate(set_dotted(study.model_dump(mode="json"), params, source), source)


def job_with_params(job: dict, params: dict[str, Any]) -> JobConfig:
    """A job (``JobConfig`` as plain data) with a trial's ``{"section.key": value}`` applied: the
    method's own section lives in ``method_params`` on the worker side."""
    job = {**job, **{k: dict(job[k]) for k in ("data", "model", "train", "method_params")}}
    routed = {name if name.partition(".")[0] in JOB_SECTIONS else "method_params." + name.partition(".")[2]: value
              for name, value in params.items()}
    return JobConfig(**set_dotted(job, routed, "trial parameter"))


def read_yaml(path: Path, what: str = "study file") -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        state = "is empty" if raw is None else f"holds a {type(raw).__name__}"
        raise ConfigError(f"{path}: {state}, but a {what} is a YAML mapping of keys to values")
    return raw


def check_raw(raw: dict, model=None, prefix: str = "") -> tuple[str, str] | None:
    """What pydantic would let pass but is a mistake: a non-string key (``1:``), or a YAML boolean
    (``epochs: yes``) where a number is expected (pydantic turns true into 1).
    Returns ``(where, one-line problem)`` or None."""
    model = model or StudyConfig
    for key, value in raw.items():
        if not isinstance(key, str):
            return prefix.rstrip("."), f"key {prefix}{key!r} is not a name (keys are words like train: or epochs:)"
        field = model.model_fields.get(key)
        if field is None:
            continue  # an unknown key: pydantic names it and the allowed ones
        annotation = field.annotation
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, Section):
            problem = check_raw(value, annotation, f"{prefix}{key}.")
            if problem:
                return problem
        elif isinstance(value, bool) and _is_number(annotation):
            return (f"{prefix}{key}", f"{prefix}{key}: expected a number, got the YAML boolean {value!r} "
                                      "(yes/no/on/off read as true/false)")
    return None


def _is_number(annotation) -> bool:
    """int / float fields, optional or not (``PositiveInt | None``), but not ``bool`` ones."""
    args = getattr(annotation, "__args__", None) or (annotation,)
    return any(arg in (int, float) for arg in args) and bool not in args


def validate(raw: dict, source: str, overrides: dict[str, str] | None = None):
    """Validate a raw study dict; paths become absolute (Tune trials and Ray Jobs change the cwd).

    ``overrides``: ``{"section.key": "--set section.key=value"}``: a problem at one of those keys is
    blamed on that ``--set``, not on ``source``.
    """
    overrides = overrides or {}
    problem = check_raw(raw)
    if problem:
        raise ConfigError(f"{_blame(problem[0], source, overrides)}: {problem[1]}")
    try:
        study = StudyConfig(**raw)
    except ValidationError as err:
        where = ".".join(str(part) for part in err.errors()[0]["loc"])
        raise ConfigError(format_validation_error(err, _blame(where, source, overrides))) from None
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return absolutise(study)


def _blame(where: str, source: str, overrides: dict[str, str]) -> str:
    """The ``--set`` that set ``where`` (or a section above or below it), else ``source``."""
    for key, option in overrides.items():
        if where and (where == key or where.startswith(key + ".") or key.startswith(where + ".")):
            return option
    return source


def load_study(path: str | Path, overrides: list[str] = ()):
    """The study file with ``--set`` overrides, validated; a problem caused by a ``--set`` names it."""
    path = Path(path)
    raw = read_yaml(path)
    options = {}
    for item in overrides:
        key, value = parse_override(item)
        options[".".join(key)] = f"--set {item}"
        set_dotted(raw, {".".join(key): value}, f"--set {item!r}")
    try:
        return validate(raw, str(path), options)
    except ConfigError as err:
        # A check across keys has no key to blame: if the file passes alone, the --set options did it.
        if options and str(err).startswith(f"{path}: "):
            culprit = _culprit(path, overrides)
            if culprit:
                raise ConfigError(f"--set {culprit}: {str(err).removeprefix(f'{path}: ')}") from None
        raise


def _culprit(path: Path, overrides: list[str]) -> str | None:
    """The ``--set`` without which the study file validates (a check across keys names no key)."""
    parsed = [(item, ".".join(key), value) for item in overrides for key, value in [parse_override(item)]]
    for item, _, _ in parsed:
        raw = set_dotted(read_yaml(path), {key: value for other, key, value in parsed if other is not item})
        try:
            validate(raw, str(path))
        except ConfigError:
            continue
        return item
    return None


def absolutise(study):
    data = study.data.model_copy(update={"root": str(Path(study.data.root).expanduser().resolve())})
    storage_path = study.storage.path
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).expanduser().resolve())
    uri = study.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    model = study.model
    if model.text_encoder != "minilm" and model.text_encoder not in RANDOM_BERTS:  # a local directory: workers have another cwd
        model = model.model_copy(update={"text_encoder": str(Path(model.text_encoder).expanduser().resolve())})
    return study.model_copy(update={
        "data": data,
        "model": model,
        "storage": study.storage.model_copy(update={"path": storage_path}),
        "tracking": study.tracking.model_copy(update={"uri": uri}),
    })
