// Training-mode BatchNorm with its activation, forward and backward (vz_batch_norm_act_* in capi.cpp), on
// a [rows, channels] row-major array: a channels-last NCHW map (rows = N * H * W) or a [N, C] batch.
//
//   forward:  mean, var = the biased batch statistics per channel (two passes: the mean, then the
//             centred squares, so no cancellation); invstd = 1 / sqrt(var + eps);
//             y = act(x * scale + shift [+ residual]), scale = weight * invstd, shift = bias - mean * scale
//             (the residual: a bottleneck block's shortcut, added before its ReLU)
//   backward: g = dy (act = identity) or 0 where y <= 0 (ReLU, the mask of ATen's threshold_backward);
//             dresidual = g;
//             one pass for sum(g) and sum(g * (x - mean)), one for
//             dx = (g - mean(g)) * scale - (x - mean) * scale * invstd^2 * mean(g * (x - mean)),
//             dweight = sum(g * (x - mean)) * invstd, dbias = sum(g)
//
// ATen's BatchNorm then ReLU take a pass more each way, and their backward a full-size gradient more
// between the two. The output of each direction is a fresh full-size array, placed on huge pages
// when it is large (advise_huge_pages: the page faults of a new 32 MiB mapping otherwise cost
// several passes over it).
//
// The flat array is walked in periods of lcm(channels, vector lanes) values (48 for 24 float
// channels on AVX-512), so every vector holds whole lanes of known channels and no row has a
// scalar tail; per-channel parameters are replicated over one period. Where that period would be
// long (more than kMaxPeriod values) it is one row, with a scalar tail. Sums run per thread over
// contiguous ranges of periods: vectors of the element type over about kRowBlock rows, added into
// double per-channel totals, and the thread totals added in thread order (the result does not depend
// on timing). Elementwise passes split the periods among the threads.
#include <omp.h>
#include <sys/mman.h>

#include <numeric>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

constexpr int64_t kRowBlock = 64;     // rows summed in the element type before a double accumulation
constexpr int64_t kMaxPeriod = 4096;  // values

template <typename T>
struct Layout {
  int64_t rows, channels, period, periods, tail_begin, n;
  int64_t vector_end;  // within a period: values below run as vectors, the rest as scalars

  Layout(int64_t rows_, int64_t channels_) : rows(rows_), channels(channels_) {
    constexpr int64_t L = Vec<T>::lanes;
    const int64_t lcm = std::lcm(channels, L);
    period = lcm <= std::max(kMaxPeriod, channels) ? lcm : channels;
    n = rows * channels;
    periods = n / period;
    tail_begin = periods * period;
    vector_end = period - period % L;
  }

  // values[c] repeated over one period
  std::vector<T> replicate(const T* values) const {
    std::vector<T> out(period);
    for (int64_t k = 0; k < period; ++k) out[k] = values[k % channels];
    return out;
  }
};

// [begin, end) of `count` items split in `parts`
inline void split(int64_t count, int parts, int part, int64_t& begin, int64_t& end) {
  const int64_t base = count / parts, extra = count % parts;
  begin = part * base + std::min<int64_t>(part, extra);
  end = begin + base + (part < extra ? 1 : 0);
}

// K per-channel sums over the whole array, in parallel. body_vec(i, k, acc) adds the vector terms of
// flat index i (period offset k) into acc[0..K) (vectors of the block); body_scalar(i, c, acc) adds
// the scalar terms of flat index i (channel c) into acc[0..K) (doubles). out[j][c] gets the totals.
template <typename T, int K, typename BodyVec, typename BodyScalar>
void channel_sums(const Layout<T>& lay, int threads, double* const* out, BodyVec body_vec, BodyScalar body_scalar) {
  typedef typename Vec<T>::type vec;
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t C = lay.channels, P = lay.period;
  const int64_t block_periods = std::max<int64_t>(1, kRowBlock * C / P);
  std::vector<double> partial(size_t(threads) * K * C, 0.0);
#pragma omp parallel num_threads(threads) if (threads > 1 && lay.n >= (int64_t(1) << 15))
  {
    const int parts = omp_get_num_threads(), part = omp_get_thread_num();
    double* totals = partial.data() + size_t(part) * K * C;
    int64_t begin, end;
    split(lay.periods, parts, part, begin, end);
    std::vector<T> block(static_cast<size_t>(K) * P);
    for (int64_t p0 = begin; p0 < end; p0 += block_periods) {
      const int64_t p1 = std::min(end, p0 + block_periods);
      std::fill(block.begin(), block.end(), T(0));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t base = p * P;
        for (int64_t k = 0; k < lay.vector_end; k += L) {
          vec acc[K];
          for (int j = 0; j < K; ++j) acc[j] = load(block.data() + j * P + k);
          body_vec(base + k, k, acc);
          for (int j = 0; j < K; ++j) store(block.data() + j * P + k, acc[j]);
        }
        for (int64_t k = lay.vector_end; k < P; ++k) {
          double acc[K] = {};
          body_scalar(base + k, k % C, acc);
          for (int j = 0; j < K; ++j) block[j * P + k] += T(acc[j]);
        }
      }
      for (int j = 0; j < K; ++j)
        for (int64_t k = 0; k < P; ++k) totals[j * C + k % C] += double(block[j * P + k]);
    }
    if (part == parts - 1) {  // rows after the last whole period
      for (int64_t i = lay.tail_begin; i < lay.n; ++i) {
        double acc[K] = {};
        body_scalar(i, i % C, acc);
        for (int j = 0; j < K; ++j) totals[j * C + i % C] += acc[j];
      }
    }
  }
  for (int j = 0; j < K; ++j) {
    for (int64_t c = 0; c < C; ++c) out[j][c] = 0.0;
    for (int t = 0; t < threads; ++t)
      for (int64_t c = 0; c < C; ++c) out[j][c] += partial[(size_t(t) * K + j) * C + c];
  }
}

// Elementwise over the array in parallel: fn_vec(i, k) for the vectors of flat index i (period
// offset k), fn_scalar(i, c) for single values (channel c)
template <typename T, typename FnVec, typename FnScalar>
void for_each(const Layout<T>& lay, int threads, FnVec fn_vec, FnScalar fn_scalar) {
  constexpr int64_t L = Vec<T>::lanes;
  const int64_t P = lay.period, C = lay.channels;
#pragma omp parallel num_threads(threads) if (threads > 1 && lay.n >= (int64_t(1) << 15))
  {
    const int parts = omp_get_num_threads(), part = omp_get_thread_num();
    int64_t begin, end;
    split(lay.periods, parts, part, begin, end);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t base = p * P;
      for (int64_t k = 0; k < lay.vector_end; k += L) fn_vec(base + k, k);
      for (int64_t k = lay.vector_end; k < P; ++k) fn_scalar(base + k, k % C);
    }
    if (part == parts - 1)
      for (int64_t i = lay.tail_begin; i < lay.n; ++i) fn_scalar(i, i % C);
  }
}

}  // namespace

namespace vz {

// Asks for transparent huge pages on a fresh output before its first write: glibc maps every
// allocation of 32 MiB or more anew (its largest mmap threshold), and 4 KiB page faults on 32 MiB cost
// about 12 ms on a Zen 4 core, 2 MiB ones about 2 ms. Only whole 2 MiB pages inside the array, only
// arrays of that size (smaller ones come from the reused heap); a no-op where the OS has no
// transparent huge pages or has them on for every mapping.
void advise_huge_pages(void* data, int64_t bytes) {
  if (bytes < (int64_t(32) << 20)) return;
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + uintptr_t(bytes)) & ~(kHuge - 1);
#ifdef MADV_HUGEPAGE
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

template <typename T>
void batch_norm_act_forward(const T* x, const T* weight, const T* bias, const T* residual, T* y, T* mean, T* var,
                            T* invstd, int64_t rows, int64_t channels, double eps, int act, int threads) {
  typedef typename Vec<T>::type vec;
  const Layout<T> lay(rows, channels);
  advise_huge_pages(y, lay.n * int64_t(sizeof(T)));
  std::vector<double> sums(channels);
  double* out[1] = {sums.data()};
  channel_sums<T, 1>(
      lay, threads, out, [&](int64_t i, int64_t, vec* acc) { acc[0] += load(x + i); },
      [&](int64_t i, int64_t, double* acc) { acc[0] += double(x[i]); });
  for (int64_t c = 0; c < channels; ++c) mean[c] = T(sums[c] / double(rows));
  const std::vector<T> mean_rep = lay.replicate(mean);
  const T* mr = mean_rep.data();
  channel_sums<T, 1>(
      lay, threads, out,
      [&](int64_t i, int64_t k, vec* acc) {
        const vec d = load(x + i) - load(mr + k);
        acc[0] += d * d;
      },
      [&](int64_t i, int64_t c, double* acc) {
        const T d = x[i] - mean[c];
        acc[0] += double(d * d);
      });
  for (int64_t c = 0; c < channels; ++c) {
    const double v = sums[c] / double(rows);
    var[c] = T(v);
    invstd[c] = T(1.0 / std::sqrt(v + eps));
  }
  std::vector<T> scale(channels), shift(channels);
  for (int64_t c = 0; c < channels; ++c) {
    scale[c] = (weight ? weight[c] : T(1)) * invstd[c];
    shift[c] = (bias ? bias[c] : T(0)) - mean[c] * scale[c];
  }
  const std::vector<T> scale_rep = lay.replicate(scale.data()), shift_rep = lay.replicate(shift.data());
  const T* sr = scale_rep.data();
  const T* br = shift_rep.data();
  const bool relu = act == 1;
  for_each<T>(
      lay, threads,
      [&](int64_t i, int64_t k) {
        vec z = load(x + i) * load(sr + k) + load(br + k);
        if (residual) z += load(residual + i);
        if (relu) z = z < T(0) ? vec{} : z;  // NaN stays NaN, as ATen's relu
        store(y + i, z);
      },
      [&](int64_t i, int64_t c) {
        T z = x[i] * scale[c] + shift[c];
        if (residual) z += residual[i];
        if (relu) z = z < T(0) ? T(0) : z;
        y[i] = z;
      });
}

template <typename T>
void batch_norm_act_backward(const T* dy, const T* x, const T* y, const T* weight, const T* mean, const T* invstd,
                             T* dx, T* dweight, T* dbias, T* dresidual, int64_t rows, int64_t channels,
                             int act, int threads) {
  typedef typename Vec<T>::type vec;
  const Layout<T> lay(rows, channels);
  advise_huge_pages(dx, lay.n * int64_t(sizeof(T)));
  if (dresidual) advise_huge_pages(dresidual, lay.n * int64_t(sizeof(T)));
  const bool relu = act == 1;
  // the incoming gradient, masked by the activation
  auto grad_vec = [&](int64_t i) {
    const vec g = load(dy + i);
    return relu ? (load(y + i) <= T(0) ? vec{} : g) : g;
  };
  auto grad_scalar = [&](int64_t i) { return relu ? (y[i] <= T(0) ? T(0) : dy[i]) : dy[i]; };
  const std::vector<T> mean_rep = lay.replicate(mean);
  const T* mr = mean_rep.data();
  std::vector<double> sum_g(channels), sum_gx(channels);
  double* out[2] = {sum_g.data(), sum_gx.data()};
  channel_sums<T, 2>(
      lay, threads, out,
      [&](int64_t i, int64_t k, vec* acc) {
        const vec g = grad_vec(i);
        acc[0] += g;
        acc[1] += g * (load(x + i) - load(mr + k));
      },
      [&](int64_t i, int64_t c, double* acc) {
        const T g = grad_scalar(i);
        acc[0] += double(g);
        acc[1] += double(g * (x[i] - mean[c]));
      });
  std::vector<T> scale(channels), coef(channels), mean_grad(channels);
  for (int64_t c = 0; c < channels; ++c) {
    scale[c] = (weight ? weight[c] : T(1)) * invstd[c];
    const double inv = double(invstd[c]);
    coef[c] = T(double(scale[c]) * inv * inv * (sum_gx[c] / double(rows)));
    mean_grad[c] = T(sum_g[c] / double(rows));
    if (dweight) dweight[c] = T(sum_gx[c] * inv);
    if (dbias) dbias[c] = T(sum_g[c]);
  }
  const std::vector<T> scale_rep = lay.replicate(scale.data()), coef_rep = lay.replicate(coef.data()),
                       mean_grad_rep = lay.replicate(mean_grad.data());
  const T* sr = scale_rep.data();
  const T* kr = coef_rep.data();
  const T* gr = mean_grad_rep.data();
  for_each<T>(
      lay, threads,
      [&](int64_t i, int64_t k) {
        const vec g = grad_vec(i);
        if (dresidual) store(dresidual + i, g);
        store(dx + i, (g - load(gr + k)) * load(sr + k) - (load(x + i) - load(mr + k)) * load(kr + k));
      },
      [&](int64_t i, int64_t c) {
        const T g = grad_scalar(i);
        if (dresidual) dresidual[i] = g;
        dx[i] = (g - mean_grad[c]) * scale[c] - (x[i] - mean[c]) * coef[c];
      });
}

template void batch_norm_act_forward<float>(const float*, const float*, const float*, const float*, float*, float*,
                                            float*, float*, int64_t, int64_t, double, int, int);
template void batch_norm_act_forward<double>(const double*, const double*, const double*, const double*, double*,
                                             double*, double*, double*, int64_t, int64_t, double, int, int);
template void batch_norm_act_backward<float>(const float*, const float*, const float*, const float*, const float*,
                                             const float*, float*, float*, float*, float*, int64_t, int64_t, int, int);
template void batch_norm_act_backward<double>(const double*, const double*, const double*, const double*,
                                              const double*, const double*, double*, double*, double*, double*,
                                              int64_t, int64_t, int, int);

}  // namespace vz
