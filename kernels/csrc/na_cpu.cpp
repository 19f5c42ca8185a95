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
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

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

  // Element offsets (relative to the (b, h) base) of the keys of query (x0, x1, x2), and their rpb
  // indices. Returns the number of keys.
  int64_t neighbors(int64_t x0, int64_t x1, int64_t x2, int64_t* key_offset, int64_t* rpb_index) const {
    const int64_t row = H * D;
    int64_t count = 0;
    const int64_t f0 = kfirst[0][x0], c0 = kcount[0][x0], r0 = rfirst[0][x0];
    const int64_t f1 = kfirst[1][x1], c1 = kcount[1][x1], r1 = rfirst[1][x1];
    const int64_t f2 = kfirst[2][x2], c2 = kcount[2][x2], r2 = rfirst[2][x2];
    for (int64_t j0 = 0; j0 < c0; ++j0) {
      const int64_t p0 = f0 + j0 * dil[0];
      const int64_t i0 = (r0 + j0) * rs[0];
      for (int64_t j1 = 0; j1 < c1; ++j1) {
        const int64_t p01 = (p0 * L[1] + f1 + j1 * dil[1]) * L[2];
        const int64_t i01 = i0 + (r1 + j1) * rs[1];
        for (int64_t j2 = 0; j2 < c2; ++j2) {
          key_offset[count] = (p01 + f2 + j2 * dil[2]) * row;
          rpb_index[count] = i01 + (r2 + j2) * rs[2];
          ++count;
        }
      }
    }
    return count;
  }
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

// head dims that are a whole number of vectors take the vector path; others the scalar loops
template <typename T, int DH>
constexpr bool vectorized() {
  return DH > 0 && DH % Vec<T>::lanes == 0;
}

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

template <typename T, int DH>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t dim) {
  if constexpr (vectorized<T, DH>()) {
    constexpr int L = Vec<T>::lanes;
    typename Vec<T>::type acc = load(a) * load(b);
    for (int i = 1; i < DH / L; ++i) acc += load(a + i * L) * load(b + i * L);
    T sum = 0;
    for (int i = 0; i < L; ++i) sum += acc[i];
    return sum;
  } else {
    T sum = 0;
    for (int64_t d = 0; d < dim; ++d) sum += a[d] * b[d];
    return sum;
  }
}

// Lanes of the two-vector shuffles that fold 2h-lane segments: x takes the first h lanes of each
// segment from a and b, y the last h; x + y halves every vector's partial sums.
template <typename T>
struct FoldMasks {
  typedef typename Vec<T>::index_scalar index;
  static constexpr int L = Vec<T>::lanes;
  index x[4][16], y[4][16], bit_reverse[16];  // x[level] folds segments of 2h lanes, h = 2^level
  constexpr FoldMasks() : x{}, y{}, bit_reverse{} {
    for (int level = 0; (1 << level) < L; ++level) {
      const int h = 1 << level;
      for (int j = 0; j < L; ++j) {
        const int o = j - j % (2 * h), i = j % (2 * h);
        x[level][j] = i < h ? o + i : L + o + i - h;
        y[level][j] = i < h ? o + h + i : L + o + i;
      }
    }
    int bits = 0;
    while ((1 << bits) < L) ++bits;
    for (int j = 0; j < L; ++j) {
      int r = 0;
      for (int b = 0; b < bits; ++b) r |= ((j >> b) & 1) << (bits - 1 - b);
      bit_reverse[j] = r;
    }
  }
};

template <typename T>
inline typename Vec<T>::index_type mask_vector(const typename Vec<T>::index_scalar* lanes) {
  typename Vec<T>::index_type m;
  std::memcpy(&m, lanes, sizeof(m));
  return m;
}

// Lane j of the result is the sum of the lanes of part[j] (j < lanes): a fold tree of two-vector
// shuffles, 2 shuffles and one add per vector instead of a horizontal reduction per vector. x takes
// the first h lanes of every 2h-lane segment from a and b, y the last h, so x + y halves the partial
// sums of both; after the folds lane j holds vector bit_reverse(j), which one permute puts right.
template <typename T>
inline typename Vec<T>::type transpose_sum(typename Vec<T>::type* part) {
  typedef typename Vec<T>::type vec;
  constexpr int L = Vec<T>::lanes;
  static constexpr FoldMasks<T> masks;
  int top = 0;
  while ((2 << top) < L) ++top;  // the first fold has h = L / 2
  int n = L;
  for (int level = top; level >= 0; --level, n /= 2) {
    const auto mx = mask_vector<T>(masks.x[level]), my = mask_vector<T>(masks.y[level]);
    for (int i = 0; i < n / 2; ++i) {
      const vec a = part[2 * i], b = part[2 * i + 1];
      part[i] = __builtin_shuffle(a, b, mx) + __builtin_shuffle(a, b, my);
    }
  }
  return __builtin_shuffle(part[0], mask_vector<T>(masks.bit_reverse));
}

// out[c] = scale * <a, rows[offset[c] :]> for c < count; out has room for count rounded up to lanes
template <typename T, int DH>
inline void dots(const T* __restrict a, const int64_t* __restrict offset, int64_t count, const T* __restrict rows,
                 T scale, T* __restrict out, int64_t dim) {
  if constexpr (vectorized<T, DH>()) {
    typedef typename Vec<T>::type vec;
    constexpr int L = Vec<T>::lanes;
    vec av[DH / L];
    for (int i = 0; i < DH / L; ++i) av[i] = load(a + i * L);
    for (int64_t c0 = 0; c0 < count; c0 += L) {
      vec part[L];
      const int64_t n = std::min<int64_t>(L, count - c0);
      for (int j = 0; j < L; ++j) {
        if (j < n) {
          const T* row = rows + offset[c0 + j];
          vec acc = av[0] * load(row);
          for (int i = 1; i < DH / L; ++i) acc += av[i] * load(row + i * L);
          part[j] = acc;
        } else {
          part[j] = vec{};
        }
      }
      store(out + c0, transpose_sum<T>(part) * scale);
    }
  } else {
    for (int64_t c = 0; c < count; ++c) out[c] = dot<T, DH>(a, rows + offset[c], dim) * scale;
  }
}

// y += alpha * x
template <typename T, int DH>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t dim) {
  if constexpr (vectorized<T, DH>()) {
    constexpr int L = Vec<T>::lanes;
    for (int i = 0; i < DH / L; ++i) store(y + i * L, load(y + i * L) + alpha * load(x + i * L));
  } else {
    for (int64_t d = 0; d < dim; ++d) y[d] += alpha * x[d];
  }
}

// dst = factor * sum_c weight[c] * rows[offset[c] : offset[c] + dim], accumulated in registers
template <typename T, int DH>
inline void weighted_sum(const T* __restrict weight, const int64_t* __restrict offset, int64_t count,
                         const T* __restrict rows, T factor, T* __restrict dst, int64_t dim) {
  if constexpr (vectorized<T, DH>()) {
    constexpr int L = Vec<T>::lanes;
    typename Vec<T>::type acc[DH / L] = {};
    for (int64_t c = 0; c < count; ++c) {
      const T* row = rows + offset[c];
      const T w = weight[c];
      for (int i = 0; i < DH / L; ++i) acc[i] += w * load(row + i * L);
    }
    for (int i = 0; i < DH / L; ++i) store(dst + i * L, acc[i] * factor);
  } else {
    for (int64_t d = 0; d < dim; ++d) dst[d] = 0;
    for (int64_t c = 0; c < count; ++c) axpy<T, DH>(weight[c], rows + offset[c], dst, dim);
    for (int64_t d = 0; d < dim; ++d) dst[d] *= factor;
  }
}

template <typename T, int DH>
void forward(const T* q, const T* k, const T* v, const T* rpb, T* out, T* lse, const Geometry& g, T scale,
             int threads) {
  const int64_t N = g.tokens(), H = g.H, D = g.D;
#pragma omp parallel num_threads(threads)
  {
    std::vector<int64_t> key_offset(g.max_keys), rpb_index(g.max_keys);
    std::vector<T> score(g.max_keys + Vec<T>::lanes);
#pragma omp for collapse(3) schedule(static)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t x0 = 0; x0 < g.L[0]; ++x0) {
          const int64_t base = b * N * H * D + h * D;
          const T* kb = k + base;
          const T* vb = v + base;
          const T* bias = g.has_rpb ? rpb + h * g.R : nullptr;
          for (int64_t x1 = 0; x1 < g.L[1]; ++x1)
            for (int64_t x2 = 0; x2 < g.L[2]; ++x2) {
              const int64_t pos = (x0 * g.L[1] + x1) * g.L[2] + x2;
              const T* qp = q + base + pos * H * D;
              const int64_t count = g.neighbors(x0, x1, x2, key_offset.data(), rpb_index.data());
              T* s = score.data();
              dots<T, DH>(qp, key_offset.data(), count, kb, scale, s, D);
              if (bias)
                for (int64_t c = 0; c < count; ++c) s[c] += bias[rpb_index[c]];
              T smax = s[0];
              for (int64_t c = 1; c < count; ++c) smax = std::max(smax, s[c]);
              T total = 0;
#pragma omp simd reduction(+ : total)
              for (int64_t c = 0; c < count; ++c) {
                s[c] = std::exp(s[c] - smax);
                total += s[c];
              }
              weighted_sum<T, DH>(s, key_offset.data(), count, vb, T(1) / total, out + base + pos * H * D, D);
              lse[(b * N + pos) * H + h] = smax + std::log(total);
            }
        }
  }
}

template <typename T, int DH>
void backward(const T* q, const T* k, const T* v, const T* out, const T* dout, const T* lse, const T* rpb, T* dq,
              T* dk, T* dv, T* drpb, const Geometry& g, T scale, int threads) {
  const int64_t N = g.tokens(), H = g.H, D = g.D;
  // one (b, h) slice per task: every key a task scatters into belongs to its own slice
#pragma omp parallel num_threads(threads)
  {
    std::vector<int64_t> key_offset(g.max_keys), rpb_index(g.max_keys);
    std::vector<T> prob(g.max_keys + Vec<T>::lanes), dscore(g.max_keys + Vec<T>::lanes);
    std::vector<T> qs(D);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t base = b * N * H * D + h * D;
        const T* kb = k + base;
        const T* vb = v + base;
        T* dkb = dk + base;
        T* dvb = dv + base;
        const T* bias = g.has_rpb ? rpb + h * g.R : nullptr;
        T* dbias = g.has_rpb ? drpb + (b * H + h) * g.R : nullptr;
        for (int64_t x0 = 0; x0 < g.L[0]; ++x0)
          for (int64_t x1 = 0; x1 < g.L[1]; ++x1)
            for (int64_t x2 = 0; x2 < g.L[2]; ++x2) {
              const int64_t pos = (x0 * g.L[1] + x1) * g.L[2] + x2;
              const int64_t at = base + pos * H * D;
              const T* qp = q + at;
              const T* dop = dout + at;
              const T row_lse = lse[(b * N + pos) * H + h];
              const T delta = dot<T, DH>(dop, out + at, D);
              const int64_t count = g.neighbors(x0, x1, x2, key_offset.data(), rpb_index.data());
              T* p = prob.data();
              T* ds = dscore.data();
              dots<T, DH>(qp, key_offset.data(), count, kb, scale, p, D);
              if (bias)
                for (int64_t c = 0; c < count; ++c) p[c] += bias[rpb_index[c]];
#pragma omp simd
              for (int64_t c = 0; c < count; ++c) p[c] = std::exp(p[c] - row_lse);
              dots<T, DH>(dop, key_offset.data(), count, vb, T(1), ds, D);
              for (int64_t c = 0; c < count; ++c) ds[c] = p[c] * (ds[c] - delta);
              weighted_sum<T, DH>(ds, key_offset.data(), count, kb, scale, dq + at, D);
              for (int64_t d = 0; d < D; ++d) qs[d] = qp[d] * scale;
              for (int64_t c = 0; c < count; ++c) {
                const int64_t o = key_offset[c];
                axpy<T, DH>(ds[c], qs.data(), dkb + o, D);
                axpy<T, DH>(p[c], dop, dvb + o, D);
              }
              if (dbias)
                for (int64_t c = 0; c < count; ++c) dbias[rpb_index[c]] += ds[c];
            }
      }
  }
}

template <typename T>
void forward_dispatch(const T* q, const T* k, const T* v, const T* rpb, T* out, T* lse, const int64_t* geom,
                      const int64_t* tables, double scale, int threads) {
  const Geometry g(geom, tables);
  switch (g.D) {
    case 16: return forward<T, 16>(q, k, v, rpb, out, lse, g, T(scale), threads);
    case 32: return forward<T, 32>(q, k, v, rpb, out, lse, g, T(scale), threads);
    case 64: return forward<T, 64>(q, k, v, rpb, out, lse, g, T(scale), threads);
    case 128: return forward<T, 128>(q, k, v, rpb, out, lse, g, T(scale), threads);
    default: return forward<T, 0>(q, k, v, rpb, out, lse, g, T(scale), threads);
  }
}

template <typename T>
void backward_dispatch(const T* q, const T* k, const T* v, const T* out, const T* dout, const T* lse, const T* rpb,
                       T* dq, T* dk, T* dv, T* drpb, const int64_t* geom, const int64_t* tables, double scale,
                       int threads) {
  const Geometry g(geom, tables);
  switch (g.D) {
    case 16: return backward<T, 16>(q, k, v, out, dout, lse, rpb, dq, dk, dv, drpb, g, T(scale), threads);
    case 32: return backward<T, 32>(q, k, v, out, dout, lse, rpb, dq, dk, dv, drpb, g, T(scale), threads);
    case 64: return backward<T, 64>(q, k, v, out, dout, lse, rpb, dq, dk, dv, drpb, g, T(scale), threads);
    case 128: return backward<T, 128>(q, k, v, out, dout, lse, rpb, dq, dk, dv, drpb, g, T(scale), threads);
    default: return backward<T, 0>(q, k, v, out, dout, lse, rpb, dq, dk, dv, drpb, g, T(scale), threads);
  }
}

}  // namespace

extern "C" {

int vz_abi_version() { return 1; }

void vz_na_forward_f32(const float* q, const float* k, const float* v, const float* rpb, float* out, float* lse,
                       const int64_t* geom, const int64_t* tables, double scale, int threads) {
  forward_dispatch<float>(q, k, v, rpb, out, lse, geom, tables, scale, threads);
}

void vz_na_forward_f64(const double* q, const double* k, const double* v, const double* rpb, double* out,
                       double* lse, const int64_t* geom, const int64_t* tables, double scale, int threads) {
  forward_dispatch<double>(q, k, v, rpb, out, lse, geom, tables, scale, threads);
}

void vz_na_backward_f32(const float* q, const float* k, const float* v, const float* out, const float* dout,
                        const float* lse, const float* rpb, float* dq, float* dk, float* dv, float* drpb,
                        const int64_t* geom, const int64_t* tables, double scale, int threads) {
  backward_dispatch<float>(q, k, v, out, dout, lse, rpb, dq, dk, dv, drpb, geom, tables, scale, threads);
}

void vz_na_backward_f64(const double* q, const double* k, const double* v, const double* out, const double* dout,
                        const double* lse, const double* rpb, double* dq, double* dk, double* dv, double* drpb,
                        const int64_t* geom, const int64_t* tables, double scale, int threads) {
  backward_dispatch<double>(q, k, v, out, dout, lse, rpb, dq, dk, dv, drpb, geom, tables, scale, threads);
}

}  // extern "C"
