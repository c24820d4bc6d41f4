// Bindings of the optimizer extension `qlora_fast._C`: the op schemas (TORCH_LIBRARY), the
// argument checks both devices share, the CPU registrations, and a bare Python module init so
// `import qlora_fast._C` loads the library (the ops are then under torch.ops.qlora_fast).
//
// Ops (all in place, many tensors per call, one step count per tensor):
//   adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, decoupled)
//   adam8bit_step_(params, grads, m_codes, v_codes, m_absmax, v_absmax, signed_map, unsigned_map,
//                  steps, lr, beta1, beta2, eps, weight_decay, decoupled)
//   adam8bit_step_checked_(same arguments) -> bool: CPU only; true when a new block absmax is
//                  not finite (the optimizer's overflow check without a pass over the states)
#include <Python.h>
#include <torch/library.h>

#include "adam_common.h"
#include "optim.h"

namespace qlora_fast {

void check_adam_args(at::TensorList params, at::TensorList grads, at::IntArrayRef steps,
                     c10::DeviceType device_type) {
  TORCH_CHECK(grads.size() == params.size(), "grads: expected ", params.size(), " tensors, got ", grads.size());
  TORCH_CHECK(steps.size() == params.size(), "steps: expected ", params.size(), " values, got ", steps.size());
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    const at::Tensor& g = grads[t];
    TORCH_CHECK(p.device().type() == device_type, "params[", t, "] is on ", p.device(), ", expected ", device_type);
    TORCH_CHECK(g.device() == p.device(), "grads[", t, "] is on ", g.device(), ", its param on ", p.device());
    const auto dt = p.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "params[", t, "]: expected float32, bfloat16 or float16, got ", dt);
    TORCH_CHECK(g.scalar_type() == dt, "grads[", t, "]: dtype ", g.scalar_type(), " != param dtype ", dt);
    TORCH_CHECK(g.numel() == p.numel(), "grads[", t, "]: ", g.numel(), " elements, param has ", p.numel());
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous(), "params[", t, "] and grads[", t, "] must be contiguous");
    TORCH_CHECK(steps[t] >= 1, "steps[", t, "] must be >= 1, got ", steps[t]);
  }
}

static void check_state(const at::Tensor& p, const at::Tensor& s, at::ScalarType dtype, int64_t numel,
                        const char* name, size_t t) {
  TORCH_CHECK(s.device() == p.device(), name, "[", t, "] is on ", s.device(), ", its param on ", p.device());
  TORCH_CHECK(s.scalar_type() == dtype, name, "[", t, "]: expected ", dtype, ", got ", s.scalar_type());
  TORCH_CHECK(s.numel() == numel, name, "[", t, "]: expected ", numel, " elements, got ", s.numel());
  TORCH_CHECK(s.is_contiguous(), name, "[", t, "] must be contiguous");
}

void check_adam32_states(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs) {
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
              "exp_avgs and exp_avg_sqs need one tensor per param");
  for (size_t t = 0; t < params.size(); ++t) {
    check_state(params[t], exp_avgs[t], at::kFloat, params[t].numel(), "exp_avgs", t);
    check_state(params[t], exp_avg_sqs[t], at::kFloat, params[t].numel(), "exp_avg_sqs", t);
  }
}

void check_adam8bit_states(at::TensorList params, at::TensorList m_codes, at::TensorList v_codes,
                           at::TensorList m_absmax, at::TensorList v_absmax,
                           const at::Tensor& signed_map, const at::Tensor& unsigned_map) {
  const size_t n = params.size();
  TORCH_CHECK(m_codes.size() == n && v_codes.size() == n && m_absmax.size() == n && v_absmax.size() == n,
              "m_codes, v_codes, m_absmax and v_absmax need one tensor per param");
  for (const at::Tensor* map : {&signed_map, &unsigned_map}) {
    TORCH_CHECK(map->scalar_type() == at::kFloat && map->numel() == 256 && map->is_contiguous(),
                "the 8-bit maps must be contiguous float32 tensors of 256 sorted values");
  }
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    const int64_t blocks = (p.numel() + kQuantBlock - 1) / kQuantBlock;
    TORCH_CHECK(signed_map.device() == p.device() && unsigned_map.device() == p.device(),
                "the 8-bit maps must be on the params' device ", p.device());
    check_state(p, m_codes[t], at::kByte, p.numel(), "m_codes", t);
    check_state(p, v_codes[t], at::kByte, p.numel(), "v_codes", t);
    check_state(p, m_absmax[t], at::kFloat, blocks, "m_absmax", t);
    check_state(p, v_absmax[t], at::kFloat, blocks, "v_absmax", t);
  }
}

}  // namespace qlora_fast

TORCH_LIBRARY(qlora_fast, m) {
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "int[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled) -> ()");
  m.def(
      "adam8bit_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] m_codes, Tensor(c!)[] v_codes, "
      "Tensor(d!)[] m_absmax, Tensor(e!)[] v_absmax, Tensor signed_map, Tensor unsigned_map, int[] steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled) -> ()");
  m.def(
      "adam8bit_step_checked_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] m_codes, Tensor(c!)[] v_codes, "
      "Tensor(d!)[] m_absmax, Tensor(e!)[] v_absmax, Tensor signed_map, Tensor unsigned_map, int[] steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled) -> bool");
}

TORCH_LIBRARY_IMPL(qlora_fast, CPU, m) {
  m.impl("adam_step_", &qlora_fast::adam_step_cpu);
  m.impl("adam8bit_step_", &qlora_fast::adam8bit_step_cpu);
  m.impl("adam8bit_step_checked_", &qlora_fast::adam8bit_step_checked_cpu);
}

// The hash of the sources this library was built from (setup.py / the JIT loader define it):
// qlora_fast/_extension.py reads it from the file, before loading, to skip a stale build.
#define QF_STRINGIFY2(x) #x
#define QF_STRINGIFY(x) QF_STRINGIFY2(x)
#ifndef QLORA_FAST_SOURCE_HASH
#define QLORA_FAST_SOURCE_HASH unknown
#endif
__attribute__((used)) static const char kSourceHash[] = "qlora_fast_source_hash:" QF_STRINGIFY(QLORA_FAST_SOURCE_HASH);

// A bare module: importing it runs the static registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "qlora_fast optimizer ops (torch.ops.qlora_fast)", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) PyModule_AddStringConstant(module, "source_hash", kSourceHash + sizeof("qlora_fast_source_hash:") - 1);
  return module;
}
