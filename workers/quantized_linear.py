"""Quantized weights kept quantized in memory: GGUF blocks as they are in the file, run by the C
block kernel (workers/native_kernel.py); `GroupCodes` through torch's int4 weight-only CPU kernel.

Parts:
- `GroupCodes`: a weight [out, in] as unsigned integer codes with one scale and one offset per
  group of `group_size` inputs: w = scale * code + offset (every GGUF type potluck runs, and
  `--quantization int8|int4`, are this form). `cat` fuses weights along the output dimension.
- `codes_from_gguf(raw, type_name, shape)`: a GGUF tensor's blocks -> `GroupCodes`, using only
  `gguf.quants.dequantize`: the blocks dequantized as they are, with every code set to 0 (the
  offsets) and with every code set to 1 (offset + scale); codes = round((w - offset) / scale).
  Q4_0, Q4_1, Q8_0 and Q4_K, the common ones, are also read directly from their blocks
  (`_DIRECT`, 30x faster on load); tests check both ways agree exactly.
- `quantize_weight(weight, bits)`: group-wise (32) asymmetric weight-only quantization of a float
  weight for `--quantization int4|int8`, scales and zeros chosen in bfloat16 so that the kernel
  reproduces `GroupCodes.dequantize()` exactly.
- `QuantizedLinear`: `y = x @ w^T (+ bias)`. GGUF parts (`QuantizedRows`) stay the file's blocks
  (1.0x their file bytes, every type) and run through `native_kernel.gguf_matmul` in float32: exact
  up to the order of float32 sums. Where that kernel cannot be built, and for `GroupCodes`
  (`--quantization`), with `torch.ops.aten._weight_int4pack_mm_for_cpu`
  (group 32, bfloat16 activations, float32 accumulation). A b-bit code is split into
  ceil(b / 4) 4-bit planes (code = sum 16^p * plane_p), each plane a packed int4 weight with its
  scale 16^p * scale; the plane results are summed in float32. Q6_K's 16-input groups are run as
  two masked halves (codes of the other half set to the kernel's zero point, 8). The weight is
  never expanded to floating point: per step it reads 4 bits (+ 1 bit of bfloat16 scale and zero)
  per weight and plane. Kernel choice: docs/quantized_kernels.md.
- `QuantizedRows`: a quantized GGUF tensor kept as its file bytes: an embedding table
  (`lookup(ids)` dequantizes only the rows a step embeds), or a linear weight (its bytes taken by
  `QuantizedLinear`, a tied LM head sharing the table's; `codes()` for the int4 fallback).
- `SUPPORTED_GGUF_TYPES`, `DENSE_GGUF_TYPES`, `UnsupportedQuantizationError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from workers.native_kernel import gguf_dequantize_rows, gguf_matmul, native_kernel

KERNEL_GROUP = 32  # the int4 kernel's group size (it takes 32, 64, 128 or 256)
_ROWS_MULTIPLE = 16  # the int4 packing wants the output dimension a multiple of 16
_PACK_ROWS = 4096  # rows packed at once (a multiple of the packing's 64-row blocks)
_CHUNK_BLOCKS = 1 << 15  # blocks dequantized at once while extracting codes (bounds load memory)

# type -> (code bits, group size, [(first byte, end byte, byte value giving code 1)] of each block)
_CODE_BYTES: dict[str, tuple[int, int, list[tuple[int, int, int]]]] = {
    "Q4_0": (4, 32, [(2, 18, 0x11)]),
    "Q4_1": (4, 32, [(4, 20, 0x11)]),
    "Q5_0": (5, 32, [(2, 6, 0x00), (6, 22, 0x11)]),
    "Q5_1": (5, 32, [(4, 8, 0x00), (8, 24, 0x11)]),
    "Q8_0": (8, 32, [(2, 34, 0x01)]),  # signed codes, shifted by 128 below
    "Q4_K": (4, 32, [(16, 144, 0x11)]),
    "Q5_K": (5, 32, [(16, 48, 0x00), (48, 176, 0x11)]),
    "Q6_K": (6, 16, [(0, 128, 0x11), (128, 192, 0x00)]),
}
SUPPORTED_GGUF_TYPES = tuple(_CODE_BYTES)
DENSE_GGUF_TYPES = ("F32", "F16", "BF16")


class UnsupportedQuantizationError(ValueError):
    """A tensor's quantization type has no kernel here."""


@dataclass
class GroupCodes:
    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # float32 [out, in // group_size]
    offset: torch.Tensor  # float32 [out, in // group_size]
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] (for references and tests; never on a step's path)."""
        out, inn = self.codes.shape
        grouped = self.codes.float().view(out, -1, self.group_size)
        return (grouped * self.scale[:, :, None] + self.offset[:, :, None]).view(out, inn)

    def take_rows(self, order: torch.Tensor) -> GroupCodes:
        return GroupCodes(self.codes[order], self.scale[order], self.offset[order], self.bits, self.group_size)

    @staticmethod
    def cat(parts: list[GroupCodes]) -> GroupCodes:
        """Weights of the same bits and groups stacked along the output dimension."""
        return GroupCodes(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.offset for p in parts]),
            parts[0].bits,
            parts[0].group_size,
        )


def codes_from_gguf(raw: np.ndarray, type_name: str, shape: tuple[int, int], tensor_name: str = "") -> GroupCodes:
    """A GGUF tensor's bytes (uint8, rows of blocks) -> `GroupCodes` [out, in]."""
    if type_name not in _CODE_BYTES:
        raise UnsupportedQuantizationError(
            f"tensor {tensor_name or '?'} has GGUF type {type_name}, which potluck cannot run "
            f"(supported: {', '.join(DENSE_GGUF_TYPES + SUPPORTED_GGUF_TYPES)})"
        )
    qtype = gguf.GGMLQuantizationType[type_name]
    bits, group, code_bytes = _CODE_BYTES[type_name]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, block_bytes)
    out, inn = shape
    if type_name in _DIRECT:  # the common types' codes read straight from the blocks (fast)
        code, scale, offset = _DIRECT[type_name](blocks)
        return GroupCodes(
            torch.from_numpy(code).view(out, inn),
            torch.from_numpy(scale.astype(np.float32)).view(out, inn // group),
            torch.from_numpy(offset.astype(np.float32)).view(out, inn // group),
            bits,
            group,
        )
    codes, scales, offsets = [], [], []
    for begin in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = blocks[begin : begin + _CHUNK_BLOCKS]
        zero, one = chunk.copy(), chunk.copy()
        for first, end, value in code_bytes:
            zero[:, first:end] = 0
            one[:, first:end] = value
        weight = gguf.quants.dequantize(chunk, qtype).reshape(-1, group)
        offset = gguf.quants.dequantize(zero, qtype).reshape(-1, group)[:, 0]
        scale = gguf.quants.dequantize(one, qtype).reshape(-1, group)[:, 0] - offset
        safe = np.where(scale == 0, 1, scale)
        code = np.rint((weight - offset[:, None]) / safe[:, None])
        code[scale == 0] = 0
        if type_name == "Q8_0":  # signed int8 codes: shift into [0, 256)
            code += 128
            offset = offset - 128 * scale
        codes.append(code.astype(np.uint8))
        scales.append(scale.astype(np.float32))
        offsets.append(offset.astype(np.float32))
    return GroupCodes(
        torch.from_numpy(np.concatenate(codes)).view(out, inn),
        torch.from_numpy(np.concatenate(scales)).view(out, inn // group),
        torch.from_numpy(np.concatenate(offsets)).view(out, inn // group),
        bits,
        group,
    )


def _raised(bits: int, plane: int) -> bool:
    """Whether plane `plane` > 0 of a `bits`-bit code holds codes below 8 and stores them plus 8,
    so that it adds code * scale with a zero point of 0 (a small constant left in plane 0's
    bfloat16 zero point keeps its rounding small: Q5_0's 5th bit would otherwise put -128 * scale
    there)."""
    return plane > 0 and bits - 4 * plane <= 3


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 field at byte `at` of every block, as float32 [blocks]."""
    return blocks[:, at : at + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes -> [blocks, 32] codes: low nibbles are elements 0-15, high ones 16-31."""
    return np.concatenate([packed & 15, packed >> 4], axis=1)


def _direct_q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _half(blocks, 0)
    return _nibbles(blocks[:, 2:18]), d, -8 * d


def _direct_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _nibbles(blocks[:, 4:20]), _half(blocks, 0), _half(blocks, 2)


def _direct_q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _half(blocks, 0)
    return (blocks[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


def _direct_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    packed = blocks[:, 4:16]  # 8 six-bit scales and 8 six-bit mins
    low, high = packed[:, 0:4], packed[:, 8:12]
    scales = np.concatenate([low & 63, (high & 15) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([packed[:, 4:8] & 63, (high >> 4) | ((packed[:, 4:8] >> 6) << 4)], axis=1)
    qs = blocks[:, 16:144].reshape(-1, 4, 32)  # 4 chunks of 64: low nibbles sub-block 2j, high 2j+1
    codes = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 256)
    scale = (d[:, None] * scales).reshape(-1)
    offset = (-(dmin[:, None] * mins)).reshape(-1)
    return codes, scale, offset


_DIRECT = {"Q4_0": _direct_q4_0, "Q4_1": _direct_q4_1, "Q8_0": _direct_q8_0, "Q4_K": _direct_q4_k}


def _center(bits: int) -> int:
    """The constant the kernel's (code - 8) terms subtract over all planes (added back in plane 0's zero)."""
    return sum(8 * 16**p for p in range(-(-bits // 4)) if not _raised(bits, p))


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = KERNEL_GROUP, name: str = "") -> GroupCodes:
    """Group-wise asymmetric weight-only quantization (min/max per group) to `bits` (4 or 8)."""
    out, inn = weight.shape
    if inn % group_size:
        raise UnsupportedQuantizationError(
            f"{name or 'weight'} has {inn} inputs, not a multiple of the group size {group_size}"
        )
    w = weight.detach().float().view(out, -1, group_size)
    low, high = w.amin(-1), w.amax(-1)
    top = 2**bits - 1
    scale = ((high - low) / top).bfloat16().float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    center = _center(bits)
    # the kernel computes (code - center) * scale + zero with zero in bfloat16: pick zero first
    zero = (low + center * scale).bfloat16().float()
    offset = zero - center * scale
    codes = torch.clamp(torch.round((w - offset[:, :, None]) / scale[:, :, None]), 0, top)
    return GroupCodes(codes.to(torch.uint8).view(out, inn), scale, offset, bits, group_size)


def _pack_plane(code: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One 4-bit plane: code int32 [out, in] in [0, 16), scale / zero [out, in // 32]."""
    out = code.shape[0]
    pad = -out % _ROWS_MULTIPLE
    if pad:
        code = torch.cat([code, torch.full((pad, code.shape[1]), 8, dtype=code.dtype)])
        scale = torch.cat([scale, scale.new_zeros((pad, scale.shape[1]))])
        zero = torch.cat([zero, zero.new_zeros((pad, zero.shape[1]))])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(code.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros  # [out, in // 2] uint8, [in // 32, out, 2] bfloat16


def _planes(codes: GroupCodes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The packed 4-bit planes of one `GroupCodes`, built `_PACK_ROWS` rows at a time (the int32
    temporaries of a 49152-row LM head took 600 MB at once); the CPU packing is blocked by 64
    rows, so packs of 64-multiple row ranges concatenate to the pack of the whole."""
    out = codes.shape[0]
    if out <= _PACK_ROWS:
        return _planes_of_rows(codes)
    pieces = [
        _planes_of_rows(GroupCodes(codes.codes[r : r + _PACK_ROWS], codes.scale[r : r + _PACK_ROWS],
                                   codes.offset[r : r + _PACK_ROWS], codes.bits, codes.group_size))
        for r in range(0, out, _PACK_ROWS)
    ]
    return [
        (torch.cat([piece[i][0] for piece in pieces]), torch.cat([piece[i][1] for piece in pieces], dim=1))
        for i in range(len(pieces[0]))
    ]


def _planes_of_rows(codes: GroupCodes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The packed 4-bit planes (and their bfloat16 scales and zeros) of one `GroupCodes`."""
    inn = codes.shape[1]
    if inn % KERNEL_GROUP:
        raise UnsupportedQuantizationError(f"{inn} inputs is not a multiple of {KERNEL_GROUP}")
    c = codes.codes.to(torch.int32)
    planes = []
    if codes.group_size % KERNEL_GROUP == 0:
        repeat = codes.group_size // KERNEL_GROUP
        scale = codes.scale.repeat_interleave(repeat, 1)
        offset = codes.offset.repeat_interleave(repeat, 1)
        const = offset + _center(codes.bits) * scale
        for p in range(-(-codes.bits // 4)):
            zero = const if p == 0 else torch.zeros_like(const)
            code = (c >> (4 * p)) & 15
            planes.append(_pack_plane(code + 8 if _raised(codes.bits, p) else code, scale * 16**p, zero))
        return planes
    if codes.group_size * 2 != KERNEL_GROUP:
        raise UnsupportedQuantizationError(f"group size {codes.group_size} has no kernel here")
    # 16-input groups: offsets must be whole multiples of the scale (Q6_K: -32 * scale), so
    # each half runs symmetric (zero 0) while the other half's codes sit at 8 (adding 0).
    shift = torch.round(-codes.offset / torch.where(codes.scale == 0, 1.0, codes.scale))
    if not torch.allclose(codes.offset + shift * codes.scale, torch.zeros_like(shift), atol=1e-6):
        raise UnsupportedQuantizationError("16-input groups with offsets off the code grid")
    signed = c - shift.to(torch.int32).repeat_interleave(codes.group_size, 1)
    low = (signed + 8) % 16  # signed = (low - 8) + 16 * (high - 8)
    high = (signed - (low - 8)) // 16 + 8
    if high.min() < 0 or high.max() > 15:
        raise UnsupportedQuantizationError(f"{codes.bits}-bit codes in 16-input groups do not fit two planes")
    half_index = (torch.arange(inn) // codes.group_size) % 2
    for half in (0, 1):
        mask = half_index == half
        scale = codes.scale[:, half::2]
        for plane, multiple in ((low, 1), (high, 16)):
            code = torch.where(mask, plane, torch.full_like(plane, 8))
            planes.append(_pack_plane(code, scale * multiple, torch.zeros_like(scale)))
    return planes


class QuantizedLinear:
    """x [N, in] -> x @ w^T [N, out] for weights stacked along the output dimension (fused q/k/v,
    gate/up). Each part is a GGUF tensor's blocks (`QuantizedRows`: run as they are by the C block
    kernel, workers/native_kernel.py, or as `GroupCodes` planes where it cannot be built), a
    `GroupCodes` (run as 4-bit planes, see the module doc) or a dense [out, in] tensor; consecutive
    parts of one kind (one GGUF type, or one bit width and group size) run as one kernel call."""

    def __init__(self, parts: list[GroupCodes | QuantizedRows | torch.Tensor] | GroupCodes | QuantizedRows) -> None:
        parts = [parts] if isinstance(parts, (GroupCodes, QuantizedRows)) else list(parts)
        native = native_kernel() is not None
        parts = [p.codes() if isinstance(p, QuantizedRows) and not native else p for p in parts]
        runs: list[list[GroupCodes | QuantizedRows | torch.Tensor]] = []
        for part in parts:
            if runs and _kind(part) is not None and _kind(part) == _kind(runs[-1][-1]):
                runs[-1].append(part)
            else:
                runs.append([part])
        self.in_features = parts[0].shape[1]
        # each segment: (kind, payload, out): "blocks" (GGUF type, uint8 [out, row bytes]),
        # "planes" [(packed, scales_and_zeros)] or "dense" w_t [in, out]
        self.segments: list[tuple[str, object, int]] = []
        for run in runs:
            if isinstance(run[0], QuantizedRows):
                raw = [r.ordered_raw() for r in run]
                raw_t = torch.from_numpy(raw[0] if len(raw) == 1 else np.concatenate(raw))
                self.segments.append(("blocks", (run[0].type_name, raw_t), raw_t.shape[0]))
            elif isinstance(run[0], GroupCodes):
                codes = GroupCodes.cat(run) if len(run) > 1 else run[0]
                self.segments.append(("planes", _planes(codes), codes.shape[0]))
            else:
                dense = torch.cat(run)
                self.segments.append(("dense", dense.t().contiguous(), dense.shape[0]))
        self.out_features = sum(out for _, _, out in self.segments)

    def holds(self, rows: object) -> bool:
        """Whether this weight is `rows`'s own file bytes (a tied LM head sharing the embedding table)."""
        return isinstance(rows, QuantizedRows) and any(
            kind == "blocks" and payload[1].data_ptr() == rows.raw.ctypes.data for kind, payload, _ in self.segments
        )

    @property
    def weight_bytes(self) -> int:
        total = 0
        for kind, payload, _ in self.segments:
            if kind == "blocks":
                total += payload[1].numel()
            elif kind == "planes":
                total += sum(p.numel() * p.element_size() + s.numel() * s.element_size() for p, s in payload)
            else:
                total += payload.numel() * payload.element_size()
        return total

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: [N, in] -> [N, out]
        if len(self.segments) == 1 and self.segments[0][0] == "blocks":  # the common case: one call
            type_name, raw = self.segments[0][1]
            out = gguf_matmul(x.float().contiguous(), raw, type_name).to(x.dtype)
            return out if bias is None else out + bias
        x16 = x32 = None
        outs = []
        for kind, payload, num_out in self.segments:
            if kind == "blocks":
                x32 = x.float().contiguous() if x32 is None else x32
                outs.append(gguf_matmul(x32, payload[1], payload[0]))
            elif kind == "dense":
                outs.append(torch.mm(x.to(payload.dtype), payload).float())
            else:
                x16 = x.to(torch.bfloat16).contiguous() if x16 is None else x16
                out = None
                for packed, scales_and_zeros in payload:
                    part = torch.ops.aten._weight_int4pack_mm_for_cpu(x16, packed, KERNEL_GROUP, scales_and_zeros)
                    out = part.float() if out is None else out.add_(part)
                outs.append(out if out.shape[1] == num_out else out[:, :num_out])
        out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).to(x.dtype)
        return out if bias is None else out + bias


def _kind(part: object) -> tuple | None:
    """Parts that run as one kernel call when adjacent: same GGUF type, or same bits and group."""
    if isinstance(part, QuantizedRows):
        return ("blocks", part.type_name)
    if isinstance(part, GroupCodes):
        return ("planes", part.bits, part.group_size)
    return None


class QuantizedRows:
    """A quantized GGUF tensor kept as the file's bytes [rows, bytes per row] until it is used:
    an embedding table for good, a linear weight until its layer is built (so a loading stage
    holds its file bytes plus one layer's codes, not every layer's codes at once)."""

    def __init__(
        self, raw: np.ndarray, type_name: str, shape: tuple[int, int], name: str = "", order: torch.Tensor | None = None
    ) -> None:
        self.type_name, self.shape, self.name = type_name, shape, name
        self.qtype = gguf.GGMLQuantizationType[type_name]
        self.raw = np.ascontiguousarray(raw).reshape(shape[0], -1)
        self.order = order  # rows to take (llama q/k: undoing llama.cpp's permutation), or None

    @property
    def weight_bytes(self) -> int:
        return int(self.raw.nbytes)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[N] token ids -> [N, hidden] (only these rows dequantized)."""
        ids_np = ids.cpu().numpy()
        if native_kernel() is not None:
            return gguf_dequantize_rows(self.raw, self.type_name, ids_np, self.shape[1]).to(dtype)
        rows = self.raw[ids_np]
        return torch.from_numpy(gguf.quants.dequantize(rows, self.qtype)).to(dtype).view(-1, self.shape[1])

    def ordered_raw(self) -> np.ndarray:
        """The file's bytes [out, row bytes] in the model's row order (the same array when no rows move)."""
        return self.raw if self.order is None else self.raw[self.order.numpy()]

    def codes(self) -> GroupCodes:
        codes = codes_from_gguf(self.raw, self.type_name, self.shape, self.name)
        return codes if self.order is None else codes.take_rows(self.order)
