// AVX2 + FMA (see vec.h): 32-byte vectors. AVX2 has no compress / expand: pack_lanes and
// unpack_lanes permute the lanes across the register by a table indexed by the lane mask (256
// entries for 8 floats, 16 for 4 doubles, as pairs of 32-bit lanes), with masked loads and stores
// so that nothing past the packed values is touched.
#pragma once

#include <immintrin.h>

namespace {

template <typename T>
inline void stream_store(T* dst, typename Vec<T>::type x) {
  if constexpr (sizeof(T) == 4)
    _mm256_stream_ps(reinterpret_cast<float*>(dst), reinterpret_cast<__m256>(x));
  else
    _mm256_stream_pd(reinterpret_cast<double*>(dst), reinterpret_cast<__m256d>(x));
}

inline void stream_fence() { _mm_sfence(); }

// all-ones in lanes [lo, hi)
template <typename T>
inline typename Vec<T>::index_type lane_range(int lo, int hi) {
  typename Vec<T>::index_type iota;
  for (int l = 0; l < Vec<T>::lanes; ++l) iota[l] = l;
  return (iota >= lo) & (iota < hi);
}

template <typename T>
inline typename Vec<T>::type load_lanes(const T* p, int lo, int hi) {
  const __m256i m = reinterpret_cast<__m256i>(lane_range<T>(lo, hi));
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<typename Vec<T>::type>(_mm256_maskload_ps(p, m));
  else
    return reinterpret_cast<typename Vec<T>::type>(_mm256_maskload_pd(p, m));
}

template <typename T>
inline typename Vec<T>::type masked_gather(const T* table, typename Vec<T>::index_type index,
                                           typename Vec<T>::index_type mask) {
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<typename Vec<T>::type>(_mm256_mask_i32gather_ps(
        _mm256_setzero_ps(), table, reinterpret_cast<__m256i>(index), reinterpret_cast<__m256>(mask), 4));
  else
    return reinterpret_cast<typename Vec<T>::type>(_mm256_mask_i64gather_pd(
        _mm256_setzero_pd(), table, reinterpret_cast<__m256i>(index), reinterpret_cast<__m256d>(mask), 8));
}

// Per lane mask (bit l: lane l kept) of L lanes, as 8 32-bit lane indices: pack, the kept lanes in
// order first; unpack, for each kept lane the position of its value among the packed ones. A
// double lane is the pair of 32-bit lanes (2l, 2l + 1).
template <int L>
struct PermuteTables {
  static constexpr int W = 8 / L;  // 32-bit lanes per element
  int32_t pack[1 << L][8], unpack[1 << L][8];
  constexpr PermuteTables() : pack{}, unpack{} {
    for (int m = 0; m < (1 << L); ++m) {
      int n = 0;
      for (int l = 0; l < L; ++l) {
        for (int w = 0; w < W; ++w) unpack[m][l * W + w] = n * W + w;
        if (m >> l & 1) {
          for (int w = 0; w < W; ++w) pack[m][n * W + w] = l * W + w;
          ++n;
        }
      }
    }
  }
};

template <typename T>
inline int lane_bits(typename Vec<T>::index_type keep) {
  if constexpr (sizeof(T) == 4)
    return _mm256_movemask_ps(reinterpret_cast<__m256>(keep));
  else
    return _mm256_movemask_pd(reinterpret_cast<__m256d>(keep));
}

template <typename T>
inline int64_t pack_lanes(T* dst, typename Vec<T>::type x, typename Vec<T>::index_type keep) {
  constexpr int L = Vec<T>::lanes;
  static constexpr PermuteTables<L> tables;
  const int m = lane_bits<T>(keep), n = __builtin_popcount(m);
  const __m256i order = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tables.pack[m]));
  const __m256 packed = _mm256_permutevar8x32_ps(reinterpret_cast<__m256>(x), order);
  const __m256i first = reinterpret_cast<__m256i>(lane_range<T>(0, n));
  if constexpr (sizeof(T) == 4)
    _mm256_maskstore_ps(dst, first, packed);
  else
    _mm256_maskstore_pd(dst, first, _mm256_castps_pd(packed));
  return n;
}

template <typename T>
inline typename Vec<T>::type unpack_lanes(const T* src, typename Vec<T>::index_type keep, int64_t& n) {
  constexpr int L = Vec<T>::lanes;
  static constexpr PermuteTables<L> tables;
  const int m = lane_bits<T>(keep);
  n = __builtin_popcount(m);
  const typename Vec<T>::type packed = load_lanes(src, 0, static_cast<int>(n));
  const __m256i order = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tables.unpack[m]));
  const typename Vec<T>::type spread =
      reinterpret_cast<typename Vec<T>::type>(_mm256_permutevar8x32_ps(reinterpret_cast<__m256>(packed), order));
  return keep ? spread : typename Vec<T>::type{};
}

}  // namespace
