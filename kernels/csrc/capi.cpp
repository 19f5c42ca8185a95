// The C interface loaded by build.py with ctypes: one function per kernel and dtype, plus what the
// caller checks before it uses them (ABI version) and needs to lay out their arguments (vector width).
#include "abi.h"
#include "kernels.h"
#include "vec.h"

extern "C" {

int vz_abi_version() { return VZ_ABI_VERSION; }

// bytes per vector of the build: the lanes of the window kernels' tiles and of the block kernels'
// padded query columns (native._lanes)
int vz_vector_bytes() { return kVectorBytes; }

const char* vz_isa() { return VZ_ISA_NAME; }

int64_t vz_block_bias_chunks() { return vz::block_bias_chunks(); }

void vz_na_forward_f32(const float* q, const float* k, const float* v, const float* rpb, float* out, float* lse, float* probs,
                       const int64_t* geom, const int64_t* tables, const int64_t* tile, double scale, int threads) {
  vz::window_forward<float>(q, k, v, rpb, out, lse, probs, geom, tables, tile, float(scale), threads);
}

void vz_na_backward_f32(const float* q, const float* k, const float* v, const float* dout, const float* lse, const float* rpb,
                        const float* probs, float* dq, float* dk, float* dv, float* drpb, const int64_t* geom,
                        const int64_t* tables, const int64_t* tile, double scale, int threads) {
  vz::window_backward<float>(q, k, v, dout, lse, rpb, probs, dq, dk, dv, drpb, geom, tables, tile, float(scale), threads);
}

void vz_block_forward_f32(const float* q, const float* k, const float* v, const float* bias, float* out, float* lse, float* probs,
                          const int64_t* geom, const int64_t* tables, double scale, int threads) {
  vz::block_forward<float>(q, k, v, bias, out, lse, probs, geom, tables, float(scale), threads);
}

void vz_block_backward_f32(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                           const float* bias, const float* probs, float* dq, float* dk, float* dv, float* dbias,
                           const int64_t* geom, const int64_t* tables, double scale, int threads) {
  vz::block_backward<float>(q, k, v, dout, lse, bias, probs, dq, dk, dv, dbias, geom, tables, float(scale), threads);
}

void vz_na_forward_f64(const double* q, const double* k, const double* v, const double* rpb, double* out, double* lse, double* probs,
                       const int64_t* geom, const int64_t* tables, const int64_t* tile, double scale, int threads) {
  vz::window_forward<double>(q, k, v, rpb, out, lse, probs, geom, tables, tile, scale, threads);
}

void vz_na_backward_f64(const double* q, const double* k, const double* v, const double* dout, const double* lse, const double* rpb,
                        const double* probs, double* dq, double* dk, double* dv, double* drpb, const int64_t* geom,
                        const int64_t* tables, const int64_t* tile, double scale, int threads) {
  vz::window_backward<double>(q, k, v, dout, lse, rpb, probs, dq, dk, dv, drpb, geom, tables, tile, scale, threads);
}

void vz_block_forward_f64(const double* q, const double* k, const double* v, const double* bias, double* out, double* lse, double* probs,
                          const int64_t* geom, const int64_t* tables, double scale, int threads) {
  vz::block_forward<double>(q, k, v, bias, out, lse, probs, geom, tables, scale, threads);
}

void vz_block_backward_f64(const double* q, const double* k, const double* v, const double* dout, const double* lse,
                           const double* bias, const double* probs, double* dq, double* dk, double* dv, double* dbias,
                           const int64_t* geom, const int64_t* tables, double scale, int threads) {
  vz::block_backward<double>(q, k, v, dout, lse, bias, probs, dq, dk, dv, dbias, geom, tables, scale, threads);
}

void vz_scan_forward_f32(const float* u, const float* delta, const float* A, const float* B, const float* C, const float* D,
                       const float* z, const float* bias, float* out, float* last_state, const int64_t* geom, int threads) {
  vz::scan_forward<float>(u, delta, A, B, C, D, z, bias, out, last_state, geom, threads);
}

void vz_scan_backward_f32(const float* u, const float* delta, const float* A, const float* B, const float* C, const float* D,
                        const float* z, const float* bias, const float* dout, const float* dlast, float* du, float* ddelta, float* dA,
                        float* dB, float* dC, float* dD, float* dz, float* dbias, const int64_t* geom, int threads) {
  vz::scan_backward<float>(u, delta, A, B, C, D, z, bias, dout, dlast, du, ddelta, dA, dB, dC, dD, dz, dbias, geom, threads);
}
void vz_scan_forward_f64(const double* u, const double* delta, const double* A, const double* B, const double* C, const double* D,
                       const double* z, const double* bias, double* out, double* last_state, const int64_t* geom, int threads) {
  vz::scan_forward<double>(u, delta, A, B, C, D, z, bias, out, last_state, geom, threads);
}

void vz_scan_backward_f64(const double* u, const double* delta, const double* A, const double* B, const double* C, const double* D,
                        const double* z, const double* bias, const double* dout, const double* dlast, double* du, double* ddelta, double* dA,
                        double* dB, double* dC, double* dD, double* dz, double* dbias, const int64_t* geom, int threads) {
  vz::scan_backward<double>(u, delta, A, B, C, D, z, bias, dout, dlast, du, ddelta, dA, dB, dC, dD, dz, dbias, geom, threads);
}

void vz_gelu_tanh_forward_f32(const float* x, float* y, int64_t n, int threads) {
  vz::gelu_tanh_forward<float>(x, y, n, threads);
}
void vz_gelu_tanh_backward_f32(const float* dy, const float* x, float* dx, int64_t n, int threads) {
  vz::gelu_tanh_backward<float>(dy, x, dx, n, threads);
}
void vz_gelu_tanh_forward_f64(const double* x, double* y, int64_t n, int threads) {
  vz::gelu_tanh_forward<double>(x, y, n, threads);
}
void vz_gelu_tanh_backward_f64(const double* dy, const double* x, double* dx, int64_t n, int threads) {
  vz::gelu_tanh_backward<double>(dy, x, dx, n, threads);
}
void vz_batch_norm_act_forward_f32(const float* x, const float* weight, const float* bias, const float* residual, float* y,
                                   float* mean, float* var, float* invstd, int64_t rows, int64_t channels, double eps, int act,
                                   int threads) {
  vz::batch_norm_act_forward<float>(x, weight, bias, residual, y, mean, var, invstd, rows, channels, eps, act, threads);
}
void vz_batch_norm_act_backward_f32(const float* dy, const float* x, const float* y, const float* weight,
                                    const float* mean, const float* invstd, float* dx, float* dweight, float* dbias,
                                    float* dresidual, int64_t rows, int64_t channels, int act, int threads) {
  vz::batch_norm_act_backward<float>(dy, x, y, weight, mean, invstd, dx, dweight, dbias, dresidual, rows, channels,
                                  act, threads);
}
void vz_batch_norm_act_forward_f64(const double* x, const double* weight, const double* bias, const double* residual, double* y,
                                   double* mean, double* var, double* invstd, int64_t rows, int64_t channels, double eps, int act,
                                   int threads) {
  vz::batch_norm_act_forward<double>(x, weight, bias, residual, y, mean, var, invstd, rows, channels, eps, act, threads);
}
void vz_batch_norm_act_backward_f64(const double* dy, const double* x, const double* y, const double* weight,
                                    const double* mean, const double* invstd, double* dx, double* dweight, double* dbias,
                                    double* dresidual, int64_t rows, int64_t channels, int act, int threads) {
  vz::batch_norm_act_backward<double>(dy, x, y, weight, mean, invstd, dx, dweight, dbias, dresidual, rows, channels,
                                  act, threads);
}
}  // extern "C"
