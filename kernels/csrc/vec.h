// The width-generic vector layer of the CPU kernels: one vector type per element type (GCC vector
// extensions, so arithmetic, comparisons and selects are plain operators the compiler lowers to the
// target), loads and stores, exp, row operations and an in-register transpose, written once. What
// the operators cannot express (non-temporal stores, masked loads, gathers, compress / expand) comes
// from one header per instruction set, chosen when the library is built:
//   vec_avx512.h  64-byte vectors, 32 registers
//   vec_avx2.h    32-byte vectors (AVX2 + FMA), 16 registers
//   vec_neon.h    16-byte vectors (aarch64 NEON), 32 registers
//   vec_scalar.h  16-byte vectors in portable code (SSE2 on any x86-64, scalar elsewhere), 16 registers
// build.py passes -DVZ_ISA_<NAME>; without one the compiler's target decides.
#pragma once

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

#if !defined(VZ_ISA_AVX512) && !defined(VZ_ISA_AVX2) && !defined(VZ_ISA_NEON) && !defined(VZ_ISA_SCALAR)
#if defined(__AVX512F__)
#define VZ_ISA_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define VZ_ISA_AVX2
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define VZ_ISA_NEON
#else
#define VZ_ISA_SCALAR
#endif
#endif

#if defined(VZ_ISA_AVX512)
#define VZ_VECTOR_BYTES 64
#define VZ_VECTOR_REGISTERS 32
#define VZ_ISA_NAME "avx512"
#elif defined(VZ_ISA_AVX2)
#define VZ_VECTOR_BYTES 32
#define VZ_VECTOR_REGISTERS 16
#define VZ_ISA_NAME "avx2"
#elif defined(VZ_ISA_NEON)
#define VZ_VECTOR_BYTES 16
#define VZ_VECTOR_REGISTERS 32
#define VZ_ISA_NAME "neon"
#else
#define VZ_VECTOR_BYTES 16
#define VZ_VECTOR_REGISTERS 16
#define VZ_ISA_NAME "scalar"
#endif

namespace {

constexpr int kVectorBytes = VZ_VECTOR_BYTES;
constexpr int kVectorRegisters = VZ_VECTOR_REGISTERS;

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVectorBytes)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> index_scalar;
  typedef index_scalar index_type __attribute__((vector_size(kVectorBytes)));
  static constexpr int lanes = kVectorBytes / sizeof(T);
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

}  // namespace

// Per instruction set, in the anonymous namespace:
//   stream_store(T* dst, vec x)      a store that bypasses the caches where the target has one (dst
//                                    aligned to a whole vector), else a plain store
//   stream_fence()                   orders this thread's stream_stores before what follows
//   load_lanes(const T* p, lo, hi)   lanes [lo, hi) from p[lo, hi), the others zero, reading nothing else
//   masked_gather(table, index, m)   table[index[l]] where m[l] is set, else 0
//   pack_lanes(dst, x, keep)         the lanes of x where keep is set, packed to the front of dst
//                                    (nothing written past them); returns their number
//   unpack_lanes(src, keep, n)       its inverse: lanes where keep is set take the next values of src
//                                    in order, the others zero (nothing read past them); n = their number
#if defined(VZ_ISA_AVX512)
#include "vec_avx512.h"
#elif defined(VZ_ISA_AVX2)
#include "vec_avx2.h"
#elif defined(VZ_ISA_NEON)
#include "vec_neon.h"
#else
#include "vec_scalar.h"
#endif

namespace {

// f on every lane of x (for log, once per query: not worth a polynomial)
template <typename T, typename F>
inline typename Vec<T>::type lanewise(typename Vec<T>::type x, F f) {
  constexpr int L = Vec<T>::lanes;
  T in[L], out[L];
  std::memcpy(in, &x, sizeof(x));
  for (int i = 0; i < L; ++i) out[i] = f(in[i]);
  return load(out);
}

// exp of arguments <= 0 (logits minus their max or their lse). Below -80 the result is exactly 0
// (exp(-80) ~ 2e-35, nothing next to the largest term of 1; and exp(-inf) must be 0, as the
// reference's is, or a masked infinite logit's zero probability would meet an infinite key as
// inf * tiny instead of 0 * inf); the polynomial then runs on a clamped argument, off the slow
// underflow path. A NaN argument gives NaN (the clamps keep it: a comparison with NaN is false).
// Cody-Waite reduction by ln 2, then float: the degree-7 polynomial of Cephes' expf (relative error
// below 3e-7); double: Cephes' exp rational approximation (below 2e-16).
template <typename T>
inline typename Vec<T>::type vexp(typename Vec<T>::type x) {
  typedef typename Vec<T>::type vec;
  typedef typename Vec<T>::index_type ivec;
  const auto underflow = x < T(-80);
  x = underflow ? vec{} - T(80) : x;
  x = x > T(0) ? vec{} : x;  // arguments are <= 0 here; rounding could leave a tiny positive one
  const vec t = x * T(1.44269504088896341);
  const ivec n = __builtin_convertvector(t - T(0.5), ivec);  // round to nearest for t <= 0
  const vec nf = __builtin_convertvector(n, vec);
  vec p;
  if constexpr (sizeof(T) == 4) {
    const vec f = x - nf * T(0.693359375) - nf * T(-2.12194440e-4);
    p = T(1.9875691500E-4) * f + T(1.3981999507E-3);
    p = p * f + T(8.3334519073E-3);
    p = p * f + T(4.1665795894E-2);
    p = p * f + T(1.6666665459E-1);
    p = p * f + T(5.0000001201E-1);
    p = p * (f * f) + f + T(1);
  } else {
    const vec f = x - nf * T(6.93145751953125E-1) - nf * T(1.42860682030941723212E-6);
    const vec ff = f * f;
    vec num = T(1.26177193074810590878E-4) * ff + T(3.02994407707441961300E-2);
    num = (num * ff + T(9.99999999999999999910E-1)) * f;
    vec den = T(3.00198505138664455042E-6) * ff + T(2.52448340349684104954E-3);
    den = den * ff + T(2.27265548208155028766E-1);
    den = den * ff + T(2.00000000000000000009E0);
    p = T(1) + T(2) * num / (den - num);
  }
  constexpr int mantissa = sizeof(T) == 4 ? 23 : 52;
  constexpr int bias = sizeof(T) == 4 ? 127 : 1023;
  const ivec bits = (n + bias) << mantissa;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const vec result = p * scale;
  return underflow ? vec{} : result;
}

// log of normal, zero, infinite or NaN arguments (sums of exponentials, once per query). float: x =
// m 2^e with m in [sqrt(1/2), sqrt(2)), then Cephes' logf polynomial in m - 1 (relative error below
// 2e-7), no call; double: the libm, lane by lane.
template <typename T>
inline typename Vec<T>::type vlog(typename Vec<T>::type x) {
  if constexpr (sizeof(T) == 4) {
    typedef typename Vec<T>::type vec;
    typedef typename Vec<T>::index_type ivec;
    ivec bits;
    std::memcpy(&bits, &x, sizeof(x));
    ivec e = ((bits >> 23) & 0xff) - 126;
    const ivec mantissa = (bits & 0x007fffff) | 0x3f000000;  // m in [0.5, 1)
    vec m;
    std::memcpy(&m, &mantissa, sizeof(m));
    const auto small = m < T(0.707106781186547524);
    e += small;  // all-ones (-1) where m is doubled below
    m = (small ? m + m : m) - T(1);
    const vec z = m * m;
    vec y = T(7.0376836292E-2) * m - T(1.1514610310E-1);
    y = y * m + T(1.1676998740E-1);
    y = y * m - T(1.2420140846E-1);
    y = y * m + T(1.4249322787E-1);
    y = y * m - T(1.6668057665E-1);
    y = y * m + T(2.0000714765E-1);
    y = y * m - T(2.4999993993E-1);
    y = y * m + T(3.3333331174E-1);
    const vec ef = __builtin_convertvector(e, vec);
    y = y * m * z + ef * T(-2.12194440e-4) - T(0.5) * z;
    vec result = m + y + ef * T(0.693359375);
    const vec inf = vec{} + std::numeric_limits<T>::infinity();
    result = x == inf ? inf : result;
    result = x == T(0) ? vec{} - inf : result;
    return (x < T(0) || x != x) ? vec{} + std::numeric_limits<T>::quiet_NaN() : result;
  } else {
    return lanewise<T>(x, [](T a) { return std::log(a); });
  }
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

// whether x[:n] holds no NaN or infinity (x - x is 0 for finite x, NaN otherwise)
template <typename T>
inline bool all_finite(const T* x, int64_t n) {
  constexpr int L = Vec<T>::lanes;
  typename Vec<T>::type bad{};
  int64_t i = 0;
  for (; i + L <= n; i += L) bad += load(x + i) - load(x + i);
  T tail = 0;
  for (; i < n; ++i) tail += x[i] - x[i];
  for (int l = 0; l < L; ++l) tail += bad[l];
  return tail == T(0);
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

// dst[:n] = src[:n] * factor for data written once and not read again by the kernel (result rows, the
// saved probabilities): with stream_store where dst is aligned and n a whole number of vectors, so
// that the destination lines are not read in (read for ownership) only to be overwritten (a sixth of
// the block kernels' backward at 14x14 d2) and do not evict the working set on their way out; else
// scaled_copy. The kernel calls stream_fence before it returns.
template <typename T>
inline void stream_row(const T* __restrict src, T* __restrict dst, int64_t n, T factor) {
  constexpr int L = Vec<T>::lanes;
  if (n % L == 0 && reinterpret_cast<uintptr_t>(dst) % kVectorBytes == 0) {
    for (int64_t i = 0; i < n; i += L) stream_store(dst + i, load(src + i) * factor);
    return;
  }
  scaled_copy(src, dst, n, factor);
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

}  // namespace
