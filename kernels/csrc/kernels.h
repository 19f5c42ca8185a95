// Fused CPU kernels for generalized neighborhood attention (forward and backward).
//
// Built on first use by visionzoo/kernels/build.py (plain C++ and OpenMP, no torch headers) and
// called through ctypes (capi.cpp). The kernels do no index math of their own: per dimension d and position x,
// the caller passes the first key position of x's window, the number of keys, and the rpb index of
// the first key (from indexing.window_bounds); keys step by the dilation, rpb indices by one.
//
// Layouts (all contiguous): q, k, v, out, dout, dq, dk, dv: [B, L0, L1, L2, H, D] (1D/2D inputs
// have leading dims of length 1); lse: [B, L0, L1, L2, H]; rpb: [H, R] (R = rpb_size, flattened);
// drpb: [B, H, R] partial sums, reduced over B by the caller.
//
// geom = {B, L0, L1, L2, H, D, dil0, dil1, dil2, rs0, rs1, rs2, R, has_rpb, max_keys}
// tables = {kfirst[L0 + L1 + L2], kcount[L0 + L1 + L2], rfirst[L0 + L1 + L2]}
// tile = {t0, t1, t2}: queries per tile of the window kernels (native._tile_shape)
// probs (window kernels; null: none kept): [B * H * N * max_keys], the attention probabilities of the
//       attended pairs of every (b, h) packed one after the other (see TileGeometry::pair_offset)
//
// Two families of kernels share the register-blocked GEMM micro-kernels of gemm.h, written over the
// vector layer of vec.h: the window kernels (window_kernels.cpp: any neighborhood; tiles of queries
// against the halo of keys their windows span, with a per-pair mask) and the block kernels
// (block_kernels.cpp: blocked.py, windows that are disjoint blocks, dense attention per block).
#pragma once

#include <cstdint>

namespace vz {

template <typename T>
void window_forward(const T* q, const T* k, const T* v, const T* rpb, T* out, T* lse, T* probs, const int64_t* geom,
                    const int64_t* tables, const int64_t* tile, T scale, int threads);

template <typename T>
void window_backward(const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* rpb, const T* probs,
                     T* dq, T* dk, T* dv, T* drpb, const int64_t* geom, const int64_t* tables, const int64_t* tile,
                     T scale, int threads);

// bgeom, btables, bias and probs of the block kernels: see block_kernels.cpp
template <typename T>
void block_forward(const T* q, const T* k, const T* v, const T* bias, T* out, T* lse, T* probs, const int64_t* geom,
                   const int64_t* tables, T scale, int threads);

template <typename T>
void block_backward(const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* bias, const T* probs,
                    T* dq, T* dk, T* dv, T* dbias, const int64_t* geom, const int64_t* tables, T scale, int threads);

// the chunks of the block backward's bias gradient (its first dimension)
int64_t block_bias_chunks();

// selective scan: geom and layouts in scan_kernels.cpp
template <typename T>
void scan_forward(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* z,
                  const T* bias, T* out, T* last_state, const int64_t* geom, int threads);

template <typename T>
void scan_backward(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* z,
                   const T* bias, const T* dout, const T* dlast, T* du, T* ddelta, T* dA, T* dB, T* dC, T* dD, T* dz,
                   T* dbias, const int64_t* geom, int threads);

// tanh-approximated GELU over n contiguous values (act_kernels.cpp)
template <typename T>
void gelu_tanh_forward(const T* x, T* y, int64_t n, int threads);

template <typename T>
void gelu_tanh_backward(const T* dy, const T* x, T* dx, int64_t n, int threads);

// training-mode BatchNorm (+ residual) + activation (0: identity, 1: ReLU) over a [rows, channels]
// row-major array (norm_kernels.cpp); weight / bias may be null (1 / 0), residual too (none), and
// dweight / dbias / dresidual (not computed)
template <typename T>
void batch_norm_act_forward(const T* x, const T* weight, const T* bias, const T* residual, T* y, T* mean, T* var,
                            T* invstd, int64_t rows, int64_t channels, double eps, int act, int threads);

template <typename T>
void batch_norm_act_backward(const T* dy, const T* x, const T* y, const T* weight, const T* mean, const T* invstd,
                             T* dx, T* dweight, T* dbias, T* dresidual, int64_t rows,
                             int64_t channels, int act, int threads);

}  // namespace vz
