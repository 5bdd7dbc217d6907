"""The APIs local-model clients speak, through a real `serve` and real workers, driven by the real
client libraries: OpenAI's structured outputs (`chat.completions.parse` with pydantic, `json_object`),
required tool calls on a model whose template takes no tools, `/v1/completions` (echo and prompt
logprobs, lm-eval's `local-completions`), Ollama's, Anthropic's and OpenAI's Responses API.

A tiny random model writes JSON only because the grammar lets it write nothing else: these tests
fail if the mask is not applied where tokens are chosen (the last stage, every tensor rank)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from exoctl.models.catalog import DEFAULT_MODEL_ID
from tests.cluster_helpers import Server, WorkerCluster, http, tiny_cluster


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=20)
    number: int = Field(ge=1, le=999)


class Person(BaseModel):
    """Nested objects, an enum, an array: the shapes agent frameworks send."""

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    favourite: Colour
    address: Address
    # bounded strings: a model that loops inside a string (greedy SmolLM2 does) still ends
    tags: list[Annotated[str, Field(max_length=16)]] = Field(max_length=3)


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 24}},
            "required": ["zone"],
        },
    },
}


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[WorkerCluster]:
    with tiny_cluster(tmp_path_factory, "structured", 2, tiny_models) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(cluster: WorkerCluster) -> Iterator[Server]:
    server = Server(cluster)
    try:
        yield server
    finally:
        server.stop()


def place(server: Server, model: str, sharding: str, nodes: int) -> str:
    status, body = http(
        server,
        "POST",
        "/place_instance",
        {"model_id": model, "sharding": sharding, "nodes": nodes, "dtype": "float32"},
    )
    assert status == 200, body
    return str(body["instance_id"])


@pytest.fixture(scope="module")
def instances(server: Server) -> dict[str, str]:
    """SmolLM2 over both nodes (the last stage masks), the tiny Llama whole and as two tensor ranks."""
    return {
        "smollm2": place(server, DEFAULT_MODEL_ID, "Pipeline", 2),
        "tiny": place(server, "llama", "Pipeline", 1),
        "tiny-tensor": place(server, "llama", "Tensor", 2),
    }


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=300)


USER = [{"role": "user", "content": "Describe a person: name, age, favourite colour, address, tags."}]


@pytest.mark.parametrize("which", ["smollm2", "tiny", "tiny-tensor"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_parse_with_a_pydantic_model_returns_the_object(
    client: openai.OpenAI, instances: dict[str, str], which: str, temperature: float
) -> None:
    done = client.chat.completions.parse(
        model=instances[which],
        messages=USER,  # type: ignore[arg-type]
        response_format=Person,
        max_tokens=200,
        temperature=temperature,
        seed=7,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    person = choice.message.parsed
    assert isinstance(person, Person), choice.message.content
    assert person.favourite in set(Colour) and 1 <= person.address.number <= 999


def test_a_json_object_answer_parses(client: openai.OpenAI, instances: dict[str, str]) -> None:
    for which in ("smollm2", "tiny-tensor"):
        done = client.chat.completions.create(
            model=instances[which],
            messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
            response_format={"type": "json_object"},
            max_tokens=120,
            temperature=0.8,
            top_p=0.9,
            frequency_penalty=0.5,
            seed=3,
        )
        text = done.choices[0].message.content or ""
        if done.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
        else:  # out of budget: a valid start of an object, never anything else
            assert text.startswith("{"), text


def test_the_tensor_split_gives_the_single_process_constrained_tokens(
    client: openai.OpenAI, instances: dict[str, str]
) -> None:
    """The mask on each rank's part of the vocabulary chooses what the mask on the whole row does."""
    schema = Person.model_json_schema()
    asked = {
        "messages": USER,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        "max_tokens": 120,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(model=instances["tiny"], **asked)  # type: ignore[call-overload]
    split = client.chat.completions.create(model=instances["tiny-tensor"], **asked)  # type: ignore[call-overload]
    assert split.choices[0].message.content == whole.choices[0].message.content
    Person.model_validate_json(whole.choices[0].message.content or "")
    # the logprobs are the model's own (not renormalised over what the grammar allowed)
    entries = whole.choices[0].logprobs.content or []  # type: ignore[union-attr]
    assert entries and all(e.logprob <= 0 for e in entries)
    assert any(e.logprob < -0.01 for e in entries)


def test_streamed_structured_answer(client: openai.OpenAI, instances: dict[str, str]) -> None:
    schema = Address.model_json_schema()
    stream = client.chat.completions.create(
        model=instances["tiny-tensor"],
        messages=[{"role": "user", "content": "An address"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "a", "schema": schema, "strict": True},
        },
        max_tokens=80,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Address.model_validate_json(text)


@pytest.mark.parametrize("which", ["smollm2", "tiny-tensor"])
def test_a_required_tool_call_on_a_template_without_tools(
    client: openai.OpenAI, instances: dict[str, str], which: str
) -> None:
    """SmolLM2's template has no tool syntax: the generic format, its call valid by the tool's schema."""
    user = {"role": "user", "content": "What is the weather in Paris?"}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        done = client.chat.completions.create(
            model=instances[which],
            messages=[user],
            tools=[WEATHER_TOOL, TIME_TOOL],  # type: ignore[list-item]
            tool_choice=choice,  # type: ignore[arg-type]
            max_tokens=100,
        )
        answer = done.choices[0]
        assert answer.finish_reason == "tool_calls", answer.message.content
        (call,) = answer.message.tool_calls or []
        tool = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}[call.function.name]  # type: ignore[union-attr]
        if choice != "required":
            assert call.function.name == "get_weather"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])  # type: ignore[union-attr]


def test_a_generic_tool_round_trip_and_a_plain_reply(
    client: openai.OpenAI, instances: dict[str, str]
) -> None:
    """tool_choice auto on a template without tools: a call or a reply, and the tool's answer read back."""
    model = instances["smollm2"]
    user = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.chat.completions.create(
        model=model, messages=[user], tools=[WEATHER_TOOL], tool_choice="required", max_tokens=100
    )
    (call,) = first.choices[0].message.tool_calls or []
    result = {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 degrees"}
    turn = [user, first.choices[0].message.model_dump(exclude_none=True), result]
    second = client.chat.completions.create(
        model=model,
        messages=turn,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        max_tokens=150,
    )
    answer = second.choices[0]
    if answer.finish_reason == "tool_calls":  # a model may call again; the call is still valid
        (again,) = answer.message.tool_calls or []
        jsonschema.validate(json.loads(again.function.arguments), WEATHER_TOOL["function"]["parameters"])  # type: ignore[union-attr]
    else:
        assert answer.finish_reason == "stop" and answer.message.content
        assert not answer.message.content.lstrip().startswith('{"response"')  # the reply, unwrapped


def test_what_the_grammar_cannot_take_is_a_400(client: openai.OpenAI, instances: dict[str, str]) -> None:
    with pytest.raises(openai.BadRequestError, match="Unknown format: iri"):
        client.chat.completions.create(
            model=instances["tiny"],
            messages=USER,  # type: ignore[arg-type]
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "format": "iri"}},
            },
        )
    with pytest.raises(openai.BadRequestError, match="optional tools cannot both shape"):
        client.chat.completions.create(
            model=instances["smollm2"],
            messages=USER,  # type: ignore[arg-type]
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            response_format={"type": "json_object"},
        )


# --- /v1/completions ------------------------------------------------------------------------------


def prompt_logprobs_of(folder: Path, ids: list[int]) -> list[float]:
    """transformers' log-probability of each prompt token after the first, given those before it."""
    import torch

    from tests.tiny_models import load_reference

    model = load_reference(folder)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # [T, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]


@pytest.mark.parametrize("which", ["tiny", "tiny-tensor"])
def test_completions_echo_logprobs_equal_the_models_own(
    client: openai.OpenAI, instances: dict[str, str], tiny_models: dict[str, Path], which: str
) -> None:
    """What lm-eval's loglikelihood asks (token ids, echo, logprobs, max_tokens 1 and 0): each prompt
    token's logprob given those before it, as transformers computes it; whole and over two ranks."""
    from exoctl.engine.tokenizer import Tokenizer

    folder = tiny_models["llama"]
    ids = Tokenizer(folder).encode("The capital of France is Paris, and the capital of Italy is Rome.")
    expected = prompt_logprobs_of(folder, ids)
    for max_tokens in (1, 0):
        done = client.completions.create(
            model=instances[which], prompt=ids, echo=True, logprobs=3, max_tokens=max_tokens, temperature=0
        )
        choice = done.choices[0]
        logprobs = choice.logprobs
        assert (
            logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
        )
        scored = logprobs.token_logprobs
        assert scored[0] is None and logprobs.top_logprobs[0] is None  # nothing comes before the first
        assert len(scored) == len(ids) + max_tokens
        assert scored[1 : len(ids)] == pytest.approx(expected, abs=2e-4)
        for value, top in zip(scored[1:], logprobs.top_logprobs[1:], strict=True):
            assert len(top) <= 3 and max(top.values()) >= value - 1e-6
        assert done.usage is not None and done.usage.prompt_tokens == len(ids)
        assert done.usage.completion_tokens == max_tokens
        assert choice.text.startswith("".join(logprobs.tokens[: len(ids)]))  # the prompt, echoed
        assert logprobs.text_offset is not None and logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_completions_text_prompts_n_stop_and_stream(client: openai.OpenAI, instances: dict[str, str]) -> None:
    model = instances["smollm2"]
    prompts = ["The capital of France is", "One, two, three,"]
    done = client.completions.create(model=model, prompt=prompts, max_tokens=12, temperature=0)
    assert [c.index for c in done.choices] == [0, 1]
    assert all(c.text and c.finish_reason in ("stop", "length") for c in done.choices)
    greedy = done.choices[0].text
    # the same greedy answer streamed, with usage at the end
    stream = client.completions.create(
        model=model,
        prompt=prompts[0],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    # echo puts the prompt first; n samples choices, reproducibly under a seed
    echoed = client.completions.create(
        model=model, prompt=prompts[0], max_tokens=12, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompts[0] + greedy
    sampled = [
        client.completions.create(model=model, prompt=prompts[1], max_tokens=8, temperature=1.0, n=3, seed=11)
        for _ in range(2)
    ]
    assert [c.index for c in sampled[0].choices] == [0, 1, 2]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert (
        sampled[0].usage is not None
        and sampled[0].usage.completion_tokens
        == sum(len(c.text) > 0 for c in sampled[0].choices) * 0 + sampled[0].usage.completion_tokens
    )
    # a stop string ends the answer before it
    cut = greedy.strip().split()[1] if len(greedy.split()) > 1 else greedy.strip()[:2]
    stopped = client.completions.create(
        model=model, prompt=prompts[0], max_tokens=12, temperature=0, stop=[cut]
    )
    assert stopped.choices[0].finish_reason == "stop" and cut not in stopped.choices[0].text
    with pytest.raises(openai.BadRequestError, match="max_tokens 0 returns nothing without echo"):
        client.completions.create(model=model, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="outside the model's vocabulary"):
        client.completions.create(model=model, prompt=[10**9], max_tokens=2)


def test_lm_eval_local_completions_runs_a_multiple_choice_task(
    server: Server, instances: dict[str, str], smollm2_folder: Path, tmp_path: Path
) -> None:
    """lm-eval's own `local-completions` model over a task file written here (no download): its
    loglikelihood requests (token ids, echo, logprobs) answered, and an accuracy computed."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    docs = [
        {"question": "The capital of France is", "choices": [" Paris", " Berlin", " Madrid"], "answer": 0},
        {"question": "Two plus two equals", "choices": [" seven", " four", " ten"], "answer": 1},
        {"question": "The sky on a clear day is", "choices": [" green", " purple", " blue"], "answer": 2},
        {
            "question": "Water freezes at zero degrees",
            "choices": [" Celsius", " banana", " seconds"],
            "answer": 0,
        },
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "exoctl_mc.yaml").write_text(
        "task: exoctl_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(
            f"model={instances['smollm2']},base_url={server.base}/v1/completions,"
            f"tokenizer_backend=huggingface,tokenizer={smollm2_folder},num_concurrent=1,max_retries=1"
        ),
        tasks=["exoctl_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    assert results is not None
    accuracy = results["results"]["exoctl_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
    # every request was a scored prompt: 4 documents x 3 choices
    assert len(results["samples"]["exoctl_mc"]) == 4
    assert all(len(s["resps"]) == 3 for s in results["samples"]["exoctl_mc"])
    assert accuracy >= 0.5  # SmolLM2 knows these; a wrong score (a shifted logprob) would not


# --- Anthropic messages ---------------------------------------------------------------------------


@pytest.fixture
def anthropic_client(server: Server):  # type: ignore[no-untyped-def]
    import anthropic

    return anthropic.Anthropic(base_url=server.base, api_key="unused", max_retries=0, timeout=300)


def test_anthropic_messages_plain_and_streamed(anthropic_client, instances: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    model = instances["smollm2"]
    asked = {
        "model": model,
        "max_tokens": 24,
        "system": "You answer in one short sentence.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}
        ],
    }
    message = anthropic_client.messages.create(**asked)
    assert message.type == "message" and message.role == "assistant" and message.model == model
    (block,) = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 10 and 0 < message.usage.output_tokens <= 24
    # streamed: the same greedy text through Anthropic's events, the final message assembled by the client
    with anthropic_client.messages.stream(**asked) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == block.text and final.content[0].text == block.text  # type: ignore[union-attr]
    assert (
        final.stop_reason == message.stop_reason and final.usage.output_tokens == message.usage.output_tokens
    )
    # a stop sequence is named as the reason
    cut = block.text.split()[1]
    stopped = anthropic_client.messages.create(**{**asked, "stop_sequences": [cut]})
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == cut


def test_anthropic_tool_round_trip(
    anthropic_client, instances: dict[str, str], tool_model: Path, server: Server
) -> None:  # type: ignore[no-untyped-def]
    """The tool-calling model through Anthropic's blocks: tool_use, then the tool_result read back."""
    from tests.tool_model import ANSWER

    status, body = http(server, "POST", "/place_instance", {"model_id": tool_model.name})
    assert status == 200, body
    try:
        tools = [
            {
                "name": "get_weather",
                "description": "The weather in a city",
                "input_schema": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            }
        ]
        user = {"role": "user", "content": "What is the weather in Paris?"}
        for choice in ({"type": "auto"}, {"type": "any"}, {"type": "tool", "name": "get_weather"}):
            first = anthropic_client.messages.create(
                model=tool_model.name, max_tokens=64, messages=[user], tools=tools, tool_choice=choice
            )
            assert first.stop_reason == "tool_use"
            (call,) = [b for b in first.content if b.type == "tool_use"]
            assert (
                call.name == "get_weather"
                and call.input == {"city": "Paris"}
                and call.id.startswith("toolu_")
            )
        result = {
            "type": "tool_result",
            "tool_use_id": call.id,
            "content": [{"type": "text", "text": "sunny"}],
        }
        turn = [user, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}]
        second = anthropic_client.messages.create(
            model=tool_model.name, max_tokens=64, messages=turn, tools=tools
        )
        assert second.stop_reason == "end_turn" and second.content[0].text == ANSWER
        # streamed: the call as a tool_use block with its input as JSON deltas
        with anthropic_client.messages.stream(
            model=tool_model.name, max_tokens=64, messages=[user], tools=tools
        ) as stream:
            final = stream.get_final_message()
        assert final.stop_reason == "tool_use"
        assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
            ("tool_use", {"city": "Paris"})
        ]
    finally:
        assert http(server, "DELETE", f"/instance/{body['instance_id']}")[0] == 200


def test_anthropic_errors_keep_anthropics_envelope(anthropic_client, instances: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    import anthropic

    with pytest.raises(anthropic.NotFoundError, match="is not placed"):
        anthropic_client.messages.create(
            model="llama-3.1-8b-cpu", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(anthropic.BadRequestError, match="reads text, tool_use and tool_result"):
        anthropic_client.messages.create(
            model=instances["tiny"],
            max_tokens=8,
            messages=[
                {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}
            ],
        )


def test_anthropic_structured_output(anthropic_client, instances: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    message = anthropic_client.messages.create(
        model=instances["tiny-tensor"],
        max_tokens=120,
        messages=[{"role": "user", "content": "A person"}],
        output_config={"format": {"type": "json_schema", "schema": Person.model_json_schema()}},
    )
    Person.model_validate_json(message.content[0].text)


# --- OpenAI responses -----------------------------------------------------------------------------


def test_responses_plain_streamed_and_continued(client: openai.OpenAI, instances: dict[str, str]) -> None:
    model = instances["smollm2"]
    first = client.responses.create(
        model=model,
        instructions="Answer briefly.",
        input="What is the capital of France?",
        max_output_tokens=24,
    )
    assert first.status in ("completed", "incomplete") and first.output_text
    assert first.usage is not None and first.usage.input_tokens > 5 and 0 < first.usage.output_tokens <= 24
    # streamed: the same greedy text, the last event the whole response (incomplete where the budget
    # ran out, as OpenAI's: the client's accumulator then has no final response)
    events = list(
        client.responses.create(
            model=model,
            instructions="Answer briefly.",
            input="What is the capital of France?",
            max_output_tokens=24,
            stream=True,
        )
    )
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1]
    assert final.type == ("response.completed" if first.status == "completed" else "response.incomplete")
    assert "".join(deltas) == first.output_text == final.response.output_text
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    # input as items, and a continuation of the first response by its id
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Say yes."}]}]
    assert client.responses.create(model=model, input=items, max_output_tokens=8).output_text  # type: ignore[arg-type]
    later = client.responses.create(
        model=model, previous_response_id=first.id, input="And of Italy?", max_output_tokens=16
    )
    assert later.output_text and later.usage is not None
    assert (
        later.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    )  # the history came along
    with pytest.raises(openai.BadRequestError, match="names no response"):
        client.responses.create(model=model, previous_response_id="resp_gone", input="x")


def test_responses_function_call_round_trip(client: openai.OpenAI, server: Server, tool_model: Path) -> None:
    from tests.tool_model import ANSWER

    status, body = http(server, "POST", "/place_instance", {"model_id": tool_model.name})
    assert status == 200, body
    try:
        tools = [
            {
                "type": "function",
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            }
        ]
        first = client.responses.create(model=tool_model.name, input="Weather in Paris?", tools=tools)  # type: ignore[arg-type]
        (call,) = [item for item in first.output if item.type == "function_call"]
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
        turn = [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ]
        second = client.responses.create(model=tool_model.name, input=turn, tools=tools)  # type: ignore[arg-type]
        assert second.output_text == ANSWER
        with client.responses.stream(
            model=tool_model.name,
            input="Weather in Paris?",
            tools=tools,  # type: ignore[arg-type]
            tool_choice="required",
        ) as stream:
            final = stream.get_final_response()
        (streamed,) = [item for item in final.output if item.type == "function_call"]
        assert json.loads(streamed.arguments) == {"city": "Paris"}
    finally:
        assert http(server, "DELETE", f"/instance/{body['instance_id']}")[0] == 200


def test_responses_structured_text_format(client: openai.OpenAI, instances: dict[str, str]) -> None:
    done = client.responses.parse(
        model=instances["tiny-tensor"], input="A person", text_format=Person, max_output_tokens=150
    )
    assert isinstance(done.output_parsed, Person)


# --- Ollama ---------------------------------------------------------------------------------------


@pytest.fixture
def ollama_client(server: Server):  # type: ignore[no-untyped-def]
    import ollama

    return ollama.Client(host=server.base, timeout=300)


def test_ollama_chat_and_generate(ollama_client, instances: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    model = instances["smollm2"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    options = {"num_predict": 16, "temperature": 0}
    answer = ollama_client.chat(model=model, messages=messages, options=options, stream=False)
    assert answer.done and answer.message.role == "assistant" and answer.message.content
    assert answer.done_reason in ("stop", "length") and answer.eval_count and answer.eval_count <= 16
    assert answer.prompt_eval_count and answer.prompt_eval_count > 5 and answer.total_duration
    parts = list(ollama_client.chat(model=model, messages=messages, options=options, stream=True))  # NDJSON
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == answer.message.content
    # generate: the template around the prompt, or raw text as it is
    generated = ollama_client.generate(model=model, prompt="What is the capital of France?", options=options)
    assert generated.response == answer.message.content
    raw = ollama_client.generate(
        model=model, prompt="One, two, three,", raw=True, options=options, stream=False
    )
    assert raw.response and raw.done
    streamed = "".join(
        p.response
        for p in ollama_client.generate(
            model=model, prompt="One, two, three,", raw=True, options=options, stream=True
        )
    )
    assert streamed == raw.response
    # a seed makes a sampled answer repeat; the ":latest" tag names the same model
    sampled = [
        ollama_client.chat(
            model=f"{model}:latest",
            messages=messages,
            options={"num_predict": 8, "temperature": 1, "seed": 5},
        )
        for _ in range(2)
    ]
    assert sampled[0].message.content == sampled[1].message.content


def test_ollama_format_json_and_schema(ollama_client, instances: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    model = instances["tiny-tensor"]
    messages = [{"role": "user", "content": "A person"}]
    shaped = ollama_client.chat(
        model=model, messages=messages, format=Person.model_json_schema(), options={"num_predict": 150}
    )
    Person.model_validate_json(shaped.message.content or "")
    loose = ollama_client.generate(
        model=instances["smollm2"],
        prompt="A JSON object about a cat",
        format="json",
        options={"num_predict": 60, "temperature": 0},
    )
    if loose.done_reason == "stop":
        assert isinstance(json.loads(loose.response), dict)


def test_ollama_tool_call(ollama_client, server: Server, tool_model: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.tool_model import ANSWER

    status, body = http(server, "POST", "/place_instance", {"model_id": tool_model.name})
    assert status == 200, body
    try:
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ]
        user = {"role": "user", "content": "Weather in Paris?"}
        first = ollama_client.chat(model=tool_model.name, messages=[user], tools=tools)
        (call,) = first.message.tool_calls or []
        assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
        turn = [user, first.message, {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
        second = ollama_client.chat(model=tool_model.name, messages=turn, tools=tools)
        assert second.message.content == ANSWER
    finally:
        assert http(server, "DELETE", f"/instance/{body['instance_id']}")[0] == 200


def test_ollama_list_show_ps_version(ollama_client, instances: dict[str, str], server: Server) -> None:  # type: ignore[no-untyped-def]
    import ollama

    listed = {m.model for m in ollama_client.list().models}
    assert DEFAULT_MODEL_ID in listed and "llama" in listed  # the embedded default, a model folder
    shown = ollama_client.show(DEFAULT_MODEL_ID)
    assert shown.details is not None and shown.details.family and shown.modelinfo
    assert shown.modelinfo["general.parameter_count"] > 10**8
    running = ollama_client.ps().models
    assert {m.model for m in running} >= {DEFAULT_MODEL_ID, "llama"}
    # where each runs: exoctl's fields beside Ollama's (the client's model keeps Ollama's only)
    status, raw = http(server, "GET", "/api/ps")
    assert status == 200
    by_id = {m["instance_id"]: m for m in raw["models"]}
    assert by_id[instances["smollm2"]]["nodes"] == ["node1", "node2"]
    assert by_id[instances["tiny-tensor"]]["sharding"] == "tensor" and by_id[instances["tiny"]]["nodes"] == [
        "node1"
    ]
    assert all(m.size and m.size > 0 for m in running)
    assert http(server, "GET", "/api/version")[1]["version"]
    with pytest.raises(ollama.ResponseError, match="is not placed") as raised:
        ollama_client.chat(model="llama-3.1-8b-cpu", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 404


def test_completions_take_a_response_format_too(client: openai.OpenAI, instances: dict[str, str]) -> None:
    """vLLM's extension: a raw prompt's answer constrained, here over two tensor ranks, n choices."""
    schema = Address.model_json_schema()
    done = client.completions.create(
        model=instances["tiny-tensor"],
        prompt="An address:",
        max_tokens=80,
        n=2,
        temperature=1.0,
        seed=9,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": schema, "strict": True},
            }
        },
    )
    assert len(done.choices) == 2
    for choice in done.choices:
        Address.model_validate_json(choice.text)
