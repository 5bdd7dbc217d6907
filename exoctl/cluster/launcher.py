"""Starting and stopping workers: one POSIX shell script, run by `sh -s` locally or over ssh.

The script travels on stdin (with the cluster key inside, so the secret never shows in a
process list), rotates the node's log, starts the worker detached, and waits until it listens
or dies. Loopback nodes run the same script without ssh, so both paths are one code path.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass

from exoctl.inventory import Node
from exoctl.keys import PUBLIC_FILE, SECRET_FILE, ClusterKeys

SSH_TIMEOUT_S = 60
START_WAIT_S = 30.0  # how long the start script waits for "listening" by default (`up --start-timeout`)


@dataclass(frozen=True)
class ShellResult:
    code: int
    out: str
    err: str


def sh_path(path: str) -> str:
    """A path for the remote shell: `~` expands to the remote $HOME, everything else is quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def ssh_command(node: Node) -> list[str]:
    command = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", str(node.ssh_port)]
    if node.ssh_config:
        command += ["-F", node.ssh_config]
    if node.ssh_identity:
        command += ["-i", node.ssh_identity, "-o", "IdentitiesOnly=yes"]
    if node.ssh_user:
        command += ["-l", node.ssh_user]
    return [*command, node.host]


def run_script(node: Node, script: str, timeout: float = SSH_TIMEOUT_S) -> ShellResult:
    argv = [*ssh_command(node), "sh -s"] if node.uses_ssh else ["sh", "-s"]
    try:
        done = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ShellResult(124, "", f"no answer within {timeout:.0f} s")
    except FileNotFoundError as exc:
        return ShellResult(127, "", f"{exc.filename} is not installed on this machine")
    return ShellResult(done.returncode, done.stdout, done.stderr)


def _prologue(node: Node) -> str:
    return (
        "set -u\n"
        f"work={sh_path(node.work_dir)}\n"
        f'log="$work/logs/{node.name}.log"\n'
        f'pidf="$work/run/{node.name}.pid"\n'
    )


def start_script(
    node: Node,
    keys: ClusterKeys | None,
    local_keys: bool,
    threads: int | None = None,
    wait_s: float = START_WAIT_S,
) -> str:
    argv = shlex.split(node.command)
    worker = [
        *argv,
        "worker",
        "--name",
        node.name,
        "--host",
        node.host,
        "--port",
        str(node.port),
        "--device",
        node.device,
    ]
    if threads is not None:
        worker += ["--threads", str(threads)]
    if node.activations is not None:
        worker += ["--activations", node.activations]
    lines = [_prologue(node), 'mkdir -p "$work/logs" "$work/run" || exit 4']
    keys_arg = ""
    if keys is not None and local_keys:
        keys_arg = f" --keys-dir {shlex.quote(str(keys.folder))}"
    elif keys is not None:
        public = (keys.folder / PUBLIC_FILE).read_text(encoding="utf-8")
        secret = (keys.folder / SECRET_FILE).read_text(encoding="utf-8")
        lines += [
            '(umask 077; mkdir -p "$work/keys"',
            f"cat > \"$work/keys/{PUBLIC_FILE}\" <<'EXOCTL_PUBLIC'\n{public.rstrip()}\nEXOCTL_PUBLIC",
            f"cat > \"$work/keys/{SECRET_FILE}\" <<'EXOCTL_SECRET'\n{secret.rstrip()}\nEXOCTL_SECRET",
            ") || exit 4",
        ]
        keys_arg = ' --keys-dir "$work/keys"'
    lines += [
        f"command -v {shlex.quote(argv[0])} >/dev/null 2>&1 || {{ echo MISSING; exit 127; }}",
        '[ -f "$log" ] && mv "$log" "$log.1"',
        "detach=; command -v setsid >/dev/null 2>&1 && detach=setsid",
        f"$detach nohup {shlex.join(worker)}{keys_arg} --model-dir {sh_path(node.model_dir)} "
        '> "$log" 2>&1 < /dev/null &',
        "pid=$!",
        'echo "$pid" > "$pidf"',
        "i=0",
        f"while [ $i -lt {max(1, round(wait_s * 10))} ]; do",
        '  if grep -q "listening on" "$log" 2>/dev/null; then echo "STARTED $pid"; exit 0; fi',
        '  if ! kill -0 "$pid" 2>/dev/null; then echo EXITED; tail -n 5 "$log"; rm -f "$pidf"; exit 3; fi',
        "  sleep 0.1; i=$((i+1))",
        "done",
        'echo TIMEOUT; tail -n 5 "$log"; exit 5',
    ]
    return "\n".join(lines) + "\n"


def stop_script(node: Node) -> str:
    """Kill the worker by its pid file (for workers that did not take `shutdown`); frozen ones too."""
    return (
        _prologue(node)
        + "\n".join(
            [
                'if [ ! -f "$pidf" ]; then echo NOTRUNNING; exit 0; fi',
                'pid=$(cat "$pidf")',
                'if ! kill -0 "$pid" 2>/dev/null || ! grep -q worker "/proc/$pid/cmdline" 2>/dev/null; then',
                '  rm -f "$pidf"; echo NOTRUNNING; exit 0',
                "fi",
                'kill -TERM "$pid"; kill -CONT "$pid"',  # a stopped process handles TERM only once continued
                "i=0",
                'while kill -0 "$pid" 2>/dev/null && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done',
                'kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"',
                'rm -f "$pidf"; echo "STOPPED $pid"',
            ]
        )
        + "\n"
    )


def logs_script(node: Node, lines: int) -> str:
    return _prologue(node) + (
        f'if [ ! -f "$log" ]; then echo "no log at $log" >&2; exit 2; fi\ntail -n {int(lines)} "$log"\n'
    )


def start_failure(node: Node, result: ShellResult, wait_s: float = START_WAIT_S) -> str:
    """The reason a start script failed, in words a user can act on."""
    out = result.out.strip().splitlines()
    if result.code == 127 and out[:1] == ["MISSING"]:
        first = shlex.split(node.command)[0]
        return (
            f"command {first!r} not found on {node.host} (Python or exoctl missing): install exoctl there, "
            "or set the node's 'command' in the inventory"
        )
    if result.code == 3:
        detail = " ".join(
            line for line in out[1:] if "error" in line.lower() or "cannot" in line
        ) or " ".join(out[1:])
        if "Address already in use" in detail:
            return f"port {node.port} on {node.host} is taken by another process"
        return f"the worker exited at start: {detail.strip()[-300:]}"
    if result.code == 5:
        return (
            f"the worker did not start listening within {wait_s:g} s; it may still be starting (a loaded "
            f"machine, a slow disk): see `exoctl logs {node.name}` and `exoctl nodes`, or wait longer "
            f"with `exoctl up --start-timeout {max(120, int(wait_s * 4))}`"
        )
    if result.code == 255 and node.uses_ssh:
        err = result.err.strip().splitlines()
        return (
            f"ssh to {node.ssh_user + '@' if node.ssh_user else ''}{node.host}:{node.ssh_port} failed: "
            + (err[-1] if err else "no reason given")
        )
    return f"start script failed (exit {result.code}): {(result.err or result.out).strip()[-300:]}"
