"""Start the whole stack — controller, one worker, web UI — as child processes: ``fastllava serve``.

    fastllava serve                                   # the embedded default model, loopback ports
    fastllava serve --model-path DIR --host 0.0.0.0 --worker-token SECRET

Prints the URLs once each part answers, and on Ctrl-C / SIGTERM stops them in reverse order (the worker
drains first). It supervises the worker: a worker that exits (its engine failed: status 3, or it crashed)
is started again after a back-off (1 s, doubling to 30 s; back to 1 s after a minute of healthy running),
logged, and registers with the controller again. The controller or the web UI exiting stops everything.
The helpers (``free_port``, ``Proc``, ``wait_http``) also start servers in the tests.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PKG = __package__ or "serve"  # "serve" from a checkout, "fastllava.serve" when installed


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def module_cmd(module: str, *args: str) -> list[str]:
    """``python -m <package>.<module> args`` for this installation."""
    return [sys.executable, "-m", f"{PKG}.{module}", *map(str, args)]


class Proc:
    """A child server process with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict | None = None) -> None:
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "ab")  # a restarted process appends: the crash stays readable
        cwd = Path(__file__).resolve().parents[1] if PKG == "serve" else None  # a checkout: serve/ importable
        # own session: a Ctrl-C in the terminal reaches only the launcher, which stops the parts in order
        self.popen = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal, wait up to ``timeout``, then kill. Returns the exit code."""
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode


def wait_http(url: str, proc: Proc | None = None, timeout: float = 180.0, ok=lambda r: r.status_code == 200) -> None:
    """Poll ``url`` until ``ok(response)``; fail early (with the log) if ``proc`` dies."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()}")
        try:
            if ok(httpx.get(url, timeout=2.0)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout}s" + (f":\n{proc.log()}" if proc else ""))


def run_stack(args: argparse.Namespace) -> int:
    """Start controller, worker and web UI; block until a signal; stop them."""
    import tempfile

    from fastllava import envs

    if args.model_path is None:
        from fastllava.default_model import default_model_path

        print("building/locating the embedded default model ...", flush=True)
        args.model_path = str(default_model_path())
    host = args.host
    cport, wport = args.controller_port or free_port(), args.worker_port or free_port()
    wport_ui = args.port
    token = args.worker_token or envs.FASTLLAVA_WORKER_TOKEN or secrets.token_hex(16)
    env = {**os.environ, "FASTLLAVA_WORKER_TOKEN": token}
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="fastllava-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    reach = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    controller_url, worker_url, web_url = (
        f"http://{reach}:{cport}",
        f"http://{reach}:{wport}",
        f"http://{reach}:{wport_ui}",
    )
    procs: list[Proc] = []

    stopping = False

    def on_signal(sig, frame):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        procs.append(Proc("controller", module_cmd("controller", "--host", host, "--port", cport), log_dir, env))
        worker_cmd = module_cmd("worker", "--host", host, "--port", wport, "--controller-address", controller_url,
                                "--worker-address", worker_url, "--model-path", args.model_path, "--device",
                                args.device, "--tensor-parallel-size", args.tensor_parallel_size)  # fmt: skip
        worker_cmd += list(args.worker_args or [])
        procs.append(Proc("worker", worker_cmd, log_dir, env))
        print(f"worker pid {procs[1].popen.pid}", flush=True)
        if not args.no_web:
            web_cmd = module_cmd("gradio_web_server", "--host", host, "--port", wport_ui,
                                 "--controller-url", controller_url, "--log-dir", log_dir / "web")  # fmt: skip
            procs.append(Proc("web", web_cmd, log_dir, env))
        wait_http(controller_url + "/health", procs[0])
        print(f"controller  {controller_url}   (OpenAI API: {controller_url}/v1)", flush=True)
        wait_http(worker_url + "/health", procs[1], timeout=args.load_timeout)
        wait_http(controller_url + "/health", procs[0], ok=lambda r: r.json().get("workers", 0) > 0)
        print(f"worker      {worker_url}   model {Path(args.model_path).name}", flush=True)
        if not args.no_web:
            wait_http(web_url + "/", procs[2])
            print(f"web UI      {web_url}", flush=True)
        print(f"logs        {log_dir}\nready: Ctrl-C stops everything", flush=True)
        backoff = WorkerBackoff()
        while not stopping:
            for i, p in enumerate(procs):
                if p.alive():
                    continue
                if p.name != "worker":
                    print(f"{p.name} exited ({p.popen.returncode}); stopping. Last lines:\n{p.log(1500)}", flush=True)
                    return 1
                delay = backoff.next_delay()
                print(f"worker exited ({p.popen.returncode}); restarting it in {delay:g}s (restart "
                      f"{backoff.restarts}). Last lines:\n{p.log(1500)}", flush=True)  # fmt: skip
                p.stop()
                deadline = time.monotonic() + delay
                while not stopping and time.monotonic() < deadline:
                    time.sleep(0.1)
                if stopping:
                    break
                procs[i] = Proc("worker", worker_cmd, log_dir, env)
                print(f"worker pid {procs[i].popen.pid} (restarted; it registers again once loaded)", flush=True)
            backoff.tick(procs[1].alive())
            time.sleep(0.5)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        for p in reversed(procs):
            p.stop()
        for s, h in old.items():
            signal.signal(s, h)
        print("stopped", flush=True)


class WorkerBackoff:
    """Restart delays: 1 s, doubling up to 30 s while restarts follow each other; a worker that has run for
    ``healthy_after`` seconds resets it (a crash loop waits longer and longer, an occasional crash does not)."""

    def __init__(self, first: float = 1.0, cap: float = 30.0, healthy_after: float = 60.0) -> None:
        self.first, self.cap, self.healthy_after = first, cap, healthy_after
        self.restarts, self._delay, self._up_since = 0, first, time.monotonic()

    def next_delay(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * 2, self.cap)
        self.restarts += 1
        self._up_since = time.monotonic() + delay
        return delay

    def tick(self, alive: bool) -> None:
        if alive and time.monotonic() - self._up_since > self.healthy_after:
            self._delay = self.first


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, help="default: the embedded default model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860, help="web UI port")
    p.add_argument("--controller-port", type=int, default=None, help="default: a free port")
    p.add_argument("--worker-port", type=int, default=None, help="default: a free port")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="the worker's ranks (one per device)")
    p.add_argument("--worker-token", default=None, help="default: $FASTLLAVA_WORKER_TOKEN or a random one")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--load-timeout", type=float, default=600.0)
    p.add_argument("--no-web", action="store_true", help="controller and worker only (no web UI)")
    p.add_argument("--worker-args", nargs=argparse.REMAINDER, help="extra arguments for the worker (last)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_stack(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
