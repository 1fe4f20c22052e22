"""A vector instruction that numba does not emit by itself: compress-store, for TIES' band.

TIES' first pass copies each fine-tune's |τ| that fall inside the sampled bracket, in position
order, into a scratch row. Written as a loop (store every value, advance the cursor by the
test), each entry waits on the previous one's cursor: about 0.53 ns per entry, the largest
cost of the first pass, whatever the band's width. LLVM's `masked.compressstore` does 16
entries at once (AVX-512's vcompressps; on other CPUs LLVM expands it into stores at
positions computed from the mask, which also breaks the chain): 0.08–0.09 ns per entry,
measured in cache for targets x86-64, haswell and this machine's own. It stores exactly the
entries the loop keeps, in the same order, so the first pass's results are unchanged.
"""

from __future__ import annotations

WIDTH = 16  # entries per compress-store

try:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba absent: the torch passes run
    intrinsic = None

if intrinsic is not None:
    def _splat(builder, value, vector):
        lanes = ir.Constant(ir.VectorType(ir.IntType(32), WIDTH), [0] * WIDTH)
        one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), lanes)

    @intrinsic
    def compress_band(typingctx, src, start, low, high, dst, at):  # pragma: no cover - compiled
        """dst[at:] ← |src[start + i]| for i < 16 where low ≤ |src[start + i]| ≤ high, in order; returns
        how many. src, dst: float32 arrays; the caller keeps start + 16 ≤ len(src) and room in dst."""
        signature = types.intp(src, start, low, high, dst, at)

        def codegen(context, builder, sig, args):
            source, begin, low_value, high_value, target, cursor = args
            f32 = ir.FloatType()
            vector = ir.VectorType(f32, WIDTH)
            mask_type = ir.VectorType(ir.IntType(1), WIDTH)
            module = builder.module
            src_data = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=source).data
            dst_data = cgutils.create_struct_proxy(sig.args[4])(context, builder, value=target).data
            loaded = builder.load(builder.bitcast(builder.gep(src_data, [begin]), vector.as_pointer()), align=4)
            fabs = cgutils.get_or_insert_function(module, ir.FunctionType(vector, [vector]), "llvm.fabs.v16f32")
            magnitude = builder.call(fabs, [loaded])
            inside = builder.and_(builder.fcmp_ordered(">=", magnitude, _splat(builder, low_value, vector)),
                                  builder.fcmp_ordered("<=", magnitude, _splat(builder, high_value, vector)))
            store = cgutils.get_or_insert_function(
                module, ir.FunctionType(ir.VoidType(), [vector, f32.as_pointer(), mask_type]),
                "llvm.masked.compressstore.v16f32")
            builder.call(store, [magnitude, builder.gep(dst_data, [cursor]), inside])
            bits = builder.bitcast(inside, ir.IntType(WIDTH))
            popcount = cgutils.get_or_insert_function(
                module, ir.FunctionType(ir.IntType(WIDTH), [ir.IntType(WIDTH)]), f"llvm.ctpop.i{WIDTH}")
            return builder.zext(builder.call(popcount, [bits]), ir.IntType(64))

        return signature, codegen
