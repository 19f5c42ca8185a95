// AVX-512 (see vec.h): 64-byte vectors; compress / expand, masked loads and gathers in one
// instruction each.
#pragma once

#include <immintrin.h>

namespace {

template <typename T>
inline void stream_store(T* dst, typename Vec<T>::type x) {
  if constexpr (sizeof(T) == 4)
    _mm512_stream_ps(reinterpret_cast<float*>(dst), reinterpret_cast<__m512>(x));
  else
    _mm512_stream_pd(reinterpret_cast<double*>(dst), reinterpret_cast<__m512d>(x));
}

inline void stream_fence() { _mm_sfence(); }

// the AVX-512 mask of the lanes of x that are set
template <typename T>
inline uint32_t lane_mask(typename Vec<T>::index_type x) {
  const __m512i k = reinterpret_cast<__m512i>(x);
  if constexpr (sizeof(T) == 4)
    return _mm512_test_epi32_mask(k, k);
  else
    return _mm512_test_epi64_mask(k, k);
}

template <typename T>
inline typename Vec<T>::type load_lanes(const T* p, int lo, int hi) {
  const uint32_t m = ((1u << hi) - 1) & ~((1u << lo) - 1);
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<typename Vec<T>::type>(_mm512_maskz_loadu_ps(static_cast<__mmask16>(m), p));
  else
    return reinterpret_cast<typename Vec<T>::type>(_mm512_maskz_loadu_pd(static_cast<__mmask8>(m), p));
}

template <typename T>
inline typename Vec<T>::type masked_gather(const T* table, typename Vec<T>::index_type index,
                                           typename Vec<T>::index_type mask) {
  if constexpr (sizeof(T) == 4) {
    return reinterpret_cast<typename Vec<T>::type>(_mm512_mask_i32gather_ps(
        _mm512_setzero_ps(), static_cast<__mmask16>(lane_mask<T>(mask)), reinterpret_cast<__m512i>(index), table, 4));
  } else {
    return reinterpret_cast<typename Vec<T>::type>(_mm512_mask_i64gather_pd(
        _mm512_setzero_pd(), static_cast<__mmask8>(lane_mask<T>(mask)), reinterpret_cast<__m512i>(index), table, 8));
  }
}

template <typename T>
inline int64_t pack_lanes(T* dst, typename Vec<T>::type x, typename Vec<T>::index_type keep) {
  const uint32_t m = lane_mask<T>(keep);
  const int n = __builtin_popcount(m);
  if constexpr (sizeof(T) == 4)
    _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << n) - 1),
                          _mm512_maskz_compress_ps(static_cast<__mmask16>(m), reinterpret_cast<__m512>(x)));
  else
    _mm512_mask_storeu_pd(dst, static_cast<__mmask8>((1u << n) - 1),
                          _mm512_maskz_compress_pd(static_cast<__mmask8>(m), reinterpret_cast<__m512d>(x)));
  return n;
}

template <typename T>
inline typename Vec<T>::type unpack_lanes(const T* src, typename Vec<T>::index_type keep, int64_t& n) {
  const uint32_t m = lane_mask<T>(keep);
  n = __builtin_popcount(m);
  if constexpr (sizeof(T) == 4)
    return reinterpret_cast<typename Vec<T>::type>(_mm512_maskz_expand_ps(
        static_cast<__mmask16>(m), _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), src)));
  else
    return reinterpret_cast<typename Vec<T>::type>(_mm512_maskz_expand_pd(
        static_cast<__mmask8>(m), _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), src)));
}

}  // namespace
