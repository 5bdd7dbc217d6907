"""The cluster's CurveZMQ key pair: made once by `exoctl keys init` (or the first `up`).

Every worker and every client of one cluster holds the same pair: workers serve with it and
accept only clients that present its public key, so a process without the key files is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exoctl.errors import ExoctlError
from exoctl.paths import exoctl_home

KEY_NAME = "cluster"
PUBLIC_FILE = f"{KEY_NAME}.key"
SECRET_FILE = f"{KEY_NAME}.key_secret"


@dataclass(frozen=True)
class ClusterKeys:
    public: bytes  # Z85, 40 bytes
    secret: bytes
    folder: Path


def keys_dir() -> Path:
    return exoctl_home() / "keys"


def init_keys(folder: Path | None = None, force: bool = False) -> tuple[ClusterKeys, bool]:
    """The key pair in `folder`, made if missing; True when it was made now."""
    import zmq.auth

    folder = folder or keys_dir()
    if (folder / SECRET_FILE).is_file() and not force:
        return load_keys(folder), False
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    for name in (PUBLIC_FILE, SECRET_FILE):
        (folder / name).unlink(missing_ok=True)
    zmq.auth.create_certificates(str(folder), KEY_NAME)
    (folder / SECRET_FILE).chmod(0o600)
    return load_keys(folder), True


def load_keys(folder: Path | None = None) -> ClusterKeys:
    import zmq.auth

    folder = folder or keys_dir()
    path = folder / SECRET_FILE
    if not path.is_file():
        raise ExoctlError(
            f"no cluster key in {folder}",
            hint="make one with `exoctl keys init` (`exoctl up` also makes it on first use)",
        )
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ExoctlError(
            f"cannot read the cluster key {path}: {exc}", hint="remake it: exoctl keys init --force"
        ) from None
    if not public or not secret:
        raise ExoctlError(f"{path} holds no secret key", hint="remake it: exoctl keys init --force")
    return ClusterKeys(public, secret, folder)


def find_keys(folder: Path | None = None) -> ClusterKeys | None:
    folder = folder or keys_dir()
    return load_keys(folder) if (folder / SECRET_FILE).is_file() else None
