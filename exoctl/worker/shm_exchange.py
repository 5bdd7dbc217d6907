"""Partials through shared memory, for tensor-parallel ranks that share a host.

Each rank creates one file in /dev/shm: a 32-bit step word (the last step it published, plus 1),
then two slots for partials, used by even and odd steps. A rank writes its partial of step s into
slot s % 2 and stores s + 1 in its word (kernels/shm_signal.c wakes a reader asleep on it); the
other ranks wait on that word and read the slot. Reusing slot s % 2 at step s + 2 is safe without
any acknowledgement: this rank reached step s + 2 only by completing step s + 1, which needed
every peer's partial of s + 1, which each peer sent after it had finished reading step s.

Co-located is decided from what every rank announces, so all ranks decide alike: a host key of
the machine's boot id and the /dev/shm mount (containers on one machine with private /dev/shm
differ), and the file's path. Partials larger than a slot (long prompt steps) go over ZeroMQ.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import stat
import tempfile
from pathlib import Path

import torch

from exoctl.engine import qkernel
from exoctl.errors import CollectiveError
from exoctl.worker.profile import MACHINE_ID_ENV

SHM_DIR = Path("/dev/shm")
SLOT_BYTES = 8 * 2**20  # a 256-row prompt step of an 8192-wide model in float32
HEADER_BYTES = 4096  # the step word, alone on its page
# How long a rank spins on a peer's step word before it sleeps. With a core for each rank's
# threads, spinning is free and a sleeping rank's wake-up costs tens of microseconds: int4 on the
# 1.1B shape, 2 ranks on 2 cores (benchmarks/tensor_decode.py), spent 11.4 ms a token in the
# collectives spinning 30 us, 7.1 ms spinning 300 us, 7.5 ms spinning 2 ms (the rest is waiting
# for the other rank's compute). Ranks that share cores spin briefly: a spin takes the core the
# rank it waits for needs.
SPIN_NS_OWN_CORES = 1_000_000
SPIN_NS_SHARED_CORES = 20_000
ENV_SWITCH = "EXOCTL_TP_SHM"  # "0": co-located ranks use ZeroMQ too
FILE_BYTES = HEADER_BYTES + 2 * SLOT_BYTES
FILE_PREFIX = "exoctl-tp-"


def spin_ns(world: int) -> int:
    """The spin for `world` ranks on this host, each with torch's thread count."""
    return (
        SPIN_NS_OWN_CORES
        if world * torch.get_num_threads() <= (os.cpu_count() or 1)
        else SPIN_NS_SHARED_CORES
    )


def offer_path(offer: str) -> str:
    """The file an offer names, which must be one of ours in /dev/shm (never a path as given)."""
    _, separator, path = offer.partition("|")
    name = path.removeprefix(f"{SHM_DIR}/")
    if not separator or not name.startswith(FILE_PREFIX) or "/" in name:
        raise ValueError(f"not an exoctl shared-memory file: {path!r}")
    return str(SHM_DIR / name)


def _pid_space() -> int:
    """This process's PID namespace: process ids in file names mean something only within it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def sweep_stale() -> None:
    """Remove the files of this user's workers that died before they unlinked theirs (a rank
    unlinks its file after its first shared step or at unload; a killed one unlinks nothing)."""
    space = f"{FILE_PREFIX}{_pid_space()}-"
    for path in SHM_DIR.glob(f"{space}*"):
        pid = path.name[len(space) :].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        try:
            if path.lstat().st_uid == os.getuid():
                path.unlink()
        except OSError:
            pass


def host_key() -> str | None:
    """What co-located ranks have in common, or None where shared memory cannot be used."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or not SHM_DIR.is_dir() or qkernel.optional_library() is None:
        return None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        mount = SHM_DIR.stat()
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{mount.st_dev}/{os.environ.get(MACHINE_ID_ENV, '')}"


class ShmExchange:
    def __init__(self, rank: int, world: int, key: str) -> None:
        self.rank = rank
        self.world = world
        self.key = key
        self.lib = qkernel.library()
        self.spin_ns = spin_ns(world)
        sweep_stale()
        fd, path = tempfile.mkstemp(prefix=f"{FILE_PREFIX}{_pid_space()}-{os.getpid()}-r{rank}-", dir=SHM_DIR)
        self.path: str | None = path  # None once unlinked
        # what the other ranks need to read this rank's partials: the host key and the file
        self.offer = f"{key}|{path}"
        try:
            os.ftruncate(fd, FILE_BYTES)
            self.own = _Segment(fd)
        finally:
            os.close(fd)
        self.peers: dict[int, _Segment] = {}

    def colocated(self, offers: list[str | None]) -> bool:
        """Whether every rank offered shared memory on this host (the same answer on every rank)."""
        return all(offer is not None and offer.split("|", 1)[0] == self.key for offer in offers)

    def attach(self, offers: list[str | None]) -> None:
        for rank, offer in enumerate(offers):
            if rank == self.rank or rank in self.peers:
                continue
            assert offer is not None
            path = offer_path(offer)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as exc:
                raise CollectiveError(
                    f"rank {rank}'s shared-memory file {path} cannot be opened here ({exc.strerror}), though "
                    f"both ranks report the same host; set {ENV_SWITCH}=0 on the workers to use ZeroMQ"
                ) from None
            try:
                # mapped past its end a file would kill this process at the first read (SIGBUS)
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_size != FILE_BYTES or info.st_uid != os.getuid():
                    raise CollectiveError(
                        f"rank {rank}'s shared-memory file {path} is not one a worker of this user made "
                        f"({info.st_size} bytes, owner {info.st_uid})"
                    )
                self.peers[rank] = _Segment(fd)
            finally:
                os.close(fd)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= SLOT_BYTES

    def publish(self, step: int, partial: torch.Tensor) -> None:
        slot = self.own.slot(step, partial.numel() * partial.element_size())
        slot.copy_(partial.reshape(-1).view(torch.uint8))
        self.lib.shm_publish(self.own.word, _stamp(step))

    def wait(self, peer: int, step: int, timeout_ms: int) -> bool:
        """Whether `peer` published `step` within timeout_ms."""
        segment = self.peers[peer]
        reached: int = self.lib.shm_wait(segment.word, _stamp(step), self.spin_ns, timeout_ms * 1_000_000)
        return reached == 0

    def view(self, peer: int, step: int, like: torch.Tensor) -> torch.Tensor:
        """`peer`'s partial of `step`, in place: valid until this rank finishes step + 1."""
        raw = self.peers[peer].slot(step, like.numel() * like.element_size())
        return raw.view(like.dtype).view(like.shape)

    def unlink(self) -> None:
        """Remove this rank's file name: the peers hold it mapped, and a killed worker leaves nothing."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None

    def close(self) -> None:
        self.unlink()
        for segment in (self.own, *self.peers.values()):
            segment.close()
        self.peers.clear()


def _stamp(step: int) -> int:
    """What a rank's step word holds once its partial of `step` is written (32 bits, wrapping)."""
    return (step + 1) & 0xFFFFFFFF


class _Segment:
    """One rank's file, mapped: the step word's address and the two slots as byte tensors."""

    def __init__(self, fd: int) -> None:
        self.map = mmap.mmap(fd, FILE_BYTES)
        self.bytes: torch.Tensor | None = torch.frombuffer(self.map, dtype=torch.uint8)
        self.word = ctypes.c_void_p(self.bytes.data_ptr())

    def slot(self, step: int, nbytes: int) -> torch.Tensor:
        assert self.bytes is not None
        start = HEADER_BYTES + (step % 2) * SLOT_BYTES
        return self.bytes[start : start + nbytes]

    def close(self) -> None:
        self.bytes = None  # the tensor holds the map's buffer; views handed out may too
        try:
            self.map.close()
        except BufferError:
            pass  # a view is still alive: the map goes with it
