// PyTorch binding of the fused one-token NSTM step (the kernel is in nstm_step.cu, ATen-free).
//
//   nstm_step_(q, k, v, logits, gate, state_k, state_v, o, w_q, w_k, s2s_gate, pos_dev,
//              pos_host, top_k, comm_every, scale)
//
// Updates state_k / state_v IN PLACE and writes o. Every tensor must be a contiguous CUDA tensor
// on one device; q/k/v/o share the input dtype (fp32, bf16 or fp16); logits, gate, the state and
// the s2s weights are fp32; pos_dev (optional) is an int64 tensor of one element holding the
// token's absolute position (else pos_host is used). Python callers: nstm_kernels/cuda.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "nstm_step.h"

namespace {

void check_cuda(const torch::Tensor& t, const char* name, const torch::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "nstm_step (CUDA): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "nstm_step (CUDA): ", name, " is on ", t.device(),
              " but q is on ", ref.device());
  TORCH_CHECK(t.is_contiguous(), "nstm_step (CUDA): ", name, " must be contiguous");
}

void check_shape(const torch::Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, "nstm_step (CUDA): ", name, " must have shape ", want, ", got ",
              t.sizes());
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "nstm_step (CUDA): ", name, " must be float32, got ",
              t.scalar_type());
}

void nstm_step_(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor logits,
                torch::Tensor gate, torch::Tensor state_k, torch::Tensor state_v, torch::Tensor o,
                c10::optional<torch::Tensor> w_q, c10::optional<torch::Tensor> w_k,
                c10::optional<torch::Tensor> s2s_gate,
                c10::optional<torch::Tensor> pos_dev, int64_t pos_host, int64_t top_k,
                int64_t comm_every, double scale) {
  TORCH_CHECK(q.dim() == 3, "nstm_step (CUDA): q must have shape [B, H, K], got ", q.sizes());
  TORCH_CHECK(v.dim() == 3, "nstm_step (CUDA): v must have shape [B, H, V], got ", v.sizes());
  TORCH_CHECK(logits.dim() == 3, "nstm_step (CUDA): route_logits must have shape [B, H, S], got ",
              logits.sizes());
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2), V = v.size(2), S = logits.size(2);
  const std::pair<const char*, const torch::Tensor*> all[] = {
      {"q", &q}, {"k", &k}, {"v", &v}, {"route_logits", &logits}, {"write_gate", &gate},
      {"state.k", &state_k}, {"state.v", &state_v}, {"o", &o}};
  for (const auto& it : all) check_cuda(*it.second, it.first, q);
  check_shape(k, "k", {B, H, K});
  check_shape(v, "v", {B, H, V});
  check_shape(o, "o", {B, H, V});
  check_shape(logits, "route_logits", {B, H, S});
  check_shape(gate, "write_gate", {B, H});
  check_shape(state_k, "state.k", {B, H, S, K});
  check_shape(state_v, "state.v", {B, H, S, V});
  const auto dt = q.scalar_type();
  int code;
  if (dt == at::kFloat) code = nstm::kFloat32;
  else if (dt == at::kBFloat16) code = nstm::kBFloat16;
  else if (dt == at::kHalf) code = nstm::kFloat16;
  else TORCH_CHECK(false, "nstm_step (CUDA): q must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && o.scalar_type() == dt,
              "nstm_step (CUDA): q, k, v and o must share one dtype");
  check_f32(logits, "route_logits");
  check_f32(gate, "write_gate");
  check_f32(state_k, "state.k");
  check_f32(state_v, "state.v");

  nstm::StepParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.logits = logits.data_ptr<float>();
  p.gate = gate.data_ptr<float>();
  p.state_k = state_k.data_ptr<float>();
  p.state_v = state_v.data_ptr<float>();
  p.o = o.data_ptr();
  const int n_s2s = (int)w_q.has_value() + w_k.has_value() + s2s_gate.has_value();
  TORCH_CHECK(n_s2s == 0 || n_s2s == 3, "nstm_step (CUDA): give all of w_q, w_k, s2s_gate or none");
  if (n_s2s == 3) {
    const std::pair<const char*, const torch::Tensor*> ws[] = {{"s2s.w_q", &*w_q}, {"s2s.w_k", &*w_k}};
    for (const auto& it : ws) {
      check_cuda(*it.second, it.first, q);
      check_f32(*it.second, it.first);
      check_shape(*it.second, it.first, {H, V, V});
    }
    check_cuda(*s2s_gate, "s2s.gate", q);
    check_f32(*s2s_gate, "s2s.gate");
    check_shape(*s2s_gate, "s2s.gate", {H});
    p.w_q = w_q->data_ptr<float>();
    p.w_k = w_k->data_ptr<float>();
    p.s2s_gate = s2s_gate->data_ptr<float>();
  }
  if (pos_dev.has_value()) {
    check_cuda(*pos_dev, "pos", q);
    TORCH_CHECK(pos_dev->scalar_type() == at::kLong && pos_dev->numel() == 1,
                "nstm_step (CUDA): pos must be an int64 tensor of one element");
    p.pos_dev = pos_dev->data_ptr<int64_t>();
  }
  TORCH_CHECK(pos_host >= 0, "nstm_step (CUDA): pos must be >= 0");
  p.pos_host = pos_host;
  p.comm_every = comm_every;
  TORCH_CHECK(B * H <= 0x7fffffffLL && K <= nstm::kMaxDim && V <= nstm::kMaxDim &&
                  S <= nstm::kMaxSlots && top_k <= S,
              "nstm_step (CUDA): unsupported sizes B*H = ", B * H, ", S = ", S, ", K = ", K,
              ", V = ", V, ", top_k = ", top_k, " (S, K, V <= 1024; top_k <= S); use "
              "backend='triton' or 'chunked'");
  p.B = (int)B;
  p.H = (int)H;
  p.S = (int)S;
  p.K = (int)K;
  p.V = (int)V;
  p.top_k = (int)top_k;
  p.scale = (float)scale;
  p.dtype = code;
  if (B == 0 || H == 0) return;

  c10::cuda::CUDAGuard guard(q.device());
  char err[512] = {0};
  TORCH_CHECK(nstm::nstm_step_check(p, q.get_device(), err, sizeof err) == 0, err);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  TORCH_CHECK(nstm::nstm_step_launch(p, stream, err, sizeof err) == 0, err);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "NSTM fused one-token step (CUDA); updates the slot memory in place";
  m.def("nstm_step_", &nstm_step_, "one-token NSTM step, state updated in place",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("logits"), py::arg("gate"),
        py::arg("state_k"), py::arg("state_v"), py::arg("o"), py::arg("w_q"), py::arg("w_k"),
        py::arg("s2s_gate"), py::arg("pos_dev"), py::arg("pos_host"),
        py::arg("top_k"), py::arg("comm_every"), py::arg("scale"));
}
