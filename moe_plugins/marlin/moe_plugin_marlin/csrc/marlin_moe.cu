// W4A16 (GPTQ uint4b8) Mixture-of-Experts kernels in a Marlin-style tile layout.
//
// Compiled at run time by NVRTC (through CuPy) for the GPU at hand, sm_80 or newer.
// The file includes no header at all, so it compiles with NVRTC's built-ins only;
// `nvcc -arch=sm_90 -Xptxas -v -c -DMARLIN_OFFLINE_CHECK` checks it offline.
//
// Kernels (host side: moe_plugin_marlin/kernels.py)
//   moe_marlin_align          local ids [N*topk] -> aligned block layout (one CTA)
//   moe_marlin_gemm<...>      one launch per GEMM over all local experts:
//       GEMM1 (GEMM2 = false): A = hidden [N, H] (row = slot / topk), B = w13,
//             epilogue silu(gate) * up -> inter [N*topk, I] (activation dtype)
//       GEMM2 (GEMM2 = true):  A = inter [N*topk, I] (row = slot), B = w2,
//             epilogue * router weight -> slot_out [N*topk, H] (fp32; atomics when split along K)
//   moe_marlin_topk_sum<...>  slot_out -> out [N, H]: sum over the top-k slots that are local
//
// Weight layout: see moe_plugin_marlin/layout.py (the single source of truth).
// Memory: every pointer is owned by the caller (torch tensors); kernels never allocate.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

struct __align__(16) V4 { u32 x, y, z, w; };
struct __align__(16) F4 { float x, y, z, w; };
struct __align__(8) F2 { float x, y; };
struct __align__(8) U2 { u32 x, y; };

#define DEVI __device__ __forceinline__

#ifndef MARLIN_M1_MINB
#define MARLIN_M1_MINB 3  // CTAs per SM the 16-row tiles are register-limited for (80 registers)
#endif

namespace marlin {

constexpr int THREADS = 256;  // 8 warps per CTA, every GEMM configuration

DEVI u32 smem_u32(const void* p) {
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

// 16-byte async copy global -> shared; src_bytes = 0 zero-fills without reading global memory.
DEVI void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// Note: no L2 cache-policy hint on the weight copies. An evict_first policy operand
// (createpolicy + cp.async ...L2::cache_hint) raised "illegal instruction" on an H100 in
// some instantiations (tn128, 32-row tiles; compute-sanitizer pointed at the copy), and it
// had not been shown to help: weights are plain cp.async.cg copies like everything else.
DEVI void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
DEVI void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

DEVI void lds128(u32 (&r)[4], u32 addr) {
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

DEVI void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

template <bool BF16>
DEVI void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  if constexpr (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// d = a * b + c on packed pairs (fma is sm_80+ for both types; plain bf16 mul/sub are sm_90 only).
template <bool BF16>
DEVI u32 fma2(u32 a, u32 b, u32 c) {
  u32 d;
  if constexpr (BF16) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}

template <bool BF16>
DEVI float half_to_float(u32 h16) {
  if constexpr (BF16) {
    return __uint_as_float(h16 << 16);
  } else {
    float f;
    unsigned short hs = (unsigned short)h16;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(hs));
    return f;
  }
}

// Two floats -> one packed pair (lo in bits 0..15), round to nearest even.
template <bool BF16>
DEVI u32 pack2(float lo, float hi) {
  u32 d;
  if constexpr (BF16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  }
  return d;
}

DEVI float silu(float x) { return x / (1.0f + __expf(-x)); }

// ---- hot-loop helpers, each written for its SASS (see "Run 7 prep: SASS audit" in bench/marlin/NOTES.md) ----

// cp.async that is issued only where `pred` holds: a predicated instruction, not a branch around it.
DEVI void cp_async16_if(u32 dst, const void* src, int src_bytes, bool pred) {
  asm volatile(
      "{ .reg .pred p; setp.ne.b32 p, %3, 0;\n"
      "  @p cp.async.cg.shared.global [%0], [%1], 16, %2; }\n" ::"r"(dst),
      "l"(src), "r"(src_bytes), "r"((int)pred)
      : "memory");
}

// (a & MASK) | MAGIC as ONE lop3. Written in C, `(x & m) | c` with two immediates compiles to two
// LOP3s (a LOP3 takes one immediate); here ptxas keeps MAGIC in a register hoisted out of the loop.
template <u32 MASK, u32 MAGIC>
DEVI u32 mask_or(u32 a) {
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "n"(MASK), "n"(MAGIC));  // 0xEA: (a & b) | c
  return d;
}

// 8 nibbles -> 4 registers of 2 weights (q - 8), exact. Register i takes nibble positions i (low
// half) and i + 4 (high half); layout.py packs the nibbles for this order. OR-ing a nibble into the
// mantissa of MAGIC (128.0 in bf16, 1024.0 in fp16, whose last mantissa bit is worth 1) gives
// MAGIC + q; one fma subtracts MAGIC + 8 (the uint4b8 zero point folded in). The AND + OR is one
// `mask_or` LOP3: written in C, `((q >> 4i) & 0x000F000F) | MAGIC` costs two LOP3s per register
// (the SASS audit's 8 -> 4 LOP3 per weight word).
// bf16 (7 mantissa bits: a nibble fits only at bits 0..3 of each half): 3 SHF + 4 LOP3 + 4 HFMA2.
// fp16 (10 mantissa bits): nibble positions i and i + 1 come from one word, the upper one as
// MAGIC + 16 q (bits 4..7), scaled back by the fma: (1024 + 16 q) / 16 - 72 = q - 8 exactly;
// one SHF (q >> 8) + 4 LOP3 + 4 HFMA2.
template <bool BF16>
DEVI void dequant8(u32 q, u32 (&w)[4]) {
  if constexpr (BF16) {
    constexpr u32 MAGIC = 0x43004300u, ONE = 0x3F803F80u, NEG_BIAS = 0xC308C308u;  // 128, 1, -(128 + 8)
    w[0] = fma2<true>(mask_or<0x000F000Fu, MAGIC>(q), ONE, NEG_BIAS);
    w[1] = fma2<true>(mask_or<0x000F000Fu, MAGIC>(q >> 4), ONE, NEG_BIAS);
    w[2] = fma2<true>(mask_or<0x000F000Fu, MAGIC>(q >> 8), ONE, NEG_BIAS);
    w[3] = fma2<true>(mask_or<0x000F000Fu, MAGIC>(q >> 12), ONE, NEG_BIAS);
  } else {
    constexpr u32 MAGIC = 0x64006400u, ONE = 0x3C003C00u, NEG_BIAS = 0xE408E408u;  // 1024, 1, -(1024 + 8)
    constexpr u32 SIXTEENTH = 0x2C002C00u, NEG_BIAS16 = 0xD480D480u;               // 1/16, -(64 + 8)
    const u32 h = q >> 8;
    w[0] = fma2<false>(mask_or<0x000F000Fu, MAGIC>(q), ONE, NEG_BIAS);
    w[1] = fma2<false>(mask_or<0x00F000F0u, MAGIC>(q), SIXTEENTH, NEG_BIAS16);
    w[2] = fma2<false>(mask_or<0x000F000Fu, MAGIC>(h), ONE, NEG_BIAS);
    w[3] = fma2<false>(mask_or<0x00F000F0u, MAGIC>(h), SIXTEENTH, NEG_BIAS16);
  }
}

// w * (s.half HI, s.half HI) for a packed pair w. Written as a broadcast `mov {h, h}` + fma with -0
// (= a multiply, exact sign of zero), which ptxas folds into ONE HMUL2 with an .H0_H0 / .H1_H1
// operand selector; a __byte_perm broadcast costs a separate PRMT per use.
template <bool BF16, bool HI>
DEVI u32 mul_bcast(u32 w, u32 s) {
  u32 d;
  const u32 neg0 = 0x80008000u;
  if constexpr (BF16 && !HI) {
    asm("{ .reg .b16 lo, hi; .reg .b32 t; mov.b32 {lo, hi}, %2; mov.b32 t, {lo, lo}; fma.rn.bf16x2 %0, %1, t, %3; }\n"
        : "=r"(d) : "r"(w), "r"(s), "r"(neg0));
  } else if constexpr (BF16) {
    asm("{ .reg .b16 lo, hi; .reg .b32 t; mov.b32 {lo, hi}, %2; mov.b32 t, {hi, hi}; fma.rn.bf16x2 %0, %1, t, %3; }\n"
        : "=r"(d) : "r"(w), "r"(s), "r"(neg0));
  } else if constexpr (!HI) {
    asm("{ .reg .b16 lo, hi; .reg .b32 t; mov.b32 {lo, hi}, %2; mov.b32 t, {lo, lo}; fma.rn.f16x2 %0, %1, t, %3; }\n"
        : "=r"(d) : "r"(w), "r"(s), "r"(neg0));
  } else {
    asm("{ .reg .b16 lo, hi; .reg .b32 t; mov.b32 {lo, hi}, %2; mov.b32 t, {hi, hi}; fma.rn.f16x2 %0, %1, t, %3; }\n"
        : "=r"(d) : "r"(w), "r"(s), "r"(neg0));
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// The MoE GEMM. CTA tile: BM = 16*M_TILES rows (one aligned block: one expert) x TN = 64*N_WARPS
// columns; K is walked TK = 16*K_WARPS*KW at a time through a STAGES-deep cp.async pipeline
// (the host picks STAGES per tile so that two CTAs fit one SM's shared memory).
// Warp (wn, wk) owns the 64-column slice wn and the k16 sub-steps wk*KW .. wk*KW+KW-1 of every
// stage; the K_WARPS partial sums are reduced through shared memory at the end.
//
// grid.x = num_mblocks * k_splits * n_tiles, decoded m-block fastest (CTAs that share a weight
// tile run together, so a tile read by several m-blocks of one expert is served from L2).
// Blocks past num_post_padded or with expert -1 (non-local / padding) exit before touching
// any weight. Rows whose slot id is >= num_slots (alignment padding) are zero-filled, never
// read, never written.
//
// The hot loop is written for instruction issue (SASS audit, bench/marlin/NOTES.md "Run 7 prep":
// 24.6 instead of 35.5 SASS instructions per 32-bit weight word, bf16 g128 bm16/tn256; measured in
// run 7): one-LOP3 dequant (`dequant8`), group scales applied by HMUL2 with a half-broadcast operand
// (`mul_bcast`, no PRMT), global source pointers that advance by a loop-invariant stride per stage (no
// 64-bit index arithmetic per copy), predicated cp.async for the A / scale copies (no branch around
// them), and compile-time shared-memory stage offsets (the scale area is reserved for g = 16).
// ---------------------------------------------------------------------------------------------
template <bool BF16, int M_TILES, int N_WARPS, int KW, int STAGES, bool GROUPED, bool GEMM2>
__global__ void __launch_bounds__(THREADS, (M_TILES >= 4 ? 1 : M_TILES == 2 ? 2 : MARLIN_M1_MINB))
    moe_marlin_gemm(const u16* __restrict__ A,  // activations, rows of K elements
                    int a_row_div,              // A row = slot / a_row_div (topk for GEMM1, 1 for GEMM2)
                    int K,                      // reduction size (H or I)
                    int N,                      // output columns of the weight (2I or H)
                    const V4* __restrict__ B,   // packed weights [E][K/16][N/2] V4
                    const u16* __restrict__ S,  // scales [E][K/g or 1][N]
                    int g_log2,                 // log2 group size (GROUPED only)
                    int num_experts,            // local experts (bound check of block expert ids)
                    const int* __restrict__ sorted_slot_ids, const int* __restrict__ block_expert_ids,
                    const int* __restrict__ num_post_padded, int num_mblocks, int num_slots,
                    int k_splits,                             // GEMM2 only; > 1: atomics into zeroed C
                    const float* __restrict__ topk_weights,   // [num_slots] (GEMM2)
                    void* __restrict__ C) {
  constexpr int K_WARPS = 8 / N_WARPS;
  constexpr int TN = 64 * N_WARPS;
  constexpr int TK = 16 * K_WARPS * KW;
  constexpr int BM = 16 * M_TILES;
  constexpr int A_CHUNKS = TK / 8;               // 16-byte chunks per A row per stage
  constexpr int B_STAGE = (TK / 16) * (TN / 2);  // V4 per stage
  constexpr int A_STAGE = BM * A_CHUNKS;         // V4 per stage
  static_assert(A_CHUNKS >= 8, "the A swizzle needs at least 8 chunks per row");
  static_assert(B_STAGE % THREADS == 0, "B stage must split evenly over the CTA");
  static_assert(STAGES >= 2, "the pipeline needs at least two stages");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % N_WARPS, wk = warp / N_WARPS;

  int bid = blockIdx.x;
  const int mb = bid % num_mblocks;
  bid /= num_mblocks;
  const int split = bid % k_splits;
  const int nt = bid / k_splits;
  if (mb * BM >= __ldg(num_post_padded)) return;
  const int e = __ldg(block_expert_ids + mb);
  if (e < 0 || e >= num_experts) return;  // skipped block: no weight is read

  __shared__ int s_slot[BM];
  __shared__ int s_arow[BM];
  if (tid < BM) {
    const int slot = __ldg(sorted_slot_ids + mb * BM + tid);
    const bool ok = slot >= 0 && slot < num_slots;
    s_slot[tid] = ok ? slot : -1;
    s_arow[tid] = ok ? slot / a_row_div : -1;
  }

  extern __shared__ V4 smem[];

  const int total_iters = K / TK;
  const int per_split = (total_iters + k_splits - 1) / k_splits;
  const int it0 = split * per_split;
  const int n_iters = min(total_iters, it0 + per_split) - it0;

  const int b_row = N / 2;  // V4 per k16 row of the packed weights
  const V4* Bt = B + (size_t)e * ((size_t)K * N / 32) + nt * (TN / 2) + (size_t)it0 * (TK / 16) * b_row;
  const int groups = GROUPED ? (K >> g_log2) : 1;
  const u16* Se = S + (size_t)e * groups * N;
  __syncthreads();  // s_slot / s_arow visible

  // Per-thread copy descriptors, fixed for the whole K loop: the element offsets of this thread's
  // 16-byte chunks (below turned into 64-bit source pointers that advance by a loop-invariant stride
  // after each stage is issued), so the steady-state loop has no index arithmetic and no 64-bit
  // multiply per copy; instruction issue goes to the dequant. (The offsets-then-pointers order is the
  // one whose SASS run 7 measured; ptxas allocates registers differently when they are merged.)
  constexpr int B_ITERS = B_STAGE / THREADS;
  constexpr int A_ITERS = (A_STAGE + THREADS - 1) / THREADS;
  int b_off[B_ITERS];
#pragma unroll
  for (int i = 0; i < B_ITERS; ++i) {
    const int c = tid + i * THREADS;
    b_off[i] = (c / (TN / 2)) * b_row + c % (TN / 2);
  }
  int a_off[A_ITERS];  // element offset into A of this thread's 16-byte chunk, -1: zero-fill
  u32 a_dst[A_ITERS];  // byte offset inside an A stage (swizzled)
#pragma unroll
  for (int i = 0; i < A_ITERS; ++i) {
    const int c = tid + i * THREADS;
    const int r = (c / A_CHUNKS) % BM, ch = c % A_CHUNKS;
    const int arow = (A_STAGE % THREADS == 0 || c < A_STAGE) ? s_arow[r] : -1;
    a_off[i] = arow >= 0 ? arow * K + it0 * TK + ch * 8 : -1;
    a_dst[i] = (u32)(r * A_CHUNKS + (ch ^ (r & 7))) * 16u;
  }
  const bool a_active = A_STAGE % THREADS == 0 || tid < A_STAGE - (A_ITERS - 1) * THREADS;
  const int s_rows = GROUPED ? ((TK >> g_log2) > 0 ? (TK >> g_log2) : 1) : 0;  // scale rows per stage
  const int S_STAGE = s_rows * (TN / 8);                                     // V4 copied per stage (<= THREADS)
  const int s_off = GROUPED ? (tid / (TN / 8)) * N + nt * TN + (tid % (TN / 8)) * 8 : 0;

  constexpr u32 B_BYTES = B_STAGE * 16, A_BYTES = A_STAGE * 16;
  // Scale area of one stage: reserved for the worst case (g = 16: TK/16 rows) whatever the group size,
  // so every stage offset is a compile-time constant (sizing it for the actual g cost a run-time
  // multiply per stage address). The host sizes shared memory the same way (jit.TileConfig.stage_bytes).
  const u32 S_BYTES = (u32)((TK / 16) * (TN / 8) * 16);
  const u32 sB = smem_u32(smem);
  const u32 sA = sB + STAGES * B_BYTES;
  const u32 sS = sA + STAGES * A_BYTES;

  // Copy state: where the next stage's copies read (advanced by `load_stage` after each stage).
  const V4* b_src[B_ITERS];
#pragma unroll
  for (int i = 0; i < B_ITERS; ++i) b_src[i] = Bt + b_off[i];
  const int b_step = (TK / 16) * b_row;  // V4 per stage (< 2^31: K * N / 32 per expert)
  // Zero-filled A chunks (padding slots, rows past the block) keep pointing at A with step 0 and
  // src_bytes 0: never read, and the copy needs no branch.
  const u16* a_src[A_ITERS];
  int a_step[A_ITERS], a_bytes[A_ITERS];
#pragma unroll
  for (int i = 0; i < A_ITERS; ++i) {
    const bool ok = a_off[i] >= 0;
    a_src[i] = ok ? A + a_off[i] : A;
    a_step[i] = ok ? TK : 0;
    a_bytes[i] = ok ? 16 : 0;
  }
  const u16* s_src = Se + s_off;
  u32 s_k = (u32)(it0 * TK);  // K position of the next stage (its scale row is s_k >> g_log2)
  // Opaque to the optimizer: without this, ptxas recomputes S_STAGE from g_log2 (5 uniform ops) in
  // every iteration instead of keeping the limit in a register.
  int s_lim = S_STAGE;
  asm volatile("" : "+r"(s_lim));
  const bool s_copy = tid < s_lim;

  auto load_stage = [&](int stage) {  // copies the next K step into `stage`, then advances the sources
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) {
      cp_async16(sB + stage * B_BYTES + (tid + i * THREADS) * 16, b_src[i], 16);
      b_src[i] += b_step;
    }
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      cp_async16_if(sA + stage * A_BYTES + a_dst[i], a_src[i], a_bytes[i], i < A_ITERS - 1 || a_active);
      a_src[i] += a_step[i];
    }
    if constexpr (GROUPED) {
      cp_async16_if(sS + stage * S_BYTES + tid * 16, s_src + (s_k >> g_log2) * (u32)N, 16, s_copy);
      s_k += TK;
    }
  };

  float acc[M_TILES][8][4];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][t][i] = 0.f;

  // Per-lane fragment addresses inside a stage (compile-time structure, lane-dependent values).
  u32 a_frag[KW][M_TILES];
  u32 b_frag[KW];
  u32 s_frag[KW];
#pragma unroll
  for (int i = 0; i < KW; ++i) {
    const int kk = wk * KW + i;  // k16 sub-step within the stage
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
      const int r = mt * 16 + (lane & 15);
      const int ch = kk * 2 + (lane >> 4);
      a_frag[i][mt] = (u32)(r * A_CHUNKS + (ch ^ (r & 7))) * 16u;
    }
    b_frag[i] = (u32)(kk * (TN / 2) + wn * 32 + lane) * 16u;
    s_frag[i] = GROUPED ? (u32)(((kk * 16) >> g_log2) * (TN / 8) + wn * 8 + (lane >> 2)) * 16u : 0u;
  }

  auto compute_stage = [&](int stage) {
    const u32 aS = sA + stage * A_BYTES, bS = sB + stage * B_BYTES, sSt = sS + stage * S_BYTES;
#pragma unroll
    for (int i = 0; i < KW; ++i) {
      u32 a[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) ldmatrix_x4(a[mt], aS + a_frag[i][mt]);
      u32 q[4];
      lds128(q, bS + b_frag[i]);
      u32 sw[4] = {0u, 0u, 0u, 0u};
      if constexpr (GROUPED) lds128(sw, sSt + s_frag[i]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        u32 w[4];
        dequant8<BF16>(q[j], w);
        if constexpr (GROUPED) {  // sw[j]: low half the scale of column n0, high half of column n1
          w[0] = mul_bcast<BF16, false>(w[0], sw[j]);
          w[1] = mul_bcast<BF16, false>(w[1], sw[j]);
          w[2] = mul_bcast<BF16, true>(w[2], sw[j]);
          w[3] = mul_bcast<BF16, true>(w[3], sw[j]);
        }
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma16816<BF16>(acc[mt][2 * j], a[mt], w[0], w[1]);
          mma16816<BF16>(acc[mt][2 * j + 1], a[mt], w[2], w[3]);
        }
      }
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_iters) load_stage(s);
    cp_async_commit();
  }
  int rd = 0, wr = STAGES - 1;  // stage computed / stage refilled (rotating, no modulo)
  for (int it = 0; it < n_iters; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage `rd` landed for everyone; stage `wr` (computed last iteration) is free
    if (it + STAGES - 1 < n_iters) load_stage(wr);
    cp_async_commit();
    compute_stage(rd);
    rd = rd + 1 == STAGES ? 0 : rd + 1;
    wr = wr + 1 == STAGES ? 0 : wr + 1;
  }
  cp_async_wait<0>();
  __syncthreads();  // pipeline buffers are reused for the reduction below

  if constexpr (K_WARPS > 1) {
    float* red = reinterpret_cast<float*>(smem);
    constexpr int PER_WARP = M_TILES * 32 * 32;  // floats
    if (wk > 0) {
      float* dst = red + ((wk - 1) * N_WARPS + wn) * PER_WARP;
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
          for (int i = 0; i < 4; ++i) dst[((mt * 8 + t) * 4 + i) * 32 + lane] = acc[mt][t][i];
    }
    __syncthreads();
    if (wk != 0) return;
#pragma unroll 1
    for (int w2 = 1; w2 < K_WARPS; ++w2) {
      const float* src = red + ((w2 - 1) * N_WARPS + wn) * PER_WARP;
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[mt][t][i] += src[((mt * 8 + t) * 4 + i) * 32 + lane];
    }
  }

  // Epilogue. Accumulator (mt, t, i): row mt*16 + lane/4 + 8*(i/2), column nbase + 8t + 2*(lane%4) + i%2.
  const int nbase = nt * TN + wn * 64;
  const int cq = 2 * (lane & 3);
  if constexpr (!GEMM2) {
    // t = 2j is gate, t = 2j+1 is up, of intermediate columns nbase/2 + 8j + cq + {0,1}.
    u16* out = reinterpret_cast<u16*>(C);
    const int I = N / 2;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float sg0 = 1.f, sg1 = 1.f, su0 = 1.f, su1 = 1.f;
      if constexpr (!GROUPED) {  // per-channel: scale the fp32 sums (columns in permuted order)
        const u32 sg = *reinterpret_cast<const u32*>(Se + nbase + 16 * j + cq);
        const u32 su = *reinterpret_cast<const u32*>(Se + nbase + 16 * j + 8 + cq);
        sg0 = half_to_float<BF16>(sg & 0xFFFFu); sg1 = half_to_float<BF16>(sg >> 16);
        su0 = half_to_float<BF16>(su & 0xFFFFu); su1 = half_to_float<BF16>(su >> 16);
      }
      const int icol = nbase / 2 + 8 * j + cq;
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int slot = s_slot[mt * 16 + (lane >> 2) + 8 * hf];
          if (slot < 0) continue;
          const float g0 = acc[mt][2 * j][2 * hf] * sg0, g1 = acc[mt][2 * j][2 * hf + 1] * sg1;
          const float u0 = acc[mt][2 * j + 1][2 * hf] * su0, u1 = acc[mt][2 * j + 1][2 * hf + 1] * su1;
          *reinterpret_cast<u32*>(out + (size_t)slot * I + icol) = pack2<BF16>(silu(g0) * u0, silu(g1) * u1);
        }
    }
  } else {
    float* out = reinterpret_cast<float*>(C);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      const int col = nbase + 8 * t + cq;
      float s0 = 1.f, s1 = 1.f;
      if constexpr (!GROUPED) {
        const u32 sv = *reinterpret_cast<const u32*>(Se + col);
        s0 = half_to_float<BF16>(sv & 0xFFFFu); s1 = half_to_float<BF16>(sv >> 16);
      }
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int slot = s_slot[mt * 16 + (lane >> 2) + 8 * hf];
          if (slot < 0) continue;
          const float wt = __ldg(topk_weights + slot);
          const float v0 = acc[mt][t][2 * hf] * s0 * wt, v1 = acc[mt][t][2 * hf + 1] * s1 * wt;
          float* dst = out + (size_t)slot * N + col;
          if (k_splits == 1) {
            *reinterpret_cast<F2*>(dst) = F2{v0, v1};
          } else {
            atomicAdd(dst, v0);
            atomicAdd(dst + 1, v1);
          }
        }
    }
  }
}

// Sum over the top-k slots of each row whose local id is valid: out[n, :] = sum_k slot_out[n*topk + k, :].
// Rows with no local slot get 0. grid = (rows, ceil(H / (4 * blockDim.x))).
template <bool BF16>
__global__ void __launch_bounds__(256) moe_marlin_topk_sum(const float* __restrict__ slot_out,
                                                           const int* __restrict__ local_ids, int topk, int H,
                                                           int num_experts, u16* __restrict__ out) {
  const int row = blockIdx.x;
  const int h = (blockIdx.y * blockDim.x + threadIdx.x) * 4;
  if (h >= H) return;
  F4 acc = {0.f, 0.f, 0.f, 0.f};
  for (int k = 0; k < topk; ++k) {
    const int id = __ldg(local_ids + (size_t)row * topk + k);
    if (id < 0 || id >= num_experts) continue;
    const F4 v = *reinterpret_cast<const F4*>(slot_out + ((size_t)row * topk + k) * H + h);
    acc.x += v.x; acc.y += v.y; acc.z += v.z; acc.w += v.w;
  }
  *reinterpret_cast<U2*>(out + (size_t)row * H + h) = U2{pack2<BF16>(acc.x, acc.y), pack2<BF16>(acc.z, acc.w)};
}

}  // namespace marlin

// Aligned block layout of the local ids, one CTA of 1024 threads (the same contract as
// hostcore.contract.AlignedLayout): slots grouped by local expert (order within a group
// unspecified), each group padded to a multiple of block_m with num_slots; block expert
// ids, -1 past the end; num_post_padded[0] = used entries. Ids outside [0, num_experts)
// are skipped. Dynamic shared memory: 3 * num_experts ints.
extern "C" __global__ void __launch_bounds__(1024)
    moe_marlin_align(const int* __restrict__ local_ids, int num_slots, int num_experts, int block_m,
                     int num_mblocks, int* __restrict__ sorted_slot_ids, int* __restrict__ block_expert_ids,
                     int* __restrict__ num_post_padded) {
  extern __shared__ int sh[];
  int* cnt = sh;
  int* end = sh + num_experts;
  int* fill = end + num_experts;
  __shared__ int warp_sum[32];
  const int tid = threadIdx.x, nthr = blockDim.x, lane = tid & 31, wid = tid >> 5;

  for (int i = tid; i < num_experts; i += nthr) {
    cnt[i] = 0;
    fill[i] = 0;
  }
  for (int i = tid; i < num_mblocks * block_m; i += nthr) sorted_slot_ids[i] = num_slots;
  __syncthreads();
  for (int i = tid; i < num_slots; i += nthr) {
    const int e = __ldg(local_ids + i);
    if (e >= 0 && e < num_experts) atomicAdd(cnt + e, 1);
  }
  __syncthreads();

  // Inclusive scan of the padded group sizes: each thread owns `per` consecutive experts.
  const int per = (num_experts + nthr - 1) / nthr;
  const int e0 = tid * per;
  int mine = 0;
  for (int i = 0; i < per; ++i) {
    const int e = e0 + i;
    if (e < num_experts) mine += (cnt[e] + block_m - 1) / block_m * block_m;
  }
  int x = mine;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sum[wid] = x;
  __syncthreads();
  if (wid == 0) {
    int v = lane < nthr / 32 ? warp_sum[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v += y;
    }
    warp_sum[lane] = v;  // inclusive over warps
  }
  __syncthreads();
  int run = (wid > 0 ? warp_sum[wid - 1] : 0) + x - mine;
  for (int i = 0; i < per; ++i) {
    const int e = e0 + i;
    if (e < num_experts) {
      run += (cnt[e] + block_m - 1) / block_m * block_m;
      end[e] = run;
    }
  }
  const int total = warp_sum[nthr / 32 - 1];
  __syncthreads();
  if (tid == 0) *num_post_padded = total;

  for (int b = tid; b < num_mblocks; b += nthr) {
    const int start = b * block_m;
    int ex = -1;
    if (start < total) {  // first expert whose group ends after `start` (empty groups never qualify)
      int lo = 0, hi = num_experts - 1;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (end[mid] > start) hi = mid; else lo = mid + 1;
      }
      ex = lo;
    }
    block_expert_ids[b] = ex;
  }
  for (int i = tid; i < num_slots; i += nthr) {
    const int e = __ldg(local_ids + i);
    if (e >= 0 && e < num_experts) {
      const int padded = (cnt[e] + block_m - 1) / block_m * block_m;
      sorted_slot_ids[end[e] - padded + atomicAdd(fill + e, 1)] = i;
    }
  }
}

#ifdef MARLIN_OFFLINE_CHECK
// Explicit instantiations for an offline `nvcc -Xptxas -v` resource check and SASS audit (NVRTC
// instantiates the same templates through name expressions at run time); stage counts as
// jit.TILE_CONFIGS resolves them.
#define MARLIN_INST1(BF, MT, NW, ST, GR, G2)                                                             \
  template __global__ void marlin::moe_marlin_gemm<BF, MT, NW, 2, ST, GR, G2>(                             \
      const u16*, int, int, int, const V4*, const u16*, int, int, const int*, const int*, const int*, int, \
      int, int, const float*, void*);
#define MARLIN_INST_CFGS(BF, GR, G2) \
  MARLIN_INST1(BF, 1, 4, 6, GR, G2)  \
  MARLIN_INST1(BF, 1, 2, 5, GR, G2)  \
  MARLIN_INST1(BF, 1, 1, 4, GR, G2)  \
  MARLIN_INST1(BF, 2, 4, 7, GR, G2)  \
  MARLIN_INST1(BF, 2, 2, 6, GR, G2)  \
  MARLIN_INST1(BF, 4, 4, 6, GR, G2)
MARLIN_INST_CFGS(true, true, false)
MARLIN_INST_CFGS(true, true, true)
MARLIN_INST_CFGS(true, false, false)
MARLIN_INST_CFGS(true, false, true)
MARLIN_INST_CFGS(false, true, false)
MARLIN_INST_CFGS(false, true, true)
template __global__ void marlin::moe_marlin_topk_sum<true>(const float*, const int*, int, int, int, u16*);
template __global__ void marlin::moe_marlin_topk_sum<false>(const float*, const int*, int, int, int, u16*);
#endif
