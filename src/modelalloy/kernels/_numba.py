"""numba building blocks shared by the kernels: float32 fma, bit casts, bf16 load and store.

Only imported when a kernel runs (numba is an optional dependency).
"""

from __future__ import annotations

import os

from modelalloy.kernels import use_versioned_cache

use_versioned_cache()  # before numba reads its configuration

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

# Compiled code is cached on disk (see kernels.use_versioned_cache);
# MODELALLOY_KERNEL_NOCACHE=1 compiles afresh, e.g. to inspect it.
JIT = {"nogil": True, "cache": not os.environ.get("MODELALLOY_KERNEL_NOCACHE"),
       "error_model": "numpy", "boundscheck": False}


@intrinsic
def fma(typingctx, a, b, c):
    """a·b + c with one rounding (LLVM's llvm.fma), as torch's ``add(other, alpha)`` does."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32] * 3))
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def bits_to_f32(typingctx, u):
    """The float32 whose bit pattern is the low 32 bits of integer ``u`` (numba widens
    unsigned arithmetic to 64 bits)."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if u.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif u.bitwidth < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(u), codegen


@intrinsic
def f32_to_bits(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def widen(x):
    """float32 value of a stored element (bfloat16 bits as uint16, or float32). This plain
    version serves Python callers; jitted code gets the overload below."""
    if isinstance(x, np.uint16):
        return np.array([np.uint32(x) << np.uint32(16)], np.uint32).view(np.float32)[0]
    return np.float32(x)


@overload(widen, inline="always")
def _widen(x):
    if x == types.uint16:
        return lambda x: bits_to_f32(np.uint32(x) << 16)
    if x == types.float32:
        return lambda x: x
    return None


def narrow(x, like):
    """A float32 value in the output's storage type (``like`` is an element of the output):
    bfloat16 bits by round-to-nearest-even, NaN as 0xFFFF. Plain version, as :func:`widen`."""
    if isinstance(like, np.uint16):
        u = int(np.array([x], np.float32).view(np.uint32)[0])
        if (u & 0x7FFFFFFF) > 0x7F800000:
            return np.uint16(0xFFFF)
        return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    return np.float32(x)


@overload(narrow, inline="always")
def _narrow(x, like):
    if like == types.uint16:
        def to_bf16(x, like):
            u = f32_to_bits(x)
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                return np.uint16(0xFFFF)  # NaN, as torch's vectorized cast writes it
            # round to nearest even, as torch's float -> bfloat16 conversion
            bias = np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
            return np.uint16((u + bias) >> np.uint32(16))
        return to_bf16
    if like == types.float32:
        return lambda x, like: x
    return None


@njit(inline="always")
def is_nonfinite(x):
    """1 where the float32 value is NaN or ±Inf, else 0 (an integer, for OR reductions)."""
    return np.uint32((f32_to_bits(x) & np.uint32(0x7F800000)) == np.uint32(0x7F800000))


@njit(inline="always")
def any_nonfinite(src, count):
    """Whether any of the first ``count`` columns of any row of ``src`` is NaN or ±Inf (one
    branch-free pass per row: the kernels then return False and the engine reports)."""
    bad = np.uint32(0)
    for k in range(src.shape[0]):
        row = src[k, :count]
        for j in range(count):
            bad |= is_nonfinite(widen(row[j]))
    return bad != 0


@njit(inline="always")
def sign(x):
    """torch.sign on float32: −1, 0 or +1 (0 for NaN, as the elected signs need)."""
    return np.float32((x > 0) - (x < 0))


@njit(**JIT)
def sfc64_fill(state, words):
    """Fill ``words`` (uint32) with the SFC64 stream at ``state`` (uint64[4], advanced): the
    low then the high half of each 64-bit draw, as ``Generator.integers`` over the full uint64
    range viewed as little-endian uint32 gives them. An odd count still uses a whole draw."""
    a, b, c, w = state[0], state[1], state[2], state[3]
    n = words.size
    pairs = words[:n - n % 2].view(np.uint64)  # little-endian: low half first
    for i in range(pairs.size):
        tmp = a + b + w
        w += np.uint64(1)
        a = b ^ (b >> np.uint64(11))
        b = c + (c << np.uint64(3))
        c = ((c << np.uint64(24)) | (c >> np.uint64(40))) + tmp
        pairs[i] = tmp
    if n % 2:
        tmp = a + b + w
        w += np.uint64(1)
        a = b ^ (b >> np.uint64(11))
        b = c + (c << np.uint64(3))
        c = ((c << np.uint64(24)) | (c >> np.uint64(40))) + tmp
        words[n - 1] = np.uint32(tmp & np.uint64(0xFFFFFFFF))
    state[0], state[1], state[2], state[3] = a, b, c, w


@njit(inline="always")
def _sfc64_step(a, b, c, w):
    tmp = a + b + w
    return b ^ (b >> np.uint64(11)), c + (c << np.uint64(3)), \
        ((c << np.uint64(24)) | (c >> np.uint64(40))) + tmp, w + np.uint64(1), tmp


@njit(**JIT)
def sfc64_fill_pair(state0, words0, state1, words1):
    """:func:`sfc64_fill` for two streams of the same length at once: the two dependency
    chains interleave, so two streams cost little more than one."""
    a0, b0, c0, w0 = state0[0], state0[1], state0[2], state0[3]
    a1, b1, c1, w1 = state1[0], state1[1], state1[2], state1[3]
    n = words0.size
    pairs0 = words0[:n - n % 2].view(np.uint64)
    pairs1 = words1[:n - n % 2].view(np.uint64)
    for i in range(pairs0.size):
        a0, b0, c0, w0, t0 = _sfc64_step(a0, b0, c0, w0)
        a1, b1, c1, w1, t1 = _sfc64_step(a1, b1, c1, w1)
        pairs0[i] = t0
        pairs1[i] = t1
    if n % 2:
        a0, b0, c0, w0, t0 = _sfc64_step(a0, b0, c0, w0)
        a1, b1, c1, w1, t1 = _sfc64_step(a1, b1, c1, w1)
        words0[n - 1] = np.uint32(t0 & np.uint64(0xFFFFFFFF))
        words1[n - 1] = np.uint32(t1 & np.uint64(0xFFFFFFFF))
    state0[0], state0[1], state0[2], state0[3] = a0, b0, c0, w0
    state1[0], state1[1], state1[2], state1[3] = a1, b1, c1, w1


@njit(**JIT)
def sfc64_fill_triple(state0, words0, state1, words1, state2, words2):
    """:func:`sfc64_fill_pair` for three streams (dare_ties' usual three experts)."""
    a0, b0, c0, w0 = state0[0], state0[1], state0[2], state0[3]
    a1, b1, c1, w1 = state1[0], state1[1], state1[2], state1[3]
    a2, b2, c2, w2 = state2[0], state2[1], state2[2], state2[3]
    n = words0.size
    pairs0 = words0[:n - n % 2].view(np.uint64)
    pairs1 = words1[:n - n % 2].view(np.uint64)
    pairs2 = words2[:n - n % 2].view(np.uint64)
    for i in range(pairs0.size):
        a0, b0, c0, w0, t0 = _sfc64_step(a0, b0, c0, w0)
        a1, b1, c1, w1, t1 = _sfc64_step(a1, b1, c1, w1)
        a2, b2, c2, w2, t2 = _sfc64_step(a2, b2, c2, w2)
        pairs0[i] = t0
        pairs1[i] = t1
        pairs2[i] = t2
    if n % 2:
        a0, b0, c0, w0, t0 = _sfc64_step(a0, b0, c0, w0)
        a1, b1, c1, w1, t1 = _sfc64_step(a1, b1, c1, w1)
        a2, b2, c2, w2, t2 = _sfc64_step(a2, b2, c2, w2)
        words0[n - 1] = np.uint32(t0 & np.uint64(0xFFFFFFFF))
        words1[n - 1] = np.uint32(t1 & np.uint64(0xFFFFFFFF))
        words2[n - 1] = np.uint32(t2 & np.uint64(0xFFFFFFFF))
    state0[0], state0[1], state0[2], state0[3] = a0, b0, c0, w0
    state1[0], state1[1], state1[2], state1[3] = a1, b1, c1, w1
    state2[0], state2[1], state2[2], state2[3] = a2, b2, c2, w2
