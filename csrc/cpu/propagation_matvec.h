// The products q = p - alpha S p of LPOSS / LPOSS+'s CG on the CPU (cpu/propagation_cg.h runs the CG): vectors
// [n, Cp], a node's Cp classes contiguous (Cp a multiple of 8). One node's row of S is walked once per block
// of up to 8 vectors of classes (64 float / 32 double classes), whose sums stay in registers over all the
// node's neighbours: each neighbour costs one broadcast weight and NV vector loads, and q is written once.
// Blocks of at most 4 vectors keep two sets of sums (even / odd neighbours, added at the end), so that at
// least 2 NV additions are in flight. The order of the sums depends only on the row's neighbours, not on
// the thread count.
#pragma once

#include <stdint.h>
#include <string.h>

#include "cpu/cpu_simd.h"

// a lambda called in a hot loop is inlined into its caller (a target clone), or it runs in the baseline build
#if defined(__GNUC__)
#define OVSS_LAMBDA_INLINE __attribute__((always_inline))
#else
#define OVSS_LAMBDA_INLINE
#endif

namespace ovss_fast {

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // always inlined: no call passes a vector
#endif

// the sums of NV vectors of classes of one node
template <typename T, int NV>
struct ClassBlock {
  typedef typename Vec32<T>::type V;
  static constexpr int L = Vec32<T>::kLen;
  V a[NV];
  // w in every lane (+0 + w: w, or +0 for w = -0; GCC makes one scalar add and a vbroadcast of it, where
  // w - V{} or a lane loop went through the stack)
  static OVSS_INLINE V broadcast(T w) { return V{} + w; }
  OVSS_INLINE void zero() {
    for (int v = 0; v < NV; ++v) a[v] = V{};
  }
  // a += w p[0 : NV L]
  OVSS_INLINE void add(T w, const T* p) {
    const V wv = broadcast(w);
    for (int v = 0; v < NV; ++v) {
      V pv;
      memcpy(&pv, p + v * L, sizeof(V));
      a[v] += wv * pv;
    }
  }
  OVSS_INLINE void add(const ClassBlock& o) {
    for (int v = 0; v < NV; ++v) a[v] += o.a[v];
  }
  // q = p - alpha a on the block's classes; pq[c] += p_c q_c in double
  OVSS_INLINE void finish(const T* p, T* q, T alpha, double* pq) const {
    const V av = broadcast(alpha);
    for (int v = 0; v < NV; ++v) {
      V pv;
      memcpy(&pv, p + v * L, sizeof(V));
      const V qv = pv - av * a[v];
      memcpy(q + v * L, &qv, sizeof(V));
    }
    for (int c = 0; c < NV * L; ++c) pq[c] += static_cast<double>(p[c]) * static_cast<double>(q[c]);
  }
};

// The class blocks of a node's Cp classes: as many blocks of 8 vectors as fit, then one of the rest.
// Calls body.template operator()<NV>(c0) for each block (c0: its first class).
template <typename T, typename Body>
OVSS_INLINE void for_class_blocks(int64_t Cp, const Body& body) {
  constexpr int64_t L = Vec32<T>::kLen;
  int64_t c0 = 0;
  for (; c0 + 8 * L <= Cp; c0 += 8 * L) body.template operator()<8>(c0);
  switch ((Cp - c0) / L) {
    case 1: body.template operator()<1>(c0); break;
    case 2: body.template operator()<2>(c0); break;
    case 3: body.template operator()<3>(c0); break;
    case 4: body.template operator()<4>(c0); break;
    case 5: body.template operator()<5>(c0); break;
    case 6: body.template operator()<6>(c0); break;
    case 7: body.template operator()<7>(c0); break;
    default: break;
  }
}

// Stencil row of pixel i: q_i = p_i - alpha sum s_i[(dy + r) side + dx + r] p_{i + dy W + dx} over
// dy in [dy0, dy1], dx in [dx0, dx1] (the pixels of the square inside the image), for classes [c0, c0 + NV L).
template <typename T, int NV>
OVSS_INLINE void stencil_node(const T* si, const T* p, T* q, double* pq, int64_t i, int64_t c0, int64_t C,
                              int64_t W, int64_t r, int64_t dy0, int64_t dy1, int64_t dx0, int64_t dx1, T alpha) {
  const int64_t side = 2 * r + 1;
  ClassBlock<T, NV> a0, a1;
  a0.zero();
  if constexpr (NV <= 4) a1.zero();
  for (int64_t dy = dy0; dy <= dy1; ++dy) {
    const T* srow = si + (dy + r) * side + r;
    const T* prow = p + (i + dy * W) * C + c0;
    int64_t dx = dx0;
    if constexpr (NV <= 4) {
      for (; dx < dx1; dx += 2) {
        a0.add(srow[dx], prow + dx * C);
        a1.add(srow[dx + 1], prow + (dx + 1) * C);
      }
    }
    for (; dx <= dx1; ++dx) a0.add(srow[dx], prow + dx * C);
  }
  if constexpr (NV <= 4) a0.add(a1);
  a0.finish(p + i * C + c0, q + i * C + c0, alpha, pq + c0);
}

// CSR row i: q_i = p_i - alpha sum_e v_e p_{col_e} over e in [e0, e1), for classes [c0, c0 + NV L)
template <typename T, int NV, typename Index>
OVSS_INLINE void csr_node(const Index* col, const T* v, const T* p, T* q, double* pq, int64_t i, int64_t e0,
                          int64_t e1, int64_t c0, int64_t C, T alpha) {
  ClassBlock<T, NV> a0, a1;
  a0.zero();
  // the neighbours' rows are scattered over p: fetch them kPrefetch entries ahead
  constexpr int64_t kPrefetch = 8, kLines = (NV * ClassBlock<T, NV>::L * sizeof(T) + 63) / 64;
  const auto prefetch = [&](int64_t f) OVSS_LAMBDA_INLINE {
    if (f < e1)
      for (int64_t l = 0; l < kLines; ++l) __builtin_prefetch(p + col[f] * C + c0 + l * (64 / sizeof(T)));
  };
  int64_t e = e0;
  if constexpr (NV <= 4) {
    a1.zero();
    for (; e + 1 < e1; e += 2) {
      prefetch(e + kPrefetch);
      prefetch(e + kPrefetch + 1);
      a0.add(v[e], p + col[e] * C + c0);
      a1.add(v[e + 1], p + col[e + 1] * C + c0);
    }
  }
  for (; e < e1; ++e) {
    prefetch(e + kPrefetch);
    a0.add(v[e], p + col[e] * C + c0);
  }
  if constexpr (NV <= 4) a0.add(a1);
  a0.finish(p + i * C + c0, q + i * C + c0, alpha, pq + c0);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace ovss_fast
