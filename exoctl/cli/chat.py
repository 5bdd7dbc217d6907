"""`exoctl chat`: a REPL with streamed answers, history across turns, and a few slash commands."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from exoctl.cli.common import InventoryOption, check_request, ensure_instance, live_statuses, open_cluster
from exoctl.cli.options import (
    FrequencyPenaltyOption,
    MaxTokensOption,
    MinPOption,
    PresencePenaltyOption,
    RepetitionPenaltyOption,
    TemperatureOption,
    TopKOption,
    TopPOption,
)
from exoctl.cli.output import console, err_console, note
from exoctl.cli.run import ModelChoice, resolve_options, sampling_request
from exoctl.errors import ExoctlError
from exoctl.wire.answer import Completion
from exoctl.wire.sampling_params import SamplingRequest

if TYPE_CHECKING:
    from exoctl.cluster.client import Cluster
    from exoctl.cluster.views import InstanceView

HELP = "Chat with a placed model: streamed answers, history across turns, /reset /stats /model /quit."
COMMANDS = (
    "/reset          forget the conversation\n"
    "/stats          tokens/s, time to first token and cached prompt tokens of the last answer, and totals\n"
    "/model ID       switch to another model (placed first if needed)\n"
    "/quit           leave (also Ctrl-D); Ctrl-C stops an answer"
)


def chat(
    model: ModelChoice = None,
    system: Annotated[str | None, typer.Option(help="A system message at the start of the chat.")] = None,
    max_tokens: MaxTokensOption = None,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    top_k: TopKOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    frequency_penalty: FrequencyPenaltyOption = 0.0,
    presence_penalty: PresencePenaltyOption = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="dtype if the model has to be placed first.")
    ] = "auto",
    inventory: InventoryOption = None,
) -> None:
    asked = sampling_request(
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        None,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )
    check_request(model, dtype)

    with open_cluster(inventory) as cluster:
        view = ensure_instance(cluster, live_statuses(cluster), model, dtype, note)
        session = ChatSession(cluster, view, system)
        note(f"chatting with {view.model_id} on {', '.join(view.nodes)} — /help for commands, /quit to leave")
        while True:
            try:
                text = console.input("[bold green]you>[/] ").strip()
            except EOFError:
                break
            except KeyboardInterrupt:
                console.print()
                break
            if text.startswith("/"):
                if not session.command(text, dtype):
                    break
            elif text:
                session.ask(text, asked)


class ChatSession:
    """One conversation of `exoctl chat`: its instance, its history, and the numbers /stats shows."""

    def __init__(self, cluster: Cluster, view: InstanceView, system: str | None) -> None:
        self.cluster = cluster
        self.view = view
        self.start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.history = list(self.start)
        self.last: Completion | None = None
        self.answers = self.tokens = self.cached = 0

    def command(self, text: str, dtype: str) -> bool:
        """A /command; False when it ends the chat."""
        command, _, argument = text.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/reset":
            self.history = list(self.start)
            note("conversation forgotten")
        elif command == "/stats":
            note(self.stats())
        elif command == "/model" and argument.strip():
            try:
                statuses = live_statuses(self.cluster)
                self.view = ensure_instance(self.cluster, statuses, argument.strip(), dtype, note)
                self.history = list(self.start)
                note(f"now chatting with {self.view.model_id} on {', '.join(self.view.nodes)}")
            except ExoctlError as exc:
                err_console.print(f"[red]error:[/] {exc.message}")
        else:
            note(COMMANDS)
        return True

    def stats(self) -> str:
        last = self.last
        if last is None:
            return "no answer yet"
        t = last.timings
        return (
            f"last answer: {last.completion_tokens} tokens, {t.decode_tokens_per_s:.1f} tok/s, first token "
            f"after {t.time_to_first_token_s * 1000:.0f} ms, prompt {last.prompt_tokens} tokens "
            f"({last.cached_tokens} cached); session: {self.answers} answers, {self.tokens} tokens, "
            f"{self.cached} prompt tokens cached"
        )

    def ask(self, text: str, asked: SamplingRequest) -> None:
        """One turn: the answer streamed as it comes; Ctrl-C stops it (what came is kept)."""
        self.history.append({"role": "user", "content": text})
        params = resolve_options(asked, self.view.sampling_defaults)
        generation = self.cluster.generate(self.view, params, messages=self.history)
        try:
            for delta in generation:
                sys.stdout.write(delta)
                sys.stdout.flush()
            result = generation.result
        except KeyboardInterrupt:
            result = generation.cancel()
            note("\n(stopped)")
        except ExoctlError as exc:
            err_console.print(
                f"\n[red]error:[/] {exc.message}" + (f"\n[dim]hint:[/] {exc.hint}" if exc.hint else "")
            )
            self.history.pop()
            return
        sys.stdout.write("\n")
        if not result:
            self.history.pop()
            return
        self.history.append({"role": "assistant", "content": result.text})
        self.last = result
        self.answers += 1
        self.tokens += result.completion_tokens
        self.cached += result.cached_tokens
