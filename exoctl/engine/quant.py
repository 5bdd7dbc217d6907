"""Weight-only quantization: int8 per output row, int4 in blocks of 32 with a scale and a minimum.

int8: w ≈ q * s, q in [-127, 127] int8 [N, K], s float32 [N] = max |w| of the row / 127.
int4: w ≈ n * d + m per block of 32 along K, n a nibble in [0, 15], d and m float16, stored as
scales [N, K / 32, 2] = (d, m) (llama.cpp's Q4_1 block; Q4_0's symmetric (n - 8) * d is the case
m = -8d, so both hold exactly); the nibbles [N, K / 2] bytes with weight j of a block in byte j's
low nibble and weight j + 16 in its high nibble. d and m are fitted per block by least squares
(`_int4_blocks`). Both formats are row-wise, so a rank's rows of a weight quantize the same alone
as in the whole tensor, and an int4 column slice on block boundaries is the same blocks; an int8
column slice keeps the whole row's scale (the loader quantizes the whole tensor first).
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
    scales: torch.Tensor  # float32 [N] for int8; float16 [N, K / 32, 2], (d, m) a block, for int4
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
        """Input columns `part`; int4 only on block boundaries (a block has one scale and minimum)."""
        if part == range(self.in_features):
            return self
        if self.bits == 8:
            # the kernel reads activations in blocks of 32: a rank's part keeps whole blocks too
            check_block_columns(part, "an int8 weight", 8)
            return QuantizedWeight(
                self.data[:, part.start : part.stop].contiguous(), self.scales, 8, len(part)
            )
        check_block_columns(part)
        data = self.data[:, part.start // 2 : part.stop // 2].contiguous()
        scales = self.scales[:, part.start // BLOCK : part.stop // BLOCK].contiguous()
        return QuantizedWeight(data, scales, 4, len(part))


def check_block_columns(part: range, what: str = "an int4 weight", bits: int = 4) -> None:
    """A rank's columns of a quantized weight must be whole blocks: an int4 block has one scale
    and minimum, and the kernel quantizes activations in blocks of 32 for int8 and int4 alike."""
    if part.start % BLOCK or part.stop % BLOCK:
        other = "--dtype bfloat16" if bits == 8 else "--dtype int8"
        raise UnsupportedModelError(
            f"columns [{part.start}, {part.stop}) of {what} would cut a block of {BLOCK} weights: a "
            "block never straddles two ranks",
            hint=f"use a node count that splits the dimension into multiples of {BLOCK}, {other}, or "
            "--sharding pipeline",
        )


def fits_blocks(in_features: int) -> bool:
    """Whether a matrix of this input width quantizes into blocks of 32 (int8's activation blocks
    and int4's weight blocks); one that does not is held in float32 (weights.WeightReader.matrix)."""
    return in_features % BLOCK == 0


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
    scales, nibbles = _int4_blocks(blocks)
    packed = nibbles[..., : BLOCK // 2] | (nibbles[..., BLOCK // 2 :] << 4)  # [N, K/32, 16]
    return QuantizedWeight(
        packed.reshape(out_features, in_features // 2).contiguous(), scales.contiguous(), 4, in_features
    )


# Least-squares refits of (d, m) per block after the min/max start. Squared error of the 1.1B
# shape's 5632 x 2048 gate_proj against quantizing time (2 threads): 0 fits 28.3 (0.11 s), 1 25.9,
# 2 24.9 (0.28 s), 4 24.3 (0.50 s).
INT4_FITS = 2


def _int4_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [N, B, 32] float32 -> scales float16 [N, B, 2] (d, m) and nibbles uint8 [N, B, 32]
    with w ≈ nibble * d + m.

    It starts from Q4_1's levels (the block's minimum at 0, its maximum at 15), then alternates
    a least-squares fit of (d, m) to the levels with rounding each weight to its nearest level:
    neither step raises a block's squared error, so it never ends worse than Q4_1's own rule.
    Weights that already lie on such a grid (a Q4_0 or Q4_1 checkpoint dequantized) come back
    exactly. Measured on SmolLM2 (benchmarks/perplexity.py, RESULTS.md): symmetric Q4_0 levels
    with a refitted scale scored 15.40, this 11.55 through the kernel (float32: 11.53; SmolLM2's
    embedded weights are a Q4_1 file's, which this holds exactly); on the 1.1B shape's random
    weights its squared error is 0.76x the symmetric one's, for 5 bits a weight instead of 4.5."""
    low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)
    d, m = _half((high - low) / 15), _half(low)
    n = blocks.shape[-1]
    for fit in range(INT4_FITS + 1):
        inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        levels = torch.round((blocks - m[..., None]) * inverse[..., None]).clamp_(0, 15)
        if fit == INT4_FITS:
            break
        # min over (d, m) of |w - (L d + m)|²: a line through the points (L, w) of the block
        sum_l, sum_ll = levels.sum(-1), (levels * levels).sum(-1)
        sum_w, sum_lw = blocks.sum(-1), (levels * blocks).sum(-1)
        det = n * sum_ll - sum_l * sum_l
        fitted_d = (n * sum_lw - sum_l * sum_w) / det.clamp(min=1e-30)
        fitted_m = (sum_ll * sum_w - sum_l * sum_lw) / det.clamp(min=1e-30)
        ok = (det > 0) & (fitted_d > 0)  # a flat block (one level) keeps its start
        d = torch.where(ok, _half(fitted_d), d)
        m = torch.where(ok, _half(fitted_m), m)
    return torch.stack((d, m), dim=-1).to(torch.float16), levels.to(torch.uint8)


def _half(values: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to what float16 stores (the fit then sees the stored scales)."""
    return values.to(torch.float16).float()


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The float32 matrix the quantized one stands for."""
    if weight.bits == 8:
        return weight.data.float() * weight.scales[:, None]
    n, k = weight.shape
    packed = weight.data.view(n, k // BLOCK, BLOCK // 2)
    nibbles = torch.cat((packed & 0x0F, packed >> 4), dim=-1).float()  # [N, K/32, 32]
    scales = weight.scales.float()
    return (nibbles * scales[..., 0:1] + scales[..., 1:2]).view(n, k)


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
    scales = torch.zeros(padded, blocks, 2, dtype=torch.float16)
    scales[:n] = weight.scales
    # [tile, row, block, (d, m)] -> [tile, block, (d, m), row]: a block's 8 d's, then its 8 m's
    return tiled.contiguous(), scales.view(padded // TILE, TILE, blocks, 2).permute(0, 2, 3, 1).contiguous()


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
    row_scales = scales.permute(0, 3, 1, 2).reshape(-1, blocks, 2)[:n]
    return QuantizedWeight(packed.reshape(n, k // 2).contiguous(), row_scales.contiguous(), 4, k)


def stack_rows(weights: list[torch.Tensor | QuantizedWeight]) -> torch.Tensor | QuantizedWeight:
    """Matrices with the same input features, one under the other (fused q/k/v, gate/up)."""
    quantized = [w for w in weights if isinstance(w, QuantizedWeight)]
    if len(quantized) == len(weights):
        # A GGUF layer may mix int4 and int8 (a Q4_K_M file's Q6_K attn_v beside Q4_K q and k):
        # the fused matrix takes the higher precision.
        bits = max(w.bits for w in quantized)
        return concat_rows([w if w.bits == bits else quantize(dequantize(w), bits) for w in quantized])
    if quantized:
        raise ValueError("cannot stack quantized and float matrices")
    return torch.cat([w for w in weights if isinstance(w, torch.Tensor)])
