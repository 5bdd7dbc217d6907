"""`exoctl run`: one answer to one prompt through the cluster, for scripts."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from exoctl.cli.common import (
    InventoryOption,
    check_request,
    ensure_instance,
    live_statuses,
    open_cluster,
    suggest_models,
)
from exoctl.cli.options import (
    FrequencyPenaltyOption,
    JsonOption,
    MaxTokensOption,
    MinPOption,
    PresencePenaltyOption,
    RepetitionPenaltyOption,
    TemperatureOption,
    TopKOption,
    TopPOption,
)
from exoctl.cli.output import err_console, note, out
from exoctl.errors import InvalidRequestError
from exoctl.wire.sampling_params import SamplingDefaults, SamplingParamError, SamplingParams, SamplingRequest

HELP = "Answer one prompt (from the argument or stdin) on the cluster and exit."
EXAMPLES = (
    "Examples:\n\n  exoctl run 'What is the capital of France?'\n\n"
    "  echo 'The capital of France is' | exoctl run --raw --max-tokens 8\n\n"
    "  exoctl run --json 'Hello' | jq .text"
)

ModelChoice = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        autocompletion=suggest_models,
        help="Catalog id, Hugging Face repo id, local folder, or instance id "
        "(default: the only placed model, else the embedded default).",
    ),
]


def sampling_request(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: list[str] | None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> SamplingRequest:
    """The options as a SamplingRequest (an option left out takes the model's default); a bad
    value is named by its option, before any node is asked."""
    asked = SamplingRequest(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        max_tokens=max_tokens,
        seed=seed,
        stop=tuple(stop or ()),
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )
    resolve_options(asked, None)
    return asked


def resolve_options(asked: SamplingRequest, defaults: SamplingDefaults | None) -> SamplingParams:
    try:
        return asked.resolve(defaults)
    except SamplingParamError as exc:
        raise InvalidRequestError(f"--{exc.name.replace('_', '-')} {exc.problem}") from None


def run(
    prompt: Annotated[str | None, typer.Argument(help="The prompt; read from stdin when omitted.")] = None,
    model: ModelChoice = None,
    max_tokens: MaxTokensOption = None,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    top_k: TopKOption = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    frequency_penalty: FrequencyPenaltyOption = 0.0,
    presence_penalty: PresencePenaltyOption = 0.0,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")
    ] = False,
    dtype: Annotated[
        str, typer.Option("--dtype", help="dtype if the model has to be placed first.")
    ] = "auto",
    speculative: Annotated[
        bool,
        typer.Option(
            "--speculative/--no-speculative",
            help="Let the instance's drafter guess tokens (place --draft); off: one token a step.",
        ),
    ] = True,
    inventory: InventoryOption = None,
    json_output: JsonOption = False,
) -> None:
    out.mode(json_output)
    asked = sampling_request(
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        stop,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )
    check_request(model, dtype)
    if prompt is None:
        if sys.stdin.isatty():
            raise InvalidRequestError("no prompt given", hint="pass it as an argument or on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise InvalidRequestError("the prompt is empty")
    with open_cluster(inventory) as cluster:
        statuses = live_statuses(cluster)
        view = ensure_instance(cluster, statuses, model, dtype, note)
        params = resolve_options(asked, view.sampling_defaults)
        messages = None if raw else [{"role": "user", "content": prompt}]
        generation = cluster.generate(
            view, params, messages=messages, prompt=prompt if raw else None, speculative=speculative
        )
        try:
            for delta in generation:
                if not out.json:  # streamed as it comes; --json prints the whole answer at the end
                    sys.stdout.write(delta)
                    sys.stdout.flush()
        except KeyboardInterrupt:  # stop the workers too, not only this process
            generation.cancel()
            raise
    result = generation.result
    assert result is not None
    timings = result.timings

    def stats() -> None:  # the answer is on stdout already: its numbers on stderr
        sys.stdout.write("\n")
        err_console.print(
            f"[dim]{result.completion_tokens} tokens, {timings.decode_tokens_per_s:.1f} tok/s, "
            f"first token after {timings.time_to_first_token_s * 1000:.0f} ms ({result.cached_tokens} of "
            f"{result.prompt_tokens} prompt tokens cached) on {', '.join(view.nodes)}[/]"
        )

    out.result(result.to_wire(), stats)
