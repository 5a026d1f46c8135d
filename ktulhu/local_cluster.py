"""`ktulhu cluster up`: the scale-out topology on one machine, for trying it and for its tests.

    nginx :PORT ── round robin ──> front-end 1 ─┐   (ktulhu serve, no model loaded)
                                  front-end 2 ─┼──> PostgreSQL (the shared store)
                                                └──> llama-server 1, llama-server 2 (the workers)

Every member is a real process with its log in the state directory; they start in dependency
order (store, workers, front-ends, balancer), each awaited until it answers, and stop in reverse
order. `up` runs in the foreground until Ctrl-C / SIGTERM; `down` stops the members a killed `up`
left behind (their pids are in the state directory). docs/scale-out.md maps the same pieces to
several machines.

On loopback only: PostgreSQL trusts local connections here. A real deployment gives it a password
(KTULHU_STORE=postgresql://user:password@host/db) and TLS.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx

from ktulhu.ports import free_port

__all__ = ["LocalCluster", "Member", "Postgres", "add_parser", "main", "run"]

#: Seconds a member may take to answer after it started (a cold llama-server maps its model).
READY_TIMEOUT_S = 180.0
#: Seconds a member gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 20.0
DATABASE = "ktulhu"
SUPERUSER = "ktulhu"
NGINX = Path("/usr/sbin/nginx")


def postgres_bin() -> Path:
    """The newest Debian PostgreSQL's binaries (`apt-get install postgresql`)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not versions:
        raise ClusterError("PostgreSQL is not installed: apt-get install -y postgresql")
    return versions[-1].parent


class ClusterError(Exception):
    """A member could not be started; the message says which and where its log is."""


def unprivileged() -> dict[str, Any]:
    """subprocess arguments that run PostgreSQL as `nobody` when we are root (it refuses root)."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def initdb(bin_dir: Path, data: Path, *, sync: bool = True) -> None:
    """A new PostgreSQL cluster in `data` (its parent created and owned by the server's user), superuser
    `ktulhu` trusted on loopback only."""
    data.parent.mkdir(parents=True, exist_ok=True)
    demote = unprivileged()
    if demote:
        os.chown(data.parent, demote["user"], demote["group"])
    done = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                           "--no-instructions", *([] if sync else ["--no-sync"])],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **demote)
    if done.returncode != 0:
        hint = " (every directory above it must be searchable by `nobody`)" if demote else ""
        raise ClusterError(f"initdb in {data} failed{hint}: {done.stderr.strip()[-500:]}")


@attrs.define
class Member:
    """One process of the cluster: how to start it and how to tell that it answers."""

    name: str
    command: list[str]
    log: Path
    ready: Callable[[], bool]
    #: Where it answers (empty for the store, which speaks its own protocol).
    url: str = ""
    env: dict[str, str] = attrs.field(factory=dict)
    cwd: Path | None = None
    #: Extra `subprocess.Popen` arguments (the user to run as).
    popen: dict[str, Any] = attrs.field(factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env}, cwd=self.cwd,
                                            start_new_session=True, **self.popen)
        (self.log.parent / f"{self.name}.pid").write_text(str(self.process.pid))

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process is not None and self.process.poll() is not None:
                raise ClusterError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} did not answer within {timeout:g} s; see {self.log}")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests)."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        (self.log.parent / f"{self.name}.pid").unlink(missing_ok=True)


def llama_server(binary: Path, model: Path, name: str, log: Path, *, slots: int, ctx: int, threads: int) -> Member:
    """A llama-server worker on a free loopback port: `slots` parallel sequences of `ctx` tokens each,
    with its `/metrics` and `/slots` on (for operators and the benchmark)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
               "-c", str(slots * ctx), "-t", str(threads), "-tb", str(threads), "--metrics", "--slots", "--no-webui"]
    return Member(name, command, log, http_ok(f"{url}/health"), url=url)


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False
    return check


@attrs.define
class Postgres:
    """A PostgreSQL server in `directory` on a loopback port (created on first start)."""

    directory: Path
    port: int = attrs.field(factory=free_port)
    bin: Path = attrs.field(factory=postgres_bin)

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    def member(self) -> Member:
        data = self.directory / "data"
        if not (data / "PG_VERSION").exists():
            initdb(self.bin, data)
        command = [str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1",
                   "-k", str(self.directory)]
        return Member("postgres", command, self.directory.parent / "logs" / "postgres.log", self._accepting,
                      popen=unprivileged())


    def _accepting(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres", connect_timeout=2,
                                 autocommit=True) as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
                    conn.execute(f"CREATE DATABASE {DATABASE}")
            return True
        except psycopg.OperationalError:
            return False


@attrs.define
class LocalCluster:
    """PostgreSQL, `workers` llama-servers, `frontends` Ktulhu servers and nginx, in `directory`."""

    directory: Path
    repo: Path
    model: Path
    port: int = 8080
    workers: int = 2
    frontends: int = 2
    slots: int = 2
    ctx: int = 2048
    threads: int = 1
    #: Extra settings for every front-end (tests set quotas and limits here).
    frontend_env: dict[str, str] = attrs.field(factory=dict)
    members: dict[str, Member] = attrs.field(factory=dict)
    postgres: Postgres | None = None
    jwt_secret: str = attrs.field(factory=lambda: secrets.token_urlsafe(32))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_url(self, index: int) -> str:
        return self.members[f"worker-{index}"].url

    def frontend_url(self, index: int) -> str:
        return self.members[f"frontend-{index}"].url

    def start(self, say: Callable[[str], None] = lambda line: None) -> None:
        """Start every member in order and wait for each to answer; on failure stop what started."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self.postgres = Postgres(self.directory / "postgres")
            self._run(self.postgres.member(), say)
            binary = _llama_server()
            for index in range(1, self.workers + 1):
                self._run(self._worker(binary, index), say)
            workers = ",".join(f"{self.worker_url(i)}|slots={self.slots}" for i in range(1, self.workers + 1))
            for index in range(1, self.frontends + 1):
                self._run(self._frontend(index, workers), say)
            self._run(self._nginx(), say)
        except BaseException:
            self.stop()
            raise

    def _run(self, member: Member, say: Callable[[str], None]) -> None:
        self.members[member.name] = member
        member.start()
        member.wait_ready()
        say(f"{member.name} ready ({member.url or member.log})")

    def _worker(self, binary: Path, index: int) -> Member:
        # Each front-end may send `slots` requests at once (its share), so the worker runs all the shares.
        return llama_server(binary, self.model, f"worker-{index}", self.directory / "logs" / f"worker-{index}.log",
                            slots=self.slots * self.frontends, ctx=self.ctx, threads=self.threads)

    def frontend_settings(self, index: int, port: int, workers: str) -> dict[str, str]:
        assert self.postgres is not None
        return {
            "KTULHU_HOST": "127.0.0.1", "KTULHU_PORT": str(port), "KTULHU_STORE": self.postgres.url,
            "KTULHU_WORKERS": workers, "JWT_SECRET": self.jwt_secret, "KTULHU_TRUSTED_PROXIES": "127.0.0.1/32",
            "KTULHU_LOG_FORMAT": "text", **self.frontend_env,
        }

    def _frontend(self, index: int, workers: str) -> Member:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "ktulhu", "serve"]
        return Member(f"frontend-{index}", command, self.directory / "logs" / f"frontend-{index}.log",
                      http_ok(f"{url}/readyz"), url=url, env=self.frontend_settings(index, port, workers),
                      cwd=self.repo)

    def restart(self, name: str) -> None:
        """Start a stopped or killed member again, same command and port."""
        member = self.members[name]
        member.stop()
        member.start()
        member.wait_ready()

    def _nginx(self) -> Member:
        if not NGINX.is_file():
            raise ClusterError("nginx is not installed: apt-get install -y nginx")
        run = self.directory / "nginx"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        upstreams = "\n".join(f"        server {self.frontend_url(i).removeprefix('http://')};"
                              for i in range(1, self.frontends + 1))
        template = (self.repo / "deploy" / "local-cluster" / "nginx.conf").read_text()
        conf = run / "nginx.conf"
        conf.write_text(template.replace("@UPSTREAMS@", upstreams).replace("@PORT@", str(self.port))
                        .replace("@RUN_DIR@", str(run)).replace("@NGINX_USER@", "nobody nogroup"))
        command = [str(NGINX), "-p", str(run), "-c", str(conf), "-e", str(run / "error.log"), "-g", "daemon off;"]
        return Member("nginx", command, self.directory / "logs" / "nginx.log", http_ok(f"{self.url}/healthz"),
                      url=self.url)

    def stop(self) -> None:
        """Stop every member, newest first (balancer, front-ends, workers, store)."""
        for member in reversed(list(self.members.values())):
            member.stop()


def stop_leftovers(directory: Path) -> list[str]:
    """Stop members whose pid files a killed `up` left in `directory`/logs (newest first)."""
    stopped = []
    order = ["nginx", "frontend", "worker", "postgres"]
    pid_files = sorted((directory / "logs").glob("*.pid"),
                       key=lambda p: next((i for i, o in enumerate(order) if p.stem.startswith(o)), 99))
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text())
            os.killpg(pid, signal.SIGTERM)
            stopped.append(pid_file.stem)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
        pid_file.unlink(missing_ok=True)
    return stopped


def _llama_server() -> Path:
    from . import native_build

    return native_build.llama_server((native_build.read_marker() or {}).get("gpu", "cpu"))


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cluster = subparsers.add_parser("cluster", help="run the scale-out topology on this machine")
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = actions.add_parser(
        "up", help="start PostgreSQL, llama-server workers, front-ends and nginx; Ctrl-C stops them",
        description="Starts, in order: PostgreSQL (shared store), N llama-server workers (built from the pinned "
                    "llama.cpp sources), N Ktulhu front-ends in remote-engine mode, and nginx balancing over "
                    "them on --port. Runs until Ctrl-C or SIGTERM, then stops them all, newest first.")
    up.add_argument("--dir", type=Path, default=Path(".cluster"), help="state and logs (default: .cluster)")
    up.add_argument("--port", type=int, default=8080, help="nginx's port (default: 8080)")
    up.add_argument("--workers", type=int, default=2, help="llama-server processes (default: 2)")
    up.add_argument("--frontends", type=int, default=2, help="Ktulhu front-ends (default: 2)")
    up.add_argument("--slots", type=int, default=2, help="requests each front-end may send each worker at once; a worker runs slots x front-ends "
                    "parallel sequences (default: 2)")
    up.add_argument("--model", type=Path, help="GGUF the workers serve (default: LLAMA_CLI_MODEL)")
    down = actions.add_parser("down", help="stop what a killed `cluster up` left running")
    down.add_argument("--dir", type=Path, default=Path(".cluster"), help="state directory (default: .cluster)")


def run(args: argparse.Namespace) -> int:
    if args.cluster_command == "down":
        stopped = stop_leftovers(args.dir)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    from .settings import load_settings

    for name in ("port", "workers", "frontends", "slots"):
        value = getattr(args, name)
        if not (1 <= value <= (65535 if name == "port" else 64)):
            print(f"ktulhu cluster up: --{name} {value} is out of range", file=sys.stderr)
            return 2
    settings = load_settings()
    model = args.model or settings.model_file
    if not model.is_file():
        print(f"ktulhu cluster up: no model at {model}: run `ktulhu models pull` or pass --model", file=sys.stderr)
        return 1
    cluster = LocalCluster(args.dir.resolve(), Path.cwd(), model.resolve(), port=args.port,
                           workers=args.workers, frontends=args.frontends, slots=args.slots)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cluster.start(lambda line: print(line, flush=True))
        print(f"cluster up: {cluster.url} (Ctrl-C stops it; logs in {cluster.directory / 'logs'})", flush=True)
        pid, _status = os.wait()  # until a member exits (or a signal interrupts the wait)
        gone = next((m.name for m in cluster.members.values() if m.process and m.process.pid == pid), str(pid))
        print(f"ktulhu cluster up: {gone} exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (ClusterError, subprocess.CalledProcessError, OSError) as error:
        print(f"ktulhu cluster up: {error}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        print("cluster stopped", flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ktulhu")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["cluster", *(sys.argv[1:] if argv is None else argv)]))
