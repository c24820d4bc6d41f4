// CUDA registrations of the optimizer ops: check arguments, group tensors by param dtype, and
// call the C launchers of adamw.cu on the current stream. Built only into CUDA builds.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "adamw_cuda.h"
#include "optim.h"

namespace qlora_fast {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return QF_FLOAT32;
    case at::kBFloat16: return QF_BFLOAT16;
    case at::kHalf: return QF_FLOAT16;
    default: TORCH_CHECK(false, "unsupported param dtype ", t);
  }
}

void check_launch(int error) {
  TORCH_CHECK(error == 0, "qlora_fast CUDA optimizer kernel failed: ", qf_cuda_error_string(error));
}

QfAdamHyper hyper_of(double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled) {
  return QfAdamHyper{lr, beta1, beta2, eps, weight_decay, decoupled ? 1 : 0};
}

void* current_stream(const at::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

}  // namespace

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::IntArrayRef steps, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool decoupled) {
  check_adam_args(params, grads, steps, c10::DeviceType::CUDA);
  check_adam32_states(params, exp_avgs, exp_avg_sqs);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<QfAdam32Tensor> by_dtype[3];
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].device() == params[0].device(), "all params of one call must be on one device");
    by_dtype[dtype_code(params[t].scalar_type())].push_back(QfAdam32Tensor{
        params[t].data_ptr(), grads[t].data_ptr(), exp_avgs[t].data_ptr<float>(),
        exp_avg_sqs[t].data_ptr<float>(), params[t].numel(), steps[t]});
  }
  const QfAdamHyper hyper = hyper_of(lr, beta1, beta2, eps, weight_decay, decoupled);
  for (int d = 0; d < 3; ++d) {
    if (by_dtype[d].empty()) continue;
    check_launch(qf_adam32_cuda(by_dtype[d].data(), static_cast<int>(by_dtype[d].size()), d, hyper,
                                current_stream(params[0])));
  }
}

void adam8bit_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList m_codes,
                        at::TensorList v_codes, at::TensorList m_absmax, at::TensorList v_absmax,
                        const at::Tensor& signed_map, const at::Tensor& unsigned_map,
                        at::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                        double weight_decay, bool decoupled) {
  check_adam_args(params, grads, steps, c10::DeviceType::CUDA);
  check_adam8bit_states(params, m_codes, v_codes, m_absmax, v_absmax, signed_map, unsigned_map);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<QfAdam8Tensor> by_dtype[3];
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].device() == params[0].device(), "all params of one call must be on one device");
    by_dtype[dtype_code(params[t].scalar_type())].push_back(QfAdam8Tensor{
        params[t].data_ptr(), grads[t].data_ptr(), m_codes[t].data_ptr<uint8_t>(),
        v_codes[t].data_ptr<uint8_t>(), m_absmax[t].data_ptr<float>(), v_absmax[t].data_ptr<float>(),
        params[t].numel(), steps[t]});
  }
  const QfAdamHyper hyper = hyper_of(lr, beta1, beta2, eps, weight_decay, decoupled);
  for (int d = 0; d < 3; ++d) {
    if (by_dtype[d].empty()) continue;
    check_launch(qf_adam8bit_cuda(by_dtype[d].data(), static_cast<int>(by_dtype[d].size()), d,
                                  signed_map.data_ptr<float>(), unsigned_map.data_ptr<float>(), hyper,
                                  current_stream(params[0])));
  }
}

}  // namespace qlora_fast

TORCH_LIBRARY_IMPL(qlora_fast, CUDA, m) {
  m.impl("adam_step_", &qlora_fast::adam_step_cuda);
  m.impl("adam8bit_step_", &qlora_fast::adam8bit_step_cuda);
}
