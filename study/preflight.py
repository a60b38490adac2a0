"""Checks the driver runs before Ray starts, so bad input fails in one line with nothing written."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from trainables.config import DataConfig, ModelConfig
from trainables.data import check_eval_protocol, split_files, validate_split
from trainables.errors import ConfigError, DataError
from trainables.text_models import checkpoint_path

FULL_SCAN_BYTES = 2 * 2**30  # NaN/inf scan of larger splits is left to `study data check` (minutes on COCO)
REACH_TIMEOUT_S = 3.0  # a tracking server that does not answer within this is reported, not retried for minutes
URI_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def check_study(study, data: bool = True) -> None:
    """Everything a command needs before it writes anything or starts Ray: the data and the text
    encoder (``data``), the tracking URI and the storage path."""
    if data:
        check_data(study.data)
        check_text_encoder(study.model)
    check_tracking(study.tracking.uri)
    check_writable(study.storage.path, "storage.path")


def check_data(data: DataConfig) -> None:
    """Every split the job reads exists and is well formed, with one feature dimension across the
    splits (read from the .npy headers); small splits are scanned for NaN/inf."""
    dims: dict[str, int] = {}
    for split in dict.fromkeys(s for s in (data.train_split, data.val_split, data.test_split) if s):
        ims = split_files(data.root, split).ims
        small = ims.is_file() and ims.stat().st_size <= FULL_SCAN_BYTES
        dims[split] = validate_split(data.root, split, scan_features=small)["feature_dim"]
    if len(set(dims.values())) > 1:
        found = ", ".join(f"{split}_ims.npy {dim}" for split, dim in dims.items())
        raise DataError(f"{data.root}: region features differ in dimension across splits ({found}); "
                        "every split must come from the same feature extractor")
    check_eval_protocol(data)


def check_text_encoder(model: ModelConfig) -> None:
    """``model.text_encoder`` resolves here, not inside a worker (``trainables/text_models.py``)."""
    checkpoint_path(model.text_encoder)


def check_tracking(uri: str) -> None:
    """The MLflow tracking URI is well formed, a sqlite file can be created, a server answers."""
    scheme = urlsplit(uri).scheme if "://" in uri else ""
    if scheme not in URI_SCHEMES and "://" in uri:
        raise ConfigError(f"tracking.uri {uri!r}: unknown scheme {scheme!r}; use e.g. sqlite:///mlruns.db "
                          "or http://host:5000")
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri == "sqlite:///":
            raise ConfigError(f"tracking.uri {uri!r}: a sqlite URI has three slashes before a relative path "
                              "and four before an absolute one, e.g. sqlite:///mlruns.db")
        check_writable(str(Path(uri.removeprefix("sqlite:///")).parent), "tracking.uri's folder")
    elif scheme in ("http", "https"):
        check_reachable(uri)
    elif scheme in ("", "file"):
        check_writable(urlsplit(uri).path if scheme else uri, "tracking.uri")


def check_reachable(uri: str) -> None:
    parts = urlsplit(uri)
    if not parts.hostname:
        raise ConfigError(f"tracking.uri {uri!r} names no host, e.g. http://127.0.0.1:5000")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"tracking.uri {uri}: no MLflow server answers at {parts.hostname}:{port} "
                          f"({err.strerror or type(err).__name__}); start it, or use sqlite:///mlruns.db") from None


def check_writable(path: str, what: str) -> None:
    """``path`` is a directory this process can write in, or one it could create: probed with a
    temporary directory (removed again) in it or in its nearest existing ancestor, because as root
    ``os.access`` says yes even under /proc."""
    if "://" in path:
        return  # a remote store (s3://...) is checked by whoever writes to it
    target = Path(path).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, not a directory")
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".itm-probe-").cleanup()
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot write in {existing} ({err.strerror or err}); "
                          "choose a writable directory") from None
