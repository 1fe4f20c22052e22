"""TIES' first pass, 16 entries at a time, in instructions numba does not emit by itself.

Per fine-tune and entry the first pass makes τ = θ_t − θ₀ (kept for the gram), counts the |τ|
above the sampled bracket, and copies the |τ| inside it, in position order, into a scratch row.
Written as a loop, the copy (store every value, advance the cursor by the test) waits on the
previous entry's cursor: 0.53 ns per entry. Until stop 33 it was LLVM's `masked.compressstore`
(16 at once) in a loop of its own, after a count loop: both loaded τ and made |τ| and the
bracket tests. `masked.compressstore` is AVX-512's vcompressps to memory, slow on AMD's cores,
and on AVX2 LLVM expands it lane by lane: the first pass then took 2.5 times as long.

`scan_band` does it all for 16 entries: the difference, the store of τ, |τ|, both tests, both
counts (popcounts of the masks), and the pack of the band (`_pack`: chosen per target CPU). On
the AMD EPYC VM of the benchmarks, the first pass over a 1.57 M-entry projection (3 fine-tunes,
2 threads) went from 1.16–1.22 to 0.78–0.89 ms from memory and from 0.83–0.89 to 0.46–0.66 ms
in cache; compiled for an AVX2 target (haswell), from 2.9–3.1 to 1.2 ms and 2.5–2.7 to 0.8 ms.
Every value stored is the loops' (one IEEE subtraction, |·|, the same comparisons), so the first
pass's results are the same bit for bit on every target (tested for AVX-512, AVX2 and SSE2).
"""

from __future__ import annotations

WIDTH = 16  # entries per `scan_band`

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

    def _features(context) -> str:
        """The target features numba compiles for ("+avx2,-avx512f,…"; empty when only a CPU name was set)."""
        return getattr(context.codegen(), "_tm_features", "") or ""

    def _left_pack_table(module):
        """[256 × 8] i32: for each 8-bit mask, the lanes it selects in order (AVX2's left-pack by vpermps)."""
        name = "metamerge_left_pack"
        table = module.globals.get(name)
        if table is None:
            lanes = ir.VectorType(ir.IntType(32), 8)
            rows = [ir.Constant(lanes, [i for i in range(8) if mask >> i & 1] + [0] * (8 - bin(mask).count("1")))
                    for mask in range(256)]
            table = cgutils.global_constant(module, name, ir.Constant(ir.ArrayType(lanes, 256), rows))
            table.align = 32
        return table

    def _pack(context, builder, values, mask, target):
        """Stores the lanes of `values` under `mask`, in order, from `target` on (16 floats of room).

        Per target: AVX-512's vcompressps into a register then a plain store (as a store to memory
        it is slow on AMD's cores); AVX2's vpermps by a 256-row table, 8 lanes at a time; else LLVM's
        expansion of the masked compress-store. Measured in cache per entry (AMD EPYC VM): 0.049
        against 0.071 ns for the masked store on AVX-512, 0.109 against 0.171 ns on AVX2."""
        vector, features = values.type, _features(context)
        module = builder.module
        if "+avx512f" in features:
            compress = cgutils.get_or_insert_function(
                module, ir.FunctionType(vector, [vector, mask.type, vector]), "llvm.experimental.vector.compress.v16f32")
            builder.store(builder.call(compress, [values, mask, ir.Constant(vector, ir.Undefined)]), target, align=4)
        elif "+avx2" in features:
            lanes, half = ir.VectorType(ir.IntType(32), 8), ir.VectorType(ir.FloatType(), 8)
            permute = cgutils.get_or_insert_function(module, ir.FunctionType(half, [half, lanes]), "llvm.x86.avx2.permps")
            count = cgutils.get_or_insert_function(module, ir.FunctionType(ir.IntType(8), [ir.IntType(8)]),
                                                   "llvm.ctpop.i8")
            table, floats = _left_pack_table(module), builder.bitcast(target, ir.FloatType().as_pointer())
            for first in (0, 8):
                select = ir.Constant(lanes, list(range(first, first + 8)))
                part = builder.shuffle_vector(values, ir.Constant(vector, ir.Undefined), select)
                bits = builder.bitcast(builder.shuffle_vector(mask, ir.Constant(mask.type, ir.Undefined), select),
                                       ir.IntType(8))
                order = builder.load(builder.gep(table, [ir.Constant(ir.IntType(32), 0),
                                                         builder.zext(bits, ir.IntType(64))]), align=32)
                builder.store(builder.call(permute, [part, order]), builder.bitcast(floats, half.as_pointer()), align=4)
                floats = builder.gep(floats, [builder.zext(builder.call(count, [bits]), ir.IntType(64))])
        else:
            store = cgutils.get_or_insert_function(
                module, ir.FunctionType(ir.VoidType(), [vector, ir.FloatType().as_pointer(), mask.type]),
                "llvm.masked.compressstore.v16f32")
            builder.call(store, [values, builder.bitcast(target, ir.FloatType().as_pointer()), mask])

    def _data(context, builder, array_type, array):
        return cgutils.create_struct_proxy(array_type)(context, builder, value=array).data

    def _popcount(builder, mask):
        count = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(WIDTH), [ir.IntType(WIDTH)]), f"llvm.ctpop.i{WIDTH}")
        return builder.zext(builder.call(count, [builder.bitcast(mask, ir.IntType(WIDTH))]), ir.IntType(64))

    @intrinsic
    def scan_band(typingctx, row, row_at, base, base_at, tau, tau_at, low, high, dst, dst_at):  # pragma: no cover
        """For the 16 entries i from row_at / base_at: tau[tau_at + i] ← row − base; |τ| inside
        [low, high] packed, in order, into dst[dst_at:] (all 16 lanes are stored: the ones past the
        count are scratch); returns (how many |τ| > high) << 32 | (how many inside). The caller keeps
        16 entries readable from row_at and base_at, and 16 writable from tau_at and dst_at."""
        signature = types.int64(row, row_at, base, base_at, tau, tau_at, low, high, dst, dst_at)

        def codegen(context, builder, sig, args):
            row_array, row_index, base_array, base_index, tau_array, tau_index, low_value, high_value, dst_array, \
                dst_index = args
            vector = ir.VectorType(ir.FloatType(), WIDTH)

            def at(array_type, array, index):
                return builder.bitcast(builder.gep(_data(context, builder, array_type, array), [index]),
                                       vector.as_pointer())

            theta = builder.load(at(sig.args[0], row_array, row_index), align=4)
            theta0 = builder.load(at(sig.args[2], base_array, base_index), align=4)
            difference = builder.fsub(theta, theta0)
            builder.store(difference, at(sig.args[4], tau_array, tau_index), align=4)
            fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector]), "llvm.fabs.v16f32")
            magnitude = builder.call(fabs, [difference])
            above = builder.fcmp_ordered(">", magnitude, _splat(builder, high_value, vector))
            inside = builder.and_(builder.fcmp_ordered(">=", magnitude, _splat(builder, low_value, vector)),
                                  builder.fcmp_ordered("<=", magnitude, _splat(builder, high_value, vector)))
            _pack(context, builder, magnitude, inside, at(sig.args[8], dst_array, dst_index))
            return builder.or_(builder.shl(_popcount(builder, above), ir.Constant(ir.IntType(64), 32)),
                               _popcount(builder, inside))

        return signature, codegen
