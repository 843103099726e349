// A C shim over ExecuTorch's C++ Module API, loaded from Python with ctypes (device_runtime/et_native.py).
// Torch-free: it links only the ExecuTorch runtime libraries the executorch wheel ships.
//
// Every function reports failure through its return value and a message written into `err`;
// none aborts on bad input it can check (the program is loaded with the flatbuffer verifier on).
// Outputs of the last run stay in the handle until the next run or et_free: copy them out first.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Program;

namespace {

struct Handle {
  std::unique_ptr<Module> module;
  std::vector<std::string> names;
  std::vector<int> status;  // per method: 0 loaded, else the ExecuTorch error (OperatorMissing: a kernel lacking)
  std::vector<EValue> outputs;
  std::vector<int64_t> scalars;  // storage for non-tensor outputs (int, bool as int64; double bits)
};

void say(char* err, size_t n, const std::string& text) {
  if (err != nullptr && n > 0) {
    std::snprintf(err, n, "%s", text.c_str());
  }
}

std::string why(Error e) {
  return std::string(executorch::runtime::to_string(e)) + " (ExecuTorch error " +
      std::to_string(static_cast<int>(e)) + ")";
}

}  // namespace

extern "C" {

int et_abi_version() { return 4; }

// Loads the program at `path` (flatbuffer verifier on) and each of its methods. NULL on failure, with the
// reason in `err`.
void* et_load(const char* path, char* err, size_t errlen) {
  auto h = std::make_unique<Handle>();
  // share_memory_arenas: the methods of one program share its mutable buffers (the bundle's KV cache,
  // which write_cache/read_cache and the decoders use); outputs are copied out before the next run.
  h->module = std::make_unique<Module>(std::string(path), Module::LoadMode::File, nullptr, nullptr, nullptr,
                                       /*share_memory_arenas=*/true);
  Error e = h->module->load(Program::Verification::InternalConsistency);
  if (e != Error::Ok) {
    say(err, errlen, "cannot load the program: " + why(e));
    return nullptr;
  }
  auto names = h->module->method_names();
  if (!names.ok()) {
    say(err, errlen, "cannot list the program's methods: " + why(names.error()));
    return nullptr;
  }
  h->names.assign(names->begin(), names->end());
  for (const auto& name : h->names) {  // every method now: a broken one fails here, not at its first run
    Error m = h->module->load_method(name);
    h->status.push_back(static_cast<int>(m));
    if (m != Error::Ok && m != Error::OperatorMissing) {  // a kernel this runtime lacks: that method only
      say(err, errlen, "cannot load its method " + name + ": " + why(m));
      return nullptr;
    }
  }
  return h.release();
}

int et_method_count(void* handle) { return static_cast<int>(static_cast<Handle*>(handle)->names.size()); }

const char* et_method_name(void* handle, int i) { return static_cast<Handle*>(handle)->names.at(i).c_str(); }

// 0 when method i loaded; otherwise its ExecuTorch error code (20: OperatorMissing, a kernel not linked in).
int et_method_status(void* handle, int i) { return static_cast<Handle*>(handle)->status.at(i); }

// Runs `method` on n tensors (dtypes: ExecuTorch ScalarType codes; shapes: ndims[i] sizes each, all
// concatenated in `sizes`; data: C-contiguous buffers the caller keeps alive during the call).
// Returns the number of outputs, or -1 with the reason in `err`.
int et_run(void* handle, const char* method, int n, const int* dtypes, const int* ndims, const int64_t* sizes,
           void* const* data, char* err, size_t errlen) {
  auto* h = static_cast<Handle*>(handle);
  h->outputs.clear();
  std::vector<TensorPtr> keep;
  std::vector<EValue> inputs;
  keep.reserve(n);
  inputs.reserve(n);
  const int64_t* at = sizes;
  for (int i = 0; i < n; ++i) {
    std::vector<executorch::aten::SizesType> shape(at, at + ndims[i]);
    at += ndims[i];
    keep.push_back(executorch::extension::make_tensor_ptr(std::move(shape), data[i],
                                                          static_cast<ScalarType>(dtypes[i])));
    inputs.emplace_back(*keep.back());
  }
  auto result = h->module->execute(std::string(method), inputs);
  if (!result.ok()) {
    say(err, errlen, std::string("method ") + method + " failed: " + why(result.error()));
    return -1;
  }
  h->outputs = std::move(*result);
  return static_cast<int>(h->outputs.size());
}

// Output i of the last run: kind 0 tensor, 1 int, 2 double, 3 bool, -1 other.
int et_output_kind(void* handle, int i) {
  const EValue& v = static_cast<Handle*>(handle)->outputs.at(i);
  if (v.isTensor()) return 0;
  if (v.isInt()) return 1;
  if (v.isDouble()) return 2;
  if (v.isBool()) return 3;
  return -1;
}

int et_output_dtype(void* handle, int i) {
  return static_cast<int>(static_cast<Handle*>(handle)->outputs.at(i).toTensor().scalar_type());
}

// Writes up to `max` sizes of tensor output i into `out`; returns its number of dimensions.
int et_output_shape(void* handle, int i, int64_t* out, int max) {
  const auto& t = static_cast<Handle*>(handle)->outputs.at(i).toTensor();
  for (int d = 0; d < t.dim() && d < max; ++d) out[d] = t.size(d);
  return static_cast<int>(t.dim());
}

// Copies tensor output i into `dst` (nbytes must equal its size); 0 on success, -1 otherwise.
int et_output_copy(void* handle, int i, void* dst, size_t nbytes) {
  const auto& t = static_cast<Handle*>(handle)->outputs.at(i).toTensor();
  if (t.nbytes() != nbytes) return -1;
  std::memcpy(dst, t.const_data_ptr(), nbytes);
  return 0;
}

// All outputs of the last run at once (one call instead of four per output): kinds[i], dtypes[i] (tensors;
// -1 otherwise), ndims[i], and sizes in shapes[i * max_dims ...]. Returns the number of outputs, or -1 when
// there are more than `max_outputs` or a tensor has more than `max_dims` dimensions.
int et_outputs_info(void* handle, int* kinds, int* dtypes, int* ndims, int64_t* shapes, int max_outputs,
                    int max_dims) {
  const auto& outputs = static_cast<Handle*>(handle)->outputs;
  if (static_cast<int>(outputs.size()) > max_outputs) return -1;
  for (size_t i = 0; i < outputs.size(); ++i) {
    kinds[i] = et_output_kind(handle, static_cast<int>(i));
    dtypes[i] = -1;
    ndims[i] = 0;
    if (kinds[i] != 0) continue;
    const auto& t = outputs[i].toTensor();
    if (t.dim() > max_dims) return -1;
    dtypes[i] = static_cast<int>(t.scalar_type());
    ndims[i] = static_cast<int>(t.dim());
    for (int d = 0; d < t.dim(); ++d) shapes[i * max_dims + d] = t.size(d);
  }
  return static_cast<int>(outputs.size());
}

int64_t et_output_int(void* handle, int i) {
  const EValue& v = static_cast<Handle*>(handle)->outputs.at(i);
  return v.isBool() ? static_cast<int64_t>(v.toBool()) : v.toInt();
}

double et_output_double(void* handle, int i) { return static_cast<Handle*>(handle)->outputs.at(i).toDouble(); }

void et_free(void* handle) { delete static_cast<Handle*>(handle); }

}  // extern "C"
