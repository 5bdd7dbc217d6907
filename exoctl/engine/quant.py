"""Weight-only quantization: int8 per output row, int4 in blocks of 32 (llama.cpp's Q4_0).

int8: w ≈ q * s, q in [-127, 127] int8 [N, K], s float32 [N] = max |w| of the row / 127.
int4: w ≈ (n - 8) * d per block of 32 along K, n a nibble, d float16 [N, K / 32] (llama.cpp's
Q4_0 format; the scale chosen per block by least squares, `_int4_blocks`), stored [N, K / 2]
bytes with weight j of a block in byte j's low nibble and weight j + 16 in its high nibble.
Both are row-wise, so a rank's rows of a weight quantize the same alone as in the whole tensor,
and an int4 column slice on block boundaries is the same blocks; an int8 column slice keeps the
whole row's scale (the loader quantizes the whole tensor first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exoctl.dtypes import QUANT_BLOCK as BLOCK  # int4 block; the K granularity of both formats
from exoctl.errors import UnsupportedModelError


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized [out_features, in_features] matrix."""

    data: torch.Tensor  # int8 [N, K], or uint8 [N, K / 2] for int4
    scales: torch.Tensor  # float32 [N] for int8, float16 [N, K / 32] for int4
    bits: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.data.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def columns(self, part: range) -> QuantizedWeight:
        """Input columns `part`; int4 only on block boundaries (a block has one scale)."""
        if part == range(self.in_features):
            return self
        if self.bits == 8:
            return QuantizedWeight(
                self.data[:, part.start : part.stop].contiguous(), self.scales, 8, len(part)
            )
        check_block_columns(part)
        data = self.data[:, part.start // 2 : part.stop // 2].contiguous()
        scales = self.scales[:, part.start // BLOCK : part.stop // BLOCK].contiguous()
        return QuantizedWeight(data, scales, 4, len(part))


def check_block_columns(part: range, what: str = "an int4 weight") -> None:
    """A rank's columns of an int4 weight must be whole blocks: a block has one scale."""
    if part.start % BLOCK or part.stop % BLOCK:
        raise UnsupportedModelError(
            f"columns [{part.start}, {part.stop}) of {what} would cut a block of {BLOCK} weights: an int4 "
            "block never straddles two ranks",
            hint=f"use a node count that splits the dimension into multiples of {BLOCK}, --dtype int8, or "
            "--sharding pipeline",
        )


def check_block_multiple(k: int, what: str = "the weight") -> None:
    if k % BLOCK:
        raise UnsupportedModelError(
            f"{what} has {k} input features, not a multiple of {BLOCK}, which int8 and int4 need",
            hint="use --dtype float32 or bfloat16 for this model",
        )


def quantize(weight: torch.Tensor, bits: int) -> QuantizedWeight:
    """weight [N, K] float -> its quantized form (K a multiple of 32)."""
    out_features, in_features = weight.shape
    check_block_multiple(in_features)
    w = weight.float()
    if bits == 8:
        amax = w.abs().amax(dim=1)
        scales = amax / 127
        inverse = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
        q = torch.round(w * inverse[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight(q.contiguous(), scales.contiguous(), 8, in_features)
    if bits != 4:
        raise ValueError(f"bits must be 8 or 4, not {bits}")
    blocks = w.view(out_features, in_features // BLOCK, BLOCK)
    d, nibbles = _int4_blocks(blocks)
    packed = nibbles[..., : BLOCK // 2] | (nibbles[..., BLOCK // 2 :] << 4)  # [N, K/32, 16]
    return QuantizedWeight(
        packed.reshape(out_features, in_features // 2).contiguous(), d.contiguous(), 4, in_features
    )


def _int4_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [N, B, 32] float32 -> scales d float16 [N, B] and nibbles uint8 [N, B, 32] with
    w ≈ (nibble - 8) * d. The levels are Q4_0's (the value of largest magnitude maps to -8); the
    scale is then refitted by least squares, d = <w, L> / <L, L> for the levels L, which never
    raises a block's squared error. Measured on SmolLM2 (benchmarks/perplexity.py): perplexity
    15.59 with Q4_0's own scale, 15.40 refitted; also trying other step sizes per block gained
    0.2% more for 2.5x the load time, and clipping the largest weight (smaller steps) lost 15%."""
    index = blocks.abs().argmax(dim=-1, keepdim=True)
    step = (blocks.gather(-1, index) / -8).squeeze(-1)  # [N, B], signed
    inverse = torch.where(step != 0, 1 / step, torch.zeros_like(step))
    levels = torch.floor(blocks * inverse[..., None] + 0.5).clamp_(-8, 7)
    norm = (levels * levels).sum(-1)
    d = torch.where(norm > 0, (blocks * levels).sum(-1) / norm.clamp(min=1), step)
    return d.to(torch.float16), (levels + 8).to(torch.uint8)


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The float32 matrix the quantized one stands for."""
    if weight.bits == 8:
        return weight.data.float() * weight.scales[:, None]
    n, k = weight.shape
    packed = weight.data.view(n, k // BLOCK, BLOCK // 2)
    nibbles = torch.cat((packed & 0x0F, packed >> 4), dim=-1).float() - 8  # [N, K/32, 32]
    return (nibbles * weight.scales.float()[..., None]).view(n, k)


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    first = weights[0]
    if len(weights) == 1:
        return first
    return QuantizedWeight(
        torch.cat([w.data for w in weights]),
        torch.cat([w.scales for w in weights]),
        first.bits,
        first.in_features,
    )


TILE = 8  # output rows the kernel takes at once (kernels/qmatmul.c)


def pack_tiles(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout of a weight: 8 output rows interleaved 4 bytes at a time, rows padded
    with zeros to a multiple of 8 (see kernels/qmatmul.c). Returns (data, scales)."""
    n, k = weight.shape
    padded = -(-n // TILE) * TILE
    blocks = k // BLOCK
    if weight.bits == 8:
        data = torch.zeros(padded, k, dtype=torch.int8)
        data[:n] = weight.data
        # [tile, row, block, group, byte] -> [tile, block, group, row, byte]
        tiled = data.view(padded // TILE, TILE, blocks, 8, 4).permute(0, 2, 3, 1, 4)
        scales = torch.zeros(padded, dtype=torch.float32)
        scales[:n] = weight.scales
        return tiled.contiguous(), scales
    nibbles = torch.zeros(padded, k, dtype=torch.uint8)
    packed = weight.data.view(n, blocks, BLOCK // 2)
    nibbles[:n] = torch.cat((packed & 0x0F, packed >> 4), dim=-1).view(n, k)
    # column 8g + 4h + j of a block -> [tile, row, block, group g, half h, byte j]
    split = nibbles.view(padded // TILE, TILE, blocks, 4, 2, 4)
    bytes_ = split[:, :, :, :, 0] | (split[:, :, :, :, 1] << 4)  # [tile, row, block, group, byte]
    tiled = bytes_.permute(0, 2, 3, 1, 4)
    scales = torch.zeros(padded, blocks, dtype=torch.float16)
    scales[:n] = weight.scales
    return tiled.contiguous(), scales.view(padded // TILE, TILE, blocks).permute(0, 2, 1).contiguous()


def unpack_tiles(
    data: torch.Tensor, scales: torch.Tensor, bits: int, shape: tuple[int, int]
) -> QuantizedWeight:
    """`pack_tiles` undone: the weight in quantize's layout."""
    n, k = shape
    blocks = k // BLOCK
    if bits == 8:
        rows = data.permute(0, 3, 1, 2, 4).reshape(-1, k)[:n]
        return QuantizedWeight(rows.contiguous(), scales[:n].clone(), 8, k)
    bytes_ = data.permute(0, 3, 1, 2, 4)  # [tile, row, block, group, byte]
    nibbles = torch.stack((bytes_ & 0x0F, bytes_ >> 4), dim=4).reshape(-1, blocks, BLOCK)[:n]  # cols in order
    packed = nibbles[..., : BLOCK // 2] | (nibbles[..., BLOCK // 2 :] << 4)
    row_scales = scales.permute(0, 2, 1).reshape(-1, blocks)[:n]
    return QuantizedWeight(packed.reshape(n, k // 2).contiguous(), row_scales.contiguous(), 4, k)


def stack_rows(weights: list[torch.Tensor | QuantizedWeight]) -> torch.Tensor | QuantizedWeight:
    """Matrices with the same input features, one under the other (fused q/k/v, gate/up)."""
    quantized = [w for w in weights if isinstance(w, QuantizedWeight)]
    if len(quantized) == len(weights):
        return concat_rows(quantized)
    if quantized:
        raise ValueError("cannot stack quantized and float matrices")
    return torch.cat([w for w in weights if isinstance(w, torch.Tensor)])
