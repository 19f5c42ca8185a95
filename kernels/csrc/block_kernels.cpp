// Blocked attention: the kernels of blocked.py (vz_block_* in capi.cpp).
#include <omp.h>

#include <vector>

#include "gemm.h"
#include "kernels.h"
#include "softmax.h"

namespace {

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

// P^T = E^T [K, Kp] (rows Kp apart) times inverse (per query), packed into K * K contiguous elements
// (zeros after them up to KKp) and streamed to dst as whole aligned vectors, each assembled from at
// most two rows with masked loads; returns false (nothing written) where that does not apply
// (K < L, dst not aligned)
template <typename T>
inline bool stream_probabilities(const T* e, const T* inverse, int64_t K, int64_t Kp, int64_t KKp, T* dst) {
  typedef typename Vec<T>::type vec;
  constexpr int L = Vec<T>::lanes;
  if (K < L || reinterpret_cast<uintptr_t>(dst) % kVectorBytes != 0 || KKp % L != 0) return false;
  int64_t c = 0, r = 0;  // row and column of the vector's first element
  for (int64_t o = 0; o < KKp; o += L) {
    vec x = vec{};
    if (c < K) {
      const int n = static_cast<int>(std::min<int64_t>(L, K - r));
      x = load_lanes(e + c * Kp + r, 0, n) * load_lanes(inverse + r, 0, n);
      if (n < L && c + 1 < K)  // the rest from the start of row c + 1
        x += load_lanes(e + (c + 1) * Kp - n, n, L) * load_lanes(inverse - n, n, L);
    }
    stream_store(dst + o, x);
    r += L;
    if (r >= K) r -= K, ++c;
  }
  return true;
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

}  // namespace

namespace vz {

int64_t block_bias_chunks() { return kBiasChunks; }

template <typename T>
void block_forward(const T* q, const T* k, const T* v, const T* bias, T* out, T* lse, T* probs, const int64_t* geom,
                   const int64_t* tables, T scale, int threads) {
  ::block_forward<T>(q, k, v, bias, out, lse, probs, BlockGeometry(geom, tables, Vec<T>::lanes), scale, threads);
}

template <typename T>
void block_backward(const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* bias, const T* probs,
                    T* dq, T* dk, T* dv, T* dbias, const int64_t* geom, const int64_t* tables, T scale, int threads) {
  ::block_backward<T>(q, k, v, dout, lse, bias, probs, dq, dk, dv, dbias, BlockGeometry(geom, tables, Vec<T>::lanes),
                      scale, threads);
}

template void block_forward<float>(const float*, const float*, const float*, const float*, float*, float*, float*,
                                   const int64_t*, const int64_t*, float, int);
template void block_forward<double>(const double*, const double*, const double*, const double*, double*, double*,
                                    double*, const int64_t*, const int64_t*, double, int);
template void block_backward<float>(const float*, const float*, const float*, const float*, const float*,
                                    const float*, const float*, float*, float*, float*, float*, const int64_t*,
                                    const int64_t*, float, int);
template void block_backward<double>(const double*, const double*, const double*, const double*, const double*,
                                     const double*, const double*, double*, double*, double*, double*,
                                     const int64_t*, const int64_t*, double, int);

}  // namespace vz
