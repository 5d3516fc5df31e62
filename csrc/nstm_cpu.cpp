// The NSTM sequence operator on the CPU, token by token, forward and backward (fp32 and fp64).
//
// One work unit is one (segment, head): a segment is an independent stream laid in the flattened
// time axis (a row of the batch, or a document of a packed batch) with its own initial state and
// its own absolute position. Each unit walks its tokens in order with the slot memory [S, K + V]
// in a small private buffer (it stays in L1/L2): the top_k routed rows are written, the token
// reads all S rows (softmax over slots), and at a period end ((pos + t + 1) % C == 0) the slot
// values go through the state-to-state attention. The work is O(T (S (K + V) + k (K + V))) per
// head plus O(S V (V + S)) per period, the same as the chunk-parallel form, in ONE parallel region
// per call: units are handed out one at a time from an atomic counter, so a thread that the OS
// deschedules (another program holds its core) delays only the unit it holds, not a barrier
// after each of hundreds of small operations.
//
// Backward: the forward stores the state at the start of every block of `block` tokens. The
// backward walks the blocks of a unit from the last to the first; it re-runs a block's forward
// from its checkpoint, recording the old contents of the routed rows, the read probabilities and
// the values before each s2s, then walks the block's tokens in reverse, carrying the adjoint of
// the slot memory and restoring the state exactly (no division by 1 - w anywhere).
//
// Semantics are those of nstm_kernels.reference.naive_recurrent_nstm (write, then read, then s2s
// at a period end); a write with w >= 1 replaces the row exactly. The routing (top_k with ties to
// the lower slot index and a NaN above every number, softmax, sigmoid gate) runs here too, per
// token, so a call is two operations in all: this kernel and its backward.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

// The row lengths (K, V, S) are runtime values; the common ones get loops of a compile-time
// length (fully unrolled, accumulators in registers), the others a generic loop.
#define NSTM_FIXED_LENGTHS(X) X(16) X(32) X(64) X(128)

// the row kernels below are called per slot and token from large task bodies, where GCC stops
// inlining them on its own (a call and a switch per 32-element dot cost ~15 % of a backward)
#define NSTM_INLINE inline __attribute__((always_inline))

template <typename T, int N>
NSTM_INLINE T dot_n(const T* __restrict a, const T* __restrict b) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < N; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
NSTM_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  switch (n) {
#define NSTM_CASE(N) case N: return dot_n<T, N>(a, b);
    NSTM_FIXED_LENGTHS(NSTM_CASE)
#undef NSTM_CASE
    default: break;
  }
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// sum a (b - c), fixed lengths for the common n
template <typename T, int N>
NSTM_INLINE T dot_diff_n(const T* __restrict a, const T* __restrict b, const T* __restrict c) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < N; ++i) s += a[i] * (b[i] - c[i]);
  return s;
}

template <typename T>
NSTM_INLINE T dot_diff(const T* __restrict a, const T* __restrict b, const T* __restrict c, int64_t n) {
  switch (n) {
#define NSTM_CASE(N) case N: return dot_diff_n<T, N>(a, b, c);
    NSTM_FIXED_LENGTHS(NSTM_CASE)
#undef NSTM_CASE
    default: break;
  }
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * (b[i] - c[i]);
  return s;
}

// y += alpha x; y = (1 - w) y + w x; y *= r: fixed-length loops for the common lengths
#define NSTM_ROW_OP(NAME, ARGS, BODY)                                   \
  template <typename T, int N>                                          \
  NSTM_INLINE void NAME##_n ARGS {                                      \
    _Pragma("omp simd") for (int i = 0; i < N; ++i) BODY;               \
  }                                                                     \
  template <typename T>                                                 \
  NSTM_INLINE void NAME ARGS {                                          \
    switch (n) {                                                        \
      case 16: return NAME##_n<T, 16>(ROW_ARGS);                        \
      case 32: return NAME##_n<T, 32>(ROW_ARGS);                        \
      case 64: return NAME##_n<T, 64>(ROW_ARGS);                        \
      case 128: return NAME##_n<T, 128>(ROW_ARGS);                      \
      default: break;                                                   \
    }                                                                   \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) BODY;           \
  }

#define ROW_ARGS alpha, x, y, n
NSTM_ROW_OP(axpy, (T alpha, const T* __restrict x, T* __restrict y, int64_t n), y[i] += alpha * x[i])
#undef ROW_ARGS
#define ROW_ARGS w, x, y, n
NSTM_ROW_OP(lerp_, (T w, const T* __restrict x, T* __restrict y, int64_t n),
            y[i] = (T(1) - w) * y[i] + w * x[i])
#undef ROW_ARGS
#define ROW_ARGS r, y, n
NSTM_ROW_OP(scale_, (T r, T* __restrict y, int64_t n), y[i] *= r)
#undef ROW_ARGS

// exp(x) for the softmaxes, where x = value - max <= 0, or NaN (which stays NaN). fp32: a Cephes
// polynomial (~1 ulp) written so that the compiler vectorises the loop around it; fp64: std::exp.
inline float exp_le0(float x) {
  // branch-free (selects on integers and bit masks) so that the loop around it vectorises
  int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);   // round(x / ln 2), x <= 0
  ni = ni < -126 ? -126 : ni;
  const float n = static_cast<float>(ni);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (ni + 127) << 23);
  const int32_t keep = -static_cast<int32_t>(x >= -87.0f);   // exp(x < -87) -> 0 (and -inf)
  const int32_t nan = -static_cast<int32_t>(x != x);
  return __builtin_bit_cast(float, (__builtin_bit_cast(int32_t, p * scale) & keep) |
                                       (0x7fc00000 & nan));
}
inline double exp_le0(double x) { return std::exp(x); }

// in-place softmax of x[0:n], as torch.softmax: a NaN anywhere, an inf (inf - inf) or an all
// -inf row gives NaN everywhere (the max skips NaNs; x - max then carries them to the sum)
template <typename T>
inline void softmax_(T* __restrict x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = exp_le0(x[i] - m);
  T z = 0;
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < n; ++i) z += x[i];
  const T r = T(1) / z;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = z != z ? z : x[i] * r;
}

// Y[m, p] (+)= X[m, n] W[n, p] (all row-major, contiguous): each row of Y is accumulated in
// registers over n when p is one of the fixed lengths
template <typename T, int P>
inline void mm_p(const T* __restrict X, const T* __restrict W, T* __restrict Y, int64_t m,
                 int64_t n, bool acc) {
  for (int64_t i = 0; i < m; ++i) {
    T a[P];
    T* y = Y + i * P;
#pragma omp simd
    for (int e = 0; e < P; ++e) a[e] = acc ? y[e] : T(0);
    for (int64_t d = 0; d < n; ++d) {
      const T x = X[i * n + d];
      const T* w = W + d * P;
#pragma omp simd
      for (int e = 0; e < P; ++e) a[e] += x * w[e];
    }
#pragma omp simd
    for (int e = 0; e < P; ++e) y[e] = a[e];
  }
}

template <typename T>
inline void mm_any(const T* X, const T* W, T* Y, int64_t m, int64_t n, int64_t p, bool acc) {
  switch (p) {
#define NSTM_CASE(N) case N: return mm_p<T, N>(X, W, Y, m, n, acc);
    NSTM_FIXED_LENGTHS(NSTM_CASE)
#undef NSTM_CASE
    default: break;
  }
  for (int64_t i = 0; i < m; ++i) {
    T* y = Y + i * p;
    if (!acc) std::fill(y, y + p, T(0));
    for (int64_t d = 0; d < n; ++d) axpy(X[i * n + d], W + d * p, y, p);
  }
}

template <typename T>
inline void mm(const T* X, const T* W, T* Y, int64_t m, int64_t n, int64_t p) {
  mm_any(X, W, Y, m, n, p, false);
}

// Y[m, p] += X[m, n] W[n, p]
template <typename T>
inline void mm_acc(const T* X, const T* W, T* Y, int64_t m, int64_t n, int64_t p) {
  mm_any(X, W, Y, m, n, p, true);
}

// Y[n, m] = X[m, n]^T
template <typename T>
inline void transpose(const T* X, T* Y, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) Y[j * m + i] = X[i * n + j];
}

struct Dims {
  int64_t H, S, K, V, top_k, C, block;
  bool s2s;
  double scale;
};

// Per-unit scratch of the state-to-state attention. Every product is an axpy over a contiguous
// row (no horizontal sums): the transposes are kept next to the row-major operands.
template <typename T>
struct S2SScratch {
  std::vector<T> qs, ks, ksT, a, m, vT, aT, dA, dAT, dqs, dks, dVp, wqT, wkT;
  S2SScratch(int64_t S, int64_t V, const T* wq, const T* wk, bool backward)
      : qs(S * V), ks(S * V), ksT(S * V), a(S * S), m(S * V) {
    if (backward && S > 0) {
      for (auto* v : {&vT, &dqs, &dks, &dVp, &wqT, &wkT}) v->resize(std::max(S, V) * V);
      for (auto* v : {&aT, &dA, &dAT}) v->resize(S * S);
      transpose(wq, wqT.data(), V, V);
      transpose(wk, wkT.data(), V, V);
    }
  }
};

// qs = V wq, ks = V wk, a = softmax(qs ks^T / sqrt(V)), m = a V
template <typename T>
void s2s_core(const T* Vs, const T* wq, const T* wk, const Dims& d, S2SScratch<T>& w) {
  const int64_t S = d.S, V = d.V;
  const T rs = std::sqrt(T(V));   // divided by, not multiplied by its inverse: PyTorch's rounding
  mm(Vs, wq, w.qs.data(), S, V, V);
  mm(Vs, wk, w.ks.data(), S, V, V);
  transpose(w.ks.data(), w.ksT.data(), S, V);
  mm(w.qs.data(), w.ksT.data(), w.a.data(), S, V, S);
  for (int64_t s = 0; s < S; ++s) {
    T* row = w.a.data() + s * S;
#pragma omp simd
    for (int64_t r = 0; r < S; ++r) row[r] /= rs;
    softmax_(row, S);
  }
  mm(w.a.data(), Vs, w.m.data(), S, S, V);
}

template <typename T>
void s2s_forward(T* Vs, const T* wq, const T* wk, T g, const Dims& d, S2SScratch<T>& w) {
  s2s_core(Vs, wq, wk, d, w);
  const int64_t n = d.S * d.V;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) Vs[i] = (T(1) - g) * Vs[i] + g * w.m[i];
}

// dV (in: adjoint of the mixed values; out: adjoint of Vs, the values before the mix); adds to
// dwq, dwk, dg
template <typename T>
void s2s_backward(const T* Vs, T* dV, const T* wq, const T* wk, T g, T* dwq, T* dwk, T* dg,
                  const Dims& d, S2SScratch<T>& w) {
  const int64_t S = d.S, V = d.V;
  const T rs = std::sqrt(T(V));
  s2s_core(Vs, wq, wk, d, w);
  T *dA = w.dA.data(), *dAT = w.dAT.data(), *dqs = w.dqs.data(), *dks = w.dks.data(),
    *dVp = w.dVp.data(), *vT = w.vT.data(), *aT = w.aT.data();
  T gsum = 0;
  for (int64_t i = 0; i < S * V; ++i) gsum += dV[i] * (w.m[i] - Vs[i]);
  *dg += gsum;
  for (int64_t i = 0; i < S * V; ++i) dVp[i] = (T(1) - g) * dV[i];
  // m = a V: dA = (g dV) V^T, dVp += g a^T dV (g applied first, as autograd does; dks holds g dV
  // until it is computed below)
  transpose(Vs, vT, S, V);
  for (int64_t i = 0; i < S * V; ++i) dks[i] = g * dV[i];
  mm(dks, vT, dA, S, V, S);
  transpose(w.a.data(), aT, S, S);
  for (int64_t i = 0; i < S * S; ++i) aT[i] *= g;
  mm_acc(aT, dV, dVp, S, S, V);
  // softmax backward, then the 1/sqrt(V) of the logits: dA becomes dZ
  for (int64_t s = 0; s < S; ++s) {
    T* da = dA + s * S;
    const T* a = w.a.data() + s * S;
    const T inner = dot(a, da, S);
#pragma omp simd
    for (int64_t r = 0; r < S; ++r) da[r] = a[r] * (da[r] - inner) / rs;
  }
  // Z = qs ks^T: dqs = dZ ks, dks = dZ^T qs
  mm(dA, w.ks.data(), dqs, S, S, V);
  transpose(dA, dAT, S, S);
  mm(dAT, w.qs.data(), dks, S, S, V);
  // qs = Vs wq: dwq += Vs^T dqs, dVp += dqs wq^T (the same for k)
  mm_acc(vT, dqs, dwq, V, S, V);
  mm_acc(vT, dks, dwk, V, S, V);
  mm_acc(dqs, w.wqT.data(), dVp, S, V, V);
  mm_acc(dks, w.wkT.data(), dVp, S, V, V);
  std::copy(dVp, dVp + S * V, dV);
}

// runs fn(unit) for unit in [0, n) on the intra-op threads, one unit at a time from a counter
template <typename F>
void for_units(int64_t n, const F& fn, bool serial = false) {
  std::atomic<int64_t> next{0};
  const int64_t workers = serial ? 1 : std::min<int64_t>(n, at::get_num_threads());
  if (workers <= 1) {
    for (int64_t u = 0; u < n; ++u) fn(u);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1); u < n; u = next.fetch_add(1)) fn(u);
  });
}

// A segment's blocks are aligned to absolute positions: a block starts at the segment's first token
// and wherever (pos + t) % block == 0, so block b covers tokens [max(0, b block - off),
// min(len, (b + 1) block - off)) with off = pos % block. With C a multiple of the block every
// period end is then the last token of a block, which the block-parallel schedule relies on.
struct Seg {
  int64_t start, len, pos, blk, off;   // blk: index of its first checkpoint; off: pos % block
};

inline int64_t seg_blocks(const Seg& s, int64_t block) {
  return (block <= 0 || s.len == 0) ? 0 : (s.off + s.len + block - 1) / block;
}

inline void block_range(const Seg& s, int64_t b, int64_t block, int64_t* t0, int64_t* t1) {
  *t0 = std::max<int64_t>(0, b * block - s.off);
  *t1 = std::min(s.len, (b + 1) * block - s.off);
}

std::vector<Seg> read_segments(const Tensor& seg, int64_t block, int64_t* nblocks) {
  TORCH_CHECK(seg.dim() == 2 && seg.size(1) == 3 && seg.scalar_type() == at::kLong,
              "nstm_cpu: segments must be an int64 [N, 3] tensor of (start, length, position)");
  auto a = seg.contiguous();
  const int64_t* p = a.data_ptr<int64_t>();
  std::vector<Seg> out(a.size(0));
  int64_t b = 0;
  for (int64_t i = 0; i < a.size(0); ++i) {
    TORCH_CHECK(p[3 * i + 2] >= 0, "nstm_cpu: segment ", i, " has a negative position ", p[3 * i + 2]);
    out[i] = Seg{p[3 * i], p[3 * i + 1], p[3 * i + 2], b, block > 0 ? p[3 * i + 2] % block : 0};
    b += seg_blocks(out[i], block);
  }
  *nblocks = b;
  return out;
}

// Zero the rows (`row` elements per token) of the tokens that no segment covers: the outputs are
// allocated uninitialised and every unit writes (or zeroes, then accumulates into) its own
// tokens' rows inside the parallel region. A separate zero fill of each output was a parallel
// region of its own per tensor: 6 of them per call cost 7 ms of ~75 alone and 55 ms next to a
// 2-thread neighbour (bench/NOTES.md).
template <typename T>
void zero_gaps(T* x, int64_t row, const std::vector<int64_t>& gaps) {
  for (const int64_t t : gaps) std::fill(x + t * row, x + (t + 1) * row, T(0));
}

// the tokens of [0, tokens) that no segment covers
inline std::vector<int64_t> gap_tokens(int64_t tokens, const std::vector<Seg>& segs) {
  std::vector<char> covered(tokens, 0);
  for (const auto& s : segs) std::fill(covered.begin() + s.start, covered.begin() + s.start + s.len, 1);
  std::vector<int64_t> gaps;
  for (int64_t t = 0; t < tokens; ++t)
    if (!covered[t]) gaps.push_back(t);
  return gaps;
}

inline bool period_end(const Dims& d, int64_t pos, int64_t t) {
  return d.s2s && (pos + t + 1) % d.C == 0;
}

// The routing order as integers: a larger key ranks higher; -0 and +0 are equal, every NaN ranks
// above every number (and NaNs tie among themselves). Ties go to the lower slot index.
template <typename T>
struct Key {
  using type = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  static inline type of(T x) {
    constexpr type top = std::numeric_limits<type>::max();
    const type bits = __builtin_bit_cast(type, static_cast<T>(x + T(0)));   // -0 -> +0
    const type key = bits ^ ((bits >> (8 * sizeof(T) - 1)) & top);          // floats ordered as ints
    return x != x ? top : key;
  }
};

// the routing of one token (spec step 1): the top_k logits (ties to the lower slot index),
// alpha = softmax over them, beta = sigmoid(gate), w = alpha beta
template <typename T>
struct Route {
  std::vector<int64_t> idx;
  std::vector<T> alpha, w;
  std::vector<typename Key<T>::type> keys;
  T beta = 0;
  Route(int64_t k, int64_t S) : idx(k), alpha(k), w(k), keys(S) {}
};

template <typename T>
inline void route(const T* lg, T gate, const Dims& d, Route<T>& r) {
  using K_t = typename Key<T>::type;
  const int64_t S = d.S, k = d.top_k;
  K_t* key = r.keys.data();
  for (int64_t i = 0; i < S; ++i) key[i] = Key<T>::of(lg[i]);
  // top_k passes of a vectorised argmax: the largest key left, at its lowest index (the tie
  // rule), then taken out (no real key is the type's minimum)
  constexpr K_t taken = std::numeric_limits<K_t>::min();
  const K_t n = static_cast<K_t>(S);
  for (int64_t j = 0; j < k; ++j) {
    K_t m = taken;
#pragma omp simd reduction(max : m)
    for (K_t i = 0; i < n; ++i) m = key[i] > m ? key[i] : m;
    K_t at = n;
#pragma omp simd reduction(min : at)
    for (K_t i = 0; i < n; ++i) at = (key[i] == m && i < at) ? i : at;
    key[at] = taken;
    r.idx[j] = at;
    r.alpha[j] = lg[at];
  }
  softmax_(r.alpha.data(), k);
  r.beta = T(1) / (T(1) + std::exp(-gate));
  for (int64_t j = 0; j < k; ++j) r.w[j] = r.alpha[j] * r.beta;
}

// spec step 2: the gated write of the top_k routed rows (oldK / oldV: their contents before, if
// not null)
template <typename T>
inline void write_rows(T* Ks, T* Vs, const T* k, const T* v, const int64_t* idx, const T* w,
                       const Dims& d, T* oldK, T* oldV) {
  const int64_t K = d.K, V = d.V;
  for (int64_t j = 0; j < d.top_k; ++j) {
    const int64_t i = idx[j];
    const T wj = w[j];
    T* kr = Ks + i * K;
    T* vr = Vs + i * V;
    if (oldK) {
      std::copy(kr, kr + K, oldK + j * K);
      std::copy(vr, vr + V, oldV + j * V);
    }
    if (wj >= T(1)) {           // a full write replaces the row exactly
      std::copy(k, k + K, kr);
      std::copy(v, v + V, vr);
    } else {
      lerp_(wj, k, kr, K);
      lerp_(wj, v, vr, V);
    }
  }
}

// spec step 3: the read, p = softmax(scale q.K_i) (length S), o = sum_i p_i V_i
template <typename T>
inline void read_slots(const T* Ks, const T* Vs, const T* q, T* o, T* p, const Dims& d) {
  const int64_t S = d.S, K = d.K, V = d.V;
  const T sc = T(d.scale);
  for (int64_t i = 0; i < S; ++i) p[i] = sc * dot(q, Ks + i * K, K);
  softmax_(p, S);
  mm(p, Vs, o, 1, S, V);
}

// one token: route, write the top_k rows, read (p: the read probabilities, length S) into o [V]
template <typename T>
inline void token_forward(T* Ks, T* Vs, const T* q, const T* k, const T* v, const T* lg, T gate,
                          T* o, T* p, const Dims& d, Route<T>& r, T* oldK, T* oldV) {
  route(lg, gate, d, r);
  write_rows(Ks, Vs, k, v, r.idx.data(), r.w.data(), d, oldK, oldV);
  read_slots(Ks, Vs, q, o, p, d);
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg,
                  const Tensor& gate, const Tensor& k0, const Tensor& v0, const Tensor& wq,
                  const Tensor& wk, const Tensor& mix, int64_t top_k) {
  for (const Tensor* t : {&q, &k, &v, &lg, &gate, &k0, &v0, &wq, &wk, &mix}) {
    TORCH_CHECK(t->device().is_cpu(), "nstm_cpu: every tensor must be on the CPU");
    TORCH_CHECK(t->is_contiguous(), "nstm_cpu: every tensor must be contiguous");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "nstm_cpu: all tensors must share q's dtype");
  }
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1),
              "nstm_cpu: q, k must be [T, H, K] and v [T, H, V]");
  TORCH_CHECK(lg.dim() == 3 && lg.size(0) == q.size(0) && lg.size(1) == q.size(1) &&
                  gate.dim() == 2 && gate.size(0) == q.size(0) && gate.size(1) == q.size(1),
              "nstm_cpu: route logits must be [T, H, S] and write gates [T, H]");
  TORCH_CHECK(top_k >= 1 && top_k <= lg.size(2), "nstm_cpu: top_k must be in [1, S]");
}

template <typename T>
struct Inputs {
  const T *q, *k, *v, *lg, *gate, *wq, *wk, *mix;
  Inputs(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& lg_,
         const Tensor& gate_, const Tensor& wq_, const Tensor& wk_, const Tensor& mix_, bool s2s)
      : q(q_.data_ptr<T>()), k(k_.data_ptr<T>()), v(v_.data_ptr<T>()), lg(lg_.data_ptr<T>()),
        gate(gate_.data_ptr<T>()), wq(s2s ? wq_.data_ptr<T>() : nullptr),
        wk(s2s ? wk_.data_ptr<T>() : nullptr), mix(s2s ? mix_.data_ptr<T>() : nullptr) {}
};

// ---------------------------------------------------------------------------------------------
// The block-parallel schedule ("fine"). A (segment, head) is sequential, so with the schedule
// above a call has only N H units: at T = 8K, B = 1, H = 4 that is 4 units for 2 threads, and a
// thread that the OS deschedules while it holds one (another program on the machine) leaves the
// other thread idle at the end of the region. The fine schedule splits each unit into its blocks
// and keeps only a thin sequential chain per unit:
//   forward:  chain  A(b): route, write the routed rows, s2s at the period end -> checkpoint b + 1
//             blocks B(b): from checkpoint b, the writes again (routing kept from A) and the reads
//   backward: blocks B1(b): the block's backward with a zero adjoint entering at its end: dq, the
//                     local parts of dk, dv and of d(write weight), the adjoint left at its start
//                     and the product of (1 - w) of each slot over the block
//             chain  B2(b): the s2s backward at the block's end, then adjoint(start) = local +
//                     decay * adjoint(end) (the writes scale a slot's adjoint by 1 - w, linearly)
//             blocks B3(b): the parts of dk, dv, d(write weight) that the adjoint entering at the
//                     block's end contributes, then the routing's gradients
// This needs every period end at a block's last token (the s2s is then never inside a block):
// blocks are aligned to absolute positions and C must be a multiple of the block. Everything
// is linear in the adjoint, so the sums are those of the per-unit schedule up to rounding (the
// forward's are the same bits).

// The tasks of one call: per unit u, nb[u] blocks and up to three lanes of tasks over them, a
// parallel lane P1 (optional), a chain CH and a parallel lane P2, each in lane order i = 0, 1, ...
// CH[i] runs after P1[i] and after CH[i - 1]; P2[i] runs after CH[i]. A thread first tries the
// task that follows its last one in its unit (P1[i] -> CH[i] -> P2[i] -> P1[i + 1] ...: the
// block's data are still in its cache, and a thread alone walks a unit in the per-unit order);
// else a chain step (of the unit whose chain is furthest behind: the critical path), a P1 task
// (of the unit whose P1 lane is least ahead of its chain), a P2 task. A thread with nothing ready
// sleeps until a task completes.
class BlockSched {
 public:
  enum Lane { P1 = 0, CH = 1, P2 = 2 };

  BlockSched(const std::vector<int64_t>& nb, bool has_p1)
      : nb_(nb), p1_next_(nb.size(), 0), ch_done_(nb.size(), 0), p2_next_(nb.size(), 0),
        ch_busy_(nb.size(), 0), p1_off_(nb.size() + 1, 0), has_p1_(has_p1) {
    for (size_t u = 0; u < nb.size(); ++u) {
      p1_off_[u + 1] = p1_off_[u] + (has_p1 ? nb[u] : 0);
      left_ += nb[u] * (has_p1 ? 3 : 2);
    }
    p1_done_.assign(p1_off_.back(), 0);
  }

  int64_t tasks() const { return left_; }

  // the next task (false once every task has been handed out, or after abort()); lane, unit and i
  // hold the caller's last task (lane < 0: none) and receive the next one
  bool next(int* lane, int64_t* unit, int64_t* i) {
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      if (left_ == 0 || aborted_) return false;
      if ((*lane >= 0 && follow(lane, unit, i)) || pick(lane, unit, i)) {
        --left_;
        return true;
      }
      ++waiting_;
      cv_.wait(lk);
      --waiting_;
    }
  }

  // a task failed (it throws on): every thread stops taking tasks instead of waiting for a chain
  // step that will never come
  void abort() {
    std::lock_guard<std::mutex> lk(m_);
    aborted_ = true;
    cv_.notify_all();
  }

  void done(int lane, int64_t u, int64_t i) {
    if (lane == P2) return;                       // nothing waits for a P2 task
    std::lock_guard<std::mutex> lk(m_);
    if (lane == P1) {
      p1_done_[p1_off_[u] + i] = 1;
    } else {
      ++ch_done_[u];
      ch_busy_[u] = 0;
    }
    if (waiting_ > 0) cv_.notify_all();
  }

 private:
  bool ch_ready(int64_t u) const {
    const int64_t c = ch_done_[u];
    return !ch_busy_[u] && c < nb_[u] && (!has_p1_ || p1_done_[p1_off_[u] + c]);
  }

  // take (lane, u, i) if it is that lane's next task and ready
  bool take(int lane, int64_t u, int64_t i) {
    if (i >= nb_[u]) return false;
    if (lane == P1) {
      if (p1_next_[u] != i) return false;
      ++p1_next_[u];
    } else if (lane == CH) {
      if (ch_done_[u] != i || !ch_ready(u)) return false;
      ch_busy_[u] = 1;
    } else {
      if (p2_next_[u] != i || i >= ch_done_[u]) return false;
      ++p2_next_[u];
    }
    return true;
  }

  bool follow(int* lane, int64_t* unit, int64_t* i) {
    int nl = *lane + 1;
    int64_t ni = *i;
    if (nl > P2) {
      nl = has_p1_ ? P1 : CH;
      ++ni;
    }
    if (!take(nl, *unit, ni)) return false;
    *lane = nl, *i = ni;
    return true;
  }

  bool pick(int* lane, int64_t* unit, int64_t* i) {
    const int64_t U = static_cast<int64_t>(nb_.size());
    int64_t best = -1;
    for (int64_t u = 0; u < U; ++u)
      if (ch_ready(u) && (best < 0 || ch_done_[u] < ch_done_[best])) best = u;
    if (best >= 0) {
      ch_busy_[best] = 1;
      *lane = CH, *unit = best, *i = ch_done_[best];
      return true;
    }
    if (has_p1_) {
      for (int64_t u = 0; u < U; ++u) {
        if (p1_next_[u] >= nb_[u]) continue;
        if (best < 0 || p1_next_[u] - ch_done_[u] < p1_next_[best] - ch_done_[best]) best = u;
      }
      if (best >= 0) {
        *lane = P1, *unit = best, *i = p1_next_[best]++;
        return true;
      }
    }
    for (int64_t u = 0; u < U; ++u) {
      if (p2_next_[u] < ch_done_[u]) {
        *lane = P2, *unit = u, *i = p2_next_[u]++;
        return true;
      }
    }
    return false;
  }

  std::vector<int64_t> nb_, p1_next_, ch_done_, p2_next_;
  std::vector<char> ch_busy_, p1_done_;
  std::vector<int64_t> p1_off_;
  bool has_p1_;
  bool aborted_ = false;
  int64_t left_ = 0;
  int waiting_ = 0;
  std::mutex m_;
  std::condition_variable cv_;
};

// runs fn() on min(tasks, intra-op threads) threads; fn pulls its tasks from `sched`, and a
// thread whose task throws stops the others (then parallel_for rethrows the exception)
template <typename F>
void on_threads(BlockSched& sched, const F& fn) {
  const int64_t workers = std::min<int64_t>(sched.tasks(), at::get_num_threads());
  const auto guarded = [&] {
    try {
      fn();
    } catch (...) {
      sched.abort();
      throw;
    }
  };
  if (workers <= 1) {
    guarded();
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { guarded(); });
}

// whether the block-parallel schedule applies: checkpoints, and no period end inside a block
inline bool fine_applies(const Dims& d) {
  return d.block > 0 && (!d.s2s || d.C % d.block == 0);
}

// the `schedule` argument of the ops: 0 = automatic, 1 = one unit per (segment, head), 2 = blocks
// (where fine_applies, i.e. with checkpoints (a call that keeps gradients) and C a multiple of
// the block; else per unit)
enum Schedule : int64_t { SCHEDULE_AUTO = 0, SCHEDULE_UNITS = 1, SCHEDULE_BLOCKS = 2 };
// automatic: blocks for calls of at most this many units. A rule on the shape alone, not on the
// thread count, so that a call gives the same bits on any number of threads (the two schedules'
// backwards sum in different orders). Blocks pay off where units are few per thread (bench/NOTES.md,
// issue 12); with many units the scheduler's lock would be contended and per unit balances anyway.
constexpr int64_t FINE_MAX_UNITS = 16;

inline void check_schedule(int64_t schedule) {
  TORCH_CHECK(schedule >= SCHEDULE_AUTO && schedule <= SCHEDULE_BLOCKS,
              "nstm_cpu: schedule must be 0 (automatic), 1 (per unit) or 2 (blocks), got ", schedule);
}

inline bool use_fine(int64_t schedule, const Dims& d, int64_t units) {
  if (schedule == SCHEDULE_UNITS || !fine_applies(d)) return false;
  return schedule == SCHEDULE_BLOCKS || units <= FINE_MAX_UNITS;
}

// the checks the forward and the backward share: the s2s weights, the segments inside [0, T)
void check_call(const std::vector<Seg>& segs, int64_t tokens, int64_t H, int64_t V, bool has_s2s,
                int64_t C, const Tensor& wq, const Tensor& wk, const Tensor& mix) {
  TORCH_CHECK(!has_s2s || (C > 0 && wq.dim() == 3 && wq.size(0) == H && wq.size(1) == V &&
                           wq.size(2) == V && wk.sizes() == wq.sizes() && mix.numel() == H),
              "nstm_cpu: with the s2s, C must be > 0 (got ", C, "), the s2s weights [H, V, V] = [", H,
              ", ", V, ", ", V, "] (got ", wq.sizes(), " and ", wk.sizes(), ") and the mix [H] (got ",
              mix.numel(), " elements)");
  for (size_t i = 0; i < segs.size(); ++i)
    TORCH_CHECK(segs[i].start >= 0 && segs[i].len >= 0 && segs[i].start + segs[i].len <= tokens,
                "nstm_cpu: segment ", i, " (start ", segs[i].start, ", length ", segs[i].len,
                ") lies outside the time axis [0, ", tokens, ")");
}

// a thread's s2s scratch for each head, made on first use
template <typename T>
struct HeadScratch {
  std::vector<std::unique_ptr<S2SScratch<T>>> s;
  const Dims& d;
  const T *wq, *wk;
  bool backward;
  HeadScratch(const Dims& d_, const T* wq_, const T* wk_, bool bw)
      : s(d_.H), d(d_), wq(wq_), wk(wk_), backward(bw) {}
  S2SScratch<T>& at(int64_t h) {
    if (!s[h]) s[h].reset(new S2SScratch<T>(d.S, d.V, wq + h * d.V * d.V, wk + h * d.V * d.V, backward));
    return *s[h];
  }
};

template <typename T>
void fine_forward(const Inputs<T>& in, const T* K0, const T* V0, T* O, T* KF, T* VF, T* CK,
                  const std::vector<Seg>& segs, const Dims& d, int64_t tokens) {
  const int64_t H = d.H, S = d.S, K = d.K, V = d.V, tk = d.top_k, blk = d.block;
  const int64_t U = static_cast<int64_t>(segs.size()) * H, SK = S * K, SKV = S * (K + V);
  std::vector<int64_t> nb(U);
  for (int64_t u = 0; u < U; ++u) {
    nb[u] = seg_blocks(segs[u / H], blk);
    if (nb[u] == 0) {                                 // no tokens: the state passes through
      std::copy(K0 + u * SK, K0 + (u + 1) * SK, KF + u * SK);
      std::copy(V0 + u * S * V, V0 + (u + 1) * S * V, VF + u * S * V);
    }
  }
  std::vector<int64_t> ridx(tokens * H * tk);       // the routing, from the chain to the reads
  std::vector<T> rw(tokens * H * tk);
  BlockSched sched(nb, false);
  on_threads(sched, [&] {
    std::vector<T> Ks(SK), Vs(S * V), p(S);
    Route<T> r(tk, S);
    HeadScratch<T> scr(d, in.wq, in.wk, false);
    int lane = -1;
    int64_t u = 0, b = 0;
    while (sched.next(&lane, &u, &b)) {
      const int64_t h = u % H;
      const Seg& sg = segs[u / H];
      int64_t t0, t1;
      block_range(sg, b, blk, &t0, &t1);
      T* c = CK + ((sg.blk + b) * H + h) * SKV;
      if (lane == BlockSched::CH && b == 0) {
        std::copy(K0 + u * SK, K0 + (u + 1) * SK, c);
        std::copy(V0 + u * S * V, V0 + (u + 1) * S * V, c + SK);
      }
      std::copy(c, c + SK, Ks.begin());
      std::copy(c + SK, c + SKV, Vs.begin());
      if (lane == BlockSched::CH) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t tok = (sg.start + t) * H + h;
          route(in.lg + tok * S, in.gate[tok], d, r);
          std::copy(r.idx.begin(), r.idx.end(), ridx.begin() + tok * tk);
          std::copy(r.w.begin(), r.w.end(), rw.begin() + tok * tk);
          write_rows(Ks.data(), Vs.data(), in.k + tok * K, in.v + tok * V, r.idx.data(),
                     r.w.data(), d, static_cast<T*>(nullptr), static_cast<T*>(nullptr));
          if (period_end(d, sg.pos, t))               // only at t1 - 1 (fine_applies)
            s2s_forward(Vs.data(), in.wq + h * V * V, in.wk + h * V * V, in.mix[h], d, scr.at(h));
        }
        const bool last = b + 1 == nb[u];
        T* nk = last ? KF + u * SK : c + H * SKV;     // the next block's checkpoint, or the final state
        T* nv = last ? VF + u * S * V : c + H * SKV + SK;
        std::copy(Ks.begin(), Ks.end(), nk);
        std::copy(Vs.begin(), Vs.end(), nv);
      } else {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t tok = (sg.start + t) * H + h;
          write_rows(Ks.data(), Vs.data(), in.k + tok * K, in.v + tok * V, ridx.data() + tok * tk,
                     rw.data() + tok * tk, d, static_cast<T*>(nullptr), static_cast<T*>(nullptr));
          read_slots(Ks.data(), Vs.data(), in.q + tok * K, O + tok * V, p.data(), d);
        }
      }
      sched.done(lane, u, b);
    }
  });
}

// the routing's backward: w = alpha beta, alpha = softmax(selected logits), beta = sigmoid(gate)
// (d alpha first, then softmax's y (g - sum g y), as torch: exactly 0 for top_k = 1); dlg: the
// token's row of [S] (only the routed entries are written), dg: its gate gradient
template <typename T>
inline void route_backward(const T* dw, const int64_t* idx, const T* alpha, T beta, int64_t tk,
                           T* da, T* dlg, T* dg) {
  T dbeta = 0, ainner = 0;
  for (int64_t jj = 0; jj < tk; ++jj) {
    dbeta += dw[jj] * alpha[jj];
    da[jj] = dw[jj] * beta;
  }
  for (int64_t jj = 0; jj < tk; ++jj) ainner += da[jj] * alpha[jj];
  for (int64_t jj = 0; jj < tk; ++jj) dlg[idx[jj]] = alpha[jj] * (da[jj] - ainner);
  *dg = dbeta * beta * (T(1) - beta);
}

// the read's backward for one token: o = sum_i p_i V_i, p = softmax(scale q.K_i); adds to the
// slot adjoints gK, gV and to dq
template <typename T>
inline void read_backward(const T* Ks, const T* Vs, const T* p, const T* qt, const T* dot_, T* gK,
                          T* gV, T* dq, T* dp, T* ds, const Dims& d) {
  const int64_t S = d.S, K = d.K, V = d.V;
  const T sc = T(d.scale);
  T inner = 0;
  for (int64_t i = 0; i < S; ++i) {
    dp[i] = dot(dot_, Vs + i * V, V);
    inner += p[i] * dp[i];
  }
  for (int64_t i = 0; i < S; ++i) {
    ds[i] = sc * p[i] * (dp[i] - inner);
    axpy(ds[i], qt, gK + i * K, K);
    axpy(p[i], dot_, gV + i * V, V);
  }
  mm_acc(ds, Ks, dq, 1, S, K);
}

// the write's backward for one token (X_i = (1 - w) X_i,old + w x for its routed rows i): dw
// [top_k] from the slot adjoints gK, gV, the share of dk, dv added to dkt, dvt, the adjoints
// scaled by 1 - w (and the decays D[i] too, if not null), the rows restored to their old contents
template <typename T>
inline void write_backward(T* Ks, T* Vs, const T* kt, const T* vt, const Route<T>& r,
                           const T* oldK, const T* oldV, T* gK, T* gV, T* dkt, T* dvt, T* dw, T* D,
                           const Dims& d) {
  const int64_t K = d.K, V = d.V;
  for (int64_t jj = 0; jj < d.top_k; ++jj) {
    const int64_t i = r.idx[jj];
    const T wj = r.w[jj];
    const T* ko = oldK + jj * K;
    const T* vo = oldV + jj * V;
    T* gk = gK + i * K;
    T* gv = gV + i * V;
    dw[jj] = dot_diff(gk, kt, ko, K) + dot_diff(gv, vt, vo, V);
    axpy(wj, gk, dkt, K);
    axpy(wj, gv, dvt, V);
    scale_(T(1) - wj, gk, K);
    scale_(T(1) - wj, gv, V);
    if (D) D[i] *= T(1) - wj;
    std::copy(ko, ko + K, Ks + i * K);
    std::copy(vo, vo + V, Vs + i * V);
  }
}

template <typename T>
void fine_backward(const Inputs<T>& in, const T* CK, const T* DO, const T* DKF, const T* DVF,
                   T* DQ, T* DK, T* DV, T* DLG, T* DG, T* DK0, T* DV0, T* DWQ, T* DWK, T* DMIX,
                   const std::vector<Seg>& segs, const Dims& d, int64_t tokens, int64_t nblocks) {
  const int64_t H = d.H, S = d.S, K = d.K, V = d.V, tk = d.top_k, blk = d.block;
  const int64_t U = static_cast<int64_t>(segs.size()) * H, SK = S * K, SV = S * V, SKV = SK + SV;
  std::vector<int64_t> nb(U);
  std::vector<T> G(U * SKV);                         // each unit's adjoint where its chain is
  for (int64_t u = 0; u < U; ++u) {
    nb[u] = seg_blocks(segs[u / H], blk);
    std::copy(DKF + u * SK, DKF + (u + 1) * SK, G.begin() + u * SKV);
    std::copy(DVF + u * SV, DVF + (u + 1) * SV, G.begin() + u * SKV + SK);
    if (nb[u] == 0) {
      std::copy(DKF + u * SK, DKF + (u + 1) * SK, DK0 + u * SK);
      std::copy(DVF + u * SV, DVF + (u + 1) * SV, DV0 + u * SV);
    }
  }
  // per block: the local adjoint at its start (B1), replaced by the adjoint entering at its end
  // (B2, for B3); the decay of each slot over the block; the values before its period-end s2s
  std::vector<T> Gb(nblocks * H * SKV), Db(nblocks * H * S), Pre(d.s2s ? nblocks * H * SV : 0);
  // per token: the routing (from B1 to B3) and the local d(write weight)
  std::vector<int64_t> ridx(tokens * H * tk);
  std::vector<T> rw(tokens * H * tk), ralpha(tokens * H * tk), rbeta(tokens * H), dwl(tokens * H * tk);
  BlockSched sched(nb, true);
  on_threads(sched, [&] {
    std::vector<T> Ks(SK), Vs(SV), o(V), P(blk * S), oldK(blk * tk * K), oldV(blk * tk * V);
    std::vector<T> gK(SK), gV(SV), tmp(SKV), Dl(S), dp(S), ds(S), dw(tk), da(tk);
    std::vector<T> aK(S), aV(S), ex(blk * tk);
    std::vector<Route<T>> R(blk, Route<T>(tk, S));
    HeadScratch<T> scr(d, in.wq, in.wk, true);
    int lane = -1;
    int64_t u = 0, i = 0;
    while (sched.next(&lane, &u, &i)) {
      const int64_t h = u % H;
      const Seg& sg = segs[u / H];
      const int64_t b = nb[u] - 1 - i;               // the lanes walk the blocks backwards
      int64_t t0, t1;
      block_range(sg, b, blk, &t0, &t1);
      const int64_t gblk = (sg.blk + b) * H + h;
      const T* c = CK + gblk * SKV;
      T* gb = Gb.data() + gblk * SKV;
      const bool ends_period = period_end(d, sg.pos, t1 - 1);
      if (lane == BlockSched::P1) {
        std::copy(c, c + SK, Ks.begin());
        std::copy(c + SK, c + SKV, Vs.begin());
        for (int64_t t = t0; t < t1; ++t) {          // re-run the block (no s2s inside it)
          const int64_t tok = (sg.start + t) * H + h, j = t - t0;
          std::fill(DQ + tok * K, DQ + (tok + 1) * K, T(0));
          std::fill(DK + tok * K, DK + (tok + 1) * K, T(0));
          std::fill(DV + tok * V, DV + (tok + 1) * V, T(0));
          std::fill(DLG + tok * S, DLG + (tok + 1) * S, T(0));
          token_forward(Ks.data(), Vs.data(), in.q + tok * K, in.k + tok * K, in.v + tok * V,
                        in.lg + tok * S, in.gate[tok], o.data(), P.data() + j * S, d, R[j],
                        oldK.data() + j * tk * K, oldV.data() + j * tk * V);
          std::copy(R[j].idx.begin(), R[j].idx.end(), ridx.begin() + tok * tk);
          std::copy(R[j].w.begin(), R[j].w.end(), rw.begin() + tok * tk);
          std::copy(R[j].alpha.begin(), R[j].alpha.end(), ralpha.begin() + tok * tk);
          rbeta[tok] = R[j].beta;
        }
        if (ends_period) std::copy(Vs.begin(), Vs.end(), Pre.begin() + gblk * SV);
        std::fill(gK.begin(), gK.end(), T(0));
        std::fill(gV.begin(), gV.end(), T(0));
        std::fill(Dl.begin(), Dl.end(), T(1));
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t tok = (sg.start + t) * H + h, j = t - t0;
          read_backward(Ks.data(), Vs.data(), P.data() + j * S, in.q + tok * K, DO + tok * V,
                        gK.data(), gV.data(), DQ + tok * K, dp.data(), ds.data(), d);
          write_backward(Ks.data(), Vs.data(), in.k + tok * K, in.v + tok * V, R[j],
                         oldK.data() + j * tk * K, oldV.data() + j * tk * V, gK.data(), gV.data(),
                         DK + tok * K, DV + tok * V, dwl.data() + tok * tk, Dl.data(), d);
        }
        std::copy(gK.begin(), gK.end(), gb);
        std::copy(gV.begin(), gV.end(), gb + SK);
        std::copy(Dl.begin(), Dl.end(), Db.begin() + gblk * S);
      } else if (lane == BlockSched::CH) {
        T* g = G.data() + u * SKV;                   // the adjoint of the state after block b
        if (ends_period)
          s2s_backward(Pre.data() + gblk * SV, g + SK, in.wq + h * V * V, in.wk + h * V * V,
                       in.mix[h], DWQ + u * V * V, DWK + u * V * V, DMIX + u, d, scr.at(h));
        const T* D = Db.data() + gblk * S;
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t e = 0; e < K; ++e) tmp[s * K + e] = gb[s * K + e] + D[s] * g[s * K + e];
          for (int64_t e = 0; e < V; ++e)
            tmp[SK + s * V + e] = gb[SK + s * V + e] + D[s] * g[SK + s * V + e];
        }
        std::copy(g, g + SKV, gb);                    // B3 reads what entered at the block's end
        std::copy(tmp.begin(), tmp.end(), g);
        if (b == 0) {
          std::copy(g, g + SK, DK0 + u * SK);
          std::copy(g + SK, g + SKV, DV0 + u * SV);
        }
      } else {
        // The adjoint entering at the block's end, Gin, reaches token t's routed slot i scaled by
        // the product of (1 - w) of the later writes to i in the block, r_i. Its share of
        // d(write weight) is r_i (Gin_K[i].(k_t - K_i) + Gin_V[i].(v_t - V_i)) with K_i, V_i the
        // row before the write, and of dk, dv: w r_i Gin[i]. Only the projections
        // a_i = Gin_K[i].K_i (and the V one) are needed, and the writes move them like the rows:
        // a_i <- (1 - w) a_i + w Gin_K[i].k_t. A forward pass keeps them, a reverse pass the r_i.
        bool zero = true;
        for (int64_t e = 0; e < SKV && zero; ++e) zero = gb[e] == T(0);
        for (int64_t s = 0; s < S; ++s) {
          aK[s] = dot(gb + s * K, c + s * K, K);
          aV[s] = dot(gb + SK + s * V, c + SK + s * V, V);
        }
        for (int64_t t = t0; t < t1 && !zero; ++t) {
          const int64_t tok = (sg.start + t) * H + h, j = t - t0;
          const int64_t* idx = ridx.data() + tok * tk;
          for (int64_t jj = 0; jj < tk; ++jj) {
            const int64_t s = idx[jj];
            const T wj = rw[tok * tk + jj];
            const T gk = dot(gb + s * K, in.k + tok * K, K);
            const T gv = dot(gb + SK + s * V, in.v + tok * V, V);
            ex[j * tk + jj] = (gk - aK[s]) + (gv - aV[s]);
            if (wj >= T(1)) {                         // as the write: the row replaced exactly
              aK[s] = gk;
              aV[s] = gv;
            } else {
              aK[s] = (T(1) - wj) * aK[s] + wj * gk;
              aV[s] = (T(1) - wj) * aV[s] + wj * gv;
            }
          }
        }
        std::fill(Dl.begin(), Dl.end(), T(1));      // r_i
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t tok = (sg.start + t) * H + h, j = t - t0;
          const int64_t* idx = ridx.data() + tok * tk;
          for (int64_t jj = 0; jj < tk; ++jj) {
            dw[jj] = dwl[tok * tk + jj];
            if (zero) continue;
            const int64_t s = idx[jj];
            const T wj = rw[tok * tk + jj];
            dw[jj] += Dl[s] * ex[j * tk + jj];
            axpy(wj * Dl[s], gb + s * K, DK + tok * K, K);
            axpy(wj * Dl[s], gb + SK + s * V, DV + tok * V, V);
            Dl[s] *= T(1) - wj;
          }
          route_backward(dw.data(), idx, ralpha.data() + tok * tk, rbeta[tok], tk, da.data(),
                         DLG + tok * S, DG + tok);
        }
      }
      sched.done(lane, u, i);
    }
  });
}

// maps > 0: also the routing (indices, weights [T, H, top_k]), the reads p [T, H, S] and the
// s2s maps [maps, N, H, S, S] (event e of each unit at [e, n, h]; every segment must have the
// same number of period ends, `maps` of them, as the rows of one batch do)
std::vector<Tensor> nstm_cpu_forward(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg, const Tensor& gate,
    const Tensor& k0, const Tensor& v0, const Tensor& seg, const Tensor& wq, const Tensor& wk,
    const Tensor& mix, int64_t top_k, int64_t C, bool has_s2s, double scale, int64_t block,
    bool want_maps, int64_t n_events, int64_t schedule) {
  check_inputs(q, k, v, lg, gate, k0, v0, wq, wk, mix, top_k);
  check_schedule(schedule);
  const int64_t H = q.size(1), K = q.size(2), V = v.size(2), S = lg.size(2);
  int64_t nblocks = 0;
  const auto segs = read_segments(seg, block, &nblocks);
  const int64_t N = static_cast<int64_t>(segs.size());
  check_call(segs, q.size(0), H, V, has_s2s, C, wq, wk, mix);
  TORCH_CHECK(k0.dim() == 4 && k0.size(0) == N && k0.size(1) == H && k0.size(2) == S && k0.size(3) == K,
              "nstm_cpu: the initial keys must be [N, H, S, K]");
  TORCH_CHECK(v0.dim() == 4 && v0.size(0) == N && v0.size(1) == H && v0.size(2) == S && v0.size(3) == V,
              "nstm_cpu: the initial values must be [N, H, S, V]");
  const Dims d{H, S, K, V, top_k, C, block, has_s2s, scale};
  // blocks only with checkpoints (a call that keeps gradients; a no-grad call would need them
  // for the reads alone, O(T) memory) and without maps
  const bool fine = !want_maps && use_fine(schedule, d, N * H);
  auto o = at::empty({q.size(0), H, V}, q.options());        // every token written, gaps below
  auto kf = at::empty_like(k0);
  auto vf = at::empty_like(v0);
  auto ck = at::empty({block > 0 ? nblocks : 0, H, S, K + V}, q.options());
  const int64_t TT = want_maps ? q.size(0) : 0;
  auto m_idx = at::zeros({TT, H, top_k}, q.options().dtype(at::kLong));
  auto m_w = at::zeros({TT, H, top_k}, q.options());
  auto m_p = at::zeros({TT, H, S}, q.options());
  auto m_a = at::zeros({want_maps ? n_events : 0, N, H, S, S}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nstm_cpu_forward", [&] {
    using T = scalar_t;
    const Inputs<T> in(q, k, v, lg, gate, wq, wk, mix, has_s2s);
    const T *K0 = k0.data_ptr<T>(), *V0 = v0.data_ptr<T>();
    T *O = o.data_ptr<T>(), *KF = kf.data_ptr<T>(), *VF = vf.data_ptr<T>(), *CK = ck.data_ptr<T>();
    zero_gaps(O, H * V, gap_tokens(q.size(0), segs));
    if (fine) {
      fine_forward(in, K0, V0, O, KF, VF, CK, segs, d, q.size(0));
      return;
    }
    for_units(N * H, [&](int64_t u) {
      const int64_t n = u / H, h = u % H;
      const Seg& sg = segs[n];
      std::vector<T> Ks(K0 + u * S * K, K0 + (u + 1) * S * K);
      std::vector<T> Vs(V0 + u * S * V, V0 + (u + 1) * S * V);
      std::vector<T> p(S);
      Route<T> r(top_k, S);
      const T* wqh = has_s2s ? in.wq + h * V * V : nullptr;
      const T* wkh = has_s2s ? in.wk + h * V * V : nullptr;
      S2SScratch<T> scr(has_s2s ? S : 0, V, wqh, wkh, false);
      int64_t ev = 0;
      for (int64_t t = 0; t < sg.len; ++t) {
        if (block > 0 && (t == 0 || (sg.pos + t) % block == 0)) {
          T* c = CK + ((sg.blk + (t + sg.off) / block) * H + h) * S * (K + V);
          std::copy(Ks.begin(), Ks.end(), c);
          std::copy(Vs.begin(), Vs.end(), c + S * K);
        }
        const int64_t tok = (sg.start + t) * H + h;
        token_forward(Ks.data(), Vs.data(), in.q + tok * K, in.k + tok * K, in.v + tok * V,
                      in.lg + tok * S, in.gate[tok], O + tok * V, p.data(), d, r,
                      static_cast<T*>(nullptr), static_cast<T*>(nullptr));
        if (want_maps) {
          std::copy(r.idx.begin(), r.idx.end(), m_idx.data_ptr<int64_t>() + tok * top_k);
          std::copy(r.w.begin(), r.w.end(), m_w.data_ptr<T>() + tok * top_k);
          std::copy(p.begin(), p.end(), m_p.data_ptr<T>() + tok * S);
        }
        if (period_end(d, sg.pos, t)) {
          s2s_forward(Vs.data(), wqh, wkh, in.mix[h], d, scr);
          if (want_maps && ev < n_events) {   // the caller counts them: never fewer
            std::copy(scr.a.begin(), scr.a.end(), m_a.data_ptr<T>() + ((ev * N + n) * H + h) * S * S);
          }
          ++ev;
        }
      }
      std::copy(Ks.begin(), Ks.end(), KF + u * S * K);
      std::copy(Vs.begin(), Vs.end(), VF + u * S * V);
    });
  });
  return {o, kf, vf, ck, m_idx, m_w, m_p, m_a};
}

// returns dq, dk, dv, dlogits, dgate, dk0, dv0, dwq [N, H, V, V], dwk, dmix [N, H] (the s2s
// gradients per segment: the caller sums them)
std::vector<Tensor> nstm_cpu_backward(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg, const Tensor& gate,
    const Tensor& seg, const Tensor& wq, const Tensor& wk, const Tensor& mix, const Tensor& ck,
    const Tensor& d_o, const Tensor& dkf, const Tensor& dvf, int64_t top_k, int64_t C,
    bool has_s2s, double scale, int64_t block, int64_t schedule) {
  check_inputs(q, k, v, lg, gate, dkf, dvf, wq, wk, mix, top_k);
  check_schedule(schedule);
  TORCH_CHECK(block > 0, "nstm_cpu: the backward needs the forward's checkpoints (block > 0)");
  TORCH_CHECK(d_o.sizes() == v.sizes() && d_o.is_contiguous() && d_o.scalar_type() == q.scalar_type(),
              "nstm_cpu: the output gradient must be a contiguous [T, H, V] tensor of q's dtype");
  const int64_t H = q.size(1), K = q.size(2), V = v.size(2), S = lg.size(2);
  int64_t nblocks = 0;
  const auto segs = read_segments(seg, block, &nblocks);
  const int64_t N = static_cast<int64_t>(segs.size());
  check_call(segs, q.size(0), H, V, has_s2s, C, wq, wk, mix);
  TORCH_CHECK(ck.is_contiguous() && ck.dim() == 4 && ck.size(0) == nblocks && ck.size(1) == H &&
                  ck.size(2) == S && ck.size(3) == K + V && dkf.size(0) == N,
              "nstm_cpu: the checkpoints do not match the segments: expected a contiguous [", nblocks,
              ", ", H, ", ", S, ", ", K + V, "] (blocks of ", block, " tokens) and ", N,
              " final-state gradients, got ", ck.sizes(), " and ", dkf.size(0));
  const Dims d{H, S, K, V, top_k, C, block, has_s2s, scale};
  // tokens outside every segment get zero gradients
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dlg = at::empty_like(lg), dgate = at::empty_like(gate);     // zeroed per unit, gaps below
  auto dk0 = at::empty_like(dkf), dv0 = at::empty_like(dvf);
  auto dwq = at::zeros({N, H, V, V}, q.options()), dwk = at::zeros({N, H, V, V}, q.options());
  auto dmix = at::zeros({N, H}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nstm_cpu_backward", [&] {
    using T = scalar_t;
    const Inputs<T> in(q, k, v, lg, gate, wq, wk, mix, has_s2s);
    const T *CK = ck.data_ptr<T>(), *DO = d_o.data_ptr<T>(), *DKF = dkf.data_ptr<T>(),
            *DVF = dvf.data_ptr<T>();
    T *DQ = dq.data_ptr<T>(), *DK = dk.data_ptr<T>(), *DV = dv.data_ptr<T>(),
      *DLG = dlg.data_ptr<T>(), *DG = dgate.data_ptr<T>(), *DK0 = dk0.data_ptr<T>(),
      *DV0 = dv0.data_ptr<T>(), *DWQ = dwq.data_ptr<T>(), *DWK = dwk.data_ptr<T>(),
      *DMIX = dmix.data_ptr<T>();
    const auto gaps = gap_tokens(q.size(0), segs);
    zero_gaps(DQ, H * K, gaps);
    zero_gaps(DK, H * K, gaps);
    zero_gaps(DV, H * V, gaps);
    zero_gaps(DLG, H * S, gaps);
    zero_gaps(DG, H, gaps);
    if (use_fine(schedule, d, N * H)) {
      fine_backward(in, CK, DO, DKF, DVF, DQ, DK, DV, DLG, DG, DK0, DV0, DWQ, DWK, DMIX, segs, d,
                    q.size(0), nblocks);
      return;
    }
    for_units(N * H, [&](int64_t u) {
      const int64_t n = u / H, h = u % H;
      const Seg& sg = segs[n];
      for (int64_t t = 0; t < sg.len; ++t) {        // this unit's rows, accumulated into below
        const int64_t tok = (sg.start + t) * H + h;
        std::fill(DQ + tok * K, DQ + (tok + 1) * K, T(0));
        std::fill(DK + tok * K, DK + (tok + 1) * K, T(0));
        std::fill(DV + tok * V, DV + (tok + 1) * V, T(0));
        std::fill(DLG + tok * S, DLG + (tok + 1) * S, T(0));
        DG[tok] = T(0);
      }
      std::vector<T> Ks(S * K), Vs(S * V), o(V);
      std::vector<T> gK(DKF + u * S * K, DKF + (u + 1) * S * K);   // adjoint of the slot keys
      std::vector<T> gV(DVF + u * S * V, DVF + (u + 1) * S * V);   // and of the slot values
      std::vector<T> P(block * S), oldK(block * top_k * K), oldV(block * top_k * V);
      std::vector<Route<T>> R(block, Route<T>(top_k, S));             // each token's routing
      const int64_t max_events = has_s2s ? block / C + 2 : 0;
      std::vector<T> pre(max_events * S * V);     // values before each s2s of the block
      std::vector<int64_t> ev_at(block, -1);      // token -> slot in `pre`, -1 if no period end
      std::vector<T> dp(S), ds(S), dw(top_k), da(top_k);
      const T* wqh = has_s2s ? in.wq + h * V * V : nullptr;
      const T* wkh = has_s2s ? in.wk + h * V * V : nullptr;
      S2SScratch<T> scr(has_s2s ? S : 0, V, wqh, wkh, true);
      T* dwqh = DWQ + u * V * V;
      T* dwkh = DWK + u * V * V;
      const int64_t nb = seg_blocks(sg, block);
      for (int64_t b = nb - 1; b >= 0; --b) {
        int64_t t0, t1;
        block_range(sg, b, block, &t0, &t1);
        const T* c = CK + ((sg.blk + b) * H + h) * S * (K + V);
        std::copy(c, c + S * K, Ks.begin());
        std::copy(c + S * K, c + S * (K + V), Vs.begin());
        int64_t ne = 0;
        for (int64_t t = t0; t < t1; ++t) {      // re-run the block, recording what the reverse needs
          const int64_t tok = (sg.start + t) * H + h, j = t - t0;
          token_forward(Ks.data(), Vs.data(), in.q + tok * K, in.k + tok * K, in.v + tok * V,
                        in.lg + tok * S, in.gate[tok], o.data(), P.data() + j * S, d, R[j],
                        oldK.data() + j * top_k * K, oldV.data() + j * top_k * V);
          ev_at[j] = -1;
          if (period_end(d, sg.pos, t)) {
            ev_at[j] = ne;
            std::copy(Vs.begin(), Vs.end(), pre.begin() + ne * S * V);
            ++ne;
            s2s_forward(Vs.data(), wqh, wkh, in.mix[h], d, scr);
          }
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t tok = (sg.start + t) * H + h, j = t - t0;
          if (ev_at[j] >= 0) {                    // undo the s2s: back to the values it mixed
            const T* vp = pre.data() + ev_at[j] * S * V;
            std::copy(vp, vp + S * V, Vs.begin());
            s2s_backward(Vs.data(), gV.data(), wqh, wkh, in.mix[h], dwqh, dwkh, DMIX + u, d, scr);
          }
          read_backward(Ks.data(), Vs.data(), P.data() + j * S, in.q + tok * K, DO + tok * V,
                        gK.data(), gV.data(), DQ + tok * K, dp.data(), ds.data(), d);
          const Route<T>& r = R[j];
          write_backward(Ks.data(), Vs.data(), in.k + tok * K, in.v + tok * V, r,
                         oldK.data() + j * top_k * K, oldV.data() + j * top_k * V, gK.data(),
                         gV.data(), DK + tok * K, DV + tok * V, dw.data(),
                         static_cast<T*>(nullptr), d);
          route_backward(dw.data(), r.idx.data(), r.alpha.data(), r.beta, top_k, da.data(),
                         DLG + tok * S, DG + tok);
        }
      }
      std::copy(gK.begin(), gK.end(), DK0 + u * S * K);
      std::copy(gV.begin(), gV.end(), DV0 + u * S * V);
    });
  });
  return {dq, dk, dv, dlg, dgate, dk0, dv0, dwq, dwk, dmix};
}

// One token for every (row, head), the slot memory updated IN PLACE (decoding): q, k [B, H, K],
// v [B, H, V], logits [B, H, S], gate [B, H], sk [B, H, S, K], sv [B, H, S, V] (all of one dtype,
// contiguous), pos int64 [1] or [B] (the token's absolute position; not incremented). Returns o.
Tensor nstm_cpu_step_(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg,
                      const Tensor& gate, const Tensor& sk, const Tensor& sv, const Tensor& pos,
                      const Tensor& wq, const Tensor& wk, const Tensor& mix, int64_t top_k,
                      int64_t C, bool has_s2s, double scale) {
  check_inputs(q, k, v, lg, gate, sk, sv, wq, wk, mix, top_k);
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2), S = lg.size(2);
  TORCH_CHECK(sk.dim() == 4 && sk.size(0) == B && sk.size(1) == H && sk.size(2) == S &&
                  sk.size(3) == K && sv.dim() == 4 && sv.size(0) == B && sv.size(1) == H &&
                  sv.size(2) == S && sv.size(3) == V,
              "nstm_cpu: the slot memory must be [B, H, S, K] and [B, H, S, V]");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() &&
                  (pos.numel() == 1 || pos.numel() == B),
              "nstm_cpu: pos must be an int64 tensor of 1 or B elements");
  TORCH_CHECK(!has_s2s || (C > 0 && wq.dim() == 3 && wq.size(0) == H && wq.size(1) == V &&
                           wq.size(2) == V && wk.sizes() == wq.sizes() && mix.numel() == H),
              "nstm_cpu: s2s weights must be [H, V, V] and the mix [H]");
  const Dims d{H, S, K, V, top_k, C, 0, has_s2s, scale};
  auto o = at::empty({B, H, V}, q.options());
  const int64_t* P = pos.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nstm_cpu_step_", [&] {
    using T = scalar_t;
    const Inputs<T> in(q, k, v, lg, gate, wq, wk, mix, has_s2s);
    T *SK = sk.data_ptr<T>(), *SV = sv.data_ptr<T>(), *O = o.data_ptr<T>();
    // a decode step is ~1 us per (row, head): threads only pay off for large batches
    const bool serial = B * H * S * (K + V) < (1 << 18);
    for_units(B * H, [&](int64_t u) {
      const int64_t b = u / H, h = u % H;
      std::vector<T> p(S);
      Route<T> r(top_k, S);
      token_forward(SK + u * S * K, SV + u * S * V, in.q + u * K, in.k + u * K, in.v + u * V,
                    in.lg + u * S, in.gate[u], O + u * V, p.data(), d, r,
                    static_cast<T*>(nullptr), static_cast<T*>(nullptr));
      if (period_end(d, P[pos.numel() == 1 ? 0 : b], 0)) {
        S2SScratch<T> scr(S, V, in.wq + h * V * V, in.wk + h * V * V, false);
        s2s_forward(SV + u * S * V, in.wq + h * V * V, in.wk + h * V * V, in.mix[h], d, scr);
      }
    }, serial);
  });
  return o;
}

// The routing alone (no gradient): logits [N, S], gate [N] -> indices [N, top_k], weights [N, top_k]
std::tuple<Tensor, Tensor> nstm_cpu_route(const Tensor& lg, const Tensor& gate, int64_t top_k) {
  TORCH_CHECK(lg.device().is_cpu() && lg.is_contiguous() && gate.is_contiguous() &&
                  lg.dim() == 2 && gate.dim() == 1 && gate.size(0) == lg.size(0) &&
                  gate.scalar_type() == lg.scalar_type(),
              "nstm_cpu: route takes contiguous CPU logits [N, S] and gates [N] of one dtype");
  const int64_t N = lg.size(0), S = lg.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= S, "nstm_cpu: top_k must be in [1, S]");
  auto idx = at::empty({N, top_k}, lg.options().dtype(at::kLong));
  auto w = at::empty({N, top_k}, lg.options());
  const Dims d{1, S, 0, 0, top_k, 1, 0, false, 1.0};
  AT_DISPATCH_FLOATING_TYPES(lg.scalar_type(), "nstm_cpu_route", [&] {
    using T = scalar_t;
    const T *L = lg.data_ptr<T>(), *G = gate.data_ptr<T>();
    int64_t* I = idx.data_ptr<int64_t>();
    T* W = w.data_ptr<T>();
    at::parallel_for(0, N, 2048, [&](int64_t b, int64_t e) {
      Route<T> r(top_k, S);
      for (int64_t n = b; n < e; ++n) {
        route(L + n * S, G[n], d, r);
        std::copy(r.idx.begin(), r.idx.end(), I + n * top_k);
        std::copy(r.w.begin(), r.w.end(), W + n * top_k);
      }
    });
  });
  return {idx, w};
}

// ---------------------------------------------------------------------------------------------
// The layer's causal depthwise short convolution and its SiLU, fused (nstm.modules.ShortConv):
//   y[b, t, c] = silu(bias[c] + sum_j w[j, c] * xc[b, t + j, c]),  xc = [cache (W - 1 rows); x]
// One parallel region over (row, block of tokens), outputs written once. The PyTorch form (W
// shifted multiply-adds, then SiLU) allocates a fresh [B, T, C] tensor for every tap in the
// forward and several in the backward; on the CPU that cost more than the arithmetic.
// x may be any [B, T, C] view whose channels are contiguous (a slice of the input projection).

constexpr int64_t CONV_BLOCK = 64;    // tokens per block (the backward's dpre buffer)
constexpr int64_t CONV_UNIT = 256;    // tokens per backward work unit (its own dw, dbias)

// sigmoid(a) = 1 / (1 + e^-|a|) for a >= 0, e^-|a| / (1 + e^-|a|) below; no overflow, no branch
template <typename T>
inline T sigmoid_of(T a) {
  const T e = exp_le0(-std::abs(a));
  const T pos = static_cast<T>(a >= T(0));
  return (pos + (T(1) - pos) * e) / (T(1) + e);
}

// out[c] = bias[c] + sum_j w[j, c] * rows[j][c]: the pre-activations of one token, tap by tap
template <typename T>
inline void conv_pre_row(const T* const* rows, const T* __restrict w, const T* __restrict bias,
                         int64_t W, int64_t C, T* __restrict out) {
  std::copy(bias, bias + C, out);
  for (int64_t j = 0; j < W; ++j) {
    const T* __restrict xr = rows[j];
    const T* __restrict wj = w + j * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] += wj[c] * xr[c];
  }
}

// one run of tokens the convolution never reads across: a batch row, or a packed document
struct ConvSeg {
  int64_t x0, y0, len;   // offsets (elements) of its first token in x and in y / g / dx; tokens
};

// seg empty: the B rows of x; else (B = 1) the packed documents, int64 [N, 2] of (start, length),
// which must tile [0, T) in order (so that every output row is written)
std::vector<ConvSeg> conv_segments(const Tensor& x, const Tensor& seg) {
  TORCH_CHECK(x.dim() == 3, "nstm_cpu: conv takes a CPU x [B, T, C] with contiguous channels, got ",
              x.sizes());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  std::vector<ConvSeg> out;
  if (seg.numel() == 0) {
    for (int64_t b = 0; b < B; ++b) out.push_back({b * x.stride(0), b * T * C, T});
    return out;
  }
  TORCH_CHECK(B == 1 && seg.dim() == 2 && seg.size(1) == 2 && seg.scalar_type() == at::kLong &&
                  seg.device().is_cpu(),
              "nstm_cpu: packed conv takes x [1, T, C] and documents as a CPU int64 [N, 2] of (start, "
              "length), got x ", x.sizes(), " and documents ", seg.scalar_type(), " ", seg.sizes(), " on ",
              seg.device());
  const auto a = seg.contiguous();
  const int64_t* p = a.data_ptr<int64_t>();
  int64_t next = 0;
  for (int64_t n = 0; n < seg.size(0); ++n) {
    TORCH_CHECK(p[2 * n] == next && p[2 * n + 1] >= 1 && p[2 * n + 1] <= T - next,
                "nstm_cpu: packed conv documents must be non-empty and tile the time axis [0, ", T,
                ") in order: document ", n, " is (start ", p[2 * n], ", length ", p[2 * n + 1],
                "), expected start ", next, " and a length in [1, ", T - next, "]");
    out.push_back({next * x.stride(1), next * C, p[2 * n + 1]});
    next += p[2 * n + 1];
  }
  TORCH_CHECK(next == T, "nstm_cpu: packed conv documents must end at T = ", T, ", got ", next);
  return out;
}

void check_conv(const Tensor& x, const Tensor& cache, const Tensor& w, const Tensor& b, int64_t rows) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1,
              "nstm_cpu: conv takes a CPU x [B, T, C] with contiguous channels");
  const int64_t C = x.size(2);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == C && w.is_contiguous() && w.size(0) >= 1,
              "nstm_cpu: conv weight must be a contiguous [W, C]");
  TORCH_CHECK(b.dim() == 1 && b.size(0) == C && b.is_contiguous(), "nstm_cpu: conv bias must be [C]");
  TORCH_CHECK(cache.numel() == 0 || (cache.dim() == 3 && cache.size(0) == rows &&
                                     cache.size(1) == w.size(0) - 1 && cache.size(2) == C &&
                                     cache.is_contiguous()),
              "nstm_cpu: conv cache must be empty (zeros) or a contiguous [B or N documents = ", rows,
              ", W - 1 = ", w.size(0) - 1, ", C = ", C, "], got ", cache.sizes(),
              cache.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && w.scalar_type() == b.scalar_type() &&
                  (cache.numel() == 0 || cache.scalar_type() == x.scalar_type()),
              "nstm_cpu: conv tensors must share one dtype");
}

// the W input rows of token t: rows[j] = xc[t + j] (a zero row where the cache is empty)
template <typename T>
inline void conv_rows(const T** rows, const T* X, int64_t sT, const T* cache, const T* zero,
                      int64_t t, int64_t W, int64_t C) {
  for (int64_t j = 0; j < W; ++j) {
    const int64_t i = t + j - (W - 1);            // the token index in x (negative: the cache)
    rows[j] = i >= 0 ? X + i * sT : (cache ? cache + (i + W - 1) * C : zero);
  }
}

// a piece of a conv pass's work: tokens [a0, a1) of segment r
struct ConvPiece {
  int64_t r, a0, a1;
};

// the work units of a conv pass: a segment of `unit` tokens or more is cut into pieces of `unit`
// tokens, each a unit of its own; consecutive shorter segments share a unit until it holds `unit`
// tokens (so that many short documents make neither as many units nor, in the backward, as many
// partial sums). A fixed order: the same bits on any thread count.
inline void conv_work(const std::vector<ConvSeg>& segs, int64_t unit, std::vector<ConvPiece>& pieces,
                      std::vector<int64_t>& first) {
  int64_t open = 0;                           // tokens in the shared unit being filled
  for (int64_t r = 0; r < static_cast<int64_t>(segs.size()); ++r) {
    const int64_t len = segs[r].len;
    if (len >= unit) {
      open = 0;
      for (int64_t a0 = 0; a0 < len; a0 += unit) {
        first.push_back(static_cast<int64_t>(pieces.size()));
        pieces.push_back({r, a0, std::min(len, a0 + unit)});
      }
      continue;
    }
    if (open == 0) first.push_back(static_cast<int64_t>(pieces.size()));
    pieces.push_back({r, 0, len});
    open += len;
    if (open >= unit) open = 0;
  }
  first.push_back(static_cast<int64_t>(pieces.size()));
}

template <typename T_>
void conv_forward_impl(const Tensor& x, const Tensor& cache, const Tensor& w, const Tensor& b,
                       const std::vector<ConvSeg>& segs, Tensor& y) {
  const int64_t C = x.size(2), W = w.size(0);
  std::vector<ConvPiece> pieces;
  std::vector<int64_t> first;                 // unit u: pieces [first[u], first[u + 1])
  conv_work(segs, CONV_BLOCK, pieces, first);
  const T_ *X = x.data_ptr<T_>(), *Wt = w.data_ptr<T_>(), *Bs = b.data_ptr<T_>();
  const T_* Ca = cache.numel() ? cache.data_ptr<T_>() : nullptr;
  T_* Y = y.data_ptr<T_>();
  const int64_t sT = x.stride(1);
  std::vector<T_> zero(C, T_(0));
  at::parallel_for(0, static_cast<int64_t>(first.size()) - 1, 1, [&](int64_t u0, int64_t u1) {
    std::vector<const T_*> rows(W);
    for (int64_t pc = first[u0]; pc < first[u1]; ++pc) {
      const int64_t r = pieces[pc].r;
      const ConvSeg& sg = segs[r];
      for (int64_t t = pieces[pc].a0; t < pieces[pc].a1; ++t) {
        conv_rows(rows.data(), X + sg.x0, sT, Ca ? Ca + r * (W - 1) * C : nullptr, zero.data(),
                  t, W, C);
        T_* __restrict yr = Y + sg.y0 + t * C;
        conv_pre_row(rows.data(), Wt, Bs, W, C, yr);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) yr[c] = yr[c] * sigmoid_of(yr[c]);
      }
    }
  });
}

Tensor nstm_cpu_conv_forward(const Tensor& x, const Tensor& cache, const Tensor& w, const Tensor& b,
                             const Tensor& seg) {
  const auto segs = conv_segments(x, seg);
  check_conv(x, cache, w, b, static_cast<int64_t>(segs.size()));
  auto y = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nstm_cpu_conv_forward",
                             [&] { conv_forward_impl<scalar_t>(x, cache, w, b, segs, y); });
  return y;
}

template <typename T_>
void conv_backward_impl(const Tensor& g, const Tensor& x, const Tensor& cache, const Tensor& w,
                        const Tensor& b, const std::vector<ConvSeg>& segs, Tensor& dx, Tensor& dcache,
                        Tensor& dwb) {
  const int64_t C = x.size(2), W = w.size(0);
  std::vector<ConvPiece> pieces;
  std::vector<int64_t> first;                 // unit u: pieces [first[u], first[u + 1])
  conv_work(segs, CONV_UNIT, pieces, first);
  const int64_t units = static_cast<int64_t>(first.size()) - 1;
  const T_ *X = x.data_ptr<T_>(), *G = g.data_ptr<T_>(), *Wt = w.data_ptr<T_>(),
           *Bs = b.data_ptr<T_>();
  const T_* Ca = cache.numel() ? cache.data_ptr<T_>() : nullptr;
  T_* DX = dx.data_ptr<T_>();
  T_* DC = cache.numel() ? dcache.data_ptr<T_>() : nullptr;
  const int64_t sT = x.stride(1);
  // each unit's own dw and dbias, summed in unit order afterwards: the same bits for any thread
  // count and any hand-out order
  std::vector<T_> part(units * (W + 1) * C, T_(0));
  std::vector<T_> zero(C, T_(0));
  for_units(units, [&](int64_t u) {
    T_* dw = part.data() + u * (W + 1) * C;
    T_* db = dw + W * C;
    std::vector<const T_*> rows(W);
    std::vector<T_> dpre((CONV_BLOCK + W) * C);
    for (int64_t pc = first[u]; pc < first[u + 1]; ++pc) {
      const int64_t r = pieces[pc].r, a0 = pieces[pc].a0, a1 = pieces[pc].a1;
      const ConvSeg& sg = segs[r];
      const int64_t T = sg.len;                         // this segment's tokens
      const T_* Xr = X + sg.x0;
      const T_* Cr = Ca ? Ca + r * (W - 1) * C : nullptr;
      for (int64_t t0 = a0; t0 < a1; t0 += CONV_BLOCK) {
        const int64_t t1 = std::min(a1, t0 + CONV_BLOCK);
        const int64_t t2 = std::min(T, t1 + W - 1);       // dx of [t0, t1) needs dpre of [t0, t2)
        for (int64_t t = t0; t < t2; ++t) {
          conv_rows(rows.data(), Xr, sT, Cr, zero.data(), t, W, C);
          const T_* __restrict gr = G + sg.y0 + t * C;
          T_* __restrict dp = dpre.data() + (t - t0) * C;
          conv_pre_row(rows.data(), Wt, Bs, W, C, dp);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T_ a = dp[c], s = sigmoid_of(a);
            dp[c] = gr[c] * s * (T_(1) + a * (T_(1) - s));
          }
          if (t < t1) {                                   // this block's own tokens: dw, dbias
            for (int64_t j = 0; j < W; ++j) {
              const T_* __restrict xr = rows[j];
              T_* __restrict dwj = dw + j * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) dwj[c] += dp[c] * xr[c];
            }
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) db[c] += dp[c];
          }
        }
        // dx[t] = sum_j dpre[t + W - 1 - j] w[j] over t + W - 1 - j < T
        for (int64_t t = t0; t < t1; ++t) {
          T_* __restrict dxr = DX + sg.y0 + t * C;
          std::fill(dxr, dxr + C, T_(0));
          for (int64_t j = 0; j < W; ++j) {
            const int64_t s = t + W - 1 - j;
            if (s >= T) continue;
            const T_* __restrict dp = dpre.data() + (s - t0) * C;
            const T_* __restrict wj = Wt + j * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) dxr[c] += dp[c] * wj[c];
          }
        }
        if (DC && t0 == 0) {                              // dcache[m] = sum_{j <= m} dpre[m - j] w[j]
          for (int64_t m = 0; m < W - 1; ++m) {
            T_* __restrict dcr = DC + (r * (W - 1) + m) * C;
            std::fill(dcr, dcr + C, T_(0));
            for (int64_t j = 0; j <= m; ++j) {
              const int64_t s = m - j;
              if (s >= T) continue;
              const T_* __restrict dp = dpre.data() + s * C;
              const T_* __restrict wj = Wt + j * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) dcr[c] += dp[c] * wj[c];
            }
          }
        }
      }
    }
  });
  T_* out = dwb.data_ptr<T_>();
  std::fill(out, out + (W + 1) * C, T_(0));
  for (int64_t u = 0; u < units; ++u) {
    const T_* __restrict pu = part.data() + u * (W + 1) * C;
#pragma omp simd
    for (int64_t i = 0; i < (W + 1) * C; ++i) out[i] += pu[i];
  }
}

// g: the gradient of y (contiguous [B, T, C]). Returns dx [B, T, C], dcache [B or N, W - 1, C]
// (empty when the cache is), dw [W, C], dbias [C]. The pre-activations are recomputed.
std::vector<Tensor> nstm_cpu_conv_backward(const Tensor& g, const Tensor& x, const Tensor& cache,
                                           const Tensor& w, const Tensor& b, const Tensor& seg) {
  const auto segs = conv_segments(x, seg);
  const int64_t R = static_cast<int64_t>(segs.size());
  check_conv(x, cache, w, b, R);
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), W = w.size(0);
  TORCH_CHECK(g.is_contiguous() && g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "nstm_cpu: conv backward takes a contiguous gradient of x's shape and dtype");
  auto dx = at::empty({B, T, C}, x.options());
  auto dcache = cache.numel() ? at::empty({R, W - 1, C}, x.options()) : at::empty({0}, x.options());
  auto dwb = at::empty({W + 1, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nstm_cpu_conv_backward", [&] {
    conv_backward_impl<scalar_t>(g, x, cache, w, b, segs, dx, dcache, dwb);
  });
  return {dx, dcache, dwb.narrow(0, 0, W), dwb[W]};
}

}  // namespace

TORCH_LIBRARY(nstm_cpu, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor logits, Tensor gate, Tensor k0, Tensor v0, "
        "Tensor seg, Tensor wq, Tensor wk, Tensor mix, int top_k, int C, bool has_s2s, "
        "float scale, int block, bool maps=False, int n_events=0, int schedule=0) -> Tensor[]");
  m.def("backward(Tensor q, Tensor k, Tensor v, Tensor logits, Tensor gate, Tensor seg, "
        "Tensor wq, Tensor wk, Tensor mix, Tensor ck, Tensor d_o, Tensor dkf, Tensor dvf, "
        "int top_k, int C, bool has_s2s, float scale, int block, int schedule=0) -> Tensor[]");
  m.def("route(Tensor logits, Tensor gate, int top_k) -> (Tensor, Tensor)");
  m.def("conv_forward(Tensor x, Tensor cache, Tensor w, Tensor b, Tensor seg) -> Tensor");
  m.def("conv_backward(Tensor g, Tensor x, Tensor cache, Tensor w, Tensor b, Tensor seg) -> Tensor[]");
  m.def("step_(Tensor q, Tensor k, Tensor v, Tensor logits, Tensor gate, Tensor(a!) sk, "
        "Tensor(b!) sv, Tensor pos, Tensor wq, Tensor wk, Tensor mix, int top_k, int C, "
        "bool has_s2s, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(nstm_cpu, CPU, m) {
  m.impl("forward", &nstm_cpu_forward);
  m.impl("backward", &nstm_cpu_backward);
  m.impl("step_", &nstm_cpu_step_);
  m.impl("route", &nstm_cpu_route);
  m.impl("conv_forward", &nstm_cpu_conv_forward);
  m.impl("conv_backward", &nstm_cpu_conv_backward);
}
