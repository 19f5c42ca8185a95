// Register-blocked GEMM micro-kernels over row accessors, and the transpose that lays operands out
// for them. The register tile is sized for the instruction set's register file (vec.h): R rows x CH
// vectors of accumulators, plus CH vectors of B and one broadcast of A, fill it without spilling
// (32 registers: 6 x 4 vectors; 16 registers: 6 x 2).
#pragma once

#include "vec.h"

namespace {

// Rows of a GEMM operand: a strided matrix (row r at p + r * ld), or a table of row pointers (row r
// at p[r] + col), e.g. the halo keys of a tile, scattered over a panel
template <typename T>
struct Strided {
  T* p;
  int64_t ld;
  T* row(int64_t r) const { return p + r * ld; }
  Strided from_row(int64_t r) const { return {p + r * ld, ld}; }
  Strided from_column(int64_t c) const { return {p + c, ld}; }
};

template <typename T>
struct RowTable {
  T* const* p;
  int64_t col;
  T* row(int64_t r) const { return p[r] + col; }
  RowTable from_row(int64_t r) const { return {p + r, col}; }
  RowTable from_column(int64_t c) const { return {p, col + c}; }
};

// C[r, :CH*L] (+)= sum_j A[r, j] * B[j, :CH*L] for R rows, A[r, j] at A.row(r)[j * aj] (so a
// transposed A costs nothing): R x CH accumulators stay in registers. Accumulate: C's rows are
// added to, else overwritten.
template <typename T, int CH, int R, bool Accumulate, typename AR, typename BR, typename CR>
inline void gemm_tile(AR A, int64_t aj, BR B, CR C, int64_t depth) {
  typedef typename Vec<T>::type vec;
  constexpr int L = Vec<T>::lanes;
  vec acc[R][CH];
  const T* a[R];
  for (int r = 0; r < R; ++r) {
    a[r] = A.row(r);
    for (int c = 0; c < CH; ++c) acc[r][c] = Accumulate ? load(C.row(r) + c * L) : vec{};
  }
  for (int64_t j = 0; j < depth; ++j) {
    const T* brow = B.row(j);
    vec b[CH];
    for (int c = 0; c < CH; ++c) b[c] = load(brow + c * L);
    for (int r = 0; r < R; ++r) {
      const T x = a[r][j * aj];
      for (int c = 0; c < CH; ++c) acc[r][c] += x * b[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CH; ++c) store(C.row(r) + c * L, acc[r][c]);
}

// the widest column block, and the rows of a register tile CH vectors wide
constexpr int kGemmColumnVectors = kVectorRegisters >= 32 ? 4 : 2;
constexpr int gemm_tile_rows(int CH) { return std::min(8, (kVectorRegisters - CH - 1) / CH); }

template <typename T, int CH, bool Accumulate, typename AR, typename BR, typename CR>
inline void gemm_columns(AR A, int64_t aj, BR B, CR C, int64_t rows, int64_t depth) {
  constexpr int R = gemm_tile_rows(CH);  // R * CH accumulators + CH rows of B + 1 broadcast
  int64_t r = 0;
  for (; r + R <= rows; r += R) gemm_tile<T, CH, R, Accumulate>(A.from_row(r), aj, B, C.from_row(r), depth);
  switch (rows - r) {
#define VZ_TAIL(n) \
  case n: return gemm_tile<T, CH, n, Accumulate>(A.from_row(r), aj, B, C.from_row(r), depth);
    VZ_TAIL(1) VZ_TAIL(2) VZ_TAIL(3) VZ_TAIL(4) VZ_TAIL(5) VZ_TAIL(6) VZ_TAIL(7)
#undef VZ_TAIL
    default: return;
  }
}

// C[rows, cols] (+)= A[rows, depth] @ B[depth, cols], cols a whole number of vectors; A, B, C row
// accessors (Strided or RowTable)
template <typename T, bool Accumulate = false, typename AR, typename BR, typename CR>
void gemm_rows(AR A, int64_t aj, BR B, CR C, int64_t rows, int64_t depth, int64_t cols) {
  constexpr int L = Vec<T>::lanes, CH = kGemmColumnVectors;
  int64_t c = 0;
  for (; c + CH * L <= cols; c += CH * L)
    gemm_columns<T, CH, Accumulate>(A, aj, B.from_column(c), C.from_column(c), rows, depth);
  switch ((cols - c) / L) {
    case 3:
      if constexpr (CH > 3) return gemm_columns<T, 3, Accumulate>(A, aj, B.from_column(c), C.from_column(c), rows, depth);
      return;
    case 2:
      if constexpr (CH > 2) return gemm_columns<T, 2, Accumulate>(A, aj, B.from_column(c), C.from_column(c), rows, depth);
      return;
    case 1: return gemm_columns<T, 1, Accumulate>(A, aj, B.from_column(c), C.from_column(c), rows, depth);
    default: return;
  }
}

// C[rows, cols] = A[rows, depth] @ B[depth, cols] on strided matrices, cols a whole number of
// vectors; A[r, j] is at A[r * ar + j * aj]
template <typename T>
inline void gemm(const T* A, int64_t ar, int64_t aj, const T* Bm, int64_t ldb, T* C, int64_t ldc, int64_t rows,
                 int64_t depth, int64_t cols) {
  gemm_rows<T>(Strided<const T>{A, ar}, aj, Strided<const T>{Bm, ldb}, Strided<T>{C, ldc}, rows, depth, cols);
}

// rows row(c) [K, D] (c < K; a null row reads as zeros) times factor, transposed -> columns [D, Kp]
// (columns >= K zero; Kp a whole number of vectors), in L x L register tiles. Whole vectors are
// loaded from each row: rows padded to whole vectors in scratch, or D a whole number of them (then
// rows can be read straight from an input)
template <typename T, typename Row>
inline void transpose_rows(Row row, int64_t K, int64_t Kp, int64_t D, T factor, T* columns) {
  typedef typename Vec<T>::type vec;
  constexpr int L = Vec<T>::lanes;
  for (int64_t c0 = 0; c0 < Kp; c0 += L)
    for (int64_t d0 = 0; d0 < D; d0 += L) {
      const int64_t width = std::min<int64_t>(L, D - d0);
      vec tile[L];
      for (int i = 0; i < L; ++i) {
        const T* x = c0 + i < K ? row(c0 + i) : nullptr;
        tile[i] = x ? load(x + d0) * factor : vec{};
      }
      transpose_tile<T>(tile);
      for (int64_t i = 0; i < width; ++i) store(columns + (d0 + i) * Kp + c0, tile[i]);
    }
}

// row c of a matrix whose rows are ld apart (for transpose_rows)
template <typename T>
inline auto rows_of(const T* x, int64_t ld) {
  return [x, ld](int64_t c) { return x + c * ld; };
}

}  // namespace
