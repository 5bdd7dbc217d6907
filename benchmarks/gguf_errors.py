"""Error of exoctl's runtime weights against the GGUF file's own dequantized values, on the
llama-quantize files `vs_llamacpp.py --same-file` makes (the 1.1B shape): relative RMS and max
error, per tensor type and runtime dtype.

    python benchmarks/gguf_errors.py
"""

from pathlib import Path

import numpy as np
import torch

from exoctl.engine.gguf_weights import GGUFWeightReader, dequantized
from exoctl.engine.quant import dequantize
from exoctl.models.gguf.file import open_model

cache = Path.home() / ".cache/exoctl-bench/gguf"
names = {
    "attn_q": "self_attn.q_proj",
    "attn_v": "self_attn.v_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate": "mlp.gate_proj",
}
RUNS = (
    ("llama-1.1b-Q4_K_M.gguf", 4),
    ("llama-1.1b-Q8_0.gguf", 8),
    ("llama-1.1b-Q4_0.gguf", 4),
    ("llama-1.1b-Q4_K_M.gguf", 8),
)
for file, bits in RUNS:
    model = open_model(cache / file)
    reader = GGUFWeightReader(model, torch.float32, bits)
    for layer in (0, 5):
        for short, hf in names.items():
            info = model.tensors[f"blk.{layer}.{short}.weight"]
            raw = np.fromfile(info.file, dtype=np.uint8, count=info.nbytes, offset=info.offset)
            raw = raw.reshape(-1, info.row_bytes)
            ref = torch.from_numpy(dequantized(info, raw).reshape(info.shape))
            if short == "attn_q":  # the file's rows are in llama.cpp's order
                order = reader._source_rows(info, range(info.shape[0]))
                ref = ref[torch.from_numpy(np.asarray(order))]
            w = reader.matrix(f"model.layers.{layer}.{hf}.weight", tuple(info.shape))
            got = dequantize(w)
            err = got - ref
            rms, worst = float(err.norm() / ref.norm()), float(err.abs().max() / ref.abs().max())
            assert not isinstance(w, torch.Tensor)
            print(
                f"{file:<24} --dtype int{bits}  blk.{layer}.{short:<9} {info.type_name:<5} -> int{w.bits}: "
                f"rms {rms:.2e}  max {worst:.2e}"
            )
