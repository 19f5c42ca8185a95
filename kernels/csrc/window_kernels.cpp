// Tiled neighborhood attention: the kernels of any window (vz_na_* in capi.cpp).
#include <omp.h>

#include <vector>

#include "gemm.h"
#include "kernels.h"
#include "softmax.h"

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

// dQ = dS K (-> w.rows) and dK += dS^T Q over the tile's pairs in the neighborhood only, for inputs
// with NaN or infinity: the GEMMs also multiply the zero dS of the halo's other pairs, and 0 * NaN or
// 0 * inf would carry a bad key (query) into the gradient of queries (keys) whose windows do not
// hold it, which the reference leaves finite
template <typename T>
void neighborhood_products(TileScratch<T>& w, int64_t nk) {
  constexpr int L = Vec<T>::lanes;
  const int64_t Dp = w.Dp;
  std::fill(w.rows.begin(), w.rows.begin() + L * Dp, T(0));
  for (int64_t c = 0; c < nk; ++c)
    for (int l = 0; l < L; ++l)
      if (w.qpos[l] >= 0 && w.mask[c * L + l]) {
        const T ds = w.dst[c * L + l];
        for (int64_t d = 0; d < Dp; ++d) {
          w.rows[l * Dp + d] += ds * w.krows[c][d];
          w.dkrows[c][d] += ds * w.qr[l * Dp + d];
        }
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
        const bool keys_finite = all_finite(w.kp.data(), np * Dp);  // else see neighborhood_products
        std::fill(w.dkp.begin(), w.dkp.begin() + np * Dp, T(0));
        std::fill(w.dvp.begin(), w.dvp.begin() + np * Dp, T(0));
        int64_t a[3];
        for (a[0] = tg.segment_tile[0][w.segment[0]]; a[0] < tg.segment_tile[0][w.segment[0] + 1]; ++a[0])
        for (a[1] = tg.segment_tile[1][w.segment[1]]; a[1] < tg.segment_tile[1][w.segment[1] + 1]; ++a[1])
        for (a[2] = tg.segment_tile[2][w.segment[2]]; a[2] < tg.segment_tile[2][w.segment[2] + 1]; ++a[2]) {
          const int64_t nk = tile_setup(tg, a, w);
          gather_rows(q, base, HD, w.qpos.data(), L, D, Dp, scale, w.qr.data());
          gather_rows(dout, base, HD, w.qpos.data(), L, D, Dp, T(1), w.dor.data());
          const bool finite = keys_finite && all_finite(w.qr.data(), L * Dp);
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
          const ivec busy = ~load(w.idle.data());
          for (int64_t c = 0; c < nk; ++c)  // exactly 0 off the neighborhood, whatever P (dP - delta) gave
            store(w.dst.data() + c * L, (load(w.mask.data() + c * L) & busy) ? load(w.dst.data() + c * L) : vec{});
          if (dbias)
            for (int64_t c = 0; c < nk; ++c)
              for (int l = 0; l < L; ++l)
                if (w.qpos[l] >= 0 && w.mask[c * L + l]) dbias[w.lane_bias[l] + w.kbias[c]] += w.dst[c * L + l];
          if (finite)
            gemm_rows<T>(Strided<const T>{w.dst.data(), 1}, L, RowTable<const T>{w.krows.data(), 0},
                         Strided<T>{w.rows.data(), Dp}, L, nk, Dp);  // dQ = dS K
          else
            neighborhood_products(w, nk);  // dQ, and dK added to
          for (int l = 0; l < L; ++l)
            if (w.qpos[l] >= 0) stream_row(w.rows.data() + l * Dp, dq + base + w.qpos[l] * HD, D, scale);
          if (finite)
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

namespace vz {

template <typename T>
void window_forward(const T* q, const T* k, const T* v, const T* rpb, T* out, T* lse, T* probs, const int64_t* geom,
                    const int64_t* tables, const int64_t* tile, T scale, int threads) {
  tile_forward<T>(q, k, v, rpb, out, lse, probs, panel_geometry<T>(geom, tables, tile, 2, threads), scale, threads);
}

template <typename T>
void window_backward(const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* rpb, const T* probs,
                     T* dq, T* dk, T* dv, T* drpb, const int64_t* geom, const int64_t* tables, const int64_t* tile,
                     T scale, int threads) {
  tile_backward<T>(q, k, v, dout, lse, rpb, probs, dq, dk, dv, drpb, panel_geometry<T>(geom, tables, tile, 4, threads),
                   scale, threads);
}

template void window_forward<float>(const float*, const float*, const float*, const float*, float*, float*, float*,
                                    const int64_t*, const int64_t*, const int64_t*, float, int);
template void window_forward<double>(const double*, const double*, const double*, const double*, double*, double*,
                                     double*, const int64_t*, const int64_t*, const int64_t*, double, int);
template void window_backward<float>(const float*, const float*, const float*, const float*, const float*,
                                     const float*, const float*, float*, float*, float*, float*, const int64_t*,
                                     const int64_t*, const int64_t*, float, int);
template void window_backward<double>(const double*, const double*, const double*, const double*, const double*,
                                      const double*, const double*, double*, double*, double*, double*,
                                      const int64_t*, const int64_t*, const int64_t*, double, int);

}  // namespace vz
