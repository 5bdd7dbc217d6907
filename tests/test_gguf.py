"""GGUF models: every architecture and tensor type against the same weights in safetensors, the
exact int4 repacking, what each node reads, placement from the tensor table, Hub references,
and the errors for files exoctl cannot run."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from exoctl.engine.gguf_weights import GGUFWeightReader, dequantized
from exoctl.engine.model import load_model, resolve_dtype
from exoctl.engine.quant import QuantizedWeight, dequantize
from exoctl.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from exoctl.models.catalog import get_card
from exoctl.models.gguf.file import open_model
from exoctl.models.gguf.hf_names import hf_config
from exoctl.models.gguf.hub import files_for_layers, parse_reference, quant_files
from exoctl.models.store import hub_reference, resolve_card
from exoctl.placement.pipeline import NodeProfile, PlacementError, PlacementRequest, place
from tests.gguf_models import all_as, hf_tensors, q4_k_m, write_gguf

SIMPLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
KINDS = ("llama", "llama-tied", "qwen2", "mixtral")
IDS = torch.tensor([[1, 2, 300, 4000, 17, 9, 12000, 5]])
POSITIONS = torch.arange(IDS.shape[1])[None]


def logits(folder: Path, dtype: str = "float32", layers: tuple[int, int] | None = None) -> torch.Tensor:
    model = load_model(folder, layers, dtype)
    return model.forward(IDS, POSITIONS, [model.new_cache()], all_logits=True)


@pytest.fixture(scope="module")
def written(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    """Each tiny model in each simple type, with its reference folder beside it (NAME-ref)."""
    base = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind in KINDS:
        for type_name in SIMPLE_TYPES:
            out[(kind, type_name)] = write_gguf(
                tiny_models[kind],
                base / f"{kind}-{type_name}.gguf",
                all_as(type_name),
                base / f"{kind}-{type_name}-ref",
            )
    return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Path:
    """A tiny Llama whose every matrix has a multiple of 256 input features, for K-quant blocks."""
    import transformers

    folder = tmp_path_factory.mktemp("wide") / "llama-wide"
    torch.manual_seed(7)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        initializer_range=0.05,
        bos_token_id=1,
        eos_token_id=2,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("type_name", SIMPLE_TYPES)
def test_each_architecture_and_type_gives_the_logits_of_its_dequantized_weights(
    written: dict[tuple[str, str], Path], kind: str, type_name: str
) -> None:
    gguf = written[(kind, type_name)]
    reference = gguf.with_name(f"{kind}-{type_name}-ref")
    assert torch.allclose(logits(gguf), logits(reference), atol=1e-4, rtol=0)


def test_k_quants_in_a_q4_k_m_mix_give_the_logits_of_their_dequantized_weights(
    wide: Path, tmp_path: Path
) -> None:
    gguf = write_gguf(wide, tmp_path / "wide-Q4_K_M.gguf", q4_k_m, tmp_path / "ref")
    model = open_model(gguf)
    assert {i.type_name for i in model.tensors.values()} == {"F32", "Q4_K", "Q6_K"}
    assert model.main_type() == "Q4_K"
    assert torch.allclose(logits(gguf), logits(tmp_path / "ref"), atol=1e-4, rtol=0)
    # int4: Q4_K is repacked, Q6_K held in int8 (q/k/v fused with Q6_K v: int8); close to float32
    quantized, exact = logits(gguf, "int4"), logits(tmp_path / "ref")
    assert (quantized - exact).norm() < 0.1 * exact.norm()


def test_q_and_k_rows_are_put_back_in_hugging_face_order(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    gguf = write_gguf(tiny_models["llama"], tmp_path / "f32.gguf", all_as("F32"))
    hf = hf_tensors(tiny_models["llama"])
    model = open_model(gguf)
    stored = np.asarray(
        dequantized(model.tensors["blk.1.attn_q.weight"], _raw(model.tensors["blk.1.attn_q.weight"]))
    ).reshape(128, 128)
    original = hf["model.layers.1.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(stored, original)  # the file holds llama.cpp's order...
    reader = GGUFWeightReader(gguf, torch.float32)
    for name in ("q_proj", "k_proj"):
        full = f"model.layers.1.self_attn.{name}.weight"
        shape = tuple(hf[full].shape)
        assert torch.equal(reader.get(full, shape), hf[full])  # ...and exoctl reads Hugging Face's
        part = range(shape[0] // 2, shape[0])  # a tensor rank's whole heads
        assert torch.equal(reader.get_part(full, shape, 0, part), hf[full][part.start :])


def _raw(info: object) -> np.ndarray:
    from exoctl.models.gguf.file import TensorInfo

    assert isinstance(info, TensorInfo)
    return np.fromfile(info.file, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(
        -1, info.row_bytes
    )


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_q4_0_and_q4_1_are_repacked_into_int4_exactly(
    written: dict[tuple[str, str], Path], type_name: str
) -> None:
    gguf = written[("llama", type_name)]
    model = open_model(gguf)
    reader = GGUFWeightReader(model, torch.float32, bits=4)
    weight = reader.matrix("model.layers.0.mlp.down_proj.weight", (128, 256))
    assert isinstance(weight, QuantizedWeight) and weight.bits == 4
    info = model.tensors["blk.0.ffn_down.weight"]
    assert torch.equal(dequantize(weight), torch.from_numpy(dequantized(info, _raw(info)).reshape(128, 256)))
    # every matrix of the model as loaded in int4 (q and k: in Hugging Face's row order)
    loaded = load_model(gguf, dtype="int4")
    reference = hf_tensors(gguf.with_name(f"llama-{type_name}-ref"))
    for i, block in enumerate(loaded.blocks):
        prefix = f"model.layers.{i}"
        qkv_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        expected = {
            "qkv": torch.cat([reference[f"{prefix}.{n}.weight"] for n in qkv_names]),
            "gate_up": torch.cat([reference[f"{prefix}.mlp.{n}_proj.weight"] for n in ("gate", "up")]),
            "down": reference[f"{prefix}.mlp.down_proj.weight"],
        }
        held = {"qkv": block.attention.qkv, "gate_up": block.mlp.gate_up, "down": block.mlp.down}
        for key, linear in held.items():
            weight = linear.weight()  # type: ignore[operator]
            assert isinstance(weight, QuantizedWeight) and weight.bits == 4
            assert torch.equal(dequantize(weight), expected[key]), (i, key)


def test_q4_k_repacked_into_int4_is_within_float16_rounding_of_the_file(wide: Path, tmp_path: Path) -> None:
    gguf = write_gguf(wide, tmp_path / "k.gguf", all_as("Q4_K"))
    model = open_model(gguf)
    info = model.tensors["blk.0.ffn_gate.weight"]
    weight = GGUFWeightReader(model, torch.float32, bits=4).matrix(
        "model.layers.0.mlp.gate_proj.weight", (512, 256)
    )
    assert isinstance(weight, QuantizedWeight) and weight.bits == 4
    file_values = torch.from_numpy(dequantized(info, _raw(info)).reshape(512, 256))
    error = (dequantize(weight) - file_values).abs().max() / file_values.abs().max()
    # d·sc and dmin·m rounded to float16: 2^-11 relative at most per block
    assert 0 < error < 2**-10


def test_q8_0_and_q6_k_under_int8_are_requantized_per_row_with_a_measured_error(
    wide: Path, tmp_path: Path
) -> None:
    gguf = write_gguf(wide, tmp_path / "q6.gguf", q4_k_m)
    model = open_model(gguf)
    info = model.tensors["blk.0.ffn_down.weight"]
    assert info.type_name == "Q6_K"
    weight = GGUFWeightReader(model, torch.float32, bits=4).matrix(
        "model.layers.0.mlp.down_proj.weight", (256, 512)
    )
    assert isinstance(weight, QuantizedWeight) and weight.bits == 8  # kept above 4 bits under int4
    file_values = torch.from_numpy(dequantized(info, _raw(info)).reshape(256, 512))
    error = (dequantize(weight) - file_values).abs()
    # per row: half an int8 step of the row's largest weight
    assert (error <= file_values.abs().amax(dim=1, keepdim=True) / 254 + 1e-7).all()


def test_split_files_load_and_a_layer_range_reads_only_its_tensors(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    first = write_gguf(tiny_models["llama"], tmp_path / "split.gguf", all_as("Q8_0"), split_max_tensors=12)
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(parts) > 2 and first == parts[0]
    whole = write_gguf(tiny_models["llama"], tmp_path / "whole.gguf", all_as("Q8_0"))
    assert torch.equal(logits(first), logits(whole))
    model = open_model(first)
    reader = GGUFWeightReader(model, torch.float32)
    load_model(first, (1, 3), "float32", reader=reader)
    layers = {int(n.split(".")[1]) for n in reader.read_tensors if n.startswith("blk.")}
    assert layers == {1, 2}
    assert not {n for n in reader.read_tensors if not n.startswith("blk.")} - {"rope_freqs.weight"}
    last = GGUFWeightReader(model, torch.float32)
    load_model(first, (3, 4), "float32", reader=last)
    assert {n for n in last.read_tensors if not n.startswith("blk.")} == {
        "output_norm.weight",
        "output.weight",
    }
    # a node holding only some parts loads its range; a missing part's tensor is named with the fix
    folder = tmp_path / "some-parts"
    folder.mkdir()
    holders = {n: i.file for n, i in model.tensors.items()}
    kept = {holders[n] for n in holders if n.startswith("blk.3.") or n.startswith("output")} | {parts[0]}
    for file in kept:
        shutil.copy(file, folder / file.name)
    assert load_model(folder / parts[0].name, (3, 4), "float32").is_last
    elsewhere = min(
        int(n.split(".")[1]) for n, f in holders.items() if f not in kept and n.startswith("blk.")
    )
    with pytest.raises(ModelFormatError, match="none of the split parts here"):
        load_model(folder / parts[0].name, (elsewhere, elsewhere + 1), "float32")


def test_placement_sizes_a_gguf_model_from_its_tensor_table(wide: Path, tmp_path: Path) -> None:
    gguf = write_gguf(wide, tmp_path / "mix.gguf", q4_k_m)
    card, ref = resolve_card(str(gguf))
    assert ref == str(gguf.resolve()) and card.native_dtype == "int4" and card.storage_dtype == "Q4_K"
    assert card.parameters == sum(t.numel() for t in hf_tensors(wide).values())
    each = card.layer_bytes_each("int4")
    model = load_model(gguf, dtype="int4")
    from exoctl.engine.model import _linears

    held = [sum(linear.nbytes for linear in _linears(block)) for block in model.blocks]
    norms = 2 * 256 * 4
    assert [b - norms for b in each] == held  # exact, layer by layer (q/k/v held in int8 here)
    nodes = [NodeProfile("a", 10**10, 10**10), NodeProfile("b", 10**10, 10**10)]
    plan = place(card, nodes, PlacementRequest(dtype="int4", nodes=2))
    assert [s.n_layers for s in plan.shards] == [2, 1] or [s.n_layers for s in plan.shards] == [1, 2]


def test_the_embedded_default_is_the_packages_q4_1_file_and_runs_in_int4(smollm2_gguf: Path) -> None:
    card, ref = resolve_card("smollm2-135m-cpu")
    assert ref == "smollm2-135m-cpu" and card.native_dtype == "int4"
    from exoctl.models.store import resolve_model

    assert resolve_model("smollm2-135m-cpu") == smollm2_gguf
    local, _ = resolve_card(str(smollm2_gguf))
    # the catalog card and the file's tensor table agree
    assert local.parameters == card.parameters and local.n_layers == card.n_layers
    assert local.weight_bytes("int4") == card.weight_bytes("int4")


def test_smollm2_from_its_gguf_equals_the_transformers_conversion_in_float32(
    smollm2_gguf: Path, smollm2_folder: Path
) -> None:
    from exoctl.engine.generate import generate_in_process
    from exoctl.engine.tokenizer import Tokenizer
    from exoctl.wire.sampling_params import SamplingParams

    gguf_tokens = Tokenizer(smollm2_gguf)
    folder_tokens = Tokenizer(smollm2_folder)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = gguf_tokens.encode_chat(messages)
    assert prompt == folder_tokens.encode_chat(messages)
    assert gguf_tokens.eos_token_ids == folder_tokens.eos_token_ids
    params = SamplingParams(max_tokens=16)
    ours = generate_in_process(load_model(smollm2_gguf), gguf_tokens, prompt, params)
    theirs = generate_in_process(load_model(smollm2_folder), folder_tokens, prompt, params)
    assert ours.token_ids == theirs.token_ids and "Paris" in ours.text


@pytest.mark.parametrize("dtype", ["int4", "bfloat16"])
def test_smollm2_from_its_gguf_answers_paris(smollm2_gguf: Path, dtype: str, activations: str) -> None:
    from exoctl.engine.generate import generate_in_process
    from exoctl.engine.tokenizer import Tokenizer
    from exoctl.wire.sampling_params import SamplingParams

    tokenizer = Tokenizer(smollm2_gguf)
    prompt = tokenizer.encode_chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    )
    answer = generate_in_process(
        load_model(smollm2_gguf, dtype=dtype), tokenizer, prompt, SamplingParams(max_tokens=16)
    )
    assert "Paris" in answer.text


# --- references and the Hub ----------------------------------------------------------------------


def test_hub_references_read_as_ollama_users_write_them() -> None:
    assert parse_reference("bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M") == (
        "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
        "Q4_K_M",
    )
    assert parse_reference("/models/x.gguf") is None and parse_reference("smollm2-135m-cpu") is None
    ref = hub_reference("llama-3.1-8b-cpu:gguf")
    assert ref is not None and ref.reference == "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M"
    ref = hub_reference("qwen2.5-32b-cpu:Q8_0")
    assert ref is not None and ref.reference == "Qwen/Qwen2.5-32B-Instruct-GGUF:Q8_0"
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-cpu has no GGUF source"):
        hub_reference("smollm2-135m-cpu:Q4_0")
    assert get_card("mixtral-8x7b-cpu").gguf_quant == "Q4_K_M" and not get_card("mixtral-8x7b-cuda").gguf_repo


def test_quant_files_picks_one_quantisation_and_its_split_parts_in_order() -> None:
    bartowski = [
        "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",
        "Meta-Llama-3.1-8B-Instruct-Q4_K_S.gguf",
        "Meta-Llama-3.1-8B-Instruct-Q4_K_L.gguf",
        "Meta-Llama-3.1-8B-Instruct-Q8_0.gguf",
        "README.md",
    ]
    assert quant_files(bartowski, "Q4_K_M") == ["Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"]
    assert quant_files(bartowski, "q8_0") == ["Meta-Llama-3.1-8B-Instruct-Q8_0.gguf"]
    assert quant_files(bartowski, "Q4_K") == []  # not Q4_K_M's file
    qwen = [f"qwen2.5-32b-instruct-q4_k_m-{i:05d}-of-00005.gguf" for i in (3, 1, 5, 2, 4)]
    assert quant_files([*qwen, "qwen2.5-32b-instruct-q8_0-00001-of-00009.gguf"], "Q4_K_M") == sorted(qwen)
    folder = [
        f"Meta-Llama-3.1-70B-Instruct-Q8_0/Meta-Llama-3.1-70B-Instruct-Q8_0-0000{i}-of-00002.gguf"
        for i in (2, 1)
    ]
    assert quant_files(folder, "Q8_0") == sorted(folder)
    assert quant_files(["mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf", "mmproj-Q4_K_M.gguf"], "Q4_K_M") == [
        "mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf"
    ]


def test_a_layer_range_needs_only_the_split_files_holding_its_tensors() -> None:
    tables = {
        "m-00001-of-00003.gguf": [
            "token_embd.weight",
            "rope_freqs.weight",
            "blk.0.attn_q.weight",
            "blk.1.ffn_up.weight",
        ],
        "m-00002-of-00003.gguf": ["blk.1.ffn_down.weight", "blk.2.attn_q.weight", "blk.3.attn_q.weight"],
        "m-00003-of-00003.gguf": [
            "blk.4.attn_q.weight",
            "blk.5.attn_q.weight",
            "output_norm.weight",
            "output.weight",
        ],
    }
    names = list(tables)
    assert files_for_layers(tables, (0, 1), 6, tied=False) == names[:1]
    assert files_for_layers(tables, (1, 3), 6, tied=False) == names[:2]  # blk.1 spans two parts
    assert files_for_layers(tables, (4, 6), 6, tied=False) == [names[0], names[2]]  # the first: metadata
    tables[names[0]].remove("rope_freqs.weight")
    assert files_for_layers(tables, (3, 4), 6, tied=False) == names[:2]


@pytest.fixture
def hub_cache(wide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Hub is out of reach here: a split Q4_K_M repo laid out as the Hugging Face cache holds
    it stands in, offline. Returns its snapshot folder."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--Wide-GGUF"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    write_gguf(wide, snapshot / "wide-Q4_K_M.gguf", q4_k_m, split_max_tensors=14)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return snapshot


def test_a_hub_gguf_card_is_sized_from_cached_headers(hub_cache: Path) -> None:
    card, ref = resolve_card("someone/Wide-GGUF:Q4_K_M")
    local, _ = resolve_card(str(sorted(hub_cache.glob("*.gguf"))[0]))
    assert ref == "someone/Wide-GGUF:Q4_K_M" and card.id == ref and card.hf_repo == "someone/Wide-GGUF"
    assert card.layer_bytes_each("int4") == local.layer_bytes_each("int4") and card.n_layers == 3
    with pytest.raises(ModelNotFoundError, match="this machine's cache holds its Q4_K_M only"):
        resolve_card("someone/Wide-GGUF:Q2_K")  # offline: what the Hub has is not known
    with pytest.raises(ModelNotFoundError, match="Hugging Face Hub"):
        resolve_card("nobody/Nothing-GGUF:Q4_K_M")


def test_a_quantisation_the_repo_lacks_is_refused_with_what_it_has(monkeypatch: pytest.MonkeyPatch) -> None:
    from exoctl.models.gguf import hub as hub_gguf

    class Api:
        def list_repo_files(self, repo: str) -> list[str]:
            return ["README.md", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-IQ4_XS.gguf"]

    monkeypatch.setattr("huggingface_hub.HfApi", Api)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_gguf, "cached_files", lambda repo: [])
    with pytest.raises(
        ModelNotFoundError, match="someone/M-GGUF has no GGUF file of quantisation Q2_K"
    ) as info:
        hub_gguf.list_files(hub_gguf.HubGGUF("someone/M-GGUF", "Q2_K"))
    assert info.value.hint == "it has: IQ4_XS, Q4_K_M, Q8_0"
    assert hub_gguf.list_files(hub_gguf.HubGGUF("someone/M-GGUF", "q8_0")) == ["m-Q8_0.gguf"]


def test_a_node_takes_a_hub_ggufs_parts_from_its_cache_and_names_a_missing_one(hub_cache: Path) -> None:
    from exoctl.worker.model_access import locate

    parts = sorted(hub_cache.glob("*.gguf"))
    first = locate("someone/Wide-GGUF:Q4_K_M", [], "node1", (0, 1), 3)
    assert first.name == parts[0].name
    model = load_model(first, (0, 1), "int4")
    assert model.is_first and not model.is_last
    holders = {n: i.file.name for n, i in open_model(parts[0]).tensors.items()}
    last_part = holders["blk.2.ffn_down.weight"]
    assert last_part != parts[0].name
    (hub_cache / last_part).unlink()
    with pytest.raises(
        ModelNotFoundError, match=rf"someone/Wide-GGUF:Q4_K_M: {last_part} is not in this node's"
    ):
        locate("someone/Wide-GGUF:Q4_K_M", [], "node1", (2, 3), 3)


# --- files exoctl cannot run ----------------------------------------------------------------------


def test_a_truncated_file_is_refused_naming_the_file_and_the_tensor(
    written: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    source = written[("llama", "Q8_0")]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size - 1000])
    with pytest.raises(ModelFormatError, match=r"cut.gguf: truncated: tensor '.*' ends at byte"):
        open_model(cut)
    header = tmp_path / "header.gguf"
    header.write_bytes(source.read_bytes()[:200])
    with pytest.raises(ModelFormatError, match=r"header\.gguf: the GGUF header is truncated"):
        open_model(header)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ModelNotFoundError, match="not a model folder or GGUF file"):
        resolve_card(str(not_gguf))


def test_an_unsupported_tensor_type_is_refused_naming_it(
    written: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    data = bytearray(written[("llama", "F32")].read_bytes())
    # the first tensor's type id, right after its name and dims in the tensor table: make it IQ2_XXS
    meta, _ = _first_tensor_type_offset(data)
    struct.pack_into("<I", data, meta, GGMLQuantizationType.IQ2_XXS.value)
    odd = tmp_path / "odd.gguf"
    odd.write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match=r"odd.gguf: tensor '.*' is stored as IQ2_XXS"):
        open_model(odd)


def _first_tensor_type_offset(data: bytearray) -> tuple[int, str]:
    from exoctl.models.gguf.file import _string, _value

    _, _, kvs = struct.unpack_from("<IQQ", data, 4)
    pos = 24
    for _ in range(kvs):
        _, pos = _string(data, pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        _, pos = _value(data, pos + 4, kind, False)
    name, pos = _string(data, pos)
    (dims,) = struct.unpack_from("<I", data, pos)
    return pos + 4 + 8 * dims, name


def test_an_architecture_exoctl_does_not_run_is_refused(wide: Path, tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "phi.gguf"
    writer = GGUFWriter(str(path), "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match=r"phi\.gguf: GGUF architecture 'phi3' is not supported"):
        hf_config(open_model(path))
    with pytest.raises(UnsupportedModelError, match="phi3"):
        resolve_card(str(path))


def test_models_lists_each_cards_gguf_source_and_what_is_local() -> None:
    from exoctl.api.service import local_sources
    from exoctl.cli.models import card_json

    assert local_sources(get_card("smollm2-135m-cpu")) == ["embedded"]
    card = get_card("llama-3.1-8b-cpu")
    listed = card_json(card, local_sources(card))
    assert listed["gguf"] == "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M" and listed["local"] == []
    assert card_json(get_card("llama-3.1-8b-cuda"))["gguf"] is None


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral"])
@pytest.mark.parametrize(("type_name", "dtype"), [("Q8_0", "float32"), ("Q4_0", "int4")])
def test_tensor_ranks_of_a_gguf_model_give_the_whole_models_logits(
    written: dict[tuple[str, str], Path], kind: str, type_name: str, dtype: str, activations: str
) -> None:
    from exoctl.engine.shard import TensorShard
    from tests.test_tensor_engine import Exchange, on_ranks

    gguf = written[(kind, type_name)]
    expected = logits(gguf, dtype)

    def work(rank: int, exchange: Exchange) -> tuple[torch.Tensor, list[str]]:
        # the reader in the model's own activation dtype, as load_model makes it
        reader = GGUFWeightReader(gguf, resolve_dtype(dtype), 4 if dtype == "int4" else None)
        model = load_model(
            gguf, dtype=dtype, reader=reader, shard=TensorShard(rank, 2), reduce=exchange.reduce(rank)
        )
        return model.forward(IDS, POSITIONS, [model.new_cache()], all_logits=True), reader.read_names

    results = on_ranks(2, work)
    got = torch.cat([r[0] for r in results], dim=-1)
    if dtype == "int4":  # sums reordered may flip roundings: see the quantized test's bound
        from tests.test_quantized import activation_rounding, relative

        assert relative(got, expected) < activation_rounding(lambda: logits(gguf, dtype)) / 4
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    else:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if kind == "mixtral":  # each rank read its own experts' slices of the merged tensors
        for rank, (_, names) in enumerate(results):
            experts = {int(n.split(".")[5]) for n in names if ".experts." in n}
            assert experts == {2 * rank, 2 * rank + 1}


def test_a_remote_header_is_read_from_the_first_bytes_only(
    written: dict[tuple[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HfFileSystem (HTTP range reads) stands in as a file that counts the bytes asked of it."""
    import io

    from exoctl.models.gguf import hub as hub_gguf

    path = written[("llama", "Q4_0")]
    asked: list[int] = []

    class Counting(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            asked.append(size or -1)
            return super().read(size)

    class FileSystem:
        def open(self, name: str, mode: str) -> Counting:
            assert name == f"someone/Tiny-GGUF/{path.name}" and mode == "rb"
            return Counting(path.read_bytes())

    monkeypatch.setattr("huggingface_hub.HfFileSystem", FileSystem)
    monkeypatch.setattr(hub_gguf, "HEADER_START", 64)  # grown 4x until the header fits
    ref = hub_gguf.HubGGUF("someone/Tiny-GGUF", "Q4_0")
    monkeypatch.setattr(hub_gguf, "cached", lambda ref, filename: None)
    meta, infos = hub_gguf.read_remote_header(ref, path.name)
    local_meta, local_infos = open_model(path).metadata, list(open_model(path).tensors.values())
    assert meta["llama.block_count"] == local_meta["llama.block_count"]
    assert [(i.name, i.shape, i.type_name, i.nbytes) for i in infos] == [
        (i.name, i.shape, i.type_name, i.nbytes) for i in local_infos
    ]
    header_bytes = min(i.offset for i in infos)  # the tensor data starts after the aligned header
    assert sum(asked) < 4 * header_bytes + 64 < path.stat().st_size


def test_a_split_model_with_a_part_missing_cannot_be_placed_from_here(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    first = write_gguf(tiny_models["qwen2"], tmp_path / "q.gguf", all_as("Q8_0"), split_max_tensors=20)
    parts = sorted(tmp_path.glob("q-*-of-*.gguf"))
    parts[-1].unlink()
    with pytest.raises(
        ModelFormatError, match=rf"q-00001-of-0000{len(parts)}.gguf is part 1 of {len(parts)} but 1"
    ):
        resolve_card(str(first))
    first.unlink()
    with pytest.raises(ModelNotFoundError, match="part 1 of"):
        resolve_card(str(parts[1]))


def q4_k_m_70b_header(path: Path) -> bytes:
    """The header (metadata and tensor table, no data) of Llama 3.1 70B as llama.cpp's Q4_K_M
    quantizes it: Q6_K for the output and for attn_v and ffn_down in the layers `use_more_bits`
    picks (the first and last eighth, every third between), Q4_K elsewhere."""
    from gguf import GGML_QUANT_SIZES, GGUFWriter

    n, d, inter, heads, kv, vocab = 80, 8192, 28672, 64, 8, 128256
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(n)
    writer.add_context_length(131072)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)

    def add(name: str, shape: tuple[int, ...], type_name: str) -> None:
        kind = GGMLQuantizationType[type_name]
        block, size = GGML_QUANT_SIZES[kind]
        count = int(np.prod(shape))
        if type_name == "F32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * count)
        else:  # quantized: the writer takes the shape in bytes
            raw_shape = (*shape[:-1], shape[-1] // block * size)
            writer.add_tensor_info(name, raw_shape, np.dtype(np.uint8), count // block * size, kind)

    def more_bits(i: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    add("rope_freqs.weight", (64,), "F32")
    add("token_embd.weight", (vocab, d), "Q4_K")
    for i in range(n):
        add(f"blk.{i}.attn_norm.weight", (d,), "F32")
        add(f"blk.{i}.attn_q.weight", (d, d), "Q4_K")
        add(f"blk.{i}.attn_k.weight", (kv * 128, d), "Q4_K")
        add(f"blk.{i}.attn_v.weight", (kv * 128, d), "Q6_K" if more_bits(i) else "Q4_K")
        add(f"blk.{i}.attn_output.weight", (d, d), "Q4_K")
        add(f"blk.{i}.ffn_norm.weight", (d,), "F32")
        add(f"blk.{i}.ffn_gate.weight", (inter, d), "Q4_K")
        add(f"blk.{i}.ffn_up.weight", (inter, d), "Q4_K")
        add(f"blk.{i}.ffn_down.weight", (d, inter), "Q6_K" if more_bits(i) else "Q4_K")
    add("output_norm.weight", (d,), "F32")
    add("output.weight", (vocab, d), "Q6_K")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path.read_bytes()


def test_a_70b_q4_k_m_plan_is_sized_layer_by_layer_from_its_header_alone(tmp_path: Path) -> None:
    from exoctl.models.gguf.card import card_from_gguf
    from exoctl.models.gguf.file import GGUFModel, header_of

    data = q4_k_m_70b_header(tmp_path / "header-only.gguf")
    assert len(data) < 100_000  # what a node fetches over HTTP ranges before anything is downloaded
    meta, infos = header_of(data, "Meta-Llama-3.1-70B-Instruct-Q4_K_M.gguf")
    model = GGUFModel((Path("Meta-Llama-3.1-70B-Instruct-Q4_K_M.gguf"),), meta, {i.name: i for i in infos})
    card = card_from_gguf(model, "bartowski/Meta-Llama-3.1-70B-Instruct-GGUF:Q4_K_M")
    catalog = get_card("llama-3.1-70b-cpu")
    assert card.parameters == catalog.parameters and card.native_dtype == "int4"
    assert 42e9 < card.storage_bytes < 43e9  # the file's size, as the Hub lists it (42.5 GB)
    each = card.layer_bytes_each("int4")
    # a layer whose attn_v and ffn_down are Q6_K holds q/k/v and down in int8
    assert len(set(each)) == 2 and each[0] > each[11] and each[12] == each[0]
    assert sum(each) > catalog.n_layers * catalog.layer_bytes("int4")  # more than plain int4
    nodes = [NodeProfile(f"node{i}", 96 * 10**9, 96 * 10**9, memory_cap=12 * 10**9) for i in range(1, 5)]
    with pytest.raises(PlacementError, match=r"needs 5\d\.\d GB in int4"):
        place(card, nodes, PlacementRequest(dtype="int4", nodes=4))  # 4 x 12 GB is too little
    nodes = [NodeProfile(f"node{i}", 96 * 10**9, 96 * 10**9) for i in range(1, 5)]
    plan = place(card, nodes, PlacementRequest(dtype="int4", nodes=4))
    assert [s.n_layers for s in plan.shards] == [20, 20, 20, 20]
    first = plan.shards[0]
    # a shard's bytes are its own layers' (with the KV reserve), not 20 times an average layer
    kv = 2 * 8 * 128 * 4 * 8192
    assert (
        first.memory_bytes - sum(b + kv for b in each[:20])
        == plan.shards[1].memory_bytes - sum(b + kv for b in each[20:40]) + card.embedding_parameters * 2
    )


def test_a_gguf_instance_is_found_by_every_name_of_its_model() -> None:
    from exoctl.cluster.views import model_matches

    assert model_matches("llama-F32", "/models/llama-F32.gguf")
    assert model_matches("q", "/models/q-00001-of-00003.gguf")
    hub = "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M"
    assert model_matches(hub, hub) and model_matches(hub, "llama-3.1-8b-cpu:gguf")
    assert model_matches(hub, "llama-3.1-8b-cpu:Q4_K_M") and not model_matches(hub, "llama-3.1-8b-cpu:Q8_0")
    assert not model_matches(hub, "smollm2-135m-cpu:Q4_0") and not model_matches(hub, "llama-3.1-8b-cpu")


def test_mixtral_files_with_one_tensor_per_expert_load_too(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    gguf = write_gguf(
        tiny_models["mixtral"], tmp_path / "old.gguf", all_as("Q4_0"), tmp_path / "ref", merged_experts=False
    )
    assert "blk.0.ffn_gate.3.weight" in open_model(gguf).tensors
    assert torch.allclose(logits(gguf), logits(tmp_path / "ref"), atol=1e-4, rtol=0)


@pytest.mark.parametrize("type_name", ["Q5_0", "Q5_1", "Q5_K"])
def test_five_bit_types_load_and_are_held_in_int8_under_int4(
    tiny_models: dict[str, Path], wide: Path, tmp_path: Path, type_name: str
) -> None:
    source = wide if type_name == "Q5_K" else tiny_models["llama"]
    gguf = write_gguf(source, tmp_path / "m.gguf", all_as(type_name), tmp_path / "ref")
    assert torch.allclose(logits(gguf), logits(tmp_path / "ref"), atol=1e-4, rtol=0)
    card, _ = resolve_card(str(gguf))
    assert card.native_dtype == "int8"
    model = load_model(gguf, dtype="int4")
    assert {linear.bits for block in model.blocks for linear in (block.attention.qkv, block.mlp.down)} == {8}
