"""A compute lane: one instance's thread, running its jobs in arrival order.

Everything queued when the lane looks is taken together, and the token messages among it become
one job, so the head decodes all its running sequences as one batch (continuous batching). A
failed job fails only the sequences it was about — or, under tensor sharding, the whole instance,
since its ranks ran part of a step and their collectives are out of step. Torch-free.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exoctl.errors import CollectiveError, ExoctlError, InvalidRequestError, PrefixMissingError
from exoctl.wire.generate_request import GenerateRequest
from exoctl.wire.instance_messages import (
    Forget,
    Forward,
    InstanceMessage,
    Lease,
    Prefill,
    Release,
    SeqError,
    Tokens,
)
from exoctl.worker.outbox import FailInstance, Out, Outbox, Poster, ToSelf, client_error

if TYPE_CHECKING:
    from exoctl.worker.instance import InstanceRunner

log = logging.getLogger("exoctl.worker")


@dataclass(frozen=True)
class GenerateJob:
    """A client's new request, for the head."""

    client: bytes
    request: GenerateRequest


@dataclass(frozen=True)
class CancelJob:
    request_id: str


@dataclass(frozen=True)
class FromPeer:
    """A message from a runner of the same instance (or this node's own, `ToSelf`)."""

    message: InstanceMessage


@dataclass(frozen=True)
class TokenBatch:
    """Every `token` message that was queued at once: one decode step for all their sequences."""

    messages: list[Tokens]


Job = GenerateJob | CancelJob | FromPeer | TokenBatch


def merge_token_jobs(jobs: list[Job]) -> list[Job]:
    """The token messages become one job, at the place of the first."""
    merged: list[Job] = []
    batch: TokenBatch | None = None
    for job in jobs:
        if isinstance(job, FromPeer) and isinstance(job.message, Tokens):
            if batch is None:
                batch = TokenBatch([])
                merged.append(batch)
            batch.messages.append(job.message)
        else:
            merged.append(job)
    return merged


def job_sequences(job: Job) -> tuple[str, ...]:
    """The sequences a failed job was about, so each can be failed on its own."""
    match job:
        case TokenBatch(messages):
            return tuple(s for message in messages for s in message.seqs)
        case FromPeer(Forward(step=step)):
            return tuple(step.seqs)
        case FromPeer(SeqError(seqs=seqs)):
            return seqs
        case FromPeer(Release(seq=seq)) | FromPeer(Prefill(seq=seq)):
            return (seq,)
    return ()  # a lease names the live ones, not the ones it was about; a forget names no sequence


class Lane:
    def __init__(self, runner: InstanceRunner, node: str, outbox: Outbox) -> None:
        self.runner = runner
        self.node = node
        self.outbox = outbox
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(
            target=self._loop, name=f"compute-{runner.spec.instance_id[:8]}", daemon=True
        )

    def put(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        poster = Poster(self.outbox)

        def send(out: Out) -> None:
            if isinstance(out, ToSelf):
                self.jobs.put(FromPeer(out.message))
            else:
                poster.post(out)

        self.runner.set_emit(send)
        running = True
        try:
            while running:
                queued = [self.jobs.get()]
                while True:  # everything queued now is handled together: decode steps get batched
                    try:
                        queued.append(self.jobs.get_nowait())
                    except queue.Empty:
                        break
                pending = [job for job in queued if job is not None]
                running = len(pending) == len(queued)
                for job in merge_token_jobs(pending):
                    for out in self._compute(job):
                        send(out)
        finally:
            self.runner.close()
            poster.close()

    def _compute(self, job: Job) -> list[Out]:
        runner = self.runner
        if runner.failed or (runner.unloading and not isinstance(job, GenerateJob)):
            return []
        role, stage = runner.role, runner.stage
        try:
            match job:
                case GenerateJob(client, request):
                    return role.start(request, client)
                case CancelJob(request_id):
                    role.cancel(request_id)
                case TokenBatch(messages):
                    return role.tokens(messages)
                case FromPeer(Forward() as forward):
                    return stage.forward(forward)
                case FromPeer(Prefill(seq=seq)):
                    return role.prefill(seq)
                case FromPeer(Release() as release):
                    return role.released(release)
                case FromPeer(Forget(entries=entries)):
                    return role.forget(entries)
                case FromPeer(SeqError(seqs=seqs, message=message, missing=missing)):
                    return role.abort(seqs, message, missing)
                case FromPeer(Lease(seqs=seqs, kept=kept)):
                    role.renew(seqs, kept)
            return []
        except Exception as exc:
            return self._failed(job, exc)

    def _failed(self, job: Job, exc: Exception) -> list[Out]:
        """Tell whoever waits on this job's sequences, and only them."""
        runner = self.runner
        hint: str | None = None
        if isinstance(exc, CollectiveError):  # names the peer, not this node
            text = f"node {self.node}: {exc.message}"
        elif isinstance(exc, ExoctlError):
            text, hint = exc.message, exc.hint
        else:
            log.error("compute error: %s", traceback.format_exc())
            text = f"node {self.node}: {type(exc).__name__}: {exc}"
        outs: list[Out]
        if isinstance(job, GenerateJob):
            request_id = job.request.request_id
            kind = type(exc).__name__ if isinstance(exc, ExoctlError) else "ExoctlError"
            outs = [client_error(job.client, request_id, text, hint, kind), *runner.role.release(request_id)]
        else:
            missing = (exc.entry,) if isinstance(exc, PrefixMissingError) else ()
            outs = runner.role.failed(job_sequences(job), text, missing)
        if runner.breaks_instance_on_error and not isinstance(exc, InvalidRequestError):
            outs.append(FailInstance(runner.spec.instance_id, text))
        return outs
