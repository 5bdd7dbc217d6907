"""A model's architecture, read from its Hugging Face `config.json` (unknown keys dropped)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exoctl.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    from exoctl.models.gguf.file import GGUFModel

# model_type in config.json -> the engine's architecture family (one module each).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "mixtral": "mixtral"}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 0
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Derived defaults, as transformers fills them.
        if not self.num_key_value_heads:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list) else (eos,)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = data.get("model_type")
        if model_type not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} is not supported",
                hint=f"exoctl runs {', '.join(sorted(ARCHITECTURES))} models",
            )
        data = dict(data)
        # transformers 5 writes rope settings as `rope_parameters`; Hub checkpoints use
        # `rope_theta` + `rope_scaling`. Normalise to the latter.
        rope = data.pop("rope_parameters", None)
        if isinstance(rope, dict):
            data.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                data["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling = data.get("rope_scaling")
        if isinstance(scaling, dict):
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "llama3", "freq_factors"):
                raise UnsupportedModelError(f"{source}: rope scaling of type {kind!r} is not supported")
            data["rope_scaling"] = None if kind == "default" else {**scaling, "rope_type": kind}
        if model_type == "qwen2":
            data.setdefault("attention_bias", True)
        known = {f.name for f in fields(cls)} - {"extra"}
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if data.get(k) is None]
        if missing:
            raise ModelFormatError(f"{source}: missing {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        extra = {k: v for k, v in data.items() if k not in known}
        config = cls(**kwargs, extra=extra)
        if config.hidden_act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {config.hidden_act!r} is not supported")
        if config.num_attention_heads % config.num_key_value_heads:
            raise ModelFormatError(
                f"{source}: num_attention_heads {config.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {config.num_key_value_heads}"
            )
        return config


def load_config(folder: Path) -> ModelConfig:
    """The config of a model folder, or of a GGUF model (a file, or a folder of GGUF files)."""
    from exoctl.models.gguf.file import is_gguf_source, open_model

    if is_gguf_source(Path(folder)):
        return gguf_config(open_model(Path(folder)))
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(
            f"no config.json in {folder}",
            hint="a model folder holds config.json, *.safetensors and the tokenizer files",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return ModelConfig.from_dict(data, source=str(path))


def gguf_config(model: GGUFModel) -> ModelConfig:
    """The config a GGUF model's metadata implies."""
    from exoctl.models.gguf.hf_names import hf_config

    return ModelConfig.from_dict(hf_config(model), source=str(model.path))
