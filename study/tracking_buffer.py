"""MLflow writes that survive a tracking outage: an ``Outbox`` sends each write at once while MLflow
answers, and otherwise appends it to a buffer in the study folder and sends it later, in order.

A tracking server is a side service: when it goes away for longer than MLflow's client retries
(≈ 4 min by default), its ``create_run`` used to raise inside Tune's callback and end the study. Here
every write is an *event* (a JSON line): create a run, log params / metrics / tags, set a status,
log an artifact, fail the open runs of a parent. While MLflow is unreachable, events go to
``FOLDER/mlflow_buffer.jsonl``; every ``RETRY_AFTER_S`` a later event tries to send the buffer, and
``python -m study sync DIR`` sends whatever is left after the study. Sending is idempotent, so a
sync may run twice or crash half-way:

- a run created from the buffer carries a ``run_key`` tag; before creating it, sync looks for a run
  with that tag, and ``mlflow_buffer.json`` maps each key to its real run id;
- metrics keep the time they were measured, and MLflow drops a metric whose key, step, time and value
  are already stored; params are sent with the same value again (accepted); tags and statuses are
  plain overwrites.

A run created while MLflow was away is known by its key (``pending-…``) until it is sent; every
event that names a run (the child's ``mlflow.parentRunId`` tag too) may hold such a key.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

BUFFER_FILE = "mlflow_buffer.jsonl"  # the events, one JSON object a line, append-only
STATE_FILE = "mlflow_buffer.json"  # {"uri", "experiment", "sent": lines sent, "ids": key -> run id, "rejected"}
LOCK_FILE = "mlflow_buffer.lock"
KEY_PREFIX = "pending-"  # a run created while MLflow was unreachable, until it is sent
KEY_TAG = "run_key"  # every run an Outbox creates: finds it again instead of creating it twice
PARENT_TAG = "mlflow.parentRunId"
RETRY_AFTER_S = 30.0  # while MLflow is away, try to send the buffer at most this often
# MLflow's client retries a refused connection 7 times with backoff (≈ 4 min) and waits 120 s for an
# answer; with a buffer behind it one short try is enough: one immediate retry (urllib3 waits before
# the second retry only; with 2 retries every try cost Tune's loop 2–2.7 s, measured), 5 s to answer.
# Applied only around our own calls (``short_retries``).
SHORT_BUDGET = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# A server that answers with one of these refused the event itself: sending it again cannot help.
REJECTED = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_STATE",
                      "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"})
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 500  # MLflow's caps for one log_batch

log = logging.getLogger(__name__)


class NotYetCreated(Exception):
    """An event names a run whose creation has not been sent yet (e.g. from another buffer)."""


@contextmanager
def short_retries():
    """MLflow's HTTP retry budget cut to ``SHORT_BUDGET`` for the calls inside (read per request)."""
    saved = {name: os.environ.get(name) for name in SHORT_BUDGET}
    os.environ.update(SHORT_BUDGET)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def rejected(err: BaseException) -> bool:
    """True when MLflow answered and refused the write (a bad value), False for an outage."""
    return isinstance(err, MlflowException) and err.error_code in REJECTED


def outage(err: BaseException) -> bool:
    """MLflow did not answer (refused connection, timeout, server or database error)."""
    if isinstance(err, (MlflowException, OSError)):
        return not rejected(err)
    return type(err).__module__.split(".")[0] in ("requests", "urllib3", "sqlalchemy")


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300]


def now_ms() -> int:
    return int(time.time() * 1000)


def client_for(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    from study.tracking import client_for as open_client  # study.tracking imports this module

    return open_client(uri, experiment)


def fail_open(client: MlflowClient, experiment_id: str, parent: str, error: str = "",
              end_time: int | None = None) -> list[str]:
    """Set FAILED on ``parent`` (if still RUNNING) and on each of its children still RUNNING; the
    parent's ``error`` tag says why. Returns the run ids it marked."""
    marked = []
    children = client.search_runs([experiment_id], filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent}' and attributes.status = 'RUNNING'"))
    for run in children:
        client.set_terminated(run.info.run_id, "FAILED", end_time)
        marked.append(run.info.run_id)
    if client.get_run(parent).info.status == "RUNNING":
        if error:
            client.set_tag(parent, "error", error[:500])
        client.set_terminated(parent, "FAILED", end_time)
        marked.append(parent)
    return marked


class Outbox:
    """MLflow writes for one study folder that never raise: sent now, or buffered and sent later.

    ``folder`` is where the buffer lives (the study directory); without one, a temporary folder is
    made the first time something must be kept. Every method returns quickly while MLflow is away:
    one short try, then nothing but appends until ``RETRY_AFTER_S`` has passed.
    """

    def __init__(self, uri: str, experiment: str, folder: str | Path | None = None):
        self.uri, self.experiment = uri, experiment
        self.folder = Path(folder) if folder is not None else None
        self._reset()

    def _reset(self) -> None:
        self._client = self._experiment_id = None
        self._retry_at = 0.0  # no direct sends and no flushes before this time (after a failure)
        self._away = False  # said that MLflow is unreachable, not yet that it is back
        self._state: dict | None = None  # the state file's content, as last read or written
        self._pending: int | None = None  # events kept and not sent (None: count them)

    def __getstate__(self):  # pickled inside Tune's experiment state: no client, no timers
        return {"uri": self.uri, "experiment": self.experiment, "folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def attach(self, folder: str | Path) -> None:
        """Keep the buffer in ``folder`` from now on (unless one already holds events)."""
        if self.folder is None or not self.pending():
            self.folder, self._state, self._pending = Path(folder), None, None

    # ----------------------------------------------------------------------------------------------
    # The writes
    # ----------------------------------------------------------------------------------------------

    def create_run(self, name: str, tags: dict[str, str], start_time: int | None = None) -> str:
        """A new run; returns its id, or its key (``pending-…``) if MLflow is unreachable now."""
        key = KEY_PREFIX + uuid.uuid4().hex
        return self.submit({"op": "create_run", "key": key, "name": name, "tags": tags,
                            "start_time": start_time or now_ms()}) or key

    def log(self, run: str, params: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
            step: int = 0, tags: dict[str, str] | None = None) -> None:
        """Params, metrics (at ``step``, stamped now) and tags of ``run`` in one event."""
        self.submit({"op": "log", "run": run, "params": params or {}, "metrics": metrics or {}, "step": step,
                     "time": now_ms(), "tags": tags or {}})

    def set_status(self, run: str, status: str) -> None:
        """``RUNNING`` again (a resumed run), or a terminal status (FINISHED, FAILED, KILLED)."""
        self.submit({"op": "status", "run": run, "status": status, "time": now_ms()})

    def log_artifact(self, run: str, path: str | Path) -> None:
        self.submit({"op": "artifact", "run": run, "path": str(Path(path).resolve())})

    def fail_open(self, parent: str, error: str = "") -> None:
        """``fail_open`` on ``parent``: FAILED on it and on its children still RUNNING."""
        self.submit({"op": "fail_open", "run": parent, "error": error, "time": now_ms()})

    # ----------------------------------------------------------------------------------------------
    # Send now or keep
    # ----------------------------------------------------------------------------------------------

    def submit(self, event: dict) -> str | None:
        """Send ``event`` if nothing is waiting before it, else append it and try the buffer (at most
        every ``RETRY_AFTER_S``). Returns the run id of a run created now. Never raises."""
        try:
            if not self.pending() and time.time() >= self._retry_at:
                try:
                    with short_retries():
                        return self.send(event, dict(self.state()["ids"]), replay=False)
                except Exception as err:  # noqa: BLE001 — every MLflow failure is handled below
                    if not (outage(err) or isinstance(err, NotYetCreated)):
                        self.warn_rejected(event, err)
                        return None
                    self.went_away(err)
            self.append(event)
            if time.time() >= self._retry_at:
                self.flush()
        except Exception as err:  # noqa: BLE001 — a tracking write must never stop a study
            log.warning("MLflow event %s not recorded: %s", event.get("op"), one_line(err))
        return None

    def went_away(self, err: BaseException) -> None:
        """Say once that MLflow went away; no sends before ``RETRY_AFTER_S`` from now."""
        if not self._away and not isinstance(err, NotYetCreated):
            print(f"MLflow at {self.uri} is unreachable ({one_line(err)[:160]}); keeping its events in "
                  f"{self.buffer_path()}, retrying every {RETRY_AFTER_S:.0f} s", file=sys.stderr, flush=True)
            self._away = True
        self._retry_at = time.time() + RETRY_AFTER_S
        self._client = self._experiment_id = None  # reopened (and the experiment looked up) next time

    def warn_rejected(self, event: dict, err: BaseException) -> None:
        print(f"MLflow refused a {event['op']} event ({one_line(err)}); left out", file=sys.stderr, flush=True)

    def flush(self, force: bool = False) -> bool:
        """Send the buffered events in order; True when none is left. Stops at the first outage
        (and waits ``RETRY_AFTER_S`` before the next try, unless ``force``)."""
        if self.folder is None or not (self.folder / BUFFER_FILE).exists():
            return True
        if not force and time.time() < self._retry_at:
            return False
        with self.locked():
            state, events = self.read_state(), self.read_events()
            first = state["sent"]
            try:
                with short_retries():
                    for index in range(first, len(events)):
                        try:
                            self.send(events[index], state["ids"], replay=True)
                        except Exception as err:  # noqa: BLE001
                            if outage(err) or isinstance(err, NotYetCreated):
                                raise
                            state["rejected"].append({"event": index, "error": one_line(err)})
                            self.warn_rejected(events[index], err)
                        state["sent"] = index + 1
                        self.write_state(state)
            except Exception as err:  # noqa: BLE001 — an outage: keep the rest for later
                self._pending = len(events) - state["sent"]
                self.went_away(err)
                return False
        self._pending, self._retry_at = 0, 0.0
        if self._away and len(events) > first:
            print(f"MLflow at {self.uri} is back: sent {len(events) - first} kept events", file=sys.stderr,
                  flush=True)
        self._away = False
        return True

    def send(self, event: dict, ids: dict[str, str], replay: bool) -> str | None:
        """One event to MLflow; ``ids`` maps keys to run ids (and learns the runs created here).
        ``replay``: the event may have been sent before (look for its run before creating it).
        Returns the run id of a created run."""
        op = event["op"]
        if op == "create_run":
            return self.send_create(event, ids, replay)
        run = self.resolve(event["run"], ids)
        client = self.client()
        if op == "log":
            params = [Param(k, str(v)) for k, v in event["params"].items()]
            metrics = [Metric(k, float(v), event["time"], event["step"]) for k, v in event["metrics"].items()]
            tags = [RunTag(k, str(v)) for k, v in event["tags"].items()]
            for start in range(0, len(params), PARAMS_PER_BATCH):
                client.log_batch(run, params=params[start:start + PARAMS_PER_BATCH])
            for start in range(0, len(metrics), METRICS_PER_BATCH):
                client.log_batch(run, metrics=metrics[start:start + METRICS_PER_BATCH])
            if tags:
                client.log_batch(run, tags=tags)
        elif op == "status":
            if event["status"] == "RUNNING":
                client.update_run(run, status="RUNNING")
            else:
                client.set_terminated(run, event["status"], event["time"])
        elif op == "artifact":
            client.log_artifact(run, event["path"])
        elif op == "fail_open":
            fail_open(client, self.experiment_id(), run, event["error"], event["time"])
        else:
            raise ValueError(f"unknown MLflow buffer event {op!r}")
        return None

    def send_create(self, event: dict, ids: dict[str, str], replay: bool) -> str:
        key = event["key"]
        if key in ids:
            return ids[key]
        found = self.find_key(key) if replay else None
        if found is None:
            tags = {**event["tags"], KEY_TAG: key}
            if tags.get(PARENT_TAG, "").startswith(KEY_PREFIX):
                tags[PARENT_TAG] = self.resolve(tags[PARENT_TAG], ids)
            found = self.client().create_run(self.experiment_id(), start_time=event["start_time"], tags=tags,
                                             run_name=event["name"]).info.run_id
        ids[key] = found
        return found

    def resolve(self, run: str, ids: dict[str, str]) -> str:
        """A run id for ``run`` (an id, or a key sent here, in another buffer, or by a sync)."""
        if not run.startswith(KEY_PREFIX):
            return run
        if run not in ids:
            found = self.find_key(run)
            if found is None:
                raise NotYetCreated(f"run {run} is not in MLflow yet")
            ids[run] = found
        return ids[run]

    def find_key(self, key: str) -> str | None:
        runs = self.client().search_runs([self.experiment_id()], filter_string=f"tags.{KEY_TAG} = '{key}'",
                                         max_results=1)
        return runs[0].info.run_id if runs else None

    def client(self) -> MlflowClient:
        if self._client is None:
            self._client, self._experiment_id = client_for(self.uri, self.experiment)
        return self._client

    def experiment_id(self) -> str:
        self.client()
        return self._experiment_id

    # ----------------------------------------------------------------------------------------------
    # The buffer files
    # ----------------------------------------------------------------------------------------------

    def buffer_path(self) -> Path:
        if self.folder is None:  # nothing said where: keep the events anyway
            self.folder = Path(tempfile.mkdtemp(prefix="mlflow-buffer-"))
        return self.folder / BUFFER_FILE

    @contextmanager
    def locked(self):
        """One writer at a time (the study's driver and a ``study sync`` may both send)."""
        self.buffer_path().parent.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(self, event: dict) -> None:
        with self.locked():
            if not (self.folder / STATE_FILE).exists():
                self.write_state(self.read_state())  # records where the events go
            with open(self.buffer_path(), "a") as handle:
                handle.write(json.dumps(event) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        self._pending = None if self._pending is None else self._pending + 1

    def read_events(self) -> list[dict]:
        path = self.folder / BUFFER_FILE if self.folder else None
        if path is None or not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def read_state(self) -> dict:
        path = self.folder / STATE_FILE if self.folder else None
        stored = json.loads(path.read_text()) if path is not None and path.exists() else {}
        self._state = {"uri": self.uri, "experiment": self.experiment, "sent": 0, "ids": {}, "rejected": [],
                       **stored}
        return self._state

    def write_state(self, state: dict) -> None:
        path = self.folder / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)  # a crash leaves the old state or the new one, never half of one
        self._state = state

    def state(self) -> dict:
        return self._state if self._state is not None else self.read_state()

    def pending(self) -> int:
        """Events kept and not sent yet (counted once, then kept up to date by this process; a
        ``study sync`` running meanwhile can only make the true count smaller)."""
        if self._pending is None:
            if self.folder is None or not (self.folder / BUFFER_FILE).exists():
                return 0
            self._pending = max(0, len(self.read_events()) - self.read_state()["sent"])
        return self._pending

    def resolved(self, run: str) -> str:
        """``run``'s id once its creation was sent, here or by a ``study sync`` (else the key itself)."""
        if not run.startswith(KEY_PREFIX):
            return run
        return self.state()["ids"].get(run) or self.read_state()["ids"].get(run, run)

    def close(self) -> str | None:
        """Try the buffer once more; the one line to print if events are still kept, else None."""
        if self.flush(force=True):
            return None
        return (f"MLflow at {self.uri} was unreachable: {self.pending()} events kept in {self.buffer_path()}; "
                f"send them with `python -m study sync {self.folder}`")


def buffers_under(directory: str | Path) -> list[Path]:
    """The folders below ``directory`` (itself included) holding an MLflow buffer, shallowest first:
    an ablation's parent run is created before its row searches' children name it."""
    found = {path.parent for path in Path(directory).rglob(BUFFER_FILE)}
    return sorted(found, key=lambda folder: (len(folder.parts), str(folder)))


def sync(directory: str | Path, uri: str | None = None) -> list[tuple[Path, int, int, str]]:
    """Send every buffer under ``directory`` (to ``uri`` if given, else where each was meant to go).
    Returns ``(folder, events sent now, events still kept, uri)`` per buffer."""
    outcomes = []
    for folder in buffers_under(directory):
        stored = json.loads((folder / STATE_FILE).read_text()) if (folder / STATE_FILE).exists() else {}
        if "experiment" not in stored:
            continue  # a buffer that never recorded where it goes holds no events either
        outbox = Outbox(uri or stored["uri"], stored["experiment"], folder)
        before = outbox.pending()
        outbox.flush(force=True)
        left = outbox.pending()
        outcomes.append((folder, before - left, left, outbox.uri))
    return outcomes
