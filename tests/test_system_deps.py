"""`make test` on a machine without the system packages the tests need: the Makefile's check
(scripts/system-deps) run with a scratch PATH that holds only what each case has."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = "openssh-server openssh-client curl jq iproute2 chromium chromium-driver"


def scratch(tmp_path: Path, uid: int, tools: tuple[str, ...] = ()) -> dict[str, str]:
    """A PATH with bash and make, a fake `id -u`, a fake apt-get that records its arguments, and
    a stand-in for each of `tools`; sshd is looked for at a path that does not exist."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for real in ("bash", "make"):
        found = shutil.which(real)
        assert found is not None, f"{real} is needed to run this test"
        (bin_dir / real).symlink_to(found)
    fakes = {"id": f"echo {uid}", "apt-get": f'echo "$*" >> {tmp_path / "apt.log"}'}
    fakes.update({tool: "exit 0" for tool in tools})
    for name, body in fakes.items():
        path = bin_dir / name
        path.write_text(f"#!{shutil.which('bash')}\n{body}\n")
        path.chmod(0o755)
    return {
        "PATH": str(bin_dir),
        "EXOCTL_SSHD": str(tmp_path / "no-sshd"),
        "HOME": os.environ.get("HOME", "/"),
    }


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", "system-deps"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_root_it_stops_at_once_with_the_exact_install_command(tmp_path: Path) -> None:
    done = check(scratch(tmp_path, uid=1000))
    assert done.returncode != 0
    assert f"error: the tests need these system packages: {PACKAGES}" in done.stderr
    assert (
        "install them with:  sudo apt-get update && "
        f"sudo apt-get install -y -qq --no-install-recommends {PACKAGES}"
    ) in done.stderr
    assert not (tmp_path / "apt.log").exists()  # nothing tried


def test_as_root_it_installs_exactly_what_is_missing(tmp_path: Path) -> None:
    done = check(scratch(tmp_path, uid=0, tools=("curl", "jq", "ssh")))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == [
        "update -qq",
        "install -y -qq --no-install-recommends openssh-server iproute2 chromium chromium-driver",
    ]


def test_with_everything_there_it_does_nothing(tmp_path: Path) -> None:
    tools = ("sshd", "ssh", "curl", "jq", "ip", "tc", "chromium", "chromedriver")
    done = check(scratch(tmp_path, uid=1000, tools=tools))
    assert done.returncode == 0 and done.stderr == ""
    assert not (tmp_path / "apt.log").exists()
