// Selective scan (Mamba's S6): the kernels of selective_scan_native.py (vz_scan_* in capi.cpp).
//
// A task is one (batch, group, block of up to one vector of channels of that group): the channels of a
// block share their B and C rows, so each step broadcasts one B and one C value per state while the
// state of every channel sits in one lane. The task copies its channels' rows of u, delta, z (and dout)
// into per-thread scratch transposed to [L][lanes] (lanes past the block's channels zero, so they
// contribute nothing), runs the recurrence sequentially over L, and copies the results back. Tasks run
// in parallel under OpenMP; nothing is shared between them but the read-only inputs.
//
// The backward (as mamba_ssm's CUDA kernel) runs the forward scan again, keeping every step's state in
// scratch ([L][d_state][lanes]), then the recurrence in reverse. The gradients of B and C sum over the
// channels of a group: each task writes its block's sums, which the caller adds up over the blocks; the
// gradients of A, D and delta_bias sum over the batch, which the caller does too.
//
// geom = {batch, dim, L, d_state, groups, softplus}
// u, delta, z, out, dout, du, ddelta, dz: [batch, dim, L]; A: [dim, d_state]; B, C: [batch, groups, d_state, L];
// D, delta_bias: [dim] or null (z likewise); last_state, dlast: [batch, dim, d_state] (dlast may be null);
// dA: [batch, dim, d_state]; dD, dbias: [batch, dim] (written when D / delta_bias are given);
// dB, dC: [batch, groups, blocks, L, d_state] with blocks = ceil((dim / groups) / lanes) (vz_scan_blocks).
#include <omp.h>

#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

struct ScanGeometry {
  int64_t batch, dim, L, N, groups, per_group, blocks;
  bool softplus;

  ScanGeometry(const int64_t* g, int lanes)
      : batch(g[0]), dim(g[1]), L(g[2]), N(g[3]), groups(g[4]), softplus(g[5] != 0) {
    per_group = dim / groups;
    blocks = (per_group + lanes - 1) / lanes;
  }
};

// One task's channels: rows [row, row + width) of the [batch * dim, ...] arrays, in group `group`.
struct ScanTask {
  int64_t batch, group, channel, row;
  int width;

  ScanTask(const ScanGeometry& g, int64_t task, int lanes) {
    batch = task / (g.groups * g.blocks);
    group = task / g.blocks % g.groups;
    const int64_t block = task % g.blocks;
    channel = group * g.per_group + block * lanes;
    width = int(std::min<int64_t>(lanes, g.per_group - block * lanes));
    row = batch * g.dim + channel;
  }
};

// dst[l][j] = src[j][l] for the task's rows of a [rows, L] array; lanes past width zero
template <typename T>
void gather_rows(const T* __restrict src, int64_t L, int width, T* __restrict dst) {
  constexpr int lanes = Vec<T>::lanes;
  if (width < lanes) zero_row(dst, L * lanes);
  for (int j = 0; j < width; ++j)
    for (int64_t l = 0; l < L; ++l) dst[l * lanes + j] = src[j * L + l];
}

template <typename T>
void scatter_rows(const T* __restrict src, int64_t L, int width, T* __restrict dst) {
  constexpr int lanes = Vec<T>::lanes;
  for (int j = 0; j < width; ++j)
    for (int64_t l = 0; l < L; ++l) dst[j * L + l] = src[l * lanes + j];
}

// per-lane values of a [dim] array for the task's channels (zero when null or past width)
template <typename T>
typename Vec<T>::type channel_lanes(const T* x, const ScanTask& t) {
  return x == nullptr ? typename Vec<T>::type{} : load_lanes(x + t.channel, 0, t.width);
}

template <typename T>
inline T hsum(typename Vec<T>::type x) {
  T total = 0;
  for (int j = 0; j < Vec<T>::lanes; ++j) total += x[j];
  return total;
}

// sums[i] = the sum of the lanes of rows[i] for i < count: one vector of sums per lanes x lanes tile,
// transposed in registers, instead of a horizontal sum per row (which made the backward 8x the forward)
template <typename T>
void lane_sums(const T* __restrict rows, int64_t count, T* __restrict sums) {
  typedef typename Vec<T>::type vec;
  constexpr int lanes = Vec<T>::lanes;
  int64_t i = 0;
  for (; i + lanes <= count; i += lanes) {
    vec tile[lanes];
    for (int k = 0; k < lanes; ++k) tile[k] = load(rows + (i + k) * lanes);
    transpose_tile<T>(tile);
    for (int k = 1; k < lanes; ++k) tile[0] += tile[k];
    store(sums + i, tile[0]);
  }
  for (; i < count; ++i) sums[i] = hsum<T>(load(rows + i * lanes));
}

// exp of an argument <= 0 by vec.h's polynomial (every decay of a scan whose dt >= 0 and A <= 0, as
// Mamba's), else lane by lane through libm
template <typename T, bool kAnySign>
inline typename Vec<T>::type decay(typename Vec<T>::type x) {
  if constexpr (kAnySign) return lanewise<T>(x, [](T a) { return std::exp(a); });
  return vexp<T>(x);
}

// 1 / (1 + exp(-x)) without overflow: exp(-|x|) only
template <typename T>
inline typename Vec<T>::type sigmoid(typename Vec<T>::type x) {
  typedef typename Vec<T>::type vec;
  const vec e = vexp<T>(x < T(0) ? x : -x);
  return (x < T(0) ? e : vec{} + T(1)) / (T(1) + e);
}

// dt = softplus(delta + bias) in place, as torch's (linear above 20), and its derivative into dsp (when
// not null); returns whether every dt >= 0 (NaN included as false)
template <typename T>
bool discretize(T* __restrict dt, T* __restrict dsp, typename Vec<T>::type bias, bool softplus, int64_t L) {
  typedef typename Vec<T>::type vec;
  constexpr int lanes = Vec<T>::lanes;
  vec nonnegative = vec{} + T(1);
  for (int64_t l = 0; l < L; ++l) {
    vec x = load(dt + l * lanes) + bias;
    vec derivative = vec{} + T(1);
    if (softplus) {
      const vec e = vexp<T>(x < T(0) ? x : -x);  // exp(-|x|), in (0, 1]
      const vec w = T(1) + e;
      // log1p(e) = log(w) * e / (w - 1), exact where w rounds e away (Goldberg)
      const vec log1p = (w == T(1)) ? e : vlog<T>(w) * e / (w - T(1));
      const vec value = (x > T(0) ? x : vec{}) + log1p;
      derivative = x > T(20) ? derivative : (x < T(0) ? e : vec{} + T(1)) / w;
      x = x > T(20) ? x : value;
    }
    nonnegative = x >= T(0) ? nonnegative : vec{};
    store(dt + l * lanes, x);
    if (dsp != nullptr) store(dsp + l * lanes, derivative);
  }
  return hsum<T>(nonnegative) == T(lanes);
}

// state = exp(dt A) state + dt u B; y = C . state + D u (times silu(z)); with a state history
// (backward) every step's state goes to history[l][n] and the output before the gate to pre[l]
template <typename T, bool kAnySign>
void forward_steps(const ScanGeometry& g, const T* __restrict B, const T* __restrict C, const T* __restrict sa,
                   typename Vec<T>::type Dv, const T* __restrict dt, const T* __restrict su, const T* __restrict sz,
                   T* __restrict sout, T* __restrict state, T* __restrict history, T* __restrict pre) {
  typedef typename Vec<T>::type vec;
  constexpr int lanes = Vec<T>::lanes;
  const int64_t L = g.L, N = g.N;
  for (int64_t l = 0; l < L; ++l) {
    const vec dtv = load(dt + l * lanes), uv = load(su + l * lanes), dtu = dtv * uv;
    vec y = Dv * uv;
    for (int64_t n = 0; n < N; ++n) {
      const vec x = decay<T, kAnySign>(dtv * load(sa + n * lanes)) * load(state + n * lanes) + dtu * B[n * L + l];
      store(state + n * lanes, x);
      if (history != nullptr) store(history + (l * N + n) * lanes, x);
      y += x * C[n * L + l];
    }
    if (sz != nullptr) {
      if (pre != nullptr) store(pre + l * lanes, y);
      const vec zv = load(sz + l * lanes);
      y *= zv * sigmoid<T>(zv);
    }
    if (sout != nullptr) store(sout + l * lanes, y);
  }
}

template <typename T>
bool load_A(const T* A, const ScanTask& t, int64_t N, T* sa) {
  constexpr int lanes = Vec<T>::lanes;
  bool nonpositive = true;
  zero_row(sa, N * lanes);
  for (int j = 0; j < t.width; ++j)
    for (int64_t n = 0; n < N; ++n) {
      const T a = A[(t.channel + j) * N + n];
      sa[n * lanes + j] = a;
      nonpositive &= a <= T(0);
    }
  return nonpositive;
}

template <typename T>
void scan_forward_impl(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* z,
                       const T* bias, T* out, T* last, const ScanGeometry& g, int threads) {
  constexpr int lanes = Vec<T>::lanes;
  const int64_t L = g.L, N = g.N, tasks = g.batch * g.groups * g.blocks;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> buffer((3 * L + 2 * N) * lanes);
    T *su = buffer.data(), *sdt = su + L * lanes, *sz = sdt + L * lanes, *sa = sz + L * lanes, *state = sa + N * lanes;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const ScanTask t(g, task, lanes);
      const int64_t offset = t.row * L, bc = (t.batch * g.groups + t.group) * N * L;
      gather_rows(u + offset, L, t.width, su);
      gather_rows(delta + offset, L, t.width, sdt);
      if (z != nullptr) gather_rows(z + offset, L, t.width, sz);
      const bool stable = discretize<T>(sdt, nullptr, channel_lanes(bias, t), g.softplus, L) & load_A(A, t, N, sa);
      zero_row(state, N * lanes);
      const auto run = stable ? forward_steps<T, false> : forward_steps<T, true>;
      run(g, B + bc, C + bc, sa, channel_lanes(D, t), sdt, su, z != nullptr ? sz : nullptr, su, state, nullptr,
          nullptr);
      scatter_rows(su, L, t.width, out + offset);
      for (int j = 0; j < t.width; ++j)
        for (int64_t n = 0; n < N; ++n) last[(t.row + j) * N + n] = state[n * lanes + j];
    }
  }
}

template <typename T, bool kAnySign>
void backward_steps(const ScanGeometry& g, const T* __restrict B, const T* __restrict C, const T* __restrict sa,
                    typename Vec<T>::type Dv, T* __restrict dt, const T* __restrict dsp, T* __restrict su,
                    T* __restrict sz, const T* __restrict sg, const T* __restrict history, const T* __restrict pre,
                    T* __restrict dstate, T* __restrict dA, typename Vec<T>::type& dD, typename Vec<T>::type& dbias,
                    T* __restrict dB, T* __restrict dC) {
  typedef typename Vec<T>::type vec;
  constexpr int lanes = Vec<T>::lanes;
  const int64_t L = g.L, N = g.N;
  for (int64_t l = L - 1; l >= 0; --l) {
    const vec dtv = load(dt + l * lanes), uv = load(su + l * lanes);
    vec gy = load(sg + l * lanes);
    if (sz != nullptr) {
      const vec zv = load(sz + l * lanes), s = sigmoid<T>(zv);
      store(sz + l * lanes, gy * load(pre + l * lanes) * s * (T(1) + zv * (T(1) - s)));  // dz
      gy *= zv * s;
    }
    vec du = gy * Dv, ddt{};
    dD += gy * uv;
    for (int64_t n = 0; n < N; ++n) {
      const T b = B[n * L + l], c = C[n * L + l];
      const vec x = load(history + (l * N + n) * lanes), an = load(sa + n * lanes);
      const vec previous = l > 0 ? load(history + ((l - 1) * N + n) * lanes) : vec{};
      const vec d = load(dstate + n * lanes) + gy * c;  // the gradient of this step's state
      const vec a = decay<T, kAnySign>(dtv * an);
      store(dC + (l * N + n) * lanes, gy * x);  // summed over the lanes by the caller (lane_sums)
      store(dB + (l * N + n) * lanes, d * dtv * uv);
      du += d * dtv * b;
      const vec dlog = d * previous * a;  // of dt * A
      ddt += d * uv * b + dlog * an;
      store(dA + n * lanes, load(dA + n * lanes) + dlog * dtv);
      store(dstate + n * lanes, d * a);
    }
    const vec ddelta = ddt * load(dsp + l * lanes);
    dbias += ddelta;
    store(dt + l * lanes, ddelta);
    store(su + l * lanes, du);
  }
}

template <typename T>
void scan_backward_impl(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* z,
                        const T* bias, const T* dout, const T* dlast, T* du, T* ddelta, T* dA, T* dB, T* dC, T* dD,
                        T* dz, T* dbias, const ScanGeometry& g, int threads) {
  typedef typename Vec<T>::type vec;
  constexpr int lanes = Vec<T>::lanes;
  const int64_t L = g.L, N = g.N, tasks = g.batch * g.groups * g.blocks;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> buffer((6 * L + 4 * N + 3 * L * N) * lanes);
    T *su = buffer.data(), *sdt = su + L * lanes, *dsp = sdt + L * lanes, *sz = dsp + L * lanes, *sg = sz + L * lanes,
      *pre = sg + L * lanes, *sa = pre + L * lanes, *state = sa + N * lanes, *dstate = state + N * lanes,
      *sdA = dstate + N * lanes, *history = sdA + N * lanes, *sdB = history + L * N * lanes,
      *sdC = sdB + L * N * lanes;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const ScanTask t(g, task, lanes);
      const int64_t offset = t.row * L, bc = (t.batch * g.groups + t.group) * N * L;
      const int64_t partial = ((t.batch * g.groups + t.group) * g.blocks + (t.channel - t.group * g.per_group) / lanes) * L * N;
      gather_rows(u + offset, L, t.width, su);
      gather_rows(delta + offset, L, t.width, sdt);
      gather_rows(dout + offset, L, t.width, sg);
      if (z != nullptr) gather_rows(z + offset, L, t.width, sz);
      const bool stable = discretize<T>(sdt, dsp, channel_lanes(bias, t), g.softplus, L) & load_A(A, t, N, sa);
      const vec Dv = channel_lanes(D, t);
      const T* zs = z != nullptr ? sz : nullptr;
      zero_row(state, N * lanes);
      (stable ? forward_steps<T, false> : forward_steps<T, true>)(g, B + bc, C + bc, sa, Dv, sdt, su, zs, nullptr,
                                                                 state, history, pre);
      zero_row(dstate, N * lanes);
      if (dlast != nullptr)
        for (int j = 0; j < t.width; ++j)
          for (int64_t n = 0; n < N; ++n) dstate[n * lanes + j] = dlast[(t.row + j) * N + n];
      zero_row(sdA, N * lanes);
      vec vdD{}, vdbias{};
      (stable ? backward_steps<T, false> : backward_steps<T, true>)(
          g, B + bc, C + bc, sa, Dv, sdt, dsp, su, z != nullptr ? sz : nullptr, sg, history, pre, dstate, sdA, vdD,
          vdbias, sdB, sdC);
      lane_sums(sdB, L * N, dB + partial);
      lane_sums(sdC, L * N, dC + partial);
      scatter_rows(su, L, t.width, du + offset);
      scatter_rows(sdt, L, t.width, ddelta + offset);
      if (z != nullptr) scatter_rows(sz, L, t.width, dz + offset);
      for (int j = 0; j < t.width; ++j) {
        for (int64_t n = 0; n < N; ++n) dA[(t.row + j) * N + n] = sdA[n * lanes + j];
        if (dD != nullptr) dD[t.row + j] = vdD[j];
        if (dbias != nullptr) dbias[t.row + j] = vdbias[j];
      }
    }
  }
}

}  // namespace

namespace vz {

template <typename T>
void scan_forward(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* z,
                  const T* bias, T* out, T* last_state, const int64_t* geom, int threads) {
  scan_forward_impl<T>(u, delta, A, B, C, D, z, bias, out, last_state, ScanGeometry(geom, Vec<T>::lanes), threads);
}

template <typename T>
void scan_backward(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* z,
                   const T* bias, const T* dout, const T* dlast, T* du, T* ddelta, T* dA, T* dB, T* dC, T* dD, T* dz,
                   T* dbias, const int64_t* geom, int threads) {
  scan_backward_impl<T>(u, delta, A, B, C, D, z, bias, dout, dlast, du, ddelta, dA, dB, dC, dD, dz, dbias,
                        ScanGeometry(geom, Vec<T>::lanes), threads);
}

template void scan_forward<float>(const float*, const float*, const float*, const float*, const float*, const float*,
                                  const float*, const float*, float*, float*, const int64_t*, int);
template void scan_forward<double>(const double*, const double*, const double*, const double*, const double*,
                                   const double*, const double*, const double*, double*, double*, const int64_t*, int);
template void scan_backward<float>(const float*, const float*, const float*, const float*, const float*, const float*,
                                   const float*, const float*, const float*, const float*, float*, float*, float*,
                                   float*, float*, float*, float*, float*, const int64_t*, int);
template void scan_backward<double>(const double*, const double*, const double*, const double*, const double*,
                                    const double*, const double*, const double*, const double*, const double*, double*,
                                    double*, double*, double*, double*, double*, double*, double*, const int64_t*, int);

}  // namespace vz
