"""`exoctl chat`: a REPL with streamed answers, history across turns, and a few slash commands."""

from __future__ import annotations

import sys
from typing import Annotated

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

HELP = "Chat with a placed model: streamed answers, history across turns, /reset /stats /model /quit."
COMMANDS = (
    "/reset          forget the conversation\n"
    "/stats          tokens/s and time to first token of the last answer, and totals\n"
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
        note(f"chatting with {view.model_id} on {', '.join(view.nodes)} — /help for commands, /quit to leave")
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        last: Completion | None = None
        totals = {"answers": 0, "tokens": 0}
        while True:
            try:
                line = console.input("[bold green]you>[/] ")
            except EOFError:
                break
            except KeyboardInterrupt:
                console.print()
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command, _, argument = text.partition(" ")
                if command in ("/quit", "/exit"):
                    break
                if command == "/reset":
                    history = history[:1] if system else []
                    note("conversation forgotten")
                elif command == "/stats":
                    if last is None:
                        note("no answer yet")
                    else:
                        t = last.timings
                        note(
                            f"last answer: {last.completion_tokens} tokens, "
                            f"{t.decode_tokens_per_s:.1f} tok/s, first token after "
                            f"{t.time_to_first_token_s * 1000:.0f} ms, "
                            f"prompt {last.prompt_tokens} tokens; "
                            f"session: {totals['answers']} answers, {totals['tokens']} tokens"
                        )
                elif command == "/model" and argument.strip():
                    try:
                        view = ensure_instance(cluster, live_statuses(cluster), argument.strip(), dtype, note)
                        history = history[:1] if system else []
                        note(f"now chatting with {view.model_id} on {', '.join(view.nodes)}")
                    except ExoctlError as exc:
                        err_console.print(f"[red]error:[/] {exc.message}")
                else:
                    note(COMMANDS)
                continue
            history.append({"role": "user", "content": text})
            params = resolve_options(asked, view.sampling_defaults)
            generation = cluster.generate(view, params, messages=history)
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
                history.pop()
                continue
            sys.stdout.write("\n")
            if result:
                history.append({"role": "assistant", "content": result.text})
                last = result
                totals["answers"] += 1
                totals["tokens"] += result.completion_tokens
            else:
                history.pop()
