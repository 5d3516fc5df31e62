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
// at a period end); a write with w >= 1 replaces the row exactly.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// in-place softmax of x[0:n]; a NaN anywhere makes every entry NaN (as torch.softmax)
template <typename T>
inline void softmax_(T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) nan = true;
    if (x[i] > m) m = x[i];
  }
  if (nan) {
    for (int64_t i = 0; i < n; ++i) x[i] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  T z = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    z += x[i];
  }
  const T r = T(1) / z;
  for (int64_t i = 0; i < n; ++i) x[i] *= r;
}

// Y[m, p] = X[m, n] W[n, p] (all row-major, contiguous)
template <typename T>
inline void mm(const T* X, const T* W, T* Y, int64_t m, int64_t n, int64_t p) {
  for (int64_t i = 0; i < m; ++i) {
    T* y = Y + i * p;
    std::fill(y, y + p, T(0));
    for (int64_t d = 0; d < n; ++d) axpy(X[i * n + d], W + d * p, y, p);
  }
}

struct Dims {
  int64_t H, S, K, V, top_k, C, block;
  bool s2s;
  double scale;
};

// per-unit scratch of the state-to-state attention
template <typename T>
struct S2SScratch {
  std::vector<T> qs, ks, a, m;
  S2SScratch(int64_t S, int64_t V) : qs(S * V), ks(S * V), a(S * S), m(S * V) {}
};

// qs = V wq, ks = V wk, a = softmax(qs ks^T / sqrt(V)), m = a V
template <typename T>
void s2s_core(const T* Vs, const T* wq, const T* wk, const Dims& d, S2SScratch<T>& w) {
  const int64_t S = d.S, V = d.V;
  const T c = T(1) / std::sqrt(T(V));
  mm(Vs, wq, w.qs.data(), S, V, V);
  mm(Vs, wk, w.ks.data(), S, V, V);
  for (int64_t s = 0; s < S; ++s) {
    T* row = w.a.data() + s * S;
    for (int64_t r = 0; r < S; ++r) row[r] = c * dot(w.qs.data() + s * V, w.ks.data() + r * V, V);
    softmax_(row, S);
  }
  mm(w.a.data(), Vs, w.m.data(), S, S, V);
}

template <typename T>
void s2s_forward(T* Vs, const T* wq, const T* wk, T g, const Dims& d, S2SScratch<T>& w) {
  s2s_core(Vs, wq, wk, d, w);
  const int64_t n = d.S * d.V;
  for (int64_t i = 0; i < n; ++i) Vs[i] = (T(1) - g) * Vs[i] + g * w.m[i];
}

// dV (in: adjoint of the mixed values; out: adjoint of Vs, the values before the mix); adds to
// dwq, dwk, dg
template <typename T>
void s2s_backward(const T* Vs, T* dV, const T* wq, const T* wk, T g, T* dwq, T* dwk, T* dg,
                  const Dims& d, S2SScratch<T>& w, std::vector<T>& tmp) {
  const int64_t S = d.S, V = d.V;
  const T c = T(1) / std::sqrt(T(V));
  s2s_core(Vs, wq, wk, d, w);
  tmp.resize(S * S + 3 * S * V);
  T* dA = tmp.data();                 // [S, S]
  T* dqs = dA + S * S;                // [S, V]
  T* dks = dqs + S * V;               // [S, V]
  T* dVp = dks + S * V;               // [S, V] adjoint of Vs being built
  T gsum = 0;
  for (int64_t i = 0; i < S * V; ++i) gsum += dV[i] * (w.m[i] - Vs[i]);
  *dg += gsum;
  for (int64_t i = 0; i < S * V; ++i) dVp[i] = (T(1) - g) * dV[i];
  // m = a V: dA = g dV V^T, dVp += g a^T dV
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t r = 0; r < S; ++r) dA[s * S + r] = g * dot(dV + s * V, Vs + r * V, V);
    for (int64_t r = 0; r < S; ++r) axpy(g * w.a[s * S + r], dV + s * V, dVp + r * V, V);
  }
  // softmax backward, times the 1/sqrt(V) of the logits: dA becomes dZ
  for (int64_t s = 0; s < S; ++s) {
    T* da = dA + s * S;
    const T* a = w.a.data() + s * S;
    const T inner = dot(a, da, S);
    for (int64_t r = 0; r < S; ++r) da[r] = c * a[r] * (da[r] - inner);
  }
  // Z = qs ks^T: dqs = dZ ks, dks = dZ^T qs
  mm(dA, w.ks.data(), dqs, S, S, V);
  std::fill(dks, dks + S * V, T(0));
  for (int64_t s = 0; s < S; ++s)
    for (int64_t r = 0; r < S; ++r) axpy(dA[s * S + r], w.qs.data() + s * V, dks + r * V, V);
  // qs = Vs wq: dwq += Vs^T dqs, dVp += dqs wq^T (the same for k)
  for (int64_t s = 0; s < S; ++s)
    for (int64_t e = 0; e < V; ++e) {
      axpy(Vs[s * V + e], dqs + s * V, dwq + e * V, V);
      axpy(Vs[s * V + e], dks + s * V, dwk + e * V, V);
      dVp[s * V + e] += dot(dqs + s * V, wq + e * V, V) + dot(dks + s * V, wk + e * V, V);
    }
  std::copy(dVp, dVp + S * V, dV);
}

// runs fn(unit) for unit in [0, n) on the intra-op threads, one unit at a time from a counter
template <typename F>
void for_units(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  if (workers <= 1) {
    for (int64_t u = 0; u < n; ++u) fn(u);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1); u < n; u = next.fetch_add(1)) fn(u);
  });
}

struct Seg {
  int64_t start, len, pos, blk;   // blk: index of its first checkpoint
};

std::vector<Seg> read_segments(const Tensor& seg, int64_t block, int64_t* nblocks) {
  TORCH_CHECK(seg.dim() == 2 && seg.size(1) == 3 && seg.scalar_type() == at::kLong,
              "nstm_cpu: segments must be an int64 [N, 3] tensor of (start, length, position)");
  auto a = seg.contiguous();
  const int64_t* p = a.data_ptr<int64_t>();
  std::vector<Seg> out(a.size(0));
  int64_t b = 0;
  for (int64_t i = 0; i < a.size(0); ++i) {
    out[i] = Seg{p[3 * i], p[3 * i + 1], p[3 * i + 2], b};
    if (block > 0) b += (p[3 * i + 1] + block - 1) / block;
  }
  *nblocks = b;
  return out;
}

inline bool period_end(const Dims& d, int64_t pos, int64_t t) {
  return d.s2s && (pos + t + 1) % d.C == 0;
}

// one token: write, read (p: the read probabilities, length S), returns nothing; o: [V]
template <typename T>
inline void token_forward(T* Ks, T* Vs, const T* q, const T* k, const T* v, const int64_t* idx,
                          const T* w, T* o, T* p, const Dims& d, T* oldK, T* oldV) {
  const int64_t S = d.S, K = d.K, V = d.V;
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
      const T r = T(1) - wj;
#pragma omp simd
      for (int64_t e = 0; e < K; ++e) kr[e] = r * kr[e] + wj * k[e];
#pragma omp simd
      for (int64_t e = 0; e < V; ++e) vr[e] = r * vr[e] + wj * v[e];
    }
  }
  const T sc = T(d.scale);
  for (int64_t i = 0; i < S; ++i) p[i] = sc * dot(q, Ks + i * K, K);
  softmax_(p, S);
  std::fill(o, o + V, T(0));
  for (int64_t i = 0; i < S; ++i) axpy(p[i], Vs + i * V, o, V);
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& idx,
                  const Tensor& w, const Tensor& k0, const Tensor& v0, const Tensor& wq,
                  const Tensor& wk, const Tensor& mix) {
  for (const Tensor* t : {&q, &k, &v, &idx, &w, &k0, &v0, &wq, &wk, &mix}) {
    TORCH_CHECK(t->device().is_cpu(), "nstm_cpu: every tensor must be on the CPU");
    TORCH_CHECK(t->is_contiguous(), "nstm_cpu: every tensor must be contiguous");
  }
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && v.size(0) == q.size(0) &&
                  v.size(1) == q.size(1),
              "nstm_cpu: q, k must be [T, H, K] and v [T, H, V]");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 3 && w.sizes() == idx.sizes(),
              "nstm_cpu: indices (int64) and weights must be [T, H, top_k]");
  for (const Tensor* t : {&k, &v, &w, &k0, &v0, &wq, &wk, &mix})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "nstm_cpu: all float tensors must share q's dtype");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> nstm_cpu_forward(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& idx, const Tensor& w,
    const Tensor& k0, const Tensor& v0, const Tensor& seg, const Tensor& wq, const Tensor& wk,
    const Tensor& mix, int64_t C, bool has_s2s, double scale, int64_t block) {
  check_inputs(q, k, v, idx, w, k0, v0, wq, wk, mix);
  const int64_t H = q.size(1), K = q.size(2), V = v.size(2), S = k0.size(2), top_k = idx.size(2);
  int64_t nblocks = 0;
  const auto segs = read_segments(seg, block, &nblocks);
  const int64_t N = static_cast<int64_t>(segs.size());
  TORCH_CHECK(k0.dim() == 4 && k0.size(0) == N && k0.size(1) == H && k0.size(3) == K,
              "nstm_cpu: the initial keys must be [N, H, S, K]");
  TORCH_CHECK(v0.dim() == 4 && v0.size(0) == N && v0.size(1) == H && v0.size(2) == S && v0.size(3) == V,
              "nstm_cpu: the initial values must be [N, H, S, V]");
  TORCH_CHECK(!has_s2s || (C > 0 && wq.dim() == 3 && wq.size(0) == H && wq.size(1) == V &&
                           wq.size(2) == V && wk.sizes() == wq.sizes() && mix.numel() == H),
              "nstm_cpu: s2s weights must be [H, V, V] and the mix [H]");
  for (const auto& s : segs)
    TORCH_CHECK(s.start >= 0 && s.len >= 0 && s.start + s.len <= q.size(0),
                "nstm_cpu: a segment lies outside the time axis");
  const Dims d{H, S, K, V, top_k, C, block, has_s2s, scale};
  auto o = at::empty({q.size(0), H, V}, q.options());
  auto kf = at::empty_like(k0);
  auto vf = at::empty_like(v0);
  auto ck = at::empty({block > 0 ? nblocks : 0, H, S, K + V}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nstm_cpu_forward", [&] {
    using T = scalar_t;
    const T *Q = q.data_ptr<T>(), *Kp = k.data_ptr<T>(), *Vp = v.data_ptr<T>(),
            *W = w.data_ptr<T>(), *K0 = k0.data_ptr<T>(), *V0 = v0.data_ptr<T>();
    const int64_t* I = idx.data_ptr<int64_t>();
    const T* WQ = has_s2s ? wq.data_ptr<T>() : nullptr;
    const T* WK = has_s2s ? wk.data_ptr<T>() : nullptr;
    const T* G = has_s2s ? mix.data_ptr<T>() : nullptr;
    T *O = o.data_ptr<T>(), *KF = kf.data_ptr<T>(), *VF = vf.data_ptr<T>(), *CK = ck.data_ptr<T>();
    for_units(N * H, [&](int64_t u) {
      const int64_t n = u / H, h = u % H;
      const Seg& sg = segs[n];
      std::vector<T> Ks(K0 + (n * H + h) * S * K, K0 + (n * H + h + 1) * S * K);
      std::vector<T> Vs(V0 + (n * H + h) * S * V, V0 + (n * H + h + 1) * S * V);
      std::vector<T> p(S);
      S2SScratch<T> scr(has_s2s ? S : 0, has_s2s ? V : 0);
      for (int64_t t = 0; t < sg.len; ++t) {
        if (block > 0 && t % block == 0) {
          T* c = CK + ((sg.blk + t / block) * H + h) * S * (K + V);
          std::copy(Ks.begin(), Ks.end(), c);
          std::copy(Vs.begin(), Vs.end(), c + S * K);
        }
        const int64_t tok = (sg.start + t) * H + h;
        token_forward(Ks.data(), Vs.data(), Q + tok * K, Kp + tok * K, Vp + tok * V,
                      I + tok * top_k, W + tok * top_k, O + tok * V, p.data(), d,
                      static_cast<T*>(nullptr), static_cast<T*>(nullptr));
        if (period_end(d, sg.pos, t)) s2s_forward(Vs.data(), WQ + h * V * V, WK + h * V * V, G[h], d, scr);
      }
      std::copy(Ks.begin(), Ks.end(), KF + (n * H + h) * S * K);
      std::copy(Vs.begin(), Vs.end(), VF + (n * H + h) * S * V);
    });
  });
  return {o, kf, vf, ck};
}

// returns dq, dk, dv, dw, dk0, dv0, dwq [N, H, V, V], dwk, dmix [N, H] (per segment: the caller sums)
std::vector<Tensor> nstm_cpu_backward(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& idx, const Tensor& w,
    const Tensor& seg, const Tensor& wq, const Tensor& wk, const Tensor& mix, const Tensor& ck,
    const Tensor& d_o, const Tensor& dkf, const Tensor& dvf, int64_t C, bool has_s2s, double scale,
    int64_t block) {
  check_inputs(q, k, v, idx, w, dkf, dvf, wq, wk, mix);
  TORCH_CHECK(block > 0, "nstm_cpu: the backward needs the forward's checkpoints (block > 0)");
  TORCH_CHECK(d_o.sizes() == v.sizes() && d_o.is_contiguous() && d_o.scalar_type() == q.scalar_type(),
              "nstm_cpu: the output gradient must be a contiguous [T, H, V] tensor of q's dtype");
  const int64_t H = q.size(1), K = q.size(2), V = v.size(2), S = dkf.size(2), top_k = idx.size(2);
  int64_t nblocks = 0;
  const auto segs = read_segments(seg, block, &nblocks);
  const int64_t N = static_cast<int64_t>(segs.size());
  TORCH_CHECK(ck.is_contiguous() && ck.dim() == 4 && ck.size(0) == nblocks && ck.size(1) == H &&
                  ck.size(2) == S && ck.size(3) == K + V,
              "nstm_cpu: the checkpoints do not match the segments");
  const Dims d{H, S, K, V, top_k, C, block, has_s2s, scale};
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v), dw = at::empty_like(w);
  auto dk0 = at::empty_like(dkf), dv0 = at::empty_like(dvf);
  auto dwq = at::zeros({N, H, V, V}, q.options()), dwk = at::zeros({N, H, V, V}, q.options());
  auto dmix = at::zeros({N, H}, q.options());
  // tokens outside every segment get zero gradients
  dq.zero_(); dk.zero_(); dv.zero_(); dw.zero_();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nstm_cpu_backward", [&] {
    using T = scalar_t;
    const T *Q = q.data_ptr<T>(), *Kp = k.data_ptr<T>(), *Vp = v.data_ptr<T>(),
            *W = w.data_ptr<T>(), *CK = ck.data_ptr<T>(), *DO = d_o.data_ptr<T>(),
            *DKF = dkf.data_ptr<T>(), *DVF = dvf.data_ptr<T>();
    const int64_t* I = idx.data_ptr<int64_t>();
    const T* WQ = has_s2s ? wq.data_ptr<T>() : nullptr;
    const T* WK = has_s2s ? wk.data_ptr<T>() : nullptr;
    const T* G = has_s2s ? mix.data_ptr<T>() : nullptr;
    T *DQ = dq.data_ptr<T>(), *DK = dk.data_ptr<T>(), *DV = dv.data_ptr<T>(), *DW = dw.data_ptr<T>(),
      *DK0 = dk0.data_ptr<T>(), *DV0 = dv0.data_ptr<T>(), *DWQ = dwq.data_ptr<T>(),
      *DWK = dwk.data_ptr<T>(), *DMIX = dmix.data_ptr<T>();
    for_units(N * H, [&](int64_t u) {
      const int64_t n = u / H, h = u % H;
      const Seg& sg = segs[n];
      const int64_t su = n * H + h;
      std::vector<T> Ks(S * K), Vs(S * V), o(V);
      std::vector<T> gK(DKF + su * S * K, DKF + (su + 1) * S * K);   // adjoint of the slot keys
      std::vector<T> gV(DVF + su * S * V, DVF + (su + 1) * S * V);   // and of the slot values
      std::vector<T> P(block * S), oldK(block * top_k * K), oldV(block * top_k * V);
      const int64_t max_events = has_s2s ? block / C + 2 : 0;
      std::vector<T> pre(max_events * S * V);     // values before each s2s of the block
      std::vector<int64_t> ev_at(block, -1);      // token -> slot in `pre`, -1 if no period end
      std::vector<T> dp(S), tmp;
      S2SScratch<T> scr(has_s2s ? S : 0, has_s2s ? V : 0);
      const T* wqh = has_s2s ? WQ + h * V * V : nullptr;
      const T* wkh = has_s2s ? WK + h * V * V : nullptr;
      T* dwqh = DWQ + su * V * V;
      T* dwkh = DWK + su * V * V;
      const T sc = T(scale);
      const int64_t nb = (sg.len + block - 1) / block;
      for (int64_t b = nb - 1; b >= 0; --b) {
        const int64_t t0 = b * block, t1 = std::min(sg.len, t0 + block);
        const T* c = CK + ((sg.blk + b) * H + h) * S * (K + V);
        std::copy(c, c + S * K, Ks.begin());
        std::copy(c + S * K, c + S * (K + V), Vs.begin());
        int64_t ne = 0;
        for (int64_t t = t0; t < t1; ++t) {      // re-run the block, recording what the reverse needs
          const int64_t tok = (sg.start + t) * H + h, j = t - t0;
          token_forward(Ks.data(), Vs.data(), Q + tok * K, Kp + tok * K, Vp + tok * V,
                        I + tok * top_k, W + tok * top_k, o.data(), P.data() + j * S, d,
                        oldK.data() + j * top_k * K, oldV.data() + j * top_k * V);
          ev_at[j] = -1;
          if (period_end(d, sg.pos, t)) {
            ev_at[j] = ne;
            std::copy(Vs.begin(), Vs.end(), pre.begin() + ne * S * V);
            ++ne;
            s2s_forward(Vs.data(), wqh, wkh, G[h], d, scr);
          }
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t tok = (sg.start + t) * H + h, j = t - t0;
          if (ev_at[j] >= 0) {                    // undo the s2s: back to the values it mixed
            const T* vp = pre.data() + ev_at[j] * S * V;
            std::copy(vp, vp + S * V, Vs.begin());
            s2s_backward(Vs.data(), gV.data(), wqh, wkh, G[h], dwqh, dwkh, DMIX + su, d, scr, tmp);
          }
          // the read: o = sum_i p_i V_i, p = softmax(scale q.K_i)
          const T* p = P.data() + j * S;
          const T* qt = Q + tok * K;
          const T* dot_ = DO + tok * V;
          T inner = 0;
          for (int64_t i = 0; i < S; ++i) {
            dp[i] = dot(dot_, Vs.data() + i * V, V);
            inner += p[i] * dp[i];
          }
          T* dqt = DQ + tok * K;
          for (int64_t i = 0; i < S; ++i) {
            const T ds = sc * p[i] * (dp[i] - inner);
            axpy(ds, Ks.data() + i * K, dqt, K);
            axpy(ds, qt, gK.data() + i * K, K);
            axpy(p[i], dot_, gV.data() + i * V, V);
          }
          // the write of the routed rows: X_i = (1 - w) X_i,old + w x
          const T* kt = Kp + tok * K;
          const T* vt = Vp + tok * V;
          T* dkt = DK + tok * K;
          T* dvt = DV + tok * V;
          for (int64_t jj = 0; jj < top_k; ++jj) {
            const int64_t i = I[tok * top_k + jj];
            const T wj = W[tok * top_k + jj];
            const T* ko = oldK.data() + (j * top_k + jj) * K;
            const T* vo = oldV.data() + (j * top_k + jj) * V;
            T* gk = gK.data() + i * K;
            T* gv = gV.data() + i * V;
            T dwj = 0;
            for (int64_t e = 0; e < K; ++e) dwj += gk[e] * (kt[e] - ko[e]);
            for (int64_t e = 0; e < V; ++e) dwj += gv[e] * (vt[e] - vo[e]);
            DW[tok * top_k + jj] = dwj;
            axpy(wj, gk, dkt, K);
            axpy(wj, gv, dvt, V);
            const T r = T(1) - wj;
            for (int64_t e = 0; e < K; ++e) gk[e] *= r;
            for (int64_t e = 0; e < V; ++e) gv[e] *= r;
            std::copy(ko, ko + K, Ks.begin() + i * K);
            std::copy(vo, vo + V, Vs.begin() + i * V);
          }
        }
      }
      std::copy(gK.begin(), gK.end(), DK0 + su * S * K);
      std::copy(gV.begin(), gV.end(), DV0 + su * S * V);
    });
  });
  return {dq, dk, dv, dw, dk0, dv0, dwq, dwk, dmix};
}

}  // namespace

TORCH_LIBRARY(nstm_cpu, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor idx, Tensor w, Tensor k0, Tensor v0, "
        "Tensor seg, Tensor wq, Tensor wk, Tensor mix, int C, bool has_s2s, float scale, "
        "int block) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("backward(Tensor q, Tensor k, Tensor v, Tensor idx, Tensor w, Tensor seg, Tensor wq, "
        "Tensor wk, Tensor mix, Tensor ck, Tensor d_o, Tensor dkf, Tensor dvf, int C, "
        "bool has_s2s, float scale, int block) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(nstm_cpu, CPU, m) {
  m.impl("forward", &nstm_cpu_forward);
  m.impl("backward", &nstm_cpu_backward);
}
