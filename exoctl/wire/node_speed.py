"""What a worker measured about its node and its links, as it reports them. Typed; torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exoctl.wire.protocol import ProtocolError

# the weight formats a node's read rate is measured in, in the order of `NodeSpeed.read_rates`
WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")


def _number(raw: Any, what: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
        raise ProtocolError(f"{what} must be a number of at least 0, got {raw!r:.40}")
    return float(raw)


@dataclass(frozen=True)
class NodeSpeed:
    """A node's measured speed (engine.node_speed): bytes of weights per second a decode step's
    kernels read in each of WEIGHT_FORMATS, float32 GEMM's FLOP/s (prompts), one small kernel
    call's seconds (what a layer costs a token at least), and when it was measured."""

    read_rates: tuple[float, ...]
    gemm_flops: float
    call_s: float
    measured_at: float

    def read_rate(self, weight_format: str) -> float:
        """Bytes/s in a weight format; GGUF's block formats read as the int kernel of their size."""
        fmt = weight_format if weight_format in WEIGHT_FORMATS else _nearest_format(weight_format)
        return self.read_rates[WEIGHT_FORMATS.index(fmt)]

    def to_wire(self) -> dict[str, Any]:
        return {
            "read_rates": list(self.read_rates),
            "gemm_flops": self.gemm_flops,
            "call_s": self.call_s,
            "measured_at": self.measured_at,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> NodeSpeed:
        if not isinstance(raw, dict):
            raise ProtocolError("node speed must be a map")
        rates = raw.get("read_rates")
        if not isinstance(rates, list) or len(rates) != len(WEIGHT_FORMATS):
            raise ProtocolError(f"node speed field 'read_rates' must be {len(WEIGHT_FORMATS)} numbers")
        return cls(
            tuple(_number(r, "a read rate") for r in rates),
            _number(raw.get("gemm_flops"), "gemm_flops"),
            _number(raw.get("call_s"), "call_s"),
            _number(raw.get("measured_at"), "measured_at"),
        )


def _nearest_format(dtype: str) -> str:
    """A GGUF block format by its bits a weight: q8_0 reads like int8, q4/q5/q6 like int4."""
    low = dtype.lower()
    if "8" in low:
        return "int8"
    if any(b in low for b in ("4", "5", "6", "3", "2")):
        return "int4"
    return "bfloat16" if "16" in low else "float32"


@dataclass(frozen=True)
class LinkMeasure:
    """One direction of a link, measured by the worker at its source: the round trip of a small
    frame to the worker at `sink` (its node name and address) and back, and the bytes per second
    a few megabytes travel at. `sink_boot` names the run of that worker (a restarted one is
    measured again)."""

    sink: str
    address: str
    sink_boot: str
    rtt_s: float
    bytes_per_s: float
    measured_at: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "sink": self.sink,
            "address": self.address,
            "sink_boot": self.sink_boot,
            "rtt_s": self.rtt_s,
            "bytes_per_s": self.bytes_per_s,
            "measured_at": self.measured_at,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> LinkMeasure:
        if not isinstance(raw, dict):
            raise ProtocolError("a link measurement must be a map")
        for name in ("sink", "address", "sink_boot"):
            if not isinstance(raw.get(name), str):
                raise ProtocolError(f"link field '{name}' must be a string")
        return cls(
            raw["sink"],
            raw["address"],
            raw["sink_boot"],
            _number(raw.get("rtt_s"), "rtt_s"),
            _number(raw.get("bytes_per_s"), "bytes_per_s"),
            _number(raw.get("measured_at"), "measured_at"),
        )
