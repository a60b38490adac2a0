"""Start or join Ray from the driver: the same code on a laptop, a GPU box and a cluster.

Joining fails in one line when nothing answers at the address, a study whose workers no node could
ever hold is refused instead of PENDING forever, and SIGTERM stops the driver the way Ctrl+C does,
resumable (docs/cluster.md "When things go wrong").
"""

from __future__ import annotations

import math
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

import ray
from ray.exceptions import AuthenticationError

from trainables.errors import ConfigError

PROBE_TIMEOUT_S = 5.0  # a head that does not accept a TCP connection within this is not there
# Ray retries joining ~20 times for ~40 s each when nothing speaks GCS at the address; once is
# enough to tell (a port that accepts TCP but is not a Ray head: ~40 s, then one line).
JOIN_ATTEMPTS = "1"
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
ADDRESS = re.compile(r"^(?:(?P<client>ray)://)?(?P<host>\[[^\]]+\]|[^:/\s]+)(?::(?P<port>\d+))?$")

AUTOSCALING_ENV = "ITM_AUTOSCALING"  # 1: the cluster adds nodes on demand, so wait instead of refusing
AUTOSCALING_WAIT_ENV = "ITM_AUTOSCALING_WAIT_S"
AUTOSCALING_WAIT_S = 600.0  # how long to wait for the autoscaler to add a node the trials fit on
POLL_S = 5.0

STOP = threading.Event()  # set by SIGINT/SIGTERM: the run that ends now was interrupted, whatever Tune reports


def connect(address: str | None = None, resources=None) -> None:
    """Join ``address`` / ``$RAY_ADDRESS`` if set, else start Ray in-process on this machine; then,
    given the study's ``resources`` section, check that one trial's workers fit on the cluster.

    Resource counts are never passed when joining: the cluster defines them (SPEC.md).
    """
    if not ray.is_initialized():
        join(address or os.environ.get("RAY_ADDRESS"))
    stop_gracefully()
    if resources is not None:
        check_fits(resources)


def join(address: str | None) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Keep worker logs out of the driver's terminal except errors: the CLI prints its own progress.
    kwargs = dict(log_to_driver=True, configure_logging=True, logging_level="WARNING")
    if not address:
        # A local instance turns token auth on by default and warns about it at every start; the
        # warning asks nothing of the user (auth stays on), so it is left out of the console.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(**kwargs)
        return
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"RAY_ADDRESS={address} is a dashboard (job submission) address: submit the study "
                          "with cluster/submit.sh, or set RAY_ADDRESS to the head's GCS address (host:6379)")
    probe(address)
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", JOIN_ATTEMPTS)  # read by ray.init, per attempt
    try:
        ray.init(address=address, **kwargs)
    except (AuthenticationError, ConnectionError) as err:
        if refused_token(err):
            raise ConfigError(f"the Ray cluster at {address} refused this driver's token: set RAY_AUTH_MODE=token "
                              "and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) as on the cluster's nodes") from None
        raise ConfigError(f"RAY_ADDRESS {address}: no Ray head answered there ({type(err).__name__}); check the "
                          "head's GCS address (host:6379), or unset RAY_ADDRESS to run on this machine") from None


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail in seconds, not Ray's minutes of retries, when nothing accepts a connection at
    ``host:port`` (``auto`` and other forms Ray resolves itself are left to Ray)."""
    match = ADDRESS.match(address.strip())
    if match is None or match["host"] in ("auto", "local"):
        return
    default = DEFAULT_CLIENT_PORT if match["client"] else DEFAULT_GCS_PORT
    host, port = match["host"].strip("[]"), int(match["port"] or default)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"RAY_ADDRESS {address}: nothing answers at {host}:{port} ({reason}); start the head "
                          "(`ray start --head`, cluster/local.sh), fix the address, or unset RAY_ADDRESS to run "
                          "on this machine") from None


def refused_token(err: BaseException | None) -> bool:
    """Whether ``err`` or its causes is Ray's token check (``ray.init`` wraps it in a ConnectionError)."""
    while err is not None:
        if isinstance(err, AuthenticationError) or "InvalidAuthToken" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def stop_gracefully() -> None:
    """Ctrl+C (SIGINT) and SIGTERM (``kill``, a batch system, ``ray job stop``) stop the driver the
    same way. The first one: inside ``Tuner.fit`` Tune saves the experiment and returns, and the
    command reports the run interrupted and how to resume it; elsewhere a KeyboardInterrupt. A second
    one is always a KeyboardInterrupt. Tune's own SIGINT handler is turned off so that both signals
    come here (it keeps the same handler on SIGUSR1, which this one calls). Installed after
    ``ray.init``, whose SIGTERM handler would drain the local node for 30 s and exit 1."""
    if threading.current_thread() is not threading.main_thread():
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read by every Tuner.fit
    # Also over an ignored SIGINT (a driver started with `&` from a script), as Tune's handler was.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_stop_signal)


def stop_requested() -> bool:
    """Whether SIGINT or SIGTERM stopped this driver. Tune ends a stopped run's trials like finished
    ones (not PENDING/RUNNING), so a study whose trials had all started could not tell otherwise."""
    return STOP.is_set()


def on_stop_signal(signum, frame) -> None:
    first = not STOP.is_set()
    STOP.set()
    tune = signal.getsignal(signal.SIGUSR1)
    if first and callable(tune) and getattr(tune, "__module__", "").startswith("ray.tune"):
        tune(signum, frame)  # Tune's: ends the run once it has saved the experiment state
    else:
        # Not in a Tune run (Ray Train's own SIGINT handler, which aborts and exits 1 without a word,
        # takes over only SIGINT during `study train`), or a second signal: stop here.
        raise KeyboardInterrupt


# --- does one trial fit on the cluster? -----------------------------------------------------------


def check_fits(resources) -> None:
    """Refuse (one line) workers that no node of the connected cluster could ever hold; on an
    autoscaling cluster, ask for them and wait up to ``$ITM_AUTOSCALING_WAIT_S`` instead."""
    problem = placement_problem(alive_nodes(), resources)
    if problem is None:
        return
    if not autoscaling():
        raise ConfigError(f"{problem} (ask for less with --set, join a larger cluster, or set "
                          f"{AUTOSCALING_ENV}=1 if this one adds nodes on demand)")
    wait_for_nodes(resources, problem)


def alive_nodes() -> list[dict[str, float]]:
    """The resources of each live node (``CPU``, ``GPU``, ...), as Ray reports them."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def workers_on(node: dict[str, float], cpus: float, gpus: float) -> int:
    """How many workers of ``cpus`` CPUs and ``gpus`` GPUs one node holds at once."""
    fit = math.floor(node.get("CPU", 0.0) / cpus + 1e-9)
    if gpus:
        fit = min(fit, math.floor(node.get("GPU", 0.0) / gpus + 1e-9))
    return fit


def placement_problem(nodes: list[dict[str, float]], resources) -> str | None:
    """What one trial asks for that the cluster ``nodes`` cannot give, named after the study-file key
    (None when it fits). A trial's workers are a placement group: each worker on one node, all of
    them at once somewhere on the cluster."""
    cpus, gpus, workers = resources.cpus_per_worker, resources.gpus, resources.workers_per_trial
    gpu_key = f"resources.gpus_per_worker {gpus:g}" if resources.gpus_per_worker else "resources.use_gpu true"
    most_cpus = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    most_gpus = max((node.get("GPU", 0.0) for node in nodes), default=0.0)
    if gpus and most_gpus == 0:
        return f"{gpu_key}: no node of this Ray cluster has a GPU"
    if gpus and most_gpus < gpus:
        return f"{gpu_key}: the largest node of this Ray cluster has {most_gpus:g} GPUs"
    if most_cpus < cpus:
        return f"resources.cpus_per_worker {cpus:g}: the largest node of this Ray cluster has {most_cpus:g} CPUs"
    fits = sum(workers_on(node, cpus, gpus) for node in nodes)
    if fits == 0:
        return (f"resources.cpus_per_worker {cpus:g} with {gpu_key.split('.', 1)[1]}: no node of this Ray "
                "cluster has both for one worker")
    if fits < workers:
        asked = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
        total = f"{sum(n.get('CPU', 0.0) for n in nodes):g} CPUs" + (
            f", {sum(n.get('GPU', 0.0) for n in nodes):g} GPUs" if gpus else "")
        return (f"resources.workers_per_trial {workers}: a trial's workers ({asked} each) must run at once, "
                f"and this Ray cluster ({len(nodes)} nodes, {total}) holds {fits}")
    return None


def autoscaling() -> bool:
    """Whether the cluster adds nodes on demand: ``$ITM_AUTOSCALING=1``, or an autoscaler that has
    published its node types to the cluster (KubeRay with autoscaler v2). The cluster launcher's v1
    autoscaler publishes nothing a driver can read: set ``ITM_AUTOSCALING=1`` there."""
    if os.environ.get(AUTOSCALING_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    try:
        from ray._private.state import state  # the lookup Ray Train itself makes before placing workers

        return state.get_cluster_config() is not None
    except Exception:  # noqa: BLE001 — an older or newer Ray without it: no autoscaler we can see
        return False


def wait_for_nodes(resources, problem: str) -> None:
    """Ask the autoscaler for one trial's workers, and wait until they fit or the timeout passes."""
    from ray.autoscaler.sdk import request_resources

    timeout = float(os.environ.get(AUTOSCALING_WAIT_ENV, AUTOSCALING_WAIT_S))
    print(f"warning: {problem}; this cluster autoscales: waiting up to {timeout:g} s for nodes that fit "
          f"(${AUTOSCALING_WAIT_ENV})", file=sys.stderr)
    bundle = {"CPU": resources.cpus_per_worker} | ({"GPU": resources.gpus} if resources.gpus else {})
    request_resources(bundles=[bundle] * resources.workers_per_trial)
    deadline = time.monotonic() + timeout
    try:
        while (problem := placement_problem(alive_nodes(), resources)) is not None:
            if time.monotonic() >= deadline:
                raise ConfigError(f"{problem}, after waiting {timeout:g} s for the autoscaler to add a node that "
                                  f"has them (${AUTOSCALING_WAIT_ENV}); lower it or check the cluster's node types")
            time.sleep(POLL_S)
    finally:
        request_resources(bundles=[])  # from here on the trials' own requests keep the nodes busy
