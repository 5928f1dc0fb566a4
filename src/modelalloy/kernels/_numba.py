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
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

# The kernel modules take ``njit`` from here, so the cache folder is chosen before numba is
# imported (a kernel module imported first would otherwise leave numba's default cache, next
# to the sources, which misses edits to the helpers inlined from this file).

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


@intrinsic
def trailing_zeros(typingctx, x):
    """The number of trailing zero bits of a nonzero uint64 (LLVM's llvm.cttz: one tzcnt)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = builder.module.declare_intrinsic("llvm.cttz", [i64],
                                              ir.FunctionType(i64, [i64, ir.IntType(1)]))
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return types.uint64(types.uint64), codegen


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


# SFC64 streams side by side: one 64-bit lane each of a 256-bit vector (AVX2/AVX-512 integer
# ops), so the streams of the models that drop at random advance together. One stream's draws
# are a chain (each step needs the last), so only independent streams can share the vector.
SFC64_LANES = 4


@intrinsic
def _sfc64_lanes(typingctx, lanes, words, rows, steps):
    """``steps`` SFC64 draws of each of the 4 streams whose states are the columns of
    ``lanes`` (uint64, 4 fields a, b, c, counter × 4 lanes; advanced in place), draw i of lane
    k written as a uint64 at uint32 column 2i of row ``rows[k]`` of ``words`` (little-endian:
    the low half first, as :func:`sfc64_fill`). The loop is written in LLVM IR on 4 × i64
    vectors: numba has no vector types, and LLVM does not vectorize the scalar form."""
    if not (isinstance(lanes, types.Array) and lanes.dtype == types.uint64
            and isinstance(words, types.Array) and words.dtype == types.uint32
            and words.ndim == 2 and isinstance(rows, types.Array)
            and rows.dtype == types.int64 and isinstance(steps, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        lanes_ty, words_ty, rows_ty, _ = signature.args
        state = context.make_array(lanes_ty)(context, builder, args[0])
        out = context.make_array(words_ty)(context, builder, args[1])
        row_of = context.make_array(rows_ty)(context, builder, args[2])
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vec = ir.VectorType(i64, SFC64_LANES)

        def splat(value):
            return ir.Constant(vec, [ir.Constant(i64, value)] * SFC64_LANES)

        fields = builder.bitcast(state.data, vec.as_pointer())
        slots = []  # a, b, c, counter: promoted to registers by LLVM
        for f in range(4):
            slot = cgutils.alloca_once(builder, vec)
            builder.store(builder.load(builder.gep(fields, [ir.Constant(i32, f)]), align=8),
                          slot)
            slots.append(slot)
        row_bytes = cgutils.unpack_tuple(builder, out.strides)[0]
        start = builder.bitcast(out.data, ir.IntType(8).as_pointer())
        targets = []
        for k in range(SFC64_LANES):
            row = builder.load(builder.gep(row_of.data, [ir.Constant(i64, k)]))
            targets.append(builder.bitcast(builder.gep(start, [builder.mul(row, row_bytes)]),
                                           i64.as_pointer()))
        steps_64 = builder.sext(args[3], i64) if args[3].type.width < 64 else args[3]
        with cgutils.for_range(builder, steps_64) as loop:
            a, b, c, w = (builder.load(slot) for slot in slots)
            tmp = builder.add(builder.add(a, b), w)
            builder.store(builder.xor(b, builder.lshr(b, splat(11))), slots[0])
            builder.store(builder.add(c, builder.shl(c, splat(3))), slots[1])
            rotated = builder.or_(builder.shl(c, splat(24)), builder.lshr(c, splat(40)))
            builder.store(builder.add(rotated, tmp), slots[2])
            builder.store(builder.add(w, splat(1)), slots[3])
            for k in range(SFC64_LANES):
                builder.store(builder.extract_element(tmp, ir.Constant(i32, k)),
                              builder.gep(targets[k], [loop.index]), align=4)
        for f in range(4):
            builder.store(builder.load(slots[f]), builder.gep(fields, [ir.Constant(i32, f)]),
                          align=8)
        return context.get_dummy_value()

    return types.void(lanes, words, rows, steps), codegen


@njit(inline="always")
def sfc64_fill_rows(states, models, words, n, lanes, rows):
    """words[t, :n] = the next n words of SFC64 stream ``states[t]`` (advanced), for every
    model t in ``models``, as :func:`sfc64_fill` gives them (an odd n still uses a whole
    draw), four streams at a time (:func:`_sfc64_lanes`). ``words`` has one spare row (its
    last) for the unused lanes and rows of at least n rounded up to even; ``lanes`` (4 × 4
    uint64) and ``rows`` (4 int64) are scratch."""
    spare = words.shape[0] - 1
    for g0 in range(0, models.size, SFC64_LANES):
        for k in range(SFC64_LANES):
            if g0 + k < models.size:
                t = models[g0 + k]
                rows[k] = t
                for f in range(4):
                    lanes[f, k] = states[t, f]
            else:
                rows[k] = spare
                for f in range(4):
                    lanes[f, k] = 0
        _sfc64_lanes(lanes, words, rows, (n + 1) // 2)
        for k in range(min(SFC64_LANES, models.size - g0)):
            t = models[g0 + k]
            for f in range(4):
                states[t, f] = lanes[f, k]
