// Reference (portable, float32) kernels for the two ExecuTorch LLM custom ops the bundle's decoders
// call, llama::update_cache.out and llama::custom_sdpa.out. The executorch wheel ships its optimized
// versions only inside libcustom_ops_aot_lib.so, which links libtorch; these keep the device runtime
// torch-free. Registered only where no kernel of that name is registered yet (a process that loaded
// ExecuTorch's own custom ops keeps them). Semantics follow extension/llm/custom_ops:
//   update_cache(value [B,S,H,D], cache [B,L,H,D], start_pos): cache[:, start_pos + s] = value[:, s]
//   custom_sdpa(q [B,S,H,D], k [B,L,Hkv,D], v [B,L,Hkv,D], start_pos, attn_mask=None, dropout_p,
//               is_causal, scale?) -> [B,S,H,D]: query s attends keys 0..start_pos+s (causal) or
//               0..start_pos+S-1, heads grouped over Hkv, scale 1/sqrt(D) unless given.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>
#include <executorch/runtime/kernel/operator_registry.h>

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

namespace {

bool float4d(const Tensor& t) { return t.scalar_type() == ScalarType::Float && t.dim() == 4; }

// The runtime passes the arguments, the out tensor, then the return value's slot: set it to `out`.
void returns(Span<EValue*> args, size_t out_index) {
  if (args.size() == out_index + 2) *args[out_index + 1] = *args[out_index];
}

void update_cache_out(KernelRuntimeContext& ctx, Span<EValue*> args) {
  if (args.size() < 4 || args.size() > 5 || !args[0]->isTensor() || !args[1]->isTensor() || !args[2]->isInt()) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  const Tensor& value = args[0]->toTensor();
  Tensor cache = args[1]->toTensor();
  const int64_t start = args[2]->toInt();
  if (!float4d(value) || !float4d(cache) || value.size(0) != cache.size(0) || value.size(2) != cache.size(2) ||
      value.size(3) != cache.size(3) || start < 0 || start + value.size(1) > cache.size(1)) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  const int64_t row = value.size(2) * value.size(3);  // H * D floats per position
  const float* src = value.const_data_ptr<float>();
  float* dst = cache.mutable_data_ptr<float>();
  for (int64_t b = 0; b < value.size(0); ++b) {
    std::memcpy(dst + (b * cache.size(1) + start) * row, src + b * value.size(1) * row,
                sizeof(float) * value.size(1) * row);
  }
  returns(args, 3);
}

void custom_sdpa_out(KernelRuntimeContext& ctx, Span<EValue*> args) {
  if (args.size() < 9 || args.size() > 10 || !args[0]->isTensor() || !args[1]->isTensor() || !args[2]->isTensor() ||
      !args[3]->isInt() || !args[4]->isNone() || !args[6]->isBool() || !args[8]->isTensor()) {
    ctx.fail(Error::InvalidArgument);  // an attention mask is not supported here (the bundle passes none)
    return;
  }
  const Tensor& q = args[0]->toTensor();
  const Tensor& k = args[1]->toTensor();
  const Tensor& v = args[2]->toTensor();
  const int64_t start = args[3]->toInt();
  const bool causal = args[6]->toBool();
  Tensor out = args[8]->toTensor();
  if (!float4d(q) || !float4d(k) || !float4d(v) || k.size(2) == 0 || q.size(2) % k.size(2) != 0 ||
      q.size(3) != k.size(3) || v.size(3) != q.size(3) || start < 0 || start + q.size(1) > k.size(1) ||
      executorch::runtime::resize_tensor(out, q.sizes()) != Error::Ok) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3), L = k.size(1), Hkv = k.size(2);
  const double scale = args[7]->isNone() ? 1.0 / std::sqrt(static_cast<double>(D)) : args[7]->toDouble();
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  std::vector<double> p(L);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t keys = causal ? start + s + 1 : start + S;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / (H / Hkv);
        const float* qv = qp + ((b * S + s) * H + h) * D;
        double top = -INFINITY;
        for (int64_t j = 0; j < keys; ++j) {
          const float* kv = kp + ((b * L + j) * Hkv + g) * D;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(qv[d]) * kv[d];
          p[j] = dot * scale;
          top = std::max(top, p[j]);
        }
        double total = 0;
        for (int64_t j = 0; j < keys; ++j) total += (p[j] = std::exp(p[j] - top));
        float* ov = op + ((b * S + s) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0;
          for (int64_t j = 0; j < keys; ++j) acc += p[j] * vp[((b * L + j) * Hkv + g) * D + d];
          ov[d] = static_cast<float>(acc / total);
        }
      }
    }
  }
  returns(args, 8);
}

}  // namespace

// Registers the kernels not registered yet; returns how many it registered (-1 on a registry error).
extern "C" int et_register_llama_kernels() {
  using executorch::runtime::Kernel;
  static const Kernel kernels[] = {Kernel("llama::update_cache.out", update_cache_out),
                                   Kernel("llama::custom_sdpa.out", custom_sdpa_out)};
  int added = 0;
  for (const Kernel& kernel : kernels) {
    if (executorch::runtime::registry_has_op_function(kernel.name_)) continue;
    if (executorch::runtime::register_kernel(kernel) != Error::Ok) return -1;
    ++added;
  }
  return added;
}
