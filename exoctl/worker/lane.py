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

from exoctl.errors import CollectiveError, ExoctlError, InvalidRequestError
from exoctl.wire.protocol import Message
from exoctl.worker.outbox import FailInstance, Out, Outbox, Poster, ToPeer, ToSelf, client_error

if TYPE_CHECKING:
    from exoctl.worker.runner import Runner

log = logging.getLogger("exoctl.worker")


@dataclass(frozen=True)
class Generate:
    """A client's new request, for the head runner."""

    client: bytes
    request: Message


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class PeerMessage:
    """A `forward`, `token`, `release`, `seq_error` or `lease` from a runner of the same instance."""

    message: Message


@dataclass(frozen=True)
class TokenBatch:
    """Every `token` message that was queued at once: one decode step for all their sequences."""

    messages: list[Message]


Job = Generate | Cancel | PeerMessage | TokenBatch


def merge_token_jobs(jobs: list[Job]) -> list[Job]:
    """The token messages become one job, at the place of the first."""
    merged: list[Job] = []
    batch: TokenBatch | None = None
    for job in jobs:
        if isinstance(job, PeerMessage) and job.message.type == "token":
            if batch is None:
                batch = TokenBatch([])
                merged.append(batch)
            batch.messages.append(job.message)
        else:
            merged.append(job)
    return merged


def job_sequences(job: Job) -> list[str]:
    """The sequences a failed job was about, so each can be failed on its own."""
    match job:
        case TokenBatch(messages):
            return [s for message in messages for s in message["seqs"]]
        case PeerMessage(message) if message.type != "lease":  # a lease names the live ones
            seqs = message.get("seqs")
            if isinstance(seqs, list):
                return [s for s in seqs if isinstance(s, str)]
            seq = message.get("seq")
            return [seq] if isinstance(seq, str) else []
    return []


class Lane:
    def __init__(self, runner: Runner, node: str, outbox: Outbox) -> None:
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
                self.jobs.put(PeerMessage(out.message))
            else:
                poster.post(out)

        self.runner.emit = send
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
        if runner.failed or (runner.unloading and not isinstance(job, Generate)):
            return []
        try:
            match job:
                case Generate(client, request):
                    return runner.start(request, client)
                case Cancel(request_id):
                    runner.cancel(request_id)
                    return []
                case TokenBatch(messages):
                    return runner.tokens(messages)
                case PeerMessage(message) if message.type == "forward":
                    return runner.forward(message)
                case PeerMessage(message) if message.type == "prefill" and runner.spec.is_head:
                    return runner.prefill(message["seq"])
                case PeerMessage(message) if message.type == "release":
                    return runner.release(message["seq"])
                case PeerMessage(message) if message.type == "seq_error":
                    return runner.abort(message["seqs"], message["message"])
                case PeerMessage(message) if message.type == "lease" and not runner.spec.is_head:
                    return runner.renew(message["seqs"])
            return []
        except Exception as exc:
            return self._failed(job, exc)

    def _failed(self, job: Job, exc: Exception) -> list[Out]:
        """Tell whoever waits on this job's sequences, and only them."""
        runner, spec = self.runner, self.runner.spec
        code = "invalid_request" if isinstance(exc, InvalidRequestError) else "failed"
        hint: str | None = None
        if isinstance(exc, CollectiveError):  # names the peer, not this node
            text = f"node {self.node}: {exc.message}"
        elif isinstance(exc, ExoctlError):
            text, hint = exc.message, exc.hint
        else:
            log.error("compute error: %s", traceback.format_exc())
            text = f"node {self.node}: {type(exc).__name__}: {exc}"
        outs: list[Out] = []
        if isinstance(job, Generate):
            request_id = job.request["request_id"]
            outs = [client_error(job.client, request_id, text, hint, code), *runner.release(request_id)]
        else:
            seqs = job_sequences(job)
            if spec.is_head:
                outs = runner.abort(seqs, text)
            elif seqs:
                fields = {"instance_id": spec.instance_id, "seqs": seqs, "message": text}
                outs = [ToPeer(spec.peers[0][1], "seq_error", fields)]
        if spec.sharding == "tensor" and code != "invalid_request":
            outs.append(FailInstance(spec.instance_id, text))
        return outs
