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
from trainables.methods import METHODS, get_method


JOB_SECTIONS = ("data", "model", "train")  # the study sections a worker receives as they are

# What the epoch loop reports each epoch (trainables/loop.py, trainables/evaluation.py), so what a
# search can optimise; "loss_<term>" and "budget/<term>" carry each method's own loss-term names.
REPORTED_METRICS = ("rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                    "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr", "loss", "lr", "epoch_time_s",
                    "gap_centroid_dist", "alignment", "uniformity_img", "uniformity_txt")
REPORTED_PREFIXES = ("loss_", "budget/")


class SearchConfig(Section):
    space: str | None = None  # YAML search-space file; None = the method's shipped default; "none" = only `params`
    params: dict[str, Any] = Field(default_factory=dict)  # inline additions / overrides of the space
    algorithm: Literal["optuna-tpe", "random", "grid"] = "optuna-tpe"
    num_samples: PositiveInt = 16
    metric: str = "rsum"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(2.0, gt=1)
    seed: int = 0
    # TPE samples its first `startup_trials` trials at random before it models the space; None keeps
    # Optuna's default (10), which is most of a 16-trial budget.
    startup_trials: PositiveInt | None = None
    max_failures: int = Field(1, ge=0)  # retries of a failed trial before it is recorded as failed

    @field_validator("metric")
    @classmethod
    def _reported_metric(cls, metric: str) -> str:
        if metric in REPORTED_METRICS or metric.startswith(REPORTED_PREFIXES) and metric not in REPORTED_PREFIXES:
            return metric
        raise ValueError(f"{metric!r} is not a metric the training loop reports; e.g. rsum, i2t_r1, t2i_r1, "
                         "loss, loss_<term>, gap_centroid_dist, alignment")

    @model_validator(mode="after")
    def _startup_trials_need_tpe(self):
        if self.startup_trials is not None and self.algorithm != "optuna-tpe":
            raise ValueError(f"startup_trials applies to algorithm optuna-tpe only, not {self.algorithm}")
        return self


class ResourcesConfig(Section):
    workers_per_trial: PositiveInt = 1
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    use_gpu: bool = False  # shorthand: one GPU per worker unless gpus_per_worker says otherwise
    max_concurrent_trials: PositiveInt = 2

    @property
    def gpus(self) -> float:
        return self.gpus_per_worker or (1.0 if self.use_gpu else 0.0)


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
    if model.text_encoder not in ("minilm", "tiny"):  # a local checkpoint directory: workers have another cwd
        model = model.model_copy(update={"text_encoder": str(Path(model.text_encoder).expanduser().resolve())})
    return study.model_copy(update={
        "data": data,
        "model": model,
        "storage": study.storage.model_copy(update={"path": storage_path}),
        "tracking": study.tracking.model_copy(update={"uri": uri}),
    })
