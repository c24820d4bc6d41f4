// CUDA registrations of the optimizer ops: check arguments, build the kernels' tables (one per
// state kind and param dtype) in one pinned buffer, copy it to the device with one asynchronous
// copy and launch the table kernels of adamw.cu on the current stream. Built only into CUDA builds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstring>
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

// One step's tables, by param dtype; empty tensors are left out (they have no chunk).
struct Tables {
  std::vector<QfAdam32Entry> t32[3];
  std::vector<QfAdam8Entry> t8[3];
};

size_t align16(size_t x) { return (x + 15) & ~static_cast<size_t>(15); }

// Pack each non-empty table and its chunk prefix sum into one pinned host buffer, copy it to the
// device (one asynchronous copy; the caching host allocator keeps the buffer until the copy is
// done) and launch one kernel per table, all on the current stream.
void launch_tables(const Tables& tables, const at::Device& device, const float* signed_map,
                   const float* unsigned_map, int* nonfinite) {
  struct Segment {
    int kind, dtype;
    size_t table_at, starts_at;
    int count, chunks;
  };
  std::vector<Segment> segments;
  size_t bytes = 0;
  for (int kind = 0; kind < 2; ++kind) {
    for (int d = 0; d < 3; ++d) {
      const size_t count = kind == 0 ? tables.t32[d].size() : tables.t8[d].size();
      if (count == 0) continue;
      TORCH_CHECK(count < static_cast<size_t>(INT_MAX), "too many tensors for one launch");
      Segment seg{kind, d, bytes, 0, static_cast<int>(count), 0};
      bytes = align16(bytes + count * (kind == 0 ? sizeof(QfAdam32Entry) : sizeof(QfAdam8Entry)));
      seg.starts_at = bytes;
      bytes = align16(bytes + count * sizeof(int));
      segments.push_back(seg);
    }
  }
  if (segments.empty()) return;
  at::Tensor host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  for (Segment& seg : segments) {
    int* starts = reinterpret_cast<int*>(h + seg.starts_at);
    int64_t chunks = 0;
    for (int i = 0; i < seg.count; ++i) {
      starts[i] = static_cast<int>(chunks);
      const int64_t n = seg.kind == 0 ? tables.t32[seg.dtype][i].n : tables.t8[seg.dtype][i].n;
      chunks += (n + (seg.kind == 0 ? kQfChunk32 : kQfChunk8) - 1) / (seg.kind == 0 ? kQfChunk32 : kQfChunk8);
      TORCH_CHECK(chunks < INT_MAX, "too many elements for one launch");
    }
    seg.chunks = static_cast<int>(chunks);
    if (seg.kind == 0) {
      std::memcpy(h + seg.table_at, tables.t32[seg.dtype].data(), seg.count * sizeof(QfAdam32Entry));
    } else {
      std::memcpy(h + seg.table_at, tables.t8[seg.dtype].data(), seg.count * sizeof(QfAdam8Entry));
    }
  }
  at::Tensor dev = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(host, /*non_blocking=*/true);
  const uint8_t* d = dev.data_ptr<uint8_t>();
  void* stream = static_cast<void*>(c10::cuda::getCurrentCUDAStream(device.index()).stream());
  for (const Segment& seg : segments) {
    const int* starts = reinterpret_cast<const int*>(d + seg.starts_at);
    if (seg.kind == 0) {
      check_launch(qf_adam32_cuda(reinterpret_cast<const QfAdam32Entry*>(d + seg.table_at), starts, seg.count,
                                  seg.chunks, seg.dtype, stream));
    } else {
      check_launch(qf_adam8bit_cuda(reinterpret_cast<const QfAdam8Entry*>(d + seg.table_at), starts, seg.count,
                                    seg.chunks, seg.dtype, signed_map, unsigned_map, nonfinite, stream));
    }
  }
}

}  // namespace

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::IntArrayRef steps, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool decoupled) {
  check_adam_args(params, grads, steps, c10::DeviceType::CUDA);
  check_adam32_states(params, exp_avgs, exp_avg_sqs);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  Tables tables;
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].device() == params[0].device(), "all params of one call must be on one device");
    if (params[t].numel() == 0) continue;
    tables.t32[dtype_code(params[t].scalar_type())].push_back(QfAdam32Entry{
        params[t].data_ptr(), grads[t].data_ptr(), exp_avgs[t].data_ptr<float>(), exp_avg_sqs[t].data_ptr<float>(),
        params[t].numel(), make_adam_scalars(lr, beta1, beta2, eps, weight_decay, steps[t], decoupled)});
  }
  launch_tables(tables, params[0].device(), nullptr, nullptr, nullptr);
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
  Tables tables;
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].device() == params[0].device(), "all params of one call must be on one device");
    if (params[t].numel() == 0) continue;
    tables.t8[dtype_code(params[t].scalar_type())].push_back(QfAdam8Entry{
        params[t].data_ptr(), grads[t].data_ptr(), m_codes[t].data_ptr<uint8_t>(), v_codes[t].data_ptr<uint8_t>(),
        m_absmax[t].data_ptr<float>(), v_absmax[t].data_ptr<float>(), params[t].numel(),
        make_adam_scalars(lr, beta1, beta2, eps, weight_decay, steps[t], decoupled)});
  }
  launch_tables(tables, params[0].device(), signed_map.data_ptr<float>(), unsigned_map.data_ptr<float>(), nullptr);
}

bool adam_multi_step_cuda(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                          at::TensorList steps, at::TensorList states, const at::Tensor& entries,
                          at::ArrayRef<double> hyper, bool decoupled, const at::Tensor& signed_map,
                          const at::Tensor& unsigned_map, const std::optional<at::Tensor>& nonfinite) {
  const MultiStep step = check_multi_args(params, grads, steps, states, entries, hyper, signed_map, unsigned_map,
                                          c10::DeviceType::CUDA);
  int* flag = nullptr;
  if (nonfinite.has_value() && nonfinite->defined()) {
    TORCH_CHECK(nonfinite->scalar_type() == at::kInt && nonfinite->numel() >= 1 &&
                    (params.empty() || nonfinite->device() == params[0].device()),
                "nonfinite: expected an int32 tensor on the params' device");
    flag = nonfinite->data_ptr<int>();
  }
  const std::vector<int64_t> counts = advance_steps(steps, step);
  if (params.empty()) return false;
  const c10::cuda::CUDAGuard guard(params[0].device());
  Tables tables;
  for (const MultiEntry& e : step.entries) {
    const at::Tensor& g = step.grads[e.param];
    if (!g.defined() || e.end == e.start) continue;
    const at::Tensor& p = params[e.param];
    const double* h = hyper.data() + 5 * e.group;
    const AdamScalars s = make_adam_scalars(h[0], h[1], h[2], h[3], h[4], counts[e.param], decoupled);
    const size_t offset = static_cast<size_t>(e.start) * p.element_size();
    void* pp = static_cast<char*>(p.data_ptr()) + offset;
    const void* gp = static_cast<const char*>(g.data_ptr()) + offset;
    const int d = dtype_code(p.scalar_type());
    if (e.kind == 0) {
      tables.t32[d].push_back(QfAdam32Entry{pp, gp, states[e.state].data_ptr<float>(),
                                            states[e.state + 1].data_ptr<float>(), e.end - e.start, s});
    } else {
      tables.t8[d].push_back(QfAdam8Entry{pp, gp, states[e.state].data_ptr<uint8_t>(),
                                          states[e.state + 1].data_ptr<uint8_t>(), states[e.state + 2].data_ptr<float>(),
                                          states[e.state + 3].data_ptr<float>(), e.end - e.start, s});
    }
  }
  launch_tables(tables, params[0].device(), step.any_8bit ? signed_map.data_ptr<float>() : nullptr,
                step.any_8bit ? unsigned_map.data_ptr<float>() : nullptr, flag);
  return false;
}

}  // namespace qlora_fast

TORCH_LIBRARY_IMPL(qlora_fast, CUDA, m) {
  m.impl("adam_step_", &qlora_fast::adam_step_cuda);
  m.impl("adam8bit_step_", &qlora_fast::adam8bit_step_cuda);
  m.impl("adam_multi_step_", &qlora_fast::adam_multi_step_cuda);
}

TORCH_LIBRARY_IMPL(qlora_fast, SparseCUDA, m) {
  m.impl("adam_multi_step_", &qlora_fast::adam_multi_step_cuda);  // its checks name the sparse gradient
}
