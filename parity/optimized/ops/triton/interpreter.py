"""GPU numerics for Triton's CPU interpreter (`TRITON_INTERPRET=1`): bf16 arithmetic and float conversions.

Why: the stock interpreter (triton 3.6 to 3.9) keeps bf16 values as their raw uint16 bits and fp8 values as uint8
and hands those bits to numpy, so a bf16 add, a bf16 `tl.dot` or a bf16 `tl.max` operates on integers; its own
float-to-float conversion truncates fp32 -> bf16 instead of rounding to nearest even and gets fp32 -> fp8 wrong
near carries, subnormals and the top of the range. A kernel that is right on the GPU then fails its CPU test.

What `install()` changes (once per process, only the interpreter's builder and reductions):
- every float <-> float conversion goes through torch, whose casts round to nearest even like the GPU's `cvt.rn`;
  conversions to fp8 first clamp finite values to the format's largest finite value, as `cvt.rn.satfinite` does,
  and keep NaN; a round-toward-zero fp32 -> bf16 request truncates the low 16 bits;
- element-wise arithmetic, fma, `tl.dot` and sum/min/max reductions on bf16 operands compute in fp32 and round the
  result back to bf16 (what the GPU does: it has no bf16 adders, it widens);
- `tl.assume` is a no-op: it is a compiler hint, and third-party kernels assume strides > 0 where a test passes 0.

Not covered (avoid in kernels meant to run here): bf16 atomics, `libdevice`, inline asm, `tl.dot_scaled` before
triton 3.8, autotuning over more than one config. Checked against torch casts and math in
`tests/optimized/ops/test_triton_interpreter.py`; not against a GPU (the GPU tests run the same kernels there).
"""

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter as interp

# triton float type name -> torch dtype with the same bits
_TORCH_OF = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
    "fp8e4nv": torch.float8_e4m3fn,
    "fp8e5": torch.float8_e5m2,
    "fp8e4b8": torch.float8_e4m3fnuz,
    "fp8e5b16": torch.float8_e5m2fnuz,
}
_UINT_OF_WIDTH = {8: (np.uint8, torch.uint8), 16: (np.uint16, torch.int16), 32: (np.uint32, torch.int32),
                  64: (np.uint64, torch.int64)}  # fmt: skip


def _as_torch(bits: np.ndarray, tl_type) -> torch.Tensor:
    """The interpreter's storage array (any shape) -> a flat torch tensor of the float type it encodes."""
    np_uint, torch_int = _UINT_OF_WIDTH[tl_type.primitive_bitwidth]
    flat = np.ascontiguousarray(np.asarray(bits)).reshape(-1).view(np_uint)
    return torch.from_numpy(flat.copy()).view(torch_int).view(_TORCH_OF[tl_type.name])


def _as_bits(t: torch.Tensor, tl_type, shape) -> np.ndarray:
    """A torch float tensor -> the interpreter's storage for `tl_type` (unsigned bits), reshaped."""
    np_uint, torch_int = _UINT_OF_WIDTH[tl_type.primitive_bitwidth]
    return t.contiguous().view(torch_int).numpy().view(np_uint).reshape(shape)


def convert_float(data, src_type, dst_type, rounding_mode):
    """Drop-in for the interpreter's `_convert_float`: same arguments, returns the destination's storage bits."""
    if src_type.name not in _TORCH_OF or dst_type.name not in _TORCH_OF:
        return _stock_convert(data, src_type, dst_type, rounding_mode)
    shape = np.shape(data)
    x = _as_torch(data, src_type)
    toward_zero = rounding_mode is not None and "RTZ" in str(rounding_mode).upper()
    if toward_zero and (src_type.name, dst_type.name) == ("fp32", "bf16"):
        y = (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # drop the low 16 bits
    else:
        target = _TORCH_OF[dst_type.name]
        if target.itemsize == 1:  # fp8: saturate finite values, keep NaN (cvt ... .satfinite)
            top = torch.finfo(target).max
            x = x.float()
            x = torch.where(x.isnan(), x, x.clamp(-top, top))
        y = x.to(target)
    return _as_bits(y, dst_type, shape)


def _bf16_bits_to_f32(bits) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(values) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
    return torch.from_numpy(a.reshape(-1)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(a.shape)


def _is_bf16(handle) -> bool:
    return handle.dtype.scalar == tl.bfloat16


def _widen(handle):
    """A bf16 handle as an fp32 one (exact); any other handle unchanged."""
    return interp.TensorHandle(_bf16_bits_to_f32(handle.data), tl.float32) if _is_bf16(handle) else handle


def _narrow(handle):
    """An fp32 result back to bf16 storage (round to nearest even)."""
    if handle.dtype.scalar == tl.float32 and handle.data.dtype == np.float32:
        return interp.TensorHandle(_f32_to_bf16_bits(handle.data), tl.bfloat16)
    return handle


def _patch_builder():
    builder = interp.InterpreterBuilder
    binary, unary, ternary = builder.binary_op, builder.unary_op, builder.ternary_op
    fma, dot = builder.create_fma, builder.create_dot

    def binary_op(self, lhs, rhs, op):
        if not (_is_bf16(lhs) or _is_bf16(rhs)):
            return binary(self, lhs, rhs, op)
        out = binary(self, _widen(lhs), _widen(rhs), op)
        return out if out.data.dtype == np.bool_ else _narrow(out)  # comparisons stay booleans

    def unary_op(self, arg, op):
        return _narrow(unary(self, _widen(arg), op)) if _is_bf16(arg) else unary(self, arg, op)

    def ternary_op(self, lhs, rhs, other, op):
        # a select (np.where) only moves bits, whatever their type; clamp and the like compute
        if op is np.where or not any(map(_is_bf16, (lhs, rhs, other))):
            return ternary(self, lhs, rhs, other, op)
        return _narrow(ternary(self, _widen(lhs), _widen(rhs), _widen(other), op))

    def create_fma(self, x, y, z):
        if not any(map(_is_bf16, (x, y, z))):
            return fma(self, x, y, z)
        return _narrow(fma(self, _widen(x), _widen(y), _widen(z)))

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out = dot(self, _widen(a), _widen(b), _widen(d), input_precision, max_num_imprecise_acc)
        return _narrow(out) if _is_bf16(d) else out

    builder.binary_op, builder.unary_op, builder.ternary_op = binary_op, unary_op, ternary_op
    builder.create_fma, builder.create_dot = create_fma, create_dot
    builder.create_assume = lambda self, condition: None


def _patch_reductions():
    reduce_ops = interp.ReduceOps
    stock_sum, stock_min_max = reduce_ops.sum, reduce_ops.min_max

    def sum_(self, input):
        if input.dtype.scalar != tl.bfloat16:
            return stock_sum(self, input)
        total = np.sum(_bf16_bits_to_f32(input.handle.data), axis=self.axis, keepdims=self.keep_dims)
        return self.to_tensor(_f32_to_bf16_bits(total), input.dtype)

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        values = input[0] if isinstance(input, tuple) else input
        if values.dtype.scalar != tl.bfloat16:
            return stock_min_max(self, input, val_reduce_op, idx_reduce_op)
        f = _bf16_bits_to_f32(values.handle.data)
        out = []
        if val_reduce_op:
            v = val_reduce_op(f, axis=self.axis, keepdims=self.keep_dims)
            out.append(self.to_tensor(_f32_to_bf16_bits(v), values.dtype))
        if idx_reduce_op:
            out.append(self.to_tensor(idx_reduce_op(f, axis=self.axis, keepdims=self.keep_dims), tl.int32))
        return tuple(out) if len(out) == 2 else out[0]

    reduce_ops.sum, reduce_ops.min_max = sum_, min_max


_stock_convert = interp._convert_float


def installed() -> bool:
    return interp._convert_float is convert_float


def install() -> None:
    """Patch the interpreter once; later calls do nothing."""
    if installed():
        return
    interp._convert_float = convert_float
    _patch_builder()
    _patch_reductions()
