"""MLflow for an ablation: one parent run, one child run per row × seed (``TrialRuns`` with
row-aware run names, params and tags)."""

from __future__ import annotations

from pathlib import Path

from study import tracking


def row_params(plan) -> dict[str, dict[str, str]]:
    """Per row the flat params its child runs log: data/model/train, the row's method and section."""
    params = {}
    for name, job in plan.jobs.items():
        flat = tracking.flatten({k: job[k] for k in ("method", "data", "model", "train")})
        flat.update(tracking.flatten({job["method"]: job["method_params"]}))
        params[name] = flat
    return params


class AblationRuns(tracking.TrialRuns):
    """Children named ``<row> seed=<s>`` and tagged with variant, seed and the row's own method
    (the base row runs ``base`` inside a DIAS ablation). Completion and failure tags are inherited."""

    def __init__(self, plan, parent_run_id: str):
        study = plan.study
        super().__init__(study.tracking.uri, study.tracking.experiment, parent_run_id, study.name,
                         study.method, {}, study.train.epochs)
        self.row_params = row_params(plan)
        self.row_methods = {name: job["method"] for name, job in plan.jobs.items()}

    def run_name(self, config: dict, number: int) -> str:
        return f"{config['variant']} seed={int(config['seed'])}"

    def trial_tags(self, config: dict) -> dict[str, str]:
        variant = config["variant"]
        return {"kind": "ablation-trial", "method": self.row_methods[variant], "variant": variant,
                "seed": str(int(config["seed"]))}

    def trial_params(self, config: dict) -> dict[str, str]:
        variant = config["variant"]
        return {**self.row_params[variant], "train.seed": str(int(config["seed"])),
                "ablation.variant": variant}


def start_parent_run(plan, ablation_dir: Path, files: list[Path]) -> str:
    """The ablation's parent run: the resolved study, rows, seeds and (``--from-study``) the source."""
    tags = {"variants": ", ".join(r.name for r in plan.rows), "seeds": ", ".join(map(str, plan.seeds))}
    if plan.source:
        tags.update({"from_study": plan.source["from_study"], "from_trial_id": plan.source["trial_id"]})
    return tracking.start_parent_run(plan.study, plan.name, "ablation", ablation_dir, files, tags)


def log_outputs(uri: str, experiment: str, parent: str, files: list[Path], close: bool) -> None:
    """Attach the per-trial results and the three table formats; close the parent when finished."""
    client, _ = tracking.client_for(uri, experiment)
    for path in files:
        client.log_artifact(parent, str(path))
    if close:
        client.set_terminated(parent, "FINISHED")
