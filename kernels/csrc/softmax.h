// Softmax and its gradient down the columns of transposed logits (keys x queries, one query per
// vector lane): no horizontal sums.
#pragma once

#include "vec.h"

namespace {

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

}  // namespace
