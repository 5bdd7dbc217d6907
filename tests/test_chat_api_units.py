"""The chat API's pure parts: tool calls read out of each family's format (whole and streamed, split
at every character), the penalties and cuts against reference implementations, and every message
shape OpenAI clients send, accepted or refused as said."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from exoctl.api.schemas import ChatRequest
from exoctl.api.tool_calls import ToolStream, forced_prefix, parse
from exoctl.engine.penalties import TokenHistory, penalize
from exoctl.engine.sampling import Sampler, min_p_filter, sample
from exoctl.engine.tokenizer import tool_format_of
from exoctl.wire.sampling_params import SamplingParamError, SamplingParams

NAMES = frozenset({"get_weather", "get_time"})
WEATHER = {"city": "Paris"}
TIME = {"tz": "Europe/Paris"}

# (format, the model's text, the text left, the calls as (name, arguments))
RECORDED: list[tuple[str, str, str, list[tuple[str, dict[str, Any]]]]] = [
    # Llama 3.1: JSON after <|python_tag|>, or alone; "parameters"; several joined by ";"
    (
        "llama3",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [("get_weather", WEATHER)],
    ),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", WEATHER)]),
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}',
        "",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    ("llama3", "Il fait beau à Paris : 24 °C.", "Il fait beau à Paris : 24 °C.", []),
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Par',
        '{"name": "get_weather", "parameters": {"city": "Par',
        [],
    ),
    (
        "llama3",
        '{"name": "launch_rocket", "parameters": {}}',
        '{"name": "launch_rocket", "parameters": {}}',
        [],
    ),
    ("llama3", '{"answer": 42}', '{"answer": 42}', []),
    # Qwen2.5 / Hermes: <tool_call> blocks, text around them kept
    (
        "hermes",
        'Je regarde ça.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        "Je regarde ça.",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        "hermes",
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>',
        "",
        [("get_weather", WEATHER)],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "",
        [("get_weather", WEATHER)],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
        [],
    ),
    ("hermes", "a < b and <tool is not a call", "a < b and <tool is not a call", []),
    # Mistral: [TOOL_CALLS] and a list
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]',
        "",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city"',
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city"',
        [],
    ),
    ("mistral", "No call [TOOL here.", "No call [TOOL here.", []),
]


def calls_of(calls: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(("fmt", "text", "left", "expected"), RECORDED)
def test_each_familys_calls_are_read_and_anything_else_stays_text(
    fmt: str, text: str, left: str, expected: list[tuple[str, dict[str, Any]]]
) -> None:
    rest, calls = parse(text, fmt, NAMES)
    assert calls_of(calls) == expected and rest == left
    for call in calls:
        assert call.id.startswith("call_") and call.to_openai()["type"] == "function"


@pytest.mark.parametrize(("fmt", "text", "left", "expected"), RECORDED)
def test_a_stream_split_at_every_character_gives_the_same_answer(
    fmt: str, text: str, left: str, expected: list[tuple[str, dict[str, Any]]]
) -> None:
    def streamed(parts: list[str]) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
        stream = ToolStream(fmt, NAMES)
        shown = "".join(stream.feed(p) for p in parts)
        rest, calls = stream.finish()
        if not calls:
            return shown + rest, []
        return (shown.strip() + rest).strip(), calls_of(calls)

    whole = (left, expected) if expected else (text, [])
    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]]) == whole, cut
    assert streamed(list(text)) == whole


def test_text_before_a_hermes_call_is_streamed_before_the_call_ends() -> None:
    stream = ToolStream("hermes", NAMES)
    assert stream.feed("Je regarde") == "Je regarde"
    assert stream.feed(" ça. <tool") == " ça. "  # held: it may be a call's start
    assert stream.feed('_call>{"name": "get_weather", "arguments": {}}') == ""
    rest, calls = stream.finish()
    assert rest == "" and calls_of(calls) == [("get_weather", {})]


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_a_forced_start_is_read_back_with_what_the_model_wrote(fmt: str) -> None:
    """The opener the head writes for a required call, and the call the grammar made the model write."""
    written = {
        "hermes": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "mistral": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    }
    stream = ToolStream(fmt, NAMES, forced_prefix(fmt))
    assert stream.feed(written[fmt]) == ""
    assert calls_of(stream.finish()[1]) == [("get_weather", WEATHER)]


def test_a_generic_answer_is_a_call_or_a_reply() -> None:
    stream = ToolStream("generic", NAMES)
    assert stream.feed('{"tool_call": {"name": "get_time", ') == ""  # JSON throughout: held
    stream.feed('"arguments": {"tz": "Europe/Paris"}}}')
    assert calls_of(stream.finish()[1]) == [("get_time", TIME)]
    stream = ToolStream("generic", NAMES)
    stream.feed('{"response": "Bonjour !"}')
    assert stream.finish() == ("Bonjour !", [])
    # a call of a tool the request did not offer stays text
    assert parse('{"tool_call": {"name": "launch", "arguments": {}}}', "generic", NAMES)[1] == []


def test_the_format_comes_from_the_template() -> None:
    assert tool_format_of("{% for t in tools %}...<tool_call>{{ t }}</tool_call>{% endfor %}") == "hermes"
    assert tool_format_of("<|start_header_id|>ipython<|end_header_id|>{{ tools }}") == "llama3"
    assert tool_format_of("[AVAILABLE_TOOLS] {{ tools }}[/AVAILABLE_TOOLS] [TOOL_CALLS]") == "mistral"
    assert tool_format_of("{% if tools %}{{ tools | tojson }}{% endif %}") == "hermes"  # the fallback
    assert tool_format_of("{{ message.content }}<|im_end|>") is None


# --- penalties and cuts ----------------------------------------------------------------------------


def reference(
    logits: torch.Tensor, params: SamplingParams, prompt: list[int], generated: list[int]
) -> torch.Tensor:
    """Hugging Face's processors and OpenAI's formula, applied to [1, V] as they define them."""
    from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper

    ids = torch.tensor([prompt + generated])
    out = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, logits.clone())
    for token in set(generated):  # OpenAI: mu[j] -= c[j] * frequency + (c[j] > 0) * presence
        out[0, token] -= generated.count(token) * params.frequency_penalty + params.presence_penalty
    out = out / params.temperature
    if params.top_k:
        out = TopKLogitsWarper(params.top_k)(ids, out)
    if params.min_p:
        out = MinPLogitsWarper(params.min_p)(ids, out)
    return out


def test_penalties_and_cuts_equal_the_reference_implementations() -> None:
    logits = torch.tensor([[3.0, -1.5, 2.0, 0.5, -0.2, 1.0, 4.0, -3.0]])
    prompt, generated = [1, 5], [6, 6, 2, 4]
    for params in (
        SamplingParams(temperature=0.7, repetition_penalty=1.3),
        SamplingParams(temperature=1.0, frequency_penalty=0.8, presence_penalty=-0.4),
        SamplingParams(temperature=1.2, repetition_penalty=0.8, frequency_penalty=1.5, presence_penalty=2.0),
        SamplingParams(temperature=0.9, min_p=0.2, frequency_penalty=0.3),
        SamplingParams(temperature=1.0, top_k=3, min_p=0.05, repetition_penalty=1.1),
    ):
        history = TokenHistory(frozenset(prompt) if params.repetition_penalty != 1 else frozenset())
        for token in generated:
            history.record(token)
        ours = penalize(logits[0], params, history) / params.temperature
        ours = min_p_filter(ours[None, :], params.min_p)
        if params.top_k:
            ours = ours.masked_fill(ours < torch.topk(ours, params.top_k).values[..., -1:], -math.inf)
        expected = reference(logits, params, prompt, generated)
        assert torch.equal(torch.isinf(ours), torch.isinf(expected)), params
        finite = ~torch.isinf(expected)
        assert torch.allclose(ours[finite], expected[finite], atol=1e-6), params


def test_greedy_choices_follow_the_penalties_and_seeded_sampling_repeats() -> None:
    logits = torch.tensor([[5.0, 4.9, 1.0, 0.0]])
    sampler = Sampler.create(SamplingParams(frequency_penalty=2.0), prompt=[0])
    # greedy, but token 0 loses 2 per use: 0, then 1 (4.9 > 3), then 0 (3 > 2.9) ...
    assert [sampler.choose(logits) for _ in range(4)] == [0, 1, 0, 1]
    repeat = Sampler.create(SamplingParams(repetition_penalty=2.0), prompt=[0])
    assert repeat.choose(logits) == 1  # the prompt's token 0 is halved: 2.5 < 4.9
    params = SamplingParams(temperature=1.0, top_k=3, min_p=0.01, presence_penalty=0.5, seed=7)
    draws = [[Sampler.create(params, [2]).choose(logits) for _ in range(1)] for _ in range(3)]
    first = Sampler.create(params, [2])
    second = Sampler.create(params, [2])
    assert [first.choose(logits) for _ in range(20)] == [second.choose(logits) for _ in range(20)]
    assert len({d[0] for d in draws}) == 1
    assert int(sample(logits, SamplingParams(temperature=1.0, min_p=0.5))) in (0, 1)  # 2, 3 are cut


def test_penalties_out_of_range_name_the_field() -> None:
    for field, value, text in (
        ("frequency_penalty", 2.5, "frequency_penalty must be in [-2, 2]"),
        ("presence_penalty", -3.0, "presence_penalty must be in [-2, 2]"),
        ("repetition_penalty", 0.0, "repetition_penalty must be in (0, 10]"),
        ("min_p", 1.5, "min_p must be in [0, 1]"),
        ("min_p", math.nan, "min_p must be a finite number"),
    ):
        with pytest.raises(SamplingParamError, match=text.replace("(", r"\(").replace("[", r"\[")):
            SamplingParams(**{field: value})


# --- message shapes ------------------------------------------------------------------------------


def request(*messages: dict[str, Any], **extra: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": list(messages), **extra})


def test_every_message_shape_an_agent_loop_sends_is_accepted() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    body = request(
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 °C"},
    )
    messages = body.chat_messages()
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": "Weather in Paris?"}
    assert messages[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert messages[3] == {"role": "tool", "content": "sunny, 24 °C", "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    ("messages", "text"),
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
            "has a 'image_url' part: this model reads text only",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
            "this model reads text only",
        ),
        (
            [{"role": "assistant", "content": None}, {"role": "user", "content": "x"}],
            "message 0 (assistant) has no content",
        ),
        ([{"role": "user", "content": "   "}], "message 0 (user) has no content"),
        ([{"role": "function", "content": "x"}], "Input should be"),
    ],
)
def test_shapes_outside_the_api_are_refused_naming_why(messages: list[dict[str, Any]], text: str) -> None:
    with pytest.raises(ValidationError, match=text.replace("(", r"\(").replace(")", r"\)")):
        request(*messages)


def test_tools_and_tool_choice() -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    user = {"role": "user", "content": "hi"}
    assert request(user, tools=[tool]).tool_specs() == [tool]
    assert request(user, tools=[tool], tool_choice="none").tool_specs() is None
    named = request(user, tools=[tool], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tool_names() == {"get_weather"}
    with pytest.raises(ValidationError):
        request(user, tools=[{"type": "function", "function": {"name": "has space"}}])
    with pytest.raises(ValidationError):
        request(user, top_logprobs=21)


# --- logprobs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_logprobs_from_the_ranks_parts_equal_the_full_rows(world: int) -> None:
    """A distributed log-sum-exp and a merge of each rank's top n: the full row's log-softmax."""
    from exoctl.engine.logprobs import merge, part_summary, token_logprob
    from exoctl.engine.shard import TensorShard

    torch.manual_seed(world)
    for n in (0, 1, 5, 20):
        logits = torch.randn(103) * 3
        token = int(torch.randint(0, 103, ()))
        whole = token_logprob(logits, token, n)
        assert whole.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-6)
        assert [v for _, v in whole.top] == sorted((v for _, v in whole.top), reverse=True)
        parts = []
        for rank in range(world):
            part = TensorShard(rank, world).part(103)
            parts.append(part_summary(logits[part.start : part.stop], part.start, token, n))
        merged = merge(parts, n)
        assert merged.logprob == pytest.approx(whole.logprob, abs=1e-6)
        assert [i for i, _ in merged.top] == [i for i, _ in whole.top]
        assert [v for _, v in merged.top] == pytest.approx([v for _, v in whole.top], abs=1e-6)


def test_a_tokens_bytes_are_its_own_even_inside_a_character(smollm2_folder: Any) -> None:
    from exoctl.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(smollm2_folder)
    ids = tokenizer.encode("Paris é 🙂")
    pieces = [tokenizer.token_text(i) for i in ids]
    assert b"".join(bytes(p["bytes"]) for p in pieces) == "Paris é 🙂".encode()
    assert pieces[0] == {"token": "Paris", "bytes": list(b"Paris")}
