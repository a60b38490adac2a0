"""Screenshots of an ablation in the MLflow UI, taken by a real browser (``docs/mlflow-ui.md``).

    .venv/bin/python docs/mlflow_screenshots.py                 # ablation + report + 3 PNGs in docs/img/
    .venv/bin/python docs/mlflow_screenshots.py --work /tmp/ui  # keep the scratch store (a rerun reuses it)

Steps, all on a scratch MLflow store (``WORK/mlruns.db``) and storage folder, never the repository's:

1. a small real ablation: ``python -m study ablate studies/ablation-demo.yaml --set name=ui-shot``
   with ``--set train.epochs=2 --seeds 0,1`` (skipped when ``WORK`` already holds a finished one);
2. ``python -m study report`` on it (the forest plot), then ``publish_table`` with that plot, as the
   ablation does when it finishes (table in the parent's description, per-row metrics, shared views);
3. ``mlflow server`` on the scratch store, and headless Chromium (Debian's ``chromium`` package:
   ``apt-get install -y chromium``) driven over the DevTools protocol on a pipe (no websocket library,
   no downloaded browser) to capture: the runs table with one column per row, the parent run's page
   with its description, and each row's mean curve (Group by ``ablation.variant``).

A fresh browser profile is what a new user has; the only thing set in it is that MLflow's Assistant
panel starts closed, so it does not cover the page. PNGs larger than ``MAX_BYTES`` are reduced to a
256-colour palette (UI screenshots lose nothing visible).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `study` is the repository's package

NAME = "ui-shot"
MAX_BYTES = 400_000
SIZE = (1600, 1000)
# Closed Assistant panel: MLflow 3.17 opens it on a first visit, over a third of the page.
QUIET_ASSISTANT = ("try { localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                   " localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false'); } catch (e) {}")


class Chromium:
    """Headless Chromium spoken to over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4:
    replies out, each a JSON message ended by a NUL byte)."""

    def __init__(self, profile: Path, size: tuple[int, int] = SIZE):
        commands_r, self._commands = os.pipe()
        self._replies, replies_w = os.pipe()

        def as_fd_3_and_4():
            os.dup2(commands_r, 3)
            os.dup2(replies_w, 4)

        self.process = subprocess.Popen(
            [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
             "about:blank"], preexec_fn=as_fd_3_and_4, pass_fds=(3, 4),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_r)
        os.close(replies_w)
        self._buffer, self._next_id, self.session = b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Page.addScriptToEvaluateOnNewDocument", source=QUIET_ASSISTANT)
        self.resize(*size)

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def open(self, url: str, ready: str, timeout: float = 90.0, settle: float = 2.0) -> None:
        """Load ``url`` as a new document and wait until the JS expression ``ready`` is true."""
        self.call("Page.navigate", url="about:blank")  # else a change of #fragment keeps the old page
        self.call("Page.navigate", url=url)
        self.wait(ready, timeout, settle, what=url)

    def wait(self, ready: str, timeout: float = 90.0, settle: float = 2.0, what: str = "the page") -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(ready):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not ready ({ready}) within {timeout:.0f} s")
            time.sleep(0.5)
        time.sleep(settle)  # charts and images finish drawing

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.process.wait(10)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self.process.kill()


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    return found


def study(*args: str) -> None:
    """``python -m study ARGS`` from the repository root, failing loudly."""
    subprocess.run([sys.executable, "-m", "study", *args], cwd=ROOT, check=True)


def run_ablation(work: Path, epochs: int, seeds: str) -> Path:
    """The small real ablation (skipped if ``work`` holds a finished one) and its report."""
    ablation_dir = work / "results" / f"{NAME}-ablation"
    data = ROOT / "data" / "synth"
    if not (data / "train_ims.npy").exists():
        data = work / "synth"
        if not (data / "train_ims.npy").exists():
            study("data", "synth", "--out", str(data))
    if not (ablation_dir / "ablation.md").exists():
        settings = [f"name={NAME}", f"train.epochs={epochs}", f"tracking.uri={store_uri(work)}",
                    f"storage.path={work / 'results'}", f"data.root={data}"]
        overrides = [arg for setting in settings for arg in ("--set", setting)]
        study("ablate", "studies/ablation-demo.yaml", "--seeds", seeds, *overrides)
    study("report", str(ablation_dir))
    return ablation_dir


def store_uri(work: Path) -> str:
    return f"sqlite:///{work.resolve() / 'mlruns.db'}"


def publish(ablation_dir: Path, uri: str) -> tuple[str, str, dict[str, str]]:
    """``publish_table`` with the forest plot; the experiment id, parent run id and view addresses."""
    from study.ablation.tracking import publish_table
    from study.layout import load_stored_study, read_parent
    from study.tracking import client_for

    stored = load_stored_study(ablation_dir)
    parent = read_parent(ablation_dir)
    paths = publish_table(uri, stored.tracking.experiment, parent, (ablation_dir / "ablation.md").read_text(),
                          ablation_dir / "ablation.csv", [ablation_dir / "report" / "forest.png"])
    _, experiment_id = client_for(uri, stored.tracking.experiment)
    return experiment_id, parent, paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(uri: str, port: int, log: Path) -> subprocess.Popen:
    """``mlflow server`` on the scratch store; returns once ``/health`` answers (or fails in 180 s)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow server exited with {server.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            time.sleep(1)
    server.terminate()
    raise SystemExit(f"mlflow server did not answer on port {port} within 180 s; see {log}")


def text_shown(*texts: str) -> str:
    """A JS expression: every one of ``texts`` is on the page."""
    return " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)


def capture(chrome: Chromium, base: str, experiment_id: str, parent: str, paths: dict[str, str],
            out: Path) -> list[Path]:
    """The three pictures: runs table, the parent run's page (description opened), row curves."""
    from study.tracking import ui_path

    shots = []
    chrome.resize(SIZE[0], 560)  # one parent row: the rest of a full-height page would be blank
    chrome.open(base + paths["table"], text_shown("rsum/full", f"{NAME}-ablation"))
    shots.append(chrome.screenshot(out / "mlflow-runs-table.png"))
    chrome.resize(SIZE[0], 1150)  # description, forest plot and the per-row metrics
    chrome.open(base + ui_path(experiment_id, run_id=parent), text_shown("Description", "Δ rSum"))
    chrome.evaluate("[...document.querySelectorAll('button, a, span')].find(e => e.innerText"
                    " && e.innerText.trim() === 'Show more')?.click()")
    plot_drawn = "[...document.images].some(i => i.src.includes('get-artifact') && i.naturalWidth > 0)"
    chrome.wait(plot_drawn, what="the forest plot in the description")
    shots.append(chrome.screenshot(out / "mlflow-ablation-run.png"))

    chrome.resize(SIZE[0], 760)  # the group list and the two charts
    chrome.open(base + paths["curves"], text_shown("full", "rsum") +
                " && document.querySelectorAll('.js-plotly-plot').length >= 2", settle=4)
    shots.append(chrome.screenshot(out / "mlflow-row-curves.png"))
    return shots


def shrink(path: Path) -> int:
    """Reduce ``path`` to a 256-colour palette when it is over ``MAX_BYTES``; its final size."""
    if path.stat().st_size > MAX_BYTES:
        from PIL import Image

        with Image.open(path) as image:
            image.convert("RGB").quantize(colors=256).save(path, optimize=True)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="mlflow-shots-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    ablation_dir = run_ablation(work, args.epochs, args.seeds)
    uri = store_uri(work)
    experiment_id, parent, paths = publish(ablation_dir, uri)
    port = free_port()
    server = start_server(uri, port, work / "mlflow-server.log")
    chrome = Chromium(work / "chromium-profile")
    try:
        shots = capture(chrome, f"http://127.0.0.1:{port}/", experiment_id, parent, paths, args.out)
    finally:
        chrome.close()
        server.terminate()
        server.wait(30)
    for path in shots:
        print(f"{path}  {shrink(path) / 1000:.0f} kB")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
