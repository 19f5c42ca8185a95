// Fused CPU kernels for generalized neighborhood attention (forward and backward).
//
// Built on first use by visionzoo/kernels/native.py (plain C++ and OpenMP, no torch headers) and
// called through ctypes. The kernels do no index math of their own: per dimension d and position x,
// the caller passes the first key position of x's window, the number of keys, and the rpb index of
// the first key (from indexing.window_bounds); keys step by the dilation, rpb indices by one.
//
// Layouts (all contiguous): q, k, v, out, dout, dq, dk, dv: [B, L0, L1, L2, H, D] (1D/2D inputs
// have leading dims of length 1); lse: [B, L0, L1, L2, H]; rpb: [H, R] (R = rpb_size, flattened);
// drpb: [B, H, R] partial sums, reduced over B by the caller.
//
// geom = {B, L0, L1, L2, H, D, dil0, dil1, dil2, rs0, rs1, rs2, R, has_rpb, max_keys}
// tables = {kfirst[L0 + L1 + L2], kcount[L0 + L1 + L2], rfirst[L0 + L1 + L2]}
// tile = {t0, t1, t2}: queries per tile of the window kernels (native._tile_shape)
// probs (window kernels; null: none kept): [B * H * N * max_keys], the attention probabilities of the
//       attended pairs of every (b, h) packed one after the other (see TileGeometry::pair_offset)
//
// Two families of kernels share the register-blocked GEMM micro-kernels below: the window kernels
// (vz_na_*: any neighborhood; tiles of queries against the halo of keys their windows span, with a
// per-pair mask) and the block kernels (vz_block_*: blocked.py, windows that are disjoint blocks,
// dense attention per block).
#include <omp.h>

// GCC turns short copy loops (a factor-1 scaled_copy once inlined) into a memmove call per row of
// D elements, far slower than the few vector moves of the loop itself
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

struct Geometry {
  int64_t B, L[3], H, D, dil[3], rs[3], R;
  bool has_rpb;
  int64_t max_keys;
  const int64_t* kfirst[3];
  const int64_t* kcount[3];
  const int64_t* rfirst[3];

  Geometry(const int64_t* g, const int64_t* tables) {
    B = g[0];
    L[0] = g[1];
    L[1] = g[2];
    L[2] = g[3];
    H = g[4];
    D = g[5];
    for (int i = 0; i < 3; ++i) {
      dil[i] = g[6 + i];
      rs[i] = g[9 + i];
    }
    R = g[12];
    has_rpb = g[13] != 0;
    max_keys = g[14];
    const int64_t total = L[0] + L[1] + L[2];
    int64_t offset = 0;
    for (int i = 0; i < 3; ++i) {
      kfirst[i] = tables + offset;
      kcount[i] = tables + total + offset;
      rfirst[i] = tables + 2 * total + offset;
      offset += L[i];
    }
  }

  int64_t tokens() const { return L[0] * L[1] * L[2]; }
};

// 512-bit GCC vector extensions: the compiler lowers them to whatever the target has (one AVX-512
// register, two AVX2 registers, four NEON registers), with no intrinsics to port.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> index_scalar;
  typedef index_scalar index_type __attribute__((vector_size(64)));
  static constexpr int lanes = 64 / sizeof(T);
};

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

template <typename T>
inline void store(T* p, typename Vec<T>::type x) {
  std::memcpy(p, &x, sizeof(x));
}

template <typename T>
inline typename Vec<T>::index_type mask_vector(const typename Vec<T>::index_scalar* lanes) {
  typename Vec<T>::index_type m;
  std::memcpy(&m, lanes, sizeof(m));
  return m;
}

// ---------------------------------------------------------------------------------------------
// Blocked attention (blocked.py): the windows cut the input into disjoint blocks of K tokens and
// every query attends to all keys of its block. One task per (b, block, head) copies the block's
// rows of that head into per-thread scratch (padded to whole vectors, pads zero), runs the small
// dense GEMMs with a register-blocked kernel, and writes the results straight back to the
// [B, L0, L1, L2, H, D] layout: no permuting copies and no temporaries the size of the problem.
// Consecutive tasks are the heads of one block, so they read neighbouring pieces of the same token
// rows. One head's arrays stay in L1 (49 x 32 floats, 6 KiB each, for 7x7 blocks at head dim 32);
// tasks of several heads, whose token rows would be contiguous runs of heads x D, measured slower
// ([8, 14x14, 8 heads, 32] k7 d2 forward + backward: 2.15 ms against 2.29 ms with all 8 heads).
//
// bgeom = {B, L0, L1, L2, H, D, nb0, nb1, nb2, k0, k1, k2, bias_heads}
// btables = {token[nb0 * k0], token[nb1 * k1], token[nb2 * k2]}: per dimension, the positions of
//           the tokens of every block (block-major), so block (i0, i1, i2) holds the tokens
//           (token0[i0][c0], token1[i1][c1], token2[i2][c2]) in row-major (c0, c1, c2) order.
// bias: [bias_heads, K, Kp] added to the transposed logits (keys x queries; zero for padded queries),
//       or null (no bias).
// probs: [B * blocks * H, KKp] + kProbabilitiesSlack elements, the attention probabilities transposed
//       like the logits, [K (keys), K (queries)] packed into the first K * K elements of each
//       (b, block, h)'s KKp (a whole number of vectors). The forward writes them when given
//       (training) and zeroes the slack; the backward then reads them instead of recomputing Q K^T
//       and the softmax. Its vector loads run over the end of each row (into the next row, or the
//       slack at the end): those lanes are padded queries, whose dO columns are zero, so they
//       contribute nothing.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kProbabilitiesSlack = 16;  // native.PROBABILITIES_SLACK

struct BlockGeometry {
  int64_t B, L[3], H, D, nb[3], k[3], bias_heads;
  const int64_t* token[3];
  int64_t K, Kp, Dp, KKp;

  BlockGeometry(const int64_t* g, const int64_t* tables, int lanes) {
    B = g[0];
    for (int i = 0; i < 3; ++i) {
      L[i] = g[1 + i];
      nb[i] = g[6 + i];
      k[i] = g[9 + i];
    }
    H = g[4];
    D = g[5];
    bias_heads = g[12];
    int64_t offset = 0;
    for (int i = 0; i < 3; ++i) {
      token[i] = tables + offset;
      offset += nb[i] * k[i];
    }
    K = k[0] * k[1] * k[2];
    Kp = (K + lanes - 1) / lanes * lanes;
    KKp = (K * K + 15) / 16 * 16;  // whole vectors in any dtype; the same as native.probabilities_numel
    Dp = (D + lanes - 1) / lanes * lanes;
  }

  int64_t blocks() const { return nb[0] * nb[1] * nb[2]; }
  int64_t tasks() const { return B * blocks() * H; }

  // flat positions of the K tokens of block `block`
  void tokens(int64_t block, int64_t* __restrict pos) const {
    const int64_t i2 = block % nb[2], i1 = block / nb[2] % nb[1], i0 = block / (nb[1] * nb[2]);
    const int64_t* t0 = token[0] + i0 * k[0];
    const int64_t* t1 = token[1] + i1 * k[1];
    const int64_t* t2 = token[2] + i2 * k[2];
    const int64_t k0 = k[0], k1 = k[1], k2 = k[2], L1 = L[1], L2 = L[2];
    int64_t c = 0;
    for (int64_t c0 = 0; c0 < k0; ++c0)
      for (int64_t c1 = 0; c1 < k1; ++c1) {
        const int64_t r = (t0[c0] * L1 + t1[c1]) * L2;
        for (int64_t c2 = 0; c2 < k2; ++c2) pos[c++] = r + t2[c2];
      }
  }
};

// Rows of a GEMM operand: a strided matrix (row r at p + r * ld), or a table of row pointers (row r
// at p[r] + col), e.g. the halo keys of a tile, scattered over a panel
template <typename T>
struct Strided {
  T* p;
  int64_t ld;
  T* row(int64_t r) const { return p + r * ld; }
  Strided from_row(int64_t r) const { return {p + r * ld, ld}; }
  Strided from_column(int64_t c) const { return {p + c, ld}; }
};

template <typename T>
struct RowTable {
  T* const* p;
  int64_t col;
  T* row(int64_t r) const { return p[r] + col; }
  RowTable from_row(int64_t r) const { return {p + r, col}; }
  RowTable from_column(int64_t c) const { return {p, col + c}; }
};

// C[r, :CH*L] (+)= sum_j A[r, j] * B[j, :CH*L] for R rows, A[r, j] at A.row(r)[j * aj] (so a
// transposed A costs nothing): R x CH accumulators stay in registers. Accumulate: C's rows are
// added to, else overwritten.
template <typename T, int CH, int R, bool Accumulate, typename AR, typename BR, typename CR>
inline void gemm_tile(AR A, int64_t aj, BR B, CR C, int64_t depth) {
  typedef typename Vec<T>::type vec;
  constexpr int L = Vec<T>::lanes;
  vec acc[R][CH];
  const T* a[R];
  for (int r = 0; r < R; ++r) {
    a[r] = A.row(r);
    for (int c = 0; c < CH; ++c) acc[r][c] = Accumulate ? load(C.row(r) + c * L) : vec{};
  }
  for (int64_t j = 0; j < depth; ++j) {
    const T* brow = B.row(j);
    vec b[CH];
    for (int c = 0; c < CH; ++c) b[c] = load(brow + c * L);
    for (int r = 0; r < R; ++r) {
      const T x = a[r][j * aj];
      for (int c = 0; c < CH; ++c) acc[r][c] += x * b[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CH; ++c) store(C.row(r) + c * L, acc[r][c]);
}

template <typename T, int CH, bool Accumulate, typename AR, typename BR, typename CR>
inline void gemm_columns(AR A, int64_t aj, BR B, CR C, int64_t rows, int64_t depth) {
  constexpr int R = CH >= 4 ? 6 : 8;  // R * CH accumulators + CH rows of B + 1 broadcast within 32 registers
  int64_t r = 0;
  for (; r + R <= rows; r += R) gemm_tile<T, CH, R, Accumulate>(A.from_row(r), aj, B, C.from_row(r), depth);
  switch (rows - r) {
#define VZ_TAIL(n) \
  case n: return gemm_tile<T, CH, n, Accumulate>(A.from_row(r), aj, B, C.from_row(r), depth);
    VZ_TAIL(1) VZ_TAIL(2) VZ_TAIL(3) VZ_TAIL(4) VZ_TAIL(5) VZ_TAIL(6) VZ_TAIL(7)
#undef VZ_TAIL
    default: return;
  }
}

// C[rows, cols] (+)= A[rows, depth] @ B[depth, cols], cols a whole number of vectors; A, B, C row
// accessors (Strided or RowTable)
template <typename T, bool Accumulate = false, typename AR, typename BR, typename CR>
void gemm_rows(AR A, int64_t aj, BR B, CR C, int64_t rows, int64_t depth, int64_t cols) {
  constexpr int L = Vec<T>::lanes;
  int64_t c = 0;
  for (; c + 4 * L <= cols; c += 4 * L)
    gemm_columns<T, 4, Accumulate>(A, aj, B.from_column(c), C.from_column(c), rows, depth);
  switch ((cols - c) / L) {
    case 3: return gemm_columns<T, 3, Accumulate>(A, aj, B.from_column(c), C.from_column(c), rows, depth);
    case 2: return gemm_columns<T, 2, Accumulate>(A, aj, B.from_column(c), C.from_column(c), rows, depth);
    case 1: return gemm_columns<T, 1, Accumulate>(A, aj, B.from_column(c), C.from_column(c), rows, depth);
    default: return;
  }
}

// C[rows, cols] = A[rows, depth] @ B[depth, cols] on strided matrices, cols a whole number of
// vectors; A[r, j] is at A[r * ar + j * aj]
template <typename T>
inline void gemm(const T* A, int64_t ar, int64_t aj, const T* Bm, int64_t ldb, T* C, int64_t ldc, int64_t rows,
                 int64_t depth, int64_t cols) {
  gemm_rows<T>(Strided<const T>{A, ar}, aj, Strided<const T>{Bm, ldb}, Strided<T>{C, ldc}, rows, depth, cols);
}

// Per-thread scratch of one task: the block's rows of one head [K, Dp]. The logits are kept
// transposed, keys x queries ([K, Kp]), so that the softmax over keys runs down the columns: L
// queries per vector, no horizontal sums. Pads stay zero.
template <typename T>
struct BlockScratch {
  int64_t block = -1;  // the block whose token positions pos holds
  std::vector<int64_t> pos, at;
  std::vector<const T*> rows;  // rows of an input read in place
  std::vector<T> q, k, v, dout, out, qt, dot, st, dst, lse, inverse;
  BlockScratch(const BlockGeometry& g, bool backward)
      : pos(g.K), at(g.K), rows(g.K), q(g.K * g.Dp), k(g.K * g.Dp), v(g.K * g.Dp), dout(backward ? g.K * g.Dp : 0),
        out(g.K * g.Dp), qt(g.D * g.Kp), dot(backward ? g.D * g.Kp : 0), st(g.K * g.Kp), dst(g.K * g.Kp),
        lse(g.Kp), inverse(g.Kp) {}
};

// f on every lane of x, as one call of the vectorized libm where f is exp or log
template <typename T, typename F>
inline typename Vec<T>::type lanewise(typename Vec<T>::type x, F f) {
  constexpr int L = Vec<T>::lanes;
  T in[L], out[L];
  std::memcpy(in, &x, sizeof(x));
#pragma omp simd
  for (int i = 0; i < L; ++i) out[i] = f(in[i]);
  return load(out);
}

// exp of arguments <= 0 (logits minus their max or their lse), clamped at -80: hopeless logits
// (exp(-80) ~ 2e-35, nothing next to the largest term of 1) stay off the slow underflow path.
// float: inline, Cody-Waite reduction by ln 2 and the degree-7 polynomial of Cephes' expf (relative
// error below 3e-7), no call; double: the vectorized libm.
template <typename T>
inline typename Vec<T>::type vexp(typename Vec<T>::type x) {
  if constexpr (sizeof(T) == 4) {
    typedef typename Vec<T>::type vec;
    typedef typename Vec<T>::index_type ivec;
    x = x > T(-80) ? x : vec{} - T(80);
    x = x < T(0) ? x : vec{};  // arguments are <= 0 here (logits minus their max or lse)
    const vec t = x * T(1.44269504088896341);
    const ivec n = __builtin_convertvector(t - T(0.5), ivec);  // round to nearest for t <= 0
    const vec nf = __builtin_convertvector(n, vec);
    const vec f = x - nf * T(0.693359375) - nf * T(-2.12194440e-4);
    vec p = T(1.9875691500E-4) * f + T(1.3981999507E-3);
    p = p * f + T(8.3334519073E-3);
    p = p * f + T(4.1665795894E-2);
    p = p * f + T(1.6666665459E-1);
    p = p * f + T(5.0000001201E-1);
    p = p * (f * f) + f + T(1);
    const ivec bits = (n + 127) << 23;
    vec scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
  } else {
    return lanewise<T>(x, [](T a) { return std::exp(std::max(a, T(-80))); });
  }
}

template <typename T>
inline typename Vec<T>::type vlog(typename Vec<T>::type x) {
  return lanewise<T>(x, [](T a) { return std::log(a); });
}

// dst[:n] = src[:n] * factor in whole vectors and a partial tail (an explicit loop: with factor 1
// the compiler would otherwise call memmove for every short row)
template <typename T>
inline void scaled_copy(const T* __restrict src, T* __restrict dst, int64_t n, T factor) {
  constexpr int L = Vec<T>::lanes;
  int64_t i = 0;
  for (; i + L <= n; i += L) store(dst + i, load(src + i) * factor);
  if (i < n) {
    T tail[L];
    for (int64_t t = 0; i + t < n; ++t) tail[t] = src[i + t] * factor;
    for (int64_t t = 0; i + t < n; ++t) dst[i + t] = tail[t];
  }
}

// dst[:n] = 0
template <typename T>
inline void zero_row(T* dst, int64_t n) {
  constexpr int L = Vec<T>::lanes;
  int64_t i = 0;
  for (; i + L <= n; i += L) store(dst + i, typename Vec<T>::type{});
  for (; i < n; ++i) dst[i] = T(0);
}

// dst[:n] += src[:n]
template <typename T>
inline void add_row(const T* __restrict src, T* __restrict dst, int64_t n) {
  constexpr int L = Vec<T>::lanes;
  int64_t i = 0;
  for (; i + L <= n; i += L) store(dst + i, load(dst + i) + load(src + i));
  for (; i < n; ++i) dst[i] += src[i];
}

// orders the non-temporal stores of this thread before what follows (the end of the kernel)
inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// dst[:n] = src[:n] * factor for data written once and not read again by the kernel (result rows, the
// saved probabilities): with non-temporal stores where the target has them, dst is aligned and n a
// whole number of vectors, so that the destination lines are not read in (read for ownership) only
// to be overwritten (a sixth of the block kernels' backward at 14x14 d2) and do not evict the working
// set on their way out; else scaled_copy. The kernel calls stream_fence before it returns.
template <typename T>
inline void stream_row(const T* __restrict src, T* __restrict dst, int64_t n, T factor) {
#if defined(__AVX512F__)
  constexpr int L = Vec<T>::lanes;
  if (n % L == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    for (int64_t i = 0; i < n; i += L) {
      const typename Vec<T>::type x = load(src + i) * factor;
      if constexpr (sizeof(T) == 4)
        _mm512_stream_ps(reinterpret_cast<float*>(dst + i), reinterpret_cast<__m512>(x));
      else
        _mm512_stream_pd(reinterpret_cast<double*>(dst + i), reinterpret_cast<__m512d>(x));
    }
    return;
  }
#endif
  scaled_copy(src, dst, n, factor);
}

// P^T = E^T [K, Kp] (rows Kp apart) times inverse (per query), packed into K * K contiguous elements
// (zeros after them up to KKp) and streamed to dst as whole aligned vectors, each assembled from at
// most two rows with masked loads; returns false (nothing written) where that does not apply
// (no AVX-512, double, K < L, dst not aligned)
template <typename T>
inline bool stream_probabilities(const T* e, const T* inverse, int64_t K, int64_t Kp, int64_t KKp, T* dst) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) {
    constexpr int L = 16;
    if (K < L || reinterpret_cast<uintptr_t>(dst) % 64 != 0 || KKp % L != 0) return false;
    int64_t c = 0, r = 0;  // row and column of the vector's first element
    for (int64_t o = 0; o < KKp; o += L) {
      __m512 x = _mm512_setzero_ps();
      if (c < K) {
        const int64_t n = std::min<int64_t>(L, K - r);
        const __mmask16 first = static_cast<__mmask16>((1u << n) - 1);
        x = _mm512_mul_ps(_mm512_maskz_loadu_ps(first, e + c * Kp + r), _mm512_maskz_loadu_ps(first, inverse + r));
        if (n < L && c + 1 < K) {  // the rest from the start of row c + 1
          const __mmask16 rest = static_cast<__mmask16>(~first);
          x = _mm512_mask_mul_ps(x, rest, _mm512_maskz_loadu_ps(rest, e + (c + 1) * Kp - n),
                                 _mm512_maskz_loadu_ps(rest, inverse - n));
        }
      }
      _mm512_stream_ps(reinterpret_cast<float*>(dst + o), x);
      r += L;
      if (r >= K) r -= K, ++c;
    }
    return true;
  }
#endif
  return false;
}

// the task's rows [K, D] of x (at[c]: token c's) -> dst [K, Dp], times factor
template <typename T>
inline void gather_block(const T* x, const int64_t* at, const BlockGeometry& g, T factor, T* __restrict dst) {
  for (int64_t c = 0; c < g.K; ++c) scaled_copy(x + at[c], dst + c * g.Dp, g.D, factor);
}

// src [K, Dp] -> the task's rows [K, D] of x, times factor (and row_factor[c] if given); written as
// soon as they are computed, so the stores drain while the next product computes
template <typename T>
inline void scatter_block(const T* src, const int64_t* at, const BlockGeometry& g, T factor, T* x,
                          const T* row_factor = nullptr) {
  for (int64_t c = 0; c < g.K; ++c)
    stream_row(src + c * g.Dp, x + at[c], g.D, row_factor ? factor * row_factor[c] : factor);
}

// Lanes of the two-vector shuffles of an L x L transpose: at level h, rows i and i + h swap their
// off-diagonal h x h sub-blocks (lo keeps row i's, hi row i + h's).
template <typename T>
struct TransposeMasks {
  typedef typename Vec<T>::index_scalar index;
  static constexpr int L = Vec<T>::lanes;
  index lo[4][16], hi[4][16];
  constexpr TransposeMasks() : lo{}, hi{} {
    for (int level = 0; (1 << level) < L; ++level) {
      const int h = 1 << level;
      for (int j = 0; j < L; ++j) {
        lo[level][j] = (j & h) ? L + j - h : j;
        hi[level][j] = (j & h) ? L + j : j + h;
      }
    }
  }
};

// r[i][j] <- r[j][i] for an L x L tile held in L vectors
template <typename T>
inline void transpose_tile(typename Vec<T>::type* r) {
  typedef typename Vec<T>::type vec;
  constexpr int L = Vec<T>::lanes;
  static constexpr TransposeMasks<T> masks;
#pragma GCC unroll 4
  for (int level = 0; (1 << level) < L; ++level) {
    const int h = 1 << level;
    const auto lo = mask_vector<T>(masks.lo[level]), hi = mask_vector<T>(masks.hi[level]);
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i)
      if (!(i & h)) {
        const vec a = r[i], b = r[i + h];
        r[i] = __builtin_shuffle(a, b, lo);
        r[i + h] = __builtin_shuffle(a, b, hi);
      }
  }
}



// rows row(c) [K, D] (c < K; a null row reads as zeros) times factor, transposed -> columns [D, Kp]
// (columns >= K zero; Kp a whole number of vectors), in L x L register tiles. Whole vectors are
// loaded from each row: rows padded to whole vectors in scratch, or D a whole number of them (then
// rows can be read straight from an input)
template <typename T, typename Row>
inline void transpose_rows(Row row, int64_t K, int64_t Kp, int64_t D, T factor, T* columns) {
  typedef typename Vec<T>::type vec;
  constexpr int L = Vec<T>::lanes;
  for (int64_t c0 = 0; c0 < Kp; c0 += L)
    for (int64_t d0 = 0; d0 < D; d0 += L) {
      const int64_t width = std::min<int64_t>(L, D - d0);
      vec tile[L];
      for (int i = 0; i < L; ++i) {
        const T* x = c0 + i < K ? row(c0 + i) : nullptr;
        tile[i] = x ? load(x + d0) * factor : vec{};
      }
      transpose_tile<T>(tile);
      for (int64_t i = 0; i < width; ++i) store(columns + (d0 + i) * Kp + c0, tile[i]);
    }
}

// row c of a matrix whose rows are ld apart (for transpose_rows)
template <typename T>
inline auto rows_of(const T* x, int64_t ld) {
  return [x, ld](int64_t c) { return x + c * ld; };
}

// task -> (b, block, head), and the offsets of the block's rows of that head (w.at)
template <typename T>
inline void task_offsets(const BlockGeometry& g, int64_t task, BlockScratch<T>& w, int64_t& b, int64_t& block,
                         int64_t& h) {
  h = task % g.H;
  block = task / g.H % g.blocks();
  b = task / (g.H * g.blocks());
  if (block != w.block) g.tokens(block, w.pos.data()), w.block = block;
  const int64_t N = g.L[0] * g.L[1] * g.L[2], base = b * N * g.H * g.D + h * g.D;
  for (int64_t c = 0; c < g.K; ++c) w.at[c] = base + w.pos[c] * g.H * g.D;
}

// Softmax down NV columns of L queries of the transposed logits [K, Kp] at col: exp(S - max) in
// place, 1 / sum -> inverse, max + log(sum) -> lse. The NV columns run side by side, so that their
// max and sum chains overlap instead of waiting on each other's latency.
template <typename T, int NV>
inline void softmax_columns(T* col, int64_t K, int64_t Kp, T* inverse, T* lse) {
  typedef typename Vec<T>::type vec;
  constexpr int L = Vec<T>::lanes;
  vec m[NV], total[NV];
  for (int i = 0; i < NV; ++i) m[i] = load(col + i * L), total[i] = vec{};
  for (int64_t c = 1; c < K; ++c)
    for (int i = 0; i < NV; ++i) {
      const vec x = load(col + c * Kp + i * L);
      m[i] = m[i] > x ? m[i] : x;
    }
  for (int64_t c = 0; c < K; ++c)
    for (int i = 0; i < NV; ++i) {
      const vec e = vexp<T>(load(col + c * Kp + i * L) - m[i]);
      store(col + c * Kp + i * L, e);
      total[i] += e;
    }
  for (int i = 0; i < NV; ++i) {
    store(inverse + i * L, T(1) / total[i]);  // the normalisation is applied to O's rows
    store(lse + i * L, m[i] + vlog<T>(total[i]));
  }
}

// dS = P * (dP - sum over keys of P dP) down NV columns of L queries, in place of dP^T [K, Kp] at ds
// (P^T at p, rows ldp apart), also added to the bias gradient at db [K, Kp] if given; the NV columns
// run side by side, as in softmax_columns
template <typename T, int NV>
inline void softmax_gradient(const T* p, int64_t ldp, T* ds, int64_t K, int64_t Kp, T* db) {
  typedef typename Vec<T>::type vec;
  constexpr int L = Vec<T>::lanes;
  vec delta[NV];  // sum over keys of P dP = sum over d of dO O
  for (int i = 0; i < NV; ++i) delta[i] = vec{};
  for (int64_t c = 0; c < K; ++c)
    for (int i = 0; i < NV; ++i) delta[i] += load(p + c * ldp + i * L) * load(ds + c * Kp + i * L);
  for (int64_t c = 0; c < K; ++c)
    for (int i = 0; i < NV; ++i) {
      const vec dsc = load(p + c * ldp + i * L) * (load(ds + c * Kp + i * L) - delta[i]);
      store(ds + c * Kp + i * L, dsc);
      if (db) store(db + c * Kp + i * L, load(db + c * Kp + i * L) + dsc);
    }
}

// bias (or null): [bias_heads, K (keys), Kp (queries)], the logit bias transposed like the logits;
// probs (or null): see above
template <typename T>
void block_forward(const T* q, const T* k, const T* v, const T* bias, T* out, T* lse, T* probs,
                   const BlockGeometry& g, T scale, int threads) {
  constexpr int L = Vec<T>::lanes;
  const int64_t N = g.L[0] * g.L[1] * g.L[2], K = g.K, Kp = g.Kp, Dp = g.Dp;
#pragma omp parallel num_threads(threads)
  {
    BlockScratch<T> w(g, false);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < g.tasks(); ++task) {
      int64_t b, block, h;
      task_offsets(g, task, w, b, block, h);
      gather_block(v, w.at.data(), g, T(1), w.v.data());  // read K / 8 times by the GEMM below
      // Q^T straight from q's rows, which nothing else reads: no copy into scratch first (kernel forward
      // of [8, 14x14, 8, 32] k7 d2: 0.84 -> 0.78 ms)
      if (g.D == Dp) {
        transpose_rows<T>([&](int64_t c) { return q + w.at[c]; }, K, Kp, g.D, scale, w.qt.data());
      } else {  // padded rows: whole vectors loaded from x would run past its end
        gather_block(q, w.at.data(), g, scale, w.q.data());
        transpose_rows(rows_of(w.q.data(), Dp), K, Kp, g.D, T(1), w.qt.data());
      }
      // S^T = K Q^T reading k's rows in place, once per 4 vectors of queries (once for blocks of up to 64
      // tokens in float32), rather than copying them to scratch first (forward 3% faster)
      for (int64_t c = 0; c < K; ++c) w.rows[c] = k + w.at[c];
      gemm_rows<T>(RowTable<const T>{w.rows.data(), 0}, 1, Strided<const T>{w.qt.data(), Kp},
                   Strided<T>{w.st.data(), Kp}, K, g.D, Kp);
      if (bias) add_row(bias + (g.bias_heads > 1 ? h : 0) * K * Kp, w.st.data(), K * Kp);
      T* inverse = w.inverse.data();
      int64_t col = 0;
      for (; col + 4 * L <= Kp; col += 4 * L)
        softmax_columns<T, 4>(w.st.data() + col, K, Kp, inverse + col, w.lse.data() + col);
      for (; col < Kp; col += L) softmax_columns<T, 1>(w.st.data() + col, K, Kp, inverse + col, w.lse.data() + col);
      for (int64_t r = 0; r < K; ++r) lse[(b * N + w.pos[r]) * g.H + h] = w.lse[r];
      gemm(w.st.data(), 1, Kp, w.v.data(), Dp, w.out.data(), Dp, K, K, Dp);  // O = exp(S - max) V
      scatter_block(w.out.data(), w.at.data(), g, T(1), out, inverse);
      if (probs) {  // P^T = exp(S - max)^T / sum, packed into rows of K queries, streamed out
        T* dst = probs + task * g.KKp;  // task = (b, block, h)
        if (!stream_probabilities(w.st.data(), inverse, K, Kp, g.KKp, dst)) {
          // packed in scratch first: row c's last vector runs into row c + 1, rewritten next (the
          // last row's into the scratch's tail)
          T* packed = w.dst.data();
          for (int64_t c = 0; c < K; ++c)
            for (int64_t r = 0; r < Kp; r += L)
              store(packed + c * K + r, load(w.st.data() + c * Kp + r) * load(inverse + r));
          stream_row(packed, dst, g.KKp, T(1));
        }
      }
    }
    stream_fence();
  }
  if (probs) std::fill(probs + g.tasks() * g.KKp, probs + g.tasks() * g.KKp + kProbabilitiesSlack, T(0));
}

// The tasks run in kBiasChunks fixed contiguous chunks, each summing its bias gradient into its own
// slice of dbias [kBiasChunks, bias_heads, K (keys), Kp (queries)] (reduced by the caller in a
// fixed order), so the result does not depend on the thread count. bias and dbias may be null;
// probs (see above) may be null, and the probabilities are recomputed from the lse.
constexpr int64_t kBiasChunks = 32;

template <typename T>
void block_backward(const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* bias,
                    const T* probs, T* dq, T* dk, T* dv, T* dbias, const BlockGeometry& g, T scale, int threads) {
  typedef typename Vec<T>::type vec;
  constexpr int L = Vec<T>::lanes;
  const int64_t N = g.L[0] * g.L[1] * g.L[2], K = g.K, Kp = g.Kp, Dp = g.Dp;
  const int64_t tasks = g.tasks();
#pragma omp parallel num_threads(threads)
  {
    BlockScratch<T> w(g, true);
#pragma omp for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < kBiasChunks; ++chunk) {
      T* dbias_chunk = dbias ? dbias + chunk * g.bias_heads * K * Kp : nullptr;
      for (int64_t task = tasks * chunk / kBiasChunks; task < tasks * (chunk + 1) / kBiasChunks; ++task) {
        int64_t b, block, h;
        task_offsets(g, task, w, b, block, h);
        const int64_t head = g.bias_heads > 1 ? h : 0;
        gather_block(q, w.at.data(), g, scale, w.q.data());
        gather_block(k, w.at.data(), g, T(1), w.k.data());
        gather_block(v, w.at.data(), g, T(1), w.v.data());
        gather_block(dout, w.at.data(), g, T(1), w.dout.data());
        // P^T [K, ldp]: saved by the forward, or recomputed here from S^T = K Q^T and the lse
        const T* P = probs ? probs + task * g.KKp : w.st.data();
        const int64_t ldp = probs ? K : Kp;
        if (!probs) {
          for (int64_t r = 0; r < K; ++r) w.lse[r] = lse[(b * N + w.pos[r]) * g.H + h];
          transpose_rows(rows_of(w.q.data(), Dp), K, Kp, g.D, T(1), w.qt.data());
          gemm(w.k.data(), Dp, 1, w.qt.data(), Kp, w.st.data(), Kp, K, g.D, Kp);  // S^T = K Q^T
          if (bias) add_row(bias + head * K * Kp, w.st.data(), K * Kp);
          for (int64_t r = 0; r < Kp; r += L) {
            T* p = w.st.data() + r;
            const vec row_lse = load(w.lse.data() + r);
            for (int64_t c = 0; c < K; ++c) store(p + c * Kp, vexp<T>(load(p + c * Kp) - row_lse));
          }
        }
        transpose_rows(rows_of(w.dout.data(), Dp), K, Kp, g.D, T(1), w.dot.data());
        gemm(w.v.data(), Dp, 1, w.dot.data(), Kp, w.dst.data(), Kp, K, g.D, Kp);  // dP^T = V dO^T
        T* db = dbias_chunk ? dbias_chunk + head * K * Kp : nullptr;
        int64_t col = 0;
        for (; col + 4 * L <= Kp; col += 4 * L)
          softmax_gradient<T, 4>(P + col, ldp, w.dst.data() + col, K, Kp, db ? db + col : db);
        for (; col < Kp; col += L) softmax_gradient<T, 1>(P + col, ldp, w.dst.data() + col, K, Kp, db ? db + col : db);
        gemm(w.dst.data(), 1, Kp, w.k.data(), Dp, w.out.data(), Dp, K, K, Dp);  // dQ = dS K
        scatter_block(w.out.data(), w.at.data(), g, scale, dq);
        gemm(w.dst.data(), Kp, 1, w.q.data(), Dp, w.out.data(), Dp, K, K, Dp);  // dK = dS^T (scale Q)
        scatter_block(w.out.data(), w.at.data(), g, T(1), dk);
        gemm(P, ldp, 1, w.dout.data(), Dp, w.out.data(), Dp, K, K, Dp);  // dV = P^T dO
        scatter_block(w.out.data(), w.at.data(), g, T(1), dv);
      }
    }
    stream_fence();
  }
}


// ---------------------------------------------------------------------------------------------
// Tiled neighborhood attention (any windows: borders, dilation, stride, causal, rpb). A task takes
// a tile of up to L queries (t0 x t1 x t2, consecutive in one dilation group of every dimension,
// one query per vector lane) and the halo of keys that the union of their windows spans, and runs
// dense GEMMs over tile x halo with the register-blocked kernels above; a per-lane mask built from
// the window tables keeps each query to its own window (masked pairs: probability exactly zero).
// For 7x7 windows and 4x4 tiles the halo is 10 x 10 keys, so about half the GEMM work is pairs of
// the neighborhood; in exchange every product runs in vector registers at GEMM speed instead of as
// per-query dot products. Logits are kept transposed, keys x query lanes, as in the block kernels.
//
// tile = {t0, t1, t2}: queries per tile along each dimension, t0 * t1 * t2 <= L; lane l is query
// (l0, l1, l2) of the tile in row-major order. The forward runs one task per (b, h, panel of tiles);
// the backward one per (b, h), which owns the dK / dV rows (and the rpb gradient partial) it writes.
// ---------------------------------------------------------------------------------------------
// rows of x at base + pos[c] * stride (D elements) -> dst [n, Dp] times factor, pads zeroed; pos < 0:
// a zero row
template <typename T>
inline void gather_rows(const T* x, int64_t base, int64_t stride, const int64_t* pos, int64_t n, int64_t D,
                        int64_t Dp, T factor, T* __restrict dst) {
  for (int64_t c = 0; c < n; ++c) {
    if (pos[c] >= 0)
      scaled_copy(x + base + pos[c] * stride, dst + c * Dp, D, factor);
    else
      zero_row(dst + c * Dp, D);
    zero_row(dst + c * Dp + D, Dp - D);
  }
}


template <typename T>
struct TileGeometry {
  typedef typename Vec<T>::index_scalar index;
  static constexpr int L = Vec<T>::lanes;
  Geometry g;
  int64_t t[3], nh[3], stride[3];  // queries per tile, most halo positions of any tile, position stride
  // per dimension and tile: first halo position, halo positions
  std::vector<int64_t> hfirst[3], hcount[3];
  // per dimension and tile, [L] per lane: its position's share of the query's flat position, of the
  // rpb index of its first key; all-ones where the lane has no query (partial tile)
  std::vector<int64_t> position[3];
  std::vector<index> bias[3], idle[3];
  // per dimension and tile, [nh, L]: all-ones where the halo position is in the lane's window
  std::vector<index> window[3];
  // Panels: per dimension, segments of tiles whose halos a panel's keys cover: one per dilation group
  // (the whole group) in the last dimension, and in the others when whole_groups, else one per tile
  // (its halo). Per segment: its first key position and key count, its tiles [tile, next one's);
  // per tile, the offset of its halo in its segment's keys. With whole groups the panels' keys are
  // disjoint and cover every position.
  std::vector<int64_t> segment_first[3], segment_count[3], segment_tile[3], offset[3];
  int64_t max_segment[3];
  bool whole_groups;
  // Saved probabilities: per dimension and tile, the keys of its queries' windows along that
  // dimension (summed over its queries) and the sum over the tiles before it; per dimension, the sum
  // over all tiles. A tile's (query, key) pairs number the product over dimensions, and the pairs
  // of one (b, h) the product of the sums.
  std::vector<int64_t> pairs[3], pairs_before[3];
  int64_t pairs_total[3];

  TileGeometry(const int64_t* geom, const int64_t* tables, const int64_t* tile, bool whole)
      : g(geom, tables), whole_groups(whole) {
    for (int i = 0; i < 3; ++i) t[i] = tile[i];
    stride[2] = 1, stride[1] = g.L[2], stride[0] = g.L[1] * g.L[2];
    int64_t lane[3][L];  // the lane's query along each dimension, -1 past t0 * t1 * t2
    for (int l = 0; l < L; ++l) {
      const bool used = l < t[0] * t[1] * t[2];
      lane[0][l] = used ? l / (t[1] * t[2]) : -1;
      lane[1][l] = used ? l / t[2] % t[1] : -1;
      lane[2][l] = used ? l % t[2] : -1;
    }
    for (int i = 0; i < 3; ++i) {
      const int64_t dil = g.dil[i], length = g.L[i];
      std::vector<int64_t> first, count;
      nh[i] = 1;
      const bool by_group = whole || i == 2;
      max_segment[i] = 1;
      for (int64_t group = 0; group < std::min(dil, length); ++group) {
        if (by_group) {
          segment_tile[i].push_back(static_cast<int64_t>(first.size()));
          segment_first[i].push_back(group);
          segment_count[i].push_back((length - group + dil - 1) / dil);
          max_segment[i] = std::max(max_segment[i], segment_count[i].back());
        }
        for (int64_t x = group; x < length; x += t[i] * dil) {
          const int64_t n = std::min(t[i], (length - x + dil - 1) / dil);
          int64_t lo = g.kfirst[i][x], hi = lo, keys = 0;
          for (int64_t j = 0; j < n; ++j) {
            const int64_t p = x + j * dil;
            lo = std::min(lo, g.kfirst[i][p]);
            hi = std::max(hi, g.kfirst[i][p] + (g.kcount[i][p] - 1) * dil);
            keys += g.kcount[i][p];
          }
          pairs_before[i].push_back(pairs[i].empty() ? 0 : pairs_before[i].back() + pairs[i].back());
          pairs[i].push_back(keys);
          first.push_back(x);
          count.push_back(n);
          hfirst[i].push_back(lo);
          hcount[i].push_back((hi - lo) / dil + 1);
          nh[i] = std::max(nh[i], (hi - lo) / dil + 1);
          if (by_group) {
            offset[i].push_back((lo - group) / dil);
          } else {
            segment_tile[i].push_back(static_cast<int64_t>(first.size()) - 1);
            segment_first[i].push_back(lo);
            segment_count[i].push_back((hi - lo) / dil + 1);
            max_segment[i] = std::max(max_segment[i], segment_count[i].back());
            offset[i].push_back(0);
          }
        }
      }
      segment_tile[i].push_back(static_cast<int64_t>(first.size()));
      pairs_total[i] = pairs_before[i].back() + pairs[i].back();
      const int64_t tiles = static_cast<int64_t>(first.size());
      position[i].assign(tiles * L, 0);
      bias[i].assign(tiles * L, 0);
      idle[i].assign(tiles * L, 0);
      window[i].assign(tiles * nh[i] * L, -1);
      for (int64_t a = 0; a < tiles; ++a)
        for (int l = 0; l < L; ++l) {
          const int64_t j = lane[i][l];
          if (j < 0 || j >= count[a]) {
            idle[i][a * L + l] = -1;
            continue;
          }
          const int64_t x = first[a] + j * dil, lo = (g.kfirst[i][x] - hfirst[i][a]) / dil;
          const int64_t hi = lo + g.kcount[i][x] - 1;
          position[i][a * L + l] = x * stride[i];
          bias[i][a * L + l] = static_cast<index>((g.rfirst[i][x] - lo) * g.rs[i]);
          for (int64_t u = 0; u < nh[i]; ++u) window[i][(a * nh[i] + u) * L + l] = (lo <= u && u <= hi) ? -1 : 0;
        }
    }
  }

  int64_t tiles(int i) const { return static_cast<int64_t>(hfirst[i].size()); }
  int64_t max_keys() const { return nh[0] * nh[1] * nh[2]; }
  int64_t segments(int i) const { return static_cast<int64_t>(segment_first[i].size()); }
  // (query, key) pairs of one (b, h), and where tile a's begin among them (tiles in row-major order)
  int64_t slice_pairs() const { return pairs_total[0] * pairs_total[1] * pairs_total[2]; }
  int64_t pair_offset(const int64_t* a) const {
    return pairs_before[0][a[0]] * pairs_total[1] * pairs_total[2] +
           pairs[0][a[0]] * (pairs_before[1][a[1]] * pairs_total[2] + pairs[1][a[1]] * pairs_before[2][a[2]]);
  }
  // a panel: the tiles of one segment per dimension, whose halos all lie in the panel's keys
  int64_t panels() const { return segments(0) * segments(1) * segments(2); }
  int64_t max_panel_keys() const { return max_segment[0] * max_segment[1] * max_segment[2]; }
};

constexpr size_t kScratchKeepBytes = size_t(32) << 20;  // per thread, kept from call to call

template <typename T>
struct TileScratch {
  typedef typename Vec<T>::index_scalar index;
  static constexpr int L = Vec<T>::lanes;
  int64_t Dp = 0, n[3];                   // the tile's halo positions per dimension
  int64_t segment[3], pn[3];              // the panel's segments, their key counts
  const index* window[3];                 // the tile's rows of TileGeometry::window
  std::vector<int64_t> qpos, kbias, ppos;  // lane -> query position (-1: idle lane); key -> rpb offset;
                                          // panel key -> position
  std::vector<index> lane_bias, idle;     // lane -> rpb index of its first key; all-ones if the lane is idle
  std::vector<index> mask;                // [keys, L]: all-ones where the pair is in the neighborhood
  std::vector<T> qr, qt, st, dst, rows, dor, dot, lse, inverse;
  std::vector<T> kp, vp, dkp, dvp;  // the panel's key and value rows [panel keys, Dp], their gradients
  std::vector<const T*> krows, vrows;  // the tile's halo keys: their rows in kp, vp
  std::vector<T*> dkrows, dvrows;      // ... and in dkp, dvp

  bool backward = false;

  // Sizes every array for a call of geometry tg, growing only: a thread's scratch persists from call
  // to call (tile_scratch), so a call neither allocates nor clears it. Nothing read is left from an
  // earlier call: rows are gathered with their pads zeroed, the panel gradients cleared per panel.
  void prepare(const TileGeometry<T>& tg, bool for_backward) {
    backward = for_backward;
    Dp = (tg.g.D + L - 1) / L * L;
    const size_t keys = tg.max_keys(), panel = tg.max_panel_keys();
    grow(qpos, L), grow(kbias, keys), grow(ppos, panel), grow(lane_bias, L), grow(idle, L), grow(mask, keys * L);
    grow(qr, L * Dp), grow(qt, Dp * L), grow(st, keys * L), grow(rows, L * Dp), grow(lse, L), grow(inverse, L);
    grow(kp, panel * Dp), grow(vp, panel * Dp), grow(krows, keys), grow(vrows, keys);
    if (backward) {
      grow(dst, keys * L), grow(dor, L * Dp), grow(dot, Dp * L), grow(dkp, panel * Dp), grow(dvp, panel * Dp);
      grow(dkrows, keys), grow(dvrows, keys);
    }
  }

  // frees the arrays if they hold more than kScratchKeepBytes (one very large call)
  void trim() {
    size_t bytes = 0;
    for (const auto* v : {&qr, &qt, &st, &dst, &rows, &dor, &dot, &kp, &vp, &dkp, &dvp}) bytes += v->capacity() * sizeof(T);
    if (bytes > kScratchKeepBytes) *this = TileScratch();
  }

  template <typename V>
  static void grow(std::vector<V>& v, size_t n) {
    if (v.size() < n) v.resize(n);
  }
};

// The calling thread's scratch, prepared for tg (see TileScratch::prepare)
template <typename T>
TileScratch<T>& tile_scratch(const TileGeometry<T>& tg, bool backward) {
  static thread_local TileScratch<T> w;
  w.prepare(tg, backward);
  return w;
}

// The segments of panel `panel` -> w.segment, their key counts -> w.pn, and the positions of its
// keys -> w.ppos, in row-major order; returns their number.
template <typename T>
int64_t panel_setup(const TileGeometry<T>& tg, int64_t panel, TileScratch<T>& w) {
  const Geometry& g = tg.g;
  w.segment[2] = panel % tg.segments(2);
  w.segment[1] = panel / tg.segments(2) % tg.segments(1);
  w.segment[0] = panel / (tg.segments(1) * tg.segments(2));
  int64_t first[3];
  for (int i = 0; i < 3; ++i) {
    w.pn[i] = tg.segment_count[i][w.segment[i]];
    first[i] = tg.segment_first[i][w.segment[i]];
  }
  int64_t c = 0;
  for (int64_t u0 = 0; u0 < w.pn[0]; ++u0)
    for (int64_t u1 = 0; u1 < w.pn[1]; ++u1) {
      const int64_t row = (first[0] + u0 * g.dil[0]) * tg.stride[0] + (first[1] + u1 * g.dil[1]) * tg.stride[1] + first[2];
      for (int64_t j = 0; j < w.pn[2]; ++j) w.ppos[c++] = row + j * g.dil[2];
    }
  return c;
}

// the rows of tile (a0, a1, a2)'s halo keys (the tile being set up in w, in the panel set up in w)
// in the panel's rows: w.krows, w.vrows (and w.dkrows, w.dvrows for the backward)
template <typename T>
inline void halo_rows(const TileGeometry<T>& tg, const int64_t* a, TileScratch<T>& w) {
  const int64_t o0 = tg.offset[0][a[0]], o1 = tg.offset[1][a[1]], o2 = tg.offset[2][a[2]];
  const bool backward = w.backward;
  int64_t c = 0;
  for (int64_t u0 = 0; u0 < w.n[0]; ++u0)
    for (int64_t u1 = 0; u1 < w.n[1]; ++u1)
      for (int64_t u2 = 0, at = (((u0 + o0) * w.pn[1] + u1 + o1) * w.pn[2] + o2) * w.Dp; u2 < w.n[2];
           ++u2, ++c, at += w.Dp) {
        w.krows[c] = w.kp.data() + at;
        w.vrows[c] = w.vp.data() + at;
        if (backward) {
          w.dkrows[c] = w.dkp.data() + at;
          w.dvrows[c] = w.dvp.data() + at;
        }
      }
}

// The tile's queries (lanes) and halo keys; returns the number of halo keys.
template <typename T>
int64_t tile_setup(const TileGeometry<T>& tg, const int64_t* a, TileScratch<T>& w) {
  typedef typename Vec<T>::index_type ivec;
  constexpr int L = Vec<T>::lanes;
  const Geometry& g = tg.g;
  for (int i = 0; i < 3; ++i) {
    w.n[i] = tg.hcount[i][a[i]];
    w.window[i] = tg.window[i].data() + a[i] * tg.nh[i] * L;
  }
  const ivec idle = load(tg.idle[0].data() + a[0] * L) | load(tg.idle[1].data() + a[1] * L) |
                    load(tg.idle[2].data() + a[2] * L);
  store(w.idle.data(), idle);
  store(w.lane_bias.data(), load(tg.bias[0].data() + a[0] * L) + load(tg.bias[1].data() + a[1] * L) +
                                load(tg.bias[2].data() + a[2] * L));
  const int64_t *p0 = tg.position[0].data() + a[0] * L, *p1 = tg.position[1].data() + a[1] * L,
                *p2 = tg.position[2].data() + a[2] * L;
  for (int l = 0; l < L; ++l) w.qpos[l] = idle[l] ? -1 : p0[l] + p1[l] + p2[l];
  int64_t c = 0;
  for (int64_t u0 = 0; u0 < w.n[0]; ++u0)
    for (int64_t u1 = 0; u1 < w.n[1]; ++u1) {
      const int64_t bias = u0 * g.rs[0] + u1 * g.rs[1];
      for (int64_t u2 = 0; u2 < w.n[2]; ++u2, ++c) w.kbias[c] = bias + u2 * g.rs[2];
    }
  return c;
}

// bias[lane] = table[index[lane]] where mask[lane] is set, else 0
template <typename T>
inline typename Vec<T>::type masked_gather(const T* table, typename Vec<T>::index_type index,
                                           typename Vec<T>::index_type mask) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) {
    __m512i i, m;
    std::memcpy(&i, &index, 64);
    std::memcpy(&m, &mask, 64);
    const __m512 r = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), _mm512_test_epi32_mask(m, m), i, table, 4);
    typename Vec<T>::type out;
    std::memcpy(&out, &r, 64);
    return out;
  }
#endif
  T out[Vec<T>::lanes];
  for (int l = 0; l < Vec<T>::lanes; ++l) out[l] = mask[l] ? table[index[l]] : T(0);
  return load(out);
}

// The lanes of x where keep is set, packed to the front of dst (nothing written past them); returns
// their number
template <typename T>
inline int64_t pack_lanes(T* dst, typename Vec<T>::type x, typename Vec<T>::index_type keep) {
#if defined(__AVX512F__)
  __m512i k;
  std::memcpy(&k, &keep, 64);
  if constexpr (sizeof(T) == 4) {
    __m512 v;
    std::memcpy(&v, &x, 64);
    const __mmask16 m = _mm512_test_epi32_mask(k, k);
    const int n = __builtin_popcount(m);
    _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << n) - 1), _mm512_maskz_compress_ps(m, v));
    return n;
  } else {
    __m512d v;
    std::memcpy(&v, &x, 64);
    const __mmask8 m = _mm512_test_epi64_mask(k, k);
    const int n = __builtin_popcount(m);
    _mm512_mask_storeu_pd(dst, static_cast<__mmask8>((1u << n) - 1), _mm512_maskz_compress_pd(m, v));
    return n;
  }
#else
  int64_t n = 0;
  for (int l = 0; l < Vec<T>::lanes; ++l)
    if (keep[l]) dst[n++] = x[l];
  return n;
#endif
}

// The inverse of pack_lanes: the lanes where keep is set take the next values of src in order, the
// others zero (nothing read past them); their number -> n
template <typename T>
inline typename Vec<T>::type unpack_lanes(const T* src, typename Vec<T>::index_type keep, int64_t& n) {
  typename Vec<T>::type out;
#if defined(__AVX512F__)
  __m512i k;
  std::memcpy(&k, &keep, 64);
  if constexpr (sizeof(T) == 4) {
    const __mmask16 m = _mm512_test_epi32_mask(k, k);
    n = __builtin_popcount(m);
    const __m512 v = _mm512_maskz_expand_ps(m, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), src));
    std::memcpy(&out, &v, 64);
  } else {
    const __mmask8 m = _mm512_test_epi64_mask(k, k);
    n = __builtin_popcount(m);
    const __m512d v = _mm512_maskz_expand_pd(m, _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), src));
    std::memcpy(&out, &v, 64);
  }
#else
  n = 0;
  for (int l = 0; l < Vec<T>::lanes; ++l) out[l] = keep[l] ? src[n++] : T(0);
#endif
  return out;
}

// The neighborhood mask of every (key, lane) pair -> w.mask (idle lanes keep every key, so that
// their logits stay finite; their rows are never written), and the rpb (table of this head, or
// null) added to the logits S^T [nk, L] in place
template <typename T>
inline void tile_logits(TileScratch<T>& w, const T* bias) {
  typedef typename Vec<T>::index_type ivec;
  constexpr int L = Vec<T>::lanes;
  const ivec idle = load(w.idle.data()), lane_bias = load(w.lane_bias.data());
  int64_t c = 0;
  for (int64_t u0 = 0; u0 < w.n[0]; ++u0)
    for (int64_t u1 = 0; u1 < w.n[1]; ++u1) {
      const ivec m01 = load(w.window[0] + u0 * L) & load(w.window[1] + u1 * L);
      for (int64_t u2 = 0; u2 < w.n[2]; ++u2, ++c) {
        const ivec m = m01 & load(w.window[2] + u2 * L);
        store(w.mask.data() + c * L, m | idle);
        if (bias) {
          const ivec at = lane_bias + static_cast<typename Vec<T>::index_scalar>(w.kbias[c]);
          store(w.st.data() + c * L, load(w.st.data() + c * L) + masked_gather<T>(bias, at, m & ~idle));
        }
      }
    }
}

// softmax of the masked logits down the keys of every lane: exp(S - max) (zero off the
// neighborhood) in place, 1 / sum -> w.inverse, max + log(sum) -> w.lse
template <typename T>
inline void tile_softmax(TileScratch<T>& w, int64_t nk) {
  typedef typename Vec<T>::type vec;
  typedef typename Vec<T>::index_type ivec;
  constexpr int L = Vec<T>::lanes;
  const vec lowest = vec{} + std::numeric_limits<T>::lowest();
  vec m = lowest, total = vec{};
  for (int64_t c = 0; c < nk; ++c) {
    const vec x = load(w.mask.data() + c * L) ? load(w.st.data() + c * L) : lowest;
    m = m > x ? m : x;
  }
  for (int64_t c = 0; c < nk; ++c) {
    const ivec keep = load(w.mask.data() + c * L);
    const vec e = keep ? vexp<T>(load(w.st.data() + c * L) - m) : vec{};
    store(w.st.data() + c * L, e);
    total += e;
  }
  store(w.inverse.data(), T(1) / total);
  store(w.lse.data(), m + vlog<T>(total));
}

template <typename T>
void tile_forward(const T* q, const T* k, const T* v, const T* rpb, T* out, T* lse, T* probs,
                  const TileGeometry<T>& tg, T scale, int threads) {
  typedef typename Vec<T>::type vec;
  typedef typename Vec<T>::index_type ivec;
  constexpr int L = Vec<T>::lanes;
  const Geometry& g = tg.g;
  const int64_t N = g.tokens(), H = g.H, D = g.D, HD = H * D, panels = tg.panels();
  if (probs)  // room for max_keys keys per query; short (causal) windows leave a tail, zeroed
    std::fill(probs + g.B * H * tg.slice_pairs(), probs + g.B * H * N * g.max_keys, T(0));
#pragma omp parallel num_threads(threads)
  {
    TileScratch<T>& w = tile_scratch(tg, false);
    const int64_t Dp = w.Dp;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < g.B * H * panels; ++task) {
      const int64_t panel = task % panels, h = task / panels % H, b = task / (panels * H), base = b * N * HD + h * D;
      const int64_t np = panel_setup(tg, panel, w);
      gather_rows(k, base, HD, w.ppos.data(), np, D, Dp, T(1), w.kp.data());
      gather_rows(v, base, HD, w.ppos.data(), np, D, Dp, T(1), w.vp.data());
      int64_t a[3];
      for (a[0] = tg.segment_tile[0][w.segment[0]]; a[0] < tg.segment_tile[0][w.segment[0] + 1]; ++a[0])
      for (a[1] = tg.segment_tile[1][w.segment[1]]; a[1] < tg.segment_tile[1][w.segment[1] + 1]; ++a[1])
      for (a[2] = tg.segment_tile[2][w.segment[2]]; a[2] < tg.segment_tile[2][w.segment[2] + 1]; ++a[2]) {
        const int64_t nk = tile_setup(tg, a, w);
        if (D == Dp) {
          transpose_rows<T>([&](int64_t l) { return w.qpos[l] >= 0 ? q + base + w.qpos[l] * HD : nullptr; }, L, L, D,
                            scale, w.qt.data());
        } else {
          gather_rows(q, base, HD, w.qpos.data(), L, D, Dp, scale, w.qr.data());
          transpose_rows(rows_of(w.qr.data(), Dp), L, L, D, T(1), w.qt.data());
        }
        halo_rows(tg, a, w);
        gemm_rows<T>(RowTable<const T>{w.krows.data(), 0}, 1, Strided<const T>{w.qt.data(), L},
                     Strided<T>{w.st.data(), L}, nk, D, L);  // S^T = K Q^T
        tile_logits(w, rpb ? rpb + h * g.R : nullptr);
        tile_softmax(w, nk);
        gemm_rows<T>(Strided<const T>{w.st.data(), 1}, L, RowTable<const T>{w.vrows.data(), 0},
                     Strided<T>{w.rows.data(), Dp}, L, nk, Dp);  // O = exp(S - max) V
        for (int l = 0; l < L; ++l)
          if (w.qpos[l] >= 0) {
            stream_row(w.rows.data() + l * Dp, out + base + w.qpos[l] * HD, D, w.inverse[l]);
            lse[(b * N + w.qpos[l]) * H + h] = w.lse[l];
          }
        if (probs) {  // P^T = exp(S - max) / sum on the tile's pairs, packed key by key
          T* dst = probs + (b * H + h) * tg.slice_pairs() + tg.pair_offset(a);
          const vec inverse = load(w.inverse.data());
          const ivec busy = ~load(w.idle.data());
          for (int64_t c = 0; c < nk; ++c)
            dst += pack_lanes<T>(dst, load(w.st.data() + c * L) * inverse, load(w.mask.data() + c * L) & busy);
        }
      }
    }
    stream_fence();
    w.trim();
  }
}

template <typename T>
void tile_backward(const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* rpb, const T* probs,
                   T* dq, T* dk, T* dv, T* drpb, const TileGeometry<T>& tg, T scale, int threads) {
  typedef typename Vec<T>::type vec;
  typedef typename Vec<T>::index_type ivec;
  constexpr int L = Vec<T>::lanes;
  const Geometry& g = tg.g;
  const int64_t N = g.tokens(), H = g.H, D = g.D, HD = H * D;
#pragma omp parallel num_threads(threads)
  {
    TileScratch<T>& w = tile_scratch(tg, true);
    const int64_t Dp = w.Dp;
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < g.B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H, base = b * N * HD + h * D;
      if (!tg.whole_groups)  // panels overlap: their gradients are added up in dk, dv
        for (int64_t p = 0; p < N; ++p) {
          zero_row(dk + base + p * HD, D);
          zero_row(dv + base + p * HD, D);
        }
      const T* bias = rpb ? rpb + h * g.R : nullptr;
      T* dbias = drpb ? drpb + bh * g.R : nullptr;
      for (int64_t panel = 0; panel < tg.panels(); ++panel) {
        const int64_t np = panel_setup(tg, panel, w);
        gather_rows(k, base, HD, w.ppos.data(), np, D, Dp, T(1), w.kp.data());
        gather_rows(v, base, HD, w.ppos.data(), np, D, Dp, T(1), w.vp.data());
        std::fill(w.dkp.begin(), w.dkp.begin() + np * Dp, T(0));
        std::fill(w.dvp.begin(), w.dvp.begin() + np * Dp, T(0));
        int64_t a[3];
        for (a[0] = tg.segment_tile[0][w.segment[0]]; a[0] < tg.segment_tile[0][w.segment[0] + 1]; ++a[0])
        for (a[1] = tg.segment_tile[1][w.segment[1]]; a[1] < tg.segment_tile[1][w.segment[1] + 1]; ++a[1])
        for (a[2] = tg.segment_tile[2][w.segment[2]]; a[2] < tg.segment_tile[2][w.segment[2] + 1]; ++a[2]) {
          const int64_t nk = tile_setup(tg, a, w);
          gather_rows(q, base, HD, w.qpos.data(), L, D, Dp, scale, w.qr.data());
          gather_rows(dout, base, HD, w.qpos.data(), L, D, Dp, T(1), w.dor.data());
          transpose_rows(rows_of(w.dor.data(), Dp), L, L, D, T(1), w.dot.data());
          halo_rows(tg, a, w);
          if (probs) {  // P^T saved by the forward
            tile_logits(w, static_cast<const T*>(nullptr));  // the mask only
            const T* src = probs + bh * tg.slice_pairs() + tg.pair_offset(a);
            const ivec busy = ~load(w.idle.data());
            for (int64_t c = 0, n = 0; c < nk; ++c, src += n)
              store(w.st.data() + c * L, unpack_lanes<T>(src, load(w.mask.data() + c * L) & busy, n));
          } else {  // recomputed from S^T = K Q^T and the lse
            transpose_rows(rows_of(w.qr.data(), Dp), L, L, D, T(1), w.qt.data());
            for (int l = 0; l < L; ++l) w.lse[l] = w.qpos[l] >= 0 ? lse[(b * N + w.qpos[l]) * H + h] : T(0);
            gemm_rows<T>(RowTable<const T>{w.krows.data(), 0}, 1, Strided<const T>{w.qt.data(), L},
                         Strided<T>{w.st.data(), L}, nk, D, L);
            tile_logits(w, bias);
            const vec row_lse = load(w.lse.data());
            for (int64_t c = 0; c < nk; ++c) {  // P^T, zero off the neighborhood
              const vec p = vexp<T>(load(w.st.data() + c * L) - row_lse);
              store(w.st.data() + c * L, load(w.mask.data() + c * L) ? p : vec{});
            }
          }
          gemm_rows<T>(RowTable<const T>{w.vrows.data(), 0}, 1, Strided<const T>{w.dot.data(), L},
                       Strided<T>{w.dst.data(), L}, nk, D, L);  // dP^T = V dO^T
          softmax_gradient<T, 1>(w.st.data(), L, w.dst.data(), nk, L, nullptr);  // dS^T
          if (dbias)
            for (int64_t c = 0; c < nk; ++c)
              for (int l = 0; l < L; ++l)
                if (w.qpos[l] >= 0 && w.mask[c * L + l]) dbias[w.lane_bias[l] + w.kbias[c]] += w.dst[c * L + l];
          gemm_rows<T>(Strided<const T>{w.dst.data(), 1}, L, RowTable<const T>{w.krows.data(), 0},
                       Strided<T>{w.rows.data(), Dp}, L, nk, Dp);  // dQ = dS K
          for (int l = 0; l < L; ++l)
            if (w.qpos[l] >= 0) stream_row(w.rows.data() + l * Dp, dq + base + w.qpos[l] * HD, D, scale);
          gemm_rows<T, true>(Strided<const T>{w.dst.data(), L}, 1, Strided<const T>{w.qr.data(), Dp},
                             RowTable<T>{w.dkrows.data(), 0}, nk, L, Dp);  // dK += dS^T (scale Q)
          gemm_rows<T, true>(Strided<const T>{w.st.data(), L}, 1, Strided<const T>{w.dor.data(), Dp},
                             RowTable<T>{w.dvrows.data(), 0}, nk, L, Dp);  // dV += P^T dO
        }
        for (int64_t c = 0; c < np; ++c) {
          if (tg.whole_groups) {  // the only panel with these keys
            stream_row(w.dkp.data() + c * Dp, dk + base + w.ppos[c] * HD, D, T(1));
            stream_row(w.dvp.data() + c * Dp, dv + base + w.ppos[c] * HD, D, T(1));
          } else {
            add_row(w.dkp.data() + c * Dp, dk + base + w.ppos[c] * HD, D);
            add_row(w.dvp.data() + c * Dp, dv + base + w.ppos[c] * HD, D);
          }
        }
      }
    }
    stream_fence();
    w.trim();
  }
}

// Panels of whole dilation groups (each key gathered once; in the backward, its gradient written
// once) where a thread's panel arrays (two in the forward, four in the backward) fit in kPanelBytes
// and, in the forward, its (b, h, panel) tasks share out evenly among the threads or number at least
// kTasksPerThread per thread (the backward's tasks are (b, h) either way); else panels of one row of
// tiles, whose halos overlap their neighbours' (a 3D key is then gathered about six times).
constexpr int64_t kPanelBytes = 4 << 20;
constexpr int64_t kTasksPerThread = 4;

template <typename T>
TileGeometry<T> panel_geometry(const int64_t* geom, const int64_t* tables, const int64_t* tile, int arrays,
                               int threads) {
  const Geometry g(geom, tables);
  int64_t keys = 1, panels = 1;  // of whole-group panels: the longest group's keys, the groups
  for (int i = 0; i < 3; ++i) {
    keys *= (g.L[i] + g.dil[i] - 1) / g.dil[i];
    panels *= std::min(g.dil[i], g.L[i]);
  }
  const int64_t Dp = (g.D + Vec<T>::lanes - 1) / Vec<T>::lanes * Vec<T>::lanes;
  const int64_t tasks = g.B * g.H * (arrays == 2 ? panels : 1);
  const bool whole = arrays * keys * Dp * int64_t(sizeof(T)) <= kPanelBytes &&
                     (arrays == 4 || tasks >= kTasksPerThread * threads || (tasks >= threads && tasks % threads == 0));
  return TileGeometry<T>(geom, tables, tile, whole);
}

}  // namespace

extern "C" {

int vz_abi_version() { return 6; }

int64_t vz_block_bias_chunks() { return kBiasChunks; }

void vz_block_forward_f32(const float* q, const float* k, const float* v, const float* bias, float* out,
                          float* lse, float* probs, const int64_t* geom, const int64_t* tables, double scale,
                          int threads) {
  block_forward<float>(q, k, v, bias, out, lse, probs, BlockGeometry(geom, tables, Vec<float>::lanes), float(scale),
                       threads);
}

void vz_block_forward_f64(const double* q, const double* k, const double* v, const double* bias, double* out,
                          double* lse, double* probs, const int64_t* geom, const int64_t* tables, double scale,
                          int threads) {
  block_forward<double>(q, k, v, bias, out, lse, probs, BlockGeometry(geom, tables, Vec<double>::lanes), scale,
                        threads);
}

void vz_block_backward_f32(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                           const float* bias, const float* probs, float* dq, float* dk, float* dv, float* dbias,
                           const int64_t* geom, const int64_t* tables, double scale, int threads) {
  block_backward<float>(q, k, v, dout, lse, bias, probs, dq, dk, dv, dbias,
                        BlockGeometry(geom, tables, Vec<float>::lanes), float(scale), threads);
}

void vz_block_backward_f64(const double* q, const double* k, const double* v, const double* dout, const double* lse,
                           const double* bias, const double* probs, double* dq, double* dk, double* dv, double* dbias,
                           const int64_t* geom, const int64_t* tables, double scale, int threads) {
  block_backward<double>(q, k, v, dout, lse, bias, probs, dq, dk, dv, dbias,
                         BlockGeometry(geom, tables, Vec<double>::lanes), scale, threads);
}

void vz_na_forward_f32(const float* q, const float* k, const float* v, const float* rpb, float* out, float* lse,
                       float* probs, const int64_t* geom, const int64_t* tables, const int64_t* tile, double scale,
                       int threads) {
  tile_forward<float>(q, k, v, rpb, out, lse, probs, panel_geometry<float>(geom, tables, tile, 2, threads), float(scale),
                      threads);
}

void vz_na_forward_f64(const double* q, const double* k, const double* v, const double* rpb, double* out,
                       double* lse, double* probs, const int64_t* geom, const int64_t* tables, const int64_t* tile,
                       double scale, int threads) {
  tile_forward<double>(q, k, v, rpb, out, lse, probs, panel_geometry<double>(geom, tables, tile, 2, threads), scale,
                       threads);
}

void vz_na_backward_f32(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                        const float* rpb, const float* probs, float* dq, float* dk, float* dv, float* drpb,
                        const int64_t* geom, const int64_t* tables, const int64_t* tile, double scale, int threads) {
  tile_backward<float>(q, k, v, dout, lse, rpb, probs, dq, dk, dv, drpb, panel_geometry<float>(geom, tables, tile, 4, threads),
                       float(scale), threads);
}

void vz_na_backward_f64(const double* q, const double* k, const double* v, const double* dout, const double* lse,
                        const double* rpb, const double* probs, double* dq, double* dk, double* dv, double* drpb,
                        const int64_t* geom, const int64_t* tables, const int64_t* tile, double scale, int threads) {
  tile_backward<double>(q, k, v, dout, lse, rpb, probs, dq, dk, dv, drpb, panel_geometry<double>(geom, tables, tile, 4, threads), scale,
                        threads);
}

}  // extern "C"
