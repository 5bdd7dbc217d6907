"""The typed messages both sides share, on hand-built values: each survives its wire form (msgpack
included), and a malformed one is refused with a clear error rather than read by a wrong key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from exoctl.errors import ExoctlError, InvalidRequestError
from exoctl.wire import protocol
from exoctl.wire.answer import Completion, Timings
from exoctl.wire.instance_messages import (
    Forget,
    Forward,
    ForwardStep,
    Lease,
    Release,
    Reuse,
    SeqError,
    SequenceStart,
    StepRefused,
    Tokens,
)
from exoctl.wire.messages import ErrorReply, parse
from exoctl.wire.protocol import Message, ProtocolError, Tensor
from exoctl.wire.runner_report import (
    ExpertLoad,
    Failure,
    HeadPrefixStats,
    PrefixReport,
    RunnerReport,
    RunnerStatus,
)
from exoctl.wire.runner_spec import RunnerSpec
from exoctl.wire.sampling_params import (
    DEFAULT_MAX_TOKENS,
    SamplingDefaults,
    SamplingParamError,
    SamplingParams,
    SamplingRequest,
)
from exoctl.worker.lane import CancelJob, FromPeer, TokenBatch, job_sequences, merge_token_jobs


def through_msgpack(value: object) -> object:
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


def report(**changes: object) -> RunnerReport:
    base = RunnerReport(
        runner_id="r",
        instance_id="i",
        model_id="mixtral-8x7b-cpu",
        sharding="tensor",
        dtype="bfloat16",
        start_layer=0,
        end_layer=32,
        n_layers=32,
        rank=1,
        world=2,
        nodes=("a", "b"),
        status=RunnerStatus.FAILED,
        failure=Failure("node a (h:1) restarted and lost its runners", lost_node="a"),
        memory_bytes=5,
        experts=(ExpertLoad(4, 10), ExpertLoad(5, 0)),
        collective_ms_per_token=1.5,
    )
    return RunnerReport(**{**base.__dict__, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        report(),
        report(status=RunnerStatus.LOADING, failure=None, experts=(), collective_ms_per_token=None),
        report(
            sampling_defaults=SamplingDefaults(0.6, None, 0.9, max_tokens=64, source="generation_config.json")
        ),
        report(
            prefix=PrefixReport(2, 300, 9000, 10000, 4, 250),
            head_prefix=HeadPrefixStats(8192, 5, 4, 250, 1),
        ),
    ],
)
def test_a_runner_report_survives_the_wire(value: RunnerReport) -> None:
    back = RunnerReport.from_wire(through_msgpack(value.to_wire()))
    assert back == value and back.status is value.status


@pytest.mark.parametrize(
    "change",
    [{"status": "RunnerHappy"}, {"experts": [[1]]}, {"failure": {"message": "x"}}, {"nodes": None}],
)
def test_a_malformed_runner_report_is_a_protocol_error(change: dict[str, object]) -> None:
    with pytest.raises(ProtocolError, match="a runner report is malformed"):
        RunnerReport.from_wire({**report().to_wire(), **change})


def test_a_runner_report_missing_a_field_is_a_protocol_error() -> None:
    raw = report().to_wire()
    del raw["memory_bytes"]
    with pytest.raises(ProtocolError, match="a runner report is malformed"):
        RunnerReport.from_wire(raw)


def spec(**changes: object) -> RunnerSpec:
    base = {
        "instance_id": "i",
        "runner_id": "r",
        "model": "smollm2-135m-cpu",
        "model_id": "smollm2-135m-cpu",
        "sharding": "pipeline",
        "dtype": "float32",
        "start_layer": 15,
        "end_layer": 30,
        "n_layers": 30,
        "rank": 1,
        "world": 2,
        "peers": (("a", "127.0.0.1:1"), ("b", "127.0.0.2:2")),
    }
    return RunnerSpec(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "sent",
    [
        spec(),
        spec(prefix_positions=8192, prefix_bytes=2**28, position_bytes=(23040, 23040)),
        spec(sharding="tensor", start_layer=0, end_layer=30, partials="q8"),
    ],
)
def test_a_runner_spec_is_the_load_message_both_ways(sent: RunnerSpec) -> None:
    fields = through_msgpack(sent.to_fields())
    assert isinstance(fields, dict)
    assert RunnerSpec.from_message(Message("load", fields)) == sent
    assert sent.address == "127.0.0.2:2" and sent.nodes == ("a", "b")


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"dtype": "float64"}, "dtype 'float64' is not supported"),
        ({"sharding": "ring"}, "sharding 'ring' is not supported"),
        ({"rank": 2}, "inconsistent rank"),
        ({"end_layer": 31}, "inconsistent rank"),
        ({"sharding": "tensor"}, "a tensor-parallel rank holds every layer"),
        # a budget needs each rank's cost of a position, one for each rank, positive
        ({"prefix_positions": 10}, "'position_bytes' must give a positive byte count for each rank"),
        ({"position_bytes": [4]}, "'position_bytes' must give a positive byte count for each rank"),
        ({"position_bytes": [4, 0]}, "'position_bytes' must give a positive byte count for each rank"),
        ({"position_bytes": [4, 4], "prefix_bytes": -1}, "must be 0 or more"),
        ({"partials": "q4"}, "'partials' must be one of exact, q8"),
    ],
)
def test_an_inconsistent_load_is_refused_in_one_place(change: dict[str, object], text: str) -> None:
    fields = {**spec().to_fields(), **change}
    with pytest.raises(ExoctlError, match=text):
        RunnerSpec.from_message(Message("load", fields))


def test_sampling_params_survive_the_wire_and_refuse_strangers() -> None:
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3, max_tokens=9, stop=("\n", "."))
    assert SamplingParams.from_wire(through_msgpack(params.to_wire())) == params  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=r"unknown sampling parameter.*: beam"):
        SamplingParams.from_wire({"beam": 2})
    with pytest.raises(InvalidRequestError, match="stop must be a list of strings"):
        SamplingParams.from_wire({"stop": [1]})
    with pytest.raises(SamplingParamError) as caught:
        SamplingParams.from_wire({"top_p": 0.0})
    assert caught.value.name == "top_p" and caught.value.problem == "must be in (0, 1], got 0.0"


def test_a_completion_survives_the_wire() -> None:
    done = Completion("Paris.", [9, 10, 2], "stop", 12, Timings(0.25, 1.5, 1.6), cached_tokens=8)
    back = Completion.from_wire(through_msgpack(done.to_wire()))
    assert back == done and back.total_tokens == 15 and back.cached_tokens == 8
    assert done.to_wire()["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    with pytest.raises(ExoctlError, match="the head's answer is malformed"):
        Completion.from_wire({"text": "x"})


def test_token_messages_merge_into_one_batch_at_the_place_of_the_first() -> None:
    token = [FromPeer(Tokens("i", (s,), (1,), (None,))) for s in "ab"]
    release = FromPeer(Release("i", "c"))
    merged = merge_token_jobs([release, token[0], CancelJob("x"), token[1]])
    assert merged[0] == release and merged[2] == CancelJob("x") and len(merged) == 3
    assert isinstance(merged[1], TokenBatch) and [m.seqs for m in merged[1].messages] == [("a",), ("b",)]
    assert job_sequences(merged[1]) == ("a", "b") and job_sequences(release) == ("c",)
    assert job_sequences(CancelJob("x")) == ()


def test_every_message_between_runners_decodes_to_its_type_and_back() -> None:
    """Each is built, framed, decoded and parsed as a worker receives it: the same object."""
    tensor = Tensor("float32", (1, 1, 2), b"\0" * 8)
    start = SequenceStart(SamplingParams(temperature=0.5, seed=3, repetition_penalty=1.1), (5, 6))
    reusing = SequenceStart(SamplingParams(), reuse=Reuse("b", 4))
    step = ForwardStep(["a", "c"], [4, 4], {"a": start, "c": reusing}, partial=True)
    sent: list[Any] = [
        Forward("i", step, tensor),
        Tokens("i", ("a", "b"), (1, 2), (None, [-0.5, [1], [-0.5]])),
        Release("i", "a"),
        Release("i", "a", keep=17),
        Forget("i", ("a", "b")),
        SeqError("i", ("a",), "sampling failed"),
        SeqError("i", ("a", "c"), "node b holds nothing of cached prefix x", missing=("x",)),
        Lease("i", ("a", "b")),
        Lease("i", ("a",), kept=("b", "c")),
    ]
    for message in sent:
        got = parse(protocol.decode([bytes(memoryview(f)) for f in message.frames()]))
        if isinstance(message, Forward):
            assert isinstance(got, Forward) and got.step == step and bytes(got.tensor.data) == tensor.data
        else:
            assert got == message


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"type": "release", "seq": "a", "keep": 0}, "'keep' must be null or a count of positions >= 1"),
        ({"type": "release", "seq": "a", "keep": "all"}, "'release' field 'keep' must be int or null"),
        ({"type": "forget", "entries": [1]}, "'forget' needs a list of sequence ids in 'entries'"),
        ({"type": "lease", "seqs": [], "kept": [None]}, "'lease' needs a list of sequence ids in 'kept'"),
    ],
)
def test_a_malformed_word_on_cached_prefixes_is_refused(fields: dict[str, Any], text: str) -> None:
    header = {"v": protocol.PROTOCOL_VERSION, "instance_id": "i", **fields}
    with pytest.raises(ProtocolError, match=text):
        parse(protocol.decode([msgpack.packb(header)]))


@pytest.mark.parametrize("reuse", [["b"], ["b", 0], [1, 4], "b:4"])
def test_a_first_step_reusing_a_malformed_prefix_is_refused_naming_its_sequence(reuse: object) -> None:
    header = {
        "v": protocol.PROTOCOL_VERSION,
        "type": "forward",
        "instance_id": "i",
        "seqs": ["a"],
        "positions": [4],
        "params": {"a": {"reuse": reuse}},
        "tensors": [{"dtype": "int64", "shape": [1, 1]}],
    }
    with pytest.raises(StepRefused, match=r"sequence a: reuse must be \[entry, positions >= 1\]") as refused:
        parse(protocol.decode([msgpack.packb(header), b"\0" * 8]))
    assert refused.value.seqs == ("a",)


def test_a_bad_step_is_refused_naming_its_sequences_so_the_head_hears() -> None:
    fields = {"v": protocol.PROTOCOL_VERSION, "type": "forward", "instance_id": "i", "seqs": ["a"]}
    header = {**fields, "positions": [0], "params": {"a": {"temperature": "hot"}}}
    with pytest.raises(StepRefused) as refused:
        parse(protocol.decode([msgpack.packb(header)]))
    assert refused.value.instance_id == "i" and refused.value.seqs == ("a",)


def test_a_wire_error_comes_back_as_the_class_that_was_raised() -> None:
    reply = ErrorReply.of(InvalidRequestError("bad temperature", "use 0 to 2"), request_id="r")
    back = parse(protocol.decode(protocol.encode(reply.KIND, reply.to_fields())))
    assert isinstance(back, ErrorReply) and back.error_class is InvalidRequestError
    assert (back.message, back.hint, back.request_id) == ("bad temperature", "use 0 to 2", "r")
    # a name that is no error of ours, or one that is not made from (message, hint), is plain
    assert ErrorReply("x", kind="SystemExit").error_class is ExoctlError
    assert ErrorReply("x", kind="NodeError").error_class is ExoctlError


def test_a_request_takes_what_it_left_out_from_the_model_else_greedy_and_a_bounded_answer() -> None:
    llama = SamplingDefaults(temperature=0.6, top_p=0.9, source="generation_config.json")
    asked = SamplingRequest(top_p=0.5, stop=("\n",), seed=3)
    chosen = asked.resolve(llama)
    assert (chosen.temperature, chosen.top_p, chosen.top_k) == (0.6, 0.5, 0)  # the request's top_p wins
    assert chosen.max_tokens == DEFAULT_MAX_TOKENS == 512 and chosen.stop == ("\n",) and chosen.seed == 3
    plain = SamplingRequest().resolve(None)
    assert plain.greedy and not plain.truncates and plain.max_tokens == 512
    assert SamplingRequest(temperature=1.0, max_tokens=7).resolve(llama).max_tokens == 7
    assert SamplingRequest().resolve(SamplingDefaults(max_tokens=20)).max_tokens == 20
    with pytest.raises(SamplingParamError, match="top_p"):
        SamplingRequest(top_p=2.0).resolve(None)
    # a report from an older or broken worker: no defaults rather than an error
    assert SamplingDefaults.from_wire({"temperature": "hot"}) is None
    assert SamplingDefaults.from_wire(None) is None


def test_a_models_defaults_follow_transformers_reading_of_its_generation_config(tmp_path: Path) -> None:
    import json

    from exoctl.engine.generation_defaults import from_generation_config, from_gguf

    def written(config: dict[str, object]) -> SamplingDefaults:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
        return from_generation_config(tmp_path)

    assert from_generation_config(tmp_path) == SamplingDefaults()  # no file: nothing declared
    # Llama 3.1 Instruct's and Qwen2.5 Instruct's files
    llama = written({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [128001, 128009]})
    assert (llama.temperature, llama.top_p, llama.top_k, llama.source) == (
        0.6,
        0.9,
        None,
        "generation_config.json",
    )
    qwen = written(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    )
    assert (qwen.temperature, qwen.top_k, qwen.repetition_penalty) == (0.7, 20, 1.05)
    # without do_sample transformers decodes greedily, whatever temperature the file lists
    assert written({"temperature": 0.9, "max_new_tokens": 64}) == SamplingDefaults(
        temperature=0.0, max_tokens=64, source="generation_config.json"
    )
    # max_length counts the prompt: not a budget; values SamplingParams refuses are dropped
    assert written({"do_sample": True, "max_length": 20}).max_tokens is None
    assert written({"do_sample": True, "top_p": 7}) == SamplingDefaults(source="generation_config.json")

    from types import SimpleNamespace

    header = SimpleNamespace(  # what from_gguf reads of a GGUF header
        path=tmp_path / "m.gguf",
        metadata={
            "general.sampling.temp": 0.8,
            "general.sampling.top_k": 40,
            "general.sampling.top_p": 0.95,
        },
    )
    gguf = from_gguf(header)  # type: ignore[arg-type]
    assert (gguf.temperature, gguf.top_k, gguf.top_p, gguf.source) == (0.8, 40, 0.95, "GGUF metadata")
