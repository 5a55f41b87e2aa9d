"""Rounding to low precision that behaves the same compiled and under the interpreter.

Compiled Triton rounds fp32 → bf16 to nearest-even (like torch). The Triton interpreter
(3.x, `_convert_float` without a rounding mode) truncates instead, which biases every bf16
value toward zero: a Newton–Schulz run in bf16 came out 3× further from float64 than torch's
bf16 run. Under TRITON_INTERPRET=1 we therefore round with integer arithmetic on the bits.
fp16 and fp32 casts go through numpy there and already round to nearest-even.
"""

import triton.language as tl

from ._launch import device_function


@device_function
def _bf16_rtne(x):
    """fp32 → bf16, round-to-nearest-even on the bit pattern; NaN and ±Inf pass through."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    y = tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    return y.to(tl.bfloat16)


@device_function
def round_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(DTYPE) with round-to-nearest-even everywhere (bf16 via fp32, exact for fp64 inputs up to double rounding)."""
    if DTYPE == tl.bfloat16:
        if INTERPRET:
            y = _bf16_rtne(x.to(tl.float32))
        else:
            y = x.to(tl.float32).to(tl.bfloat16)
    else:
        y = x.to(DTYPE)
    return y
