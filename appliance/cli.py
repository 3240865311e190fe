"""The `appliance` command: runs one role (api, builder, worker), or all of them with `up`;
and the operator's tools: backup, restore, export, apply, callback-secret.

The kernel does not import the roles' packages: each role is found by name at run time,
so the layering (api -> builder/forwarder -> gpu -> appliance) holds.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError
from pydantic_settings import SettingsError

from appliance import __version__, build, bus, install, logs, migrations, running
from appliance.errors import validation_message
from appliance.settings import Settings, get_settings, settings_table

logger = logging.getLogger(__name__)

ROLES = {"api": "api.serve", "builder": "builder.serve", "worker": "forwarder.worker.serve"}
# run by the builder in a container of its own with the box's GPUs, not by `up` or compose
AGENT_ROLES = {"gpu-agent": "gpu.agent"}
REDIS_START_TIMEOUT_S = 10.0
# how long `up` waits for its roles to stop before it kills them: a stopping worker gives the
# replies it awaits up to 30 s (forwarder/worker/runner.py), and compose gives it 40 s too
STOP_GRACE_S = 40.0
_HELD: list[running.Holding] = []  # this role's locks on its data dir, kept while it runs
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


def _run_role(role: str, settings: Settings) -> None:
    logs.configure(settings.log_level, role)
    if not settings.redis_url:
        sys.exit(f"appliance {role}: set APPLIANCE_REDIS_URL (or use `appliance up`)")
    stale = build.stale_modules()
    if stale:
        sys.exit(
            f"appliance {role}: the compiled build of {', '.join(stale)} is older than its "
            "source; reinstall the appliance (pip install .) or run scripts/compile"
        )
    logger.info("%s: %s build", role, build.describe())
    if role in ROLES:
        try:
            _HELD.append(running.hold(settings.data_dir, role))
        except running.AlreadyRunningError as exc:
            sys.exit(f"appliance {role}: {exc}")
        except OSError as exc:  # under a file, a path it may not write
            sys.exit(
                f"appliance {role}: cannot use the data directory {settings.data_dir} "
                f"(APPLIANCE_DATA_DIR): {exc.strerror or exc}"
            )
    main: Callable[[Settings], None] = importlib.import_module({**ROLES, **AGENT_ROLES}[role]).main
    try:
        main(settings)
    except migrations.NewerSchemaError as exc:
        sys.exit(f"appliance {role}: {exc}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _private_redis(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("appliance up: no APPLIANCE_REDIS_URL and no redis-server on PATH")
    port = _free_port()
    workdir = data_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
        preexec_fn=functools.partial(_end_with_parent, os.getpid()),
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            bus.connect(url).ping()
            return proc, url
        except Exception:
            time.sleep(0.1)
    proc.kill()
    sys.exit("appliance up: the private redis-server did not start")


def _up(settings: Settings) -> int:
    """Run api, builder and worker as child processes; stop them all when one ends."""
    logs.configure(settings.log_level, "up")
    # Ctrl+C (SIGINT) stops the roles, and a second one kills them, wherever `up` was started
    # from: a shell's background job hands it SIGINT ignored, which the roles (and Redis) would
    # still obey, with handlers of their own, while `up` did not (it took the first role to
    # end for a failure, and a second Ctrl+C for nothing).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    env = dict(os.environ)
    redis_proc = None
    if not settings.redis_url:
        redis_proc, env["APPLIANCE_REDIS_URL"] = _private_redis(settings.data_dir)
    children = {
        role: subprocess.Popen(
            [sys.executable, "-m", "appliance", role],
            env=env,
            preexec_fn=functools.partial(_end_with_parent, os.getpid()),
        )
        for role in ROLES
    }
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    ended: list[str] = []
    try:
        while not stopping and not ended:
            ended = [role for role, child in children.items() if child.poll() is not None]
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    for role in ended:
        logger.error(
            "the %s %s; stopping the other roles", role, _how_ended(children[role].returncode)
        )
    try:
        _stop_roles(children)
    except KeyboardInterrupt:  # Ctrl+C again while they stop: now
        logger.warning("interrupted again: killing the roles still running")
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
    if redis_proc is not None:
        redis_proc.terminate()
        redis_proc.wait()
    if ended:  # a role that ended by itself is a failure, whatever its code: say so
        code = children[ended[0]].returncode or 0
        return 128 - code if code < 0 else code or 1
    return max(max(child.returncode or 0, 0) for child in children.values())


def _stop_roles(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every role still running; kill one that has not stopped after STOP_GRACE_S."""
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for role, child in children.items():
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            logger.error("the %s did not stop within %.0f s; killing it", role, STOP_GRACE_S)
            child.kill()
            child.wait()


def _end_with_parent(parent: int) -> None:
    """In a role's process before it runs: SIGTERM it when `up` ends, even by SIGKILL, so no
    role runs on without it (the next `up` would find the port taken and a second builder
    at work). Linux's PR_SET_PDEATHSIG; elsewhere the roles outlive a killed `up`."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # `up` died before the line above: end now, as it would have
        os.kill(os.getpid(), signal.SIGTERM)


def _how_ended(code: int | None) -> str:
    """How a role's process ended, as the log says it."""
    if code is None or code >= 0:
        return f"exited with code {code}"
    try:
        name = f" ({signal.Signals(-code).name})"
    except ValueError:
        name = ""
    return f"was killed by signal {-code}{name}"


def _health(role: str, settings: Settings) -> int:
    """Exit 0 when the role is alive: the api answers /healthz, the others beat in Redis."""
    if role == "api":
        import urllib.request

        url = f"http://127.0.0.1:{settings.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=3) as reply:
                return 0 if reply.status == 200 else 1
        except OSError:
            return 1
    try:
        return 0 if bus.alive(bus.connect(str(settings.redis_url)), role) else 1
    except redis.RedisError as exc:  # a line for the health log, not redis-py's traceback
        print(f"appliance health: cannot reach Redis: {exc}", file=sys.stderr)
        return 1


def _operator_commands(sub: Any) -> None:
    """backup, restore, export, apply: the operator's tools (appliance/backup.py, declared.py)."""
    made = sub.add_parser("backup", help="write a backup of this install to FILE, while it runs")
    made.add_argument("file", type=Path)
    made.add_argument("--no-files", action="store_true", help="leave uploaded files out")
    back = sub.add_parser("restore", help="restore a backup into a fresh data directory")
    back.add_argument("file", type=Path)
    back.add_argument("--data-dir", type=Path, help="default: APPLIANCE_DATA_DIR")
    back.add_argument("--force", action="store_true", help="empty a non-empty data dir first")
    out = sub.add_parser("export", help="write the endpoints (and keys, for admins) as YAML")
    out.add_argument("-o", "--output", type=Path, help="default: standard output")
    out.add_argument("--format", choices=("appliance", "llm-engine"), default="appliance")
    into = sub.add_parser("apply", help="make the install match a file `export` wrote")
    into.add_argument("-f", "--file", type=Path, required=True)
    into.add_argument("--prune", action="store_true", help="delete what the file does not name")
    into.add_argument("--dry-run", action="store_true", help="say what would change")
    for command in (out, into):
        command.add_argument("--url", help="the api (default: this box's)")
        command.add_argument("--key", help="an API key (default: the admin key kept here)")
        command.add_argument("--key-file", type=Path, help="a file holding the API key")


def _operate(args: argparse.Namespace, settings: Settings) -> None:
    from appliance import backup, declared

    try:
        if args.command == "backup":
            made = backup.backup(settings.data_dir, args.file, with_files=not args.no_files)
            print(f"backup of install {made['install_id']} written to {args.file}")
        elif args.command == "restore":
            target = args.data_dir or settings.data_dir
            made = backup.restore(args.file, target, force=args.force)
            print(f"install {made['install_id']} restored into {target}")
        else:
            base, key = declared.access(settings, args.url, args.key, args.key_file)
            if args.command == "export":
                text = declared.export(base, key, args.format)
                if args.output:
                    try:
                        args.output.write_text(text)
                    except OSError as exc:
                        raise declared.ClientError(f"cannot write {args.output}: {exc}") from None
                else:
                    sys.stdout.write(text)
            else:
                sys.stdout.write(
                    declared.apply(base, key, args.file, prune=args.prune, dry_run=args.dry_run)
                )
    except (backup.BackupError, declared.ClientError) as exc:
        sys.exit(f"appliance {args.command}: {exc}")


def _settings(command: str) -> Settings:
    """The settings, or an exit naming each bad variable and why (no traceback)."""
    try:
        return get_settings()
    except ValidationError as exc:
        bad = "; ".join(
            f"APPLIANCE_{str(error['loc'][0]).upper()}: {validation_message(error)}"
            for error in exc.errors()
        )
        sys.exit(f"appliance {command}: {bad}")
    except SettingsError as exc:  # a list or other JSON value that does not parse
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"APPLIANCE_{field.group(1).upper()}" if field else "a setting"
        sys.exit(
            f"appliance {command}: {name}: not JSON ({exc.__cause__ or exc}); "
            'a list is written as ["a", "b"]'
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run api, builder and worker together")
    for role in ROLES:
        sub.add_parser(role, help=f"run the {role} role")
    sub.add_parser("gpu-agent", help="publish the GPU inventory (the builder starts it)")
    sub.add_parser("version", help="print the version")
    sub.add_parser("settings", help="print every setting with its default, as a table")
    sub.add_parser(
        "callback-secret", help="print the secret task callbacks are signed with, for receivers"
    )
    health = sub.add_parser("health", help="exit 0 when a role is alive (health checks)")
    health.add_argument("role", choices=sorted(ROLES))
    _operator_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "version":
        print(__version__)
        return
    if args.command == "settings":
        print(settings_table())
        return
    settings = _settings(args.command)
    if args.command in ("backup", "restore", "export", "apply"):
        _operate(args, settings)
        return
    if args.command == "health":
        sys.exit(_health(args.role, settings))
    if args.command == "callback-secret":
        if not (settings.data_dir / "key-secret").exists():
            sys.exit(f"appliance callback-secret: no install in {settings.data_dir}")
        print(install.callback_secret(settings.data_dir).hex())
        return
    if args.command == "up":
        sys.exit(_up(settings))
    try:
        _run_role(args.command, settings)
    except KeyboardInterrupt:  # Ctrl+C before the role's own stop took over (as it started)
        logger.info("%s: interrupted as it started; stopped", args.command)
