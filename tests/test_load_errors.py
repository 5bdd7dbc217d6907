"""Config parsing and the errors a user sees for bad model folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from exoctl.engine.config import ModelConfig, load_config
from exoctl.engine.model import load_model
from exoctl.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from exoctl.models.store import resolve_model

BASE = {
    "model_type": "llama",
    "vocab_size": 10,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def test_unknown_keys_are_dropped_and_defaults_derived() -> None:
    config = ModelConfig.from_dict(
        {**BASE, "torch_dtype": "bfloat16", "architectures": ["X"], "some_new_key": 1}
    )
    assert config.num_key_value_heads == 2 and config.head_dim == 4
    assert config.extra["some_new_key"] == 1


def test_hub_and_transformers5_rope_settings_read_the_same() -> None:
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hub = ModelConfig.from_dict(
        {**BASE, "rope_theta": 5e5, "rope_scaling": {**scaling, "rope_type": "llama3"}}
    )
    v5 = ModelConfig.from_dict(
        {**BASE, "rope_parameters": {**scaling, "rope_type": "llama3", "rope_theta": 5e5}}
    )
    assert hub.rope_theta == v5.rope_theta == 5e5
    assert hub.rope_scaling == v5.rope_scaling


def test_qwen2_has_qkv_bias_by_default() -> None:
    assert ModelConfig.from_dict({**BASE, "model_type": "qwen2"}).attention_bias


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2' is not supported.*"):
        ModelConfig.from_dict({**BASE, "model_type": "gpt2"})


def test_unsupported_rope_scaling_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match="rope scaling of type 'yarn'"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_missing_config_fields_are_listed() -> None:
    with pytest.raises(ModelFormatError, match="missing hidden_size, num_hidden_layers"):
        ModelConfig.from_dict(
            {k: v for k, v in BASE.items() if k not in ("hidden_size", "num_hidden_layers")}
        )


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=f"no config.json in {tmp_path}"):
        load_config(tmp_path)


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(ModelNotFoundError, match=r"no \*.safetensors files"):
        load_model(tmp_path)


def test_broken_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_config(tmp_path)


def test_wrong_dtype_is_refused(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(UnsupportedModelError, match=r"dtype 'float64' is not supported.*float32, bfloat16"):
        load_model(tiny_models["llama"], dtype="float64")


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_follows_native_bf16(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: torch.dtype
) -> None:
    from exoctl.engine import kernel_calls, model

    monkeypatch.delenv("EXOCTL_ACTIVATIONS", raising=False)
    monkeypatch.setattr(kernel_calls, "cpu_has_native_bf16", lambda: native)
    assert model.resolve_dtype("auto") == expected
    assert model.resolve_dtype("int4") == expected
    assert model.resolve_dtype("float32") == torch.float32


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(("forced", "expected"), [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_the_activations_switch_overrides_the_cpu(
    monkeypatch: pytest.MonkeyPatch, native: bool, forced: str, expected: torch.dtype
) -> None:
    from exoctl.engine import kernel_calls, model

    monkeypatch.setattr(kernel_calls, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setenv("EXOCTL_ACTIVATIONS", forced)
    for name in ("auto", "int8", "int4"):
        assert model.resolve_dtype(name) == expected
    assert model.resolve_dtype("float32") == torch.float32
    assert model.resolve_dtype("bfloat16") == torch.bfloat16


def test_a_bad_activations_switch_says_what_it_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    from exoctl.engine import model
    from exoctl.errors import ExoctlError

    monkeypatch.setenv("EXOCTL_ACTIVATIONS", "fp8")
    with pytest.raises(ExoctlError, match=r"EXOCTL_ACTIVATIONS='fp8' is not one of auto, bfloat16, float32"):
        model.resolve_dtype("int4")


def test_layer_range_outside_the_model(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(
        UnsupportedModelError, match=r"layer range \[2, 9\) is not within the model's 4 layers"
    ):
        load_model(tiny_models["llama"], (2, 9))


def test_a_missing_shard_file_is_named(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], folder)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    # the index may name files a node lacks (it downloads only its layers' files): the error comes
    # when a tensor is read from one
    with pytest.raises(ModelFormatError, match=rf"{victim.name}, which holds '.*', is not in the folder"):
        load_model(folder)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "num_hidden_layers": 1}))
    save_file({"model.embed_tokens.weight": torch.zeros(10, 9)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelFormatError, match=r"'model.embed_tokens.weight' has shape \(10, 9\).*\(10, 8\)"):
        load_model(tmp_path)


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "num_hidden_layers": 1}))
    save_file({"model.embed_tokens.weight": torch.zeros(10, 8)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelFormatError, match=r"tensor 'model.layers.0.input_layernorm.weight' is missing"):
        load_model(tmp_path)


def test_resolving_models(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_model(str(tiny_models["qwen2"])) == tiny_models["qwen2"].resolve()
    with pytest.raises(ModelNotFoundError, match="is not a model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=r"no model folder at \./nowhere"):
        resolve_model("./nowhere")
    with pytest.raises(ModelNotFoundError, match="unknown model 'llama-9'"):
        resolve_model("llama-9")
    # A catalog model that is not in the (empty) Hugging Face cache: say how to get it.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelNotFoundError, match=r"llama-3.1-8b-cpu \(meta-llama/Llama-3.1-8B-Instruct\) is not "
    ):
        resolve_model("meta-llama/Llama-3.1-8B-Instruct")
