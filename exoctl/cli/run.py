"""`exoctl run`: one answer to one prompt, for scripts.

Until the cluster exists this runs the engine in this process.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from exoctl.catalog import DEFAULT_MODEL_ID
from exoctl.cli.options import DtypeOption, JsonOption, ModelOption
from exoctl.cli.output import err_console, print_json, use_json_errors
from exoctl.errors import InvalidRequestError

HELP = "Answer one prompt (from the argument or stdin) and exit."
EXAMPLES = (
    "Examples:\n\n  exoctl run 'What is the capital of France?'\n\n"
    "  echo 'The capital of France is' | exoctl run --raw --max-tokens 8\n\n"
    "  exoctl run --json 'Hello' | jq .text"
)


def run(
    prompt: Annotated[str | None, typer.Argument(help="The prompt; read from stdin when omitted.")] = None,
    model: ModelOption = DEFAULT_MODEL_ID,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0: all).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")
    ] = False,
    dtype: DtypeOption = "auto",
    json_output: JsonOption = False,
) -> None:
    use_json_errors(json_output)
    if prompt is None:
        if sys.stdin.isatty():
            raise InvalidRequestError("no prompt given", hint="pass it as an argument or on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise InvalidRequestError("the prompt is empty")

    from exoctl.engine.generate import Completion, stream_completion
    from exoctl.engine.model import load_model
    from exoctl.engine.sampling import SamplingParams
    from exoctl.engine.tokenizer import Tokenizer
    from exoctl.model_store import resolve_model

    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        max_tokens=max_tokens,
        stop=tuple(stop or ()),
    )
    from exoctl.engine.default_model import default_model_folder, is_converted

    if model == DEFAULT_MODEL_ID and not is_converted(default_model_folder()):
        err_console.print("[dim]converting the embedded SmolLM2 model once (about 30 s)…[/]")
    with err_console.status(f"loading {model}…"):
        folder = resolve_model(model)
        tokenizer = Tokenizer(folder)
        engine = load_model(folder, dtype=dtype)
    prompt_ids = (
        tokenizer.encode(prompt) if raw else tokenizer.encode_chat([{"role": "user", "content": prompt}])
    )
    completion: Completion | None = None
    for item in stream_completion(engine, tokenizer, prompt_ids, params):
        if isinstance(item, Completion):
            completion = item
        elif not json_output:
            sys.stdout.write(item)
            sys.stdout.flush()
    assert completion is not None
    t = completion.timings
    if json_output:
        print_json(
            {
                "text": completion.text,
                "token_ids": completion.token_ids,
                "finish_reason": completion.finish_reason,
                "usage": {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens},
                "timings": {
                    "time_to_first_token_s": round(t.time_to_first_token_s, 4),
                    "total_s": round(t.total_s, 4),
                    "decode_tokens_per_s": round(t.decode_tokens_per_s, 2),
                },
            }
        )
    else:
        sys.stdout.write("\n")
        err_console.print(
            f"[dim]{t.completion_tokens} tokens, {t.decode_tokens_per_s:.1f} tok/s, "
            f"first token after {t.time_to_first_token_s * 1000:.0f} ms[/]"
        )
