// tanh-approximated GELU, forward and backward (vz_gelu_tanh_* in capi.cpp), elementwise over n values.
//
//   y = 0.5 x (1 + tanh(u)) = x * sigmoid(2u),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   dy/dx = s + x s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2),  s = sigmoid(2u)
//
// The sigmoid takes one exponential of a non-positive argument (vexp of vec.h): e = exp(-2|u|),
// s = 1 / (1 + e) for u >= 0, e / (1 + e) below, and 1 - s the other one (no cancellation near 1). ATen computes tanh with a slower polynomial per lane;
// the results agree to a few float32 ulps. NaN inputs give NaN. Chunks of the array run in parallel
// under OpenMP.
#include <omp.h>

#include "kernels.h"
#include "vec.h"

namespace {

template <typename T>
constexpr T kSqrt2OverPi = T(0.79788456080286535588);
template <typename T>
constexpr T kCubic = T(0.044715);

// s = sigmoid(2u) and 1 - s for the lanes of x, each without cancellation
template <typename T>
inline void gelu_sigmoid(typename Vec<T>::type x, typename Vec<T>::type& s, typename Vec<T>::type& one_minus_s) {
  typedef typename Vec<T>::type vec;
  const vec u = kSqrt2OverPi<T> * (x + kCubic<T> * x * x * x);
  const vec two_u = u + u;
  const auto positive = two_u >= T(0);
  const vec e = vexp<T>(positive ? vec{} - two_u : two_u);
  const vec inv = T(1) / (T(1) + e);
  s = positive ? inv : e * inv;
  one_minus_s = positive ? e * inv : inv;
}

template <typename T>
inline void gelu_sigmoid_scalar(T x, T& s, T& one_minus_s) {
  const T u = kSqrt2OverPi<T> * (x + kCubic<T> * x * x * x);
  const T e = std::exp(-std::abs(u + u)), inv = T(1) / (T(1) + e);
  s = u >= T(0) ? inv : e * inv;
  one_minus_s = u >= T(0) ? e * inv : inv;
}

constexpr int64_t kChunk = 1 << 14;  // values per parallel task

template <typename T, typename VecFn, typename ScalarFn>
void elementwise(int64_t n, int threads, VecFn vec_fn, ScalarFn scalar_fn) {
  constexpr int L = Vec<T>::lanes;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    int64_t i = begin;
    for (; i + L <= end; i += L) vec_fn(i);
    for (; i < end; ++i) scalar_fn(i);
  }
}

}  // namespace

namespace vz {

template <typename T>
void gelu_tanh_forward(const T* x, T* y, int64_t n, int threads) {
  elementwise<T>(
      n, threads,
      [&](int64_t i) {
        const auto v = load(x + i);
        typename Vec<T>::type s, one_minus_s;
        gelu_sigmoid<T>(v, s, one_minus_s);
        store(y + i, v * s);
      },
      [&](int64_t i) {
        T s, one_minus_s;
        gelu_sigmoid_scalar(x[i], s, one_minus_s);
        y[i] = x[i] * s;
      });
}

template <typename T>
void gelu_tanh_backward(const T* dy, const T* x, T* dx, int64_t n, int threads) {
  constexpr T k2 = T(2) * kSqrt2OverPi<T>, k3 = T(3) * kCubic<T>;
  elementwise<T>(
      n, threads,
      [&](int64_t i) {
        const auto v = load(x + i);
        typename Vec<T>::type s, one_minus_s;
        gelu_sigmoid<T>(v, s, one_minus_s);
        store(dx + i, load(dy + i) * (s + v * s * one_minus_s * k2 * (T(1) + k3 * v * v)));
      },
      [&](int64_t i) {
        const T v = x[i];
        T s, one_minus_s;
        gelu_sigmoid_scalar(v, s, one_minus_s);
        dx[i] = dy[i] * (s + v * s * one_minus_s * k2 * (T(1) + k3 * v * v));
      });
}

template void gelu_tanh_forward<float>(const float*, float*, int64_t, int);
template void gelu_tanh_forward<double>(const double*, double*, int64_t, int);
template void gelu_tanh_backward<float>(const float*, const float*, float*, int64_t, int);
template void gelu_tanh_backward<double>(const double*, const double*, double*, int64_t, int);

}  // namespace vz
