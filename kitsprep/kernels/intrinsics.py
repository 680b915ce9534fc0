"""The LLVM instructions numba does not offer, as `@intrinsic`s the kernels call: float16
rounding, prefetch, a typed constant and the in-register block transpose."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _f16bits(typingctx, x):
    """float -> IEEE half bits via LLVM's fptrunc (vcvtps2ph with F16C, fcvt on arm64):
    round-to-nearest-even, the same result as numpy's .astype(np.float16). numba has no
    float16 type, so the half value travels as its uint16 bit pattern."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type != ir.FloatType():
            v = builder.fptrunc(v, ir.FloatType())
        return builder.bitcast(builder.fptrunc(v, ir.HalfType()), ir.IntType(16))

    return types.uint16(x), codegen


def _prefetch_intrinsic(write: int):
    """`llvm.prefetch` of &arr[idx] (1D array) into all cache levels; a hint: never faults,
    so an address past the end is harmless."""

    @intrinsic
    def prefetch(typingctx, arr, idx):
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(idx, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            i = context.cast(builder, args[1], signature.args[1], types.intp)
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fn = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                "llvm.prefetch.p0",
            )
            ptr = builder.bitcast(builder.gep(ary.data, [i]), i8p)
            builder.call(fn, [ptr, i32(write), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(arr, idx), codegen

    return prefetch


_prefetch = _prefetch_intrinsic(0)
_prefetchw = _prefetch_intrinsic(1)


@intrinsic
def _like(typingctx, x, c):
    """`c` as a value of x's type: a typed constant, so that comparing uint8 labels with
    it stays in uint8 lanes instead of numba's promotion to int64."""
    if not (isinstance(x, types.Integer) and isinstance(c, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[1], signature.args[1], signature.args[0])

    return x(x, c), codegen


@intrinsic
def _transpose_block(typingctx, src, s_off, s_stride, dst, d_off, d_stride):
    """Transpose one 128-bit block, 8x8 uint16 or 16x16 uint8, in registers: rows
    src[s_off + i*s_stride :][:n] -> rows dst[d_off + j*d_stride :][:n]. log2(n) rounds of
    interleaving row i with row i + n/2 (punpckl/punpckh on x86, zip1/zip2 on arm64)."""
    if not (
        isinstance(src, types.Array)
        and isinstance(dst, types.Array)
        and src.ndim == 1
        and dst.ndim == 1
        and src.dtype == dst.dtype
        and isinstance(src.dtype, types.Integer)
        and src.dtype.bitwidth in (8, 16)
    ):
        return None
    bits = src.dtype.bitwidth
    n = 128 // bits

    def codegen(context, builder, signature, args):
        a_src = context.make_array(signature.args[0])(context, builder, args[0])
        a_dst = context.make_array(signature.args[3])(context, builder, args[3])
        so, ss, do, ds = (
            context.cast(builder, args[i], signature.args[i], types.intp) for i in (1, 2, 4, 5)
        )
        intp = context.get_value_type(types.intp)
        vec = ir.VectorType(ir.IntType(bits), n)
        rows = []
        for i in range(n):
            at = builder.add(so, builder.mul(ss, ir.Constant(intp, i)))
            ptr = builder.bitcast(builder.gep(a_src.data, [at]), vec.as_pointer())
            rows.append(builder.load(ptr, align=bits // 8, typ=vec))
        mask = ir.VectorType(ir.IntType(32), n)
        lo = ir.Constant(mask, [j // 2 + (n if j % 2 else 0) for j in range(n)])
        hi = ir.Constant(mask, [n // 2 + j // 2 + (n if j % 2 else 0) for j in range(n)])
        for _ in range(n.bit_length() - 1):
            rows = [
                builder.shuffle_vector(rows[i // 2], rows[i // 2 + n // 2], hi if i % 2 else lo)
                for i in range(n)
            ]
        for j in range(n):
            at = builder.add(do, builder.mul(ds, ir.Constant(intp, j)))
            ptr = builder.bitcast(builder.gep(a_dst.data, [at]), vec.as_pointer())
            builder.store(rows[j], ptr, align=bits // 8)
        return context.get_dummy_value()

    return types.void(src, s_off, s_stride, dst, d_off, d_stride), codegen
