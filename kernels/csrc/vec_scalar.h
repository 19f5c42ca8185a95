// The portable operations of the vector layer (see vec.h): plain stores and lane loops, which the
// compiler vectorizes where it can. Used alone by the scalar build and under vec_neon.h.
#pragma once

namespace {

template <typename T>
inline void stream_store(T* dst, typename Vec<T>::type x) {
  store(dst, x);
}

inline void stream_fence() {}

template <typename T>
inline typename Vec<T>::type load_lanes(const T* p, int lo, int hi) {
  T out[Vec<T>::lanes] = {};
  for (int l = lo; l < hi; ++l) out[l] = p[l];
  return load(out);
}

template <typename T>
inline typename Vec<T>::type masked_gather(const T* table, typename Vec<T>::index_type index,
                                           typename Vec<T>::index_type mask) {
  T out[Vec<T>::lanes];
  for (int l = 0; l < Vec<T>::lanes; ++l) out[l] = mask[l] ? table[index[l]] : T(0);
  return load(out);
}

template <typename T>
inline int64_t pack_lanes(T* dst, typename Vec<T>::type x, typename Vec<T>::index_type keep) {
  int64_t n = 0;
  for (int l = 0; l < Vec<T>::lanes; ++l)
    if (keep[l]) dst[n++] = x[l];
  return n;
}

template <typename T>
inline typename Vec<T>::type unpack_lanes(const T* src, typename Vec<T>::index_type keep, int64_t& n) {
  typename Vec<T>::type out;
  n = 0;
  for (int l = 0; l < Vec<T>::lanes; ++l) out[l] = keep[l] ? src[n++] : T(0);
  return out;
}

}  // namespace
