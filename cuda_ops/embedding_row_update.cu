// embedding_row_update (schema in embedding_row_grads.cpp) for tables on a GPU: the two steps it stands for,
// chained on the device: embedding_row_grads' CUDA kernel (float64 sums in ascending position), one cast to
// float32, then sparse_opt_<kind>'s CUDA kernel with the sorted unique rows (the rules of
// sparse_optimizers_common.h). The same bits as the two ops called from Python, and as the CPU op; fusing the
// two kernels into one pass on the GPU, as the CPU op does, is not done yet.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace {

using RowGrads = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const c10::optional<at::Tensor>&, const at::Tensor&,
                                                    const at::Tensor&, int64_t, int64_t, int64_t);

const at::Tensor& state_tensor(const c10::optional<at::Tensor>& t, const std::string& kind, const char* name) {
  TORCH_CHECK(t.has_value() && t->defined(), "sparse optimizer kind ", kind, " needs its state tensor '", name, "'");
  return *t;
}

void embedding_row_update_cuda(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& offsets,
                               const c10::optional<at::Tensor>& per_sample_weights, const at::Tensor& features,
                               const at::Tensor& column_offsets, int64_t dim, int64_t num_features,
                               int64_t pooling_mode, c10::string_view kind_view, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& sum, const c10::optional<at::Tensor>& exp_avg,
                               const c10::optional<at::Tensor>& exp_avg_sq, const c10::optional<at::Tensor>& step,
                               double lr, double eps, double weight_decay, double beta1, double beta2, double decay) {
  TORCH_CHECK(grad_output.device().is_cuda() && weight.device() == grad_output.device(),
              "embedding_row_update: expected CUDA tensors on one device here, got ", grad_output.device(), " and ",
              weight.device());
  const std::string kind(kind_view);
  TORCH_CHECK(kind == "sgd" || kind == "adagrad" || kind == "rowwise_adagrad" || kind == "decayed_adagrad" ||
                  kind == "rowwise_adam" || kind == "adam",
              "unknown sparse optimizer kind '", kind,
              "': expected sgd, adagrad, rowwise_adagrad, decayed_adagrad, rowwise_adam or adam");
  const c10::cuda::CUDAGuard guard(grad_output.device());
  auto& dispatcher = c10::Dispatcher::singleton();
  at::Tensor rows, grads;
  std::tie(rows, grads) = dispatcher.findSchemaOrThrow("lightning_sparse::embedding_row_grads", "")
                              .typed<RowGrads>()
                              .call(grad_output, indices, offsets, per_sample_weights, features, column_offsets, dim,
                                    num_features, pooling_mode);
  const at::Tensor g = grads.to(at::kFloat);
  const auto op = dispatcher.findSchemaOrThrow(("lightning_sparse::sparse_opt_" + kind).c_str(), "");
  if (kind == "sgd") {
    op.typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double)>().call(weight, rows, g, lr,
                                                                                                   weight_decay);
  } else if (kind == "adagrad" || kind == "rowwise_adagrad") {
    op.typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double)>()
        .call(weight, state_tensor(sum, kind, "sum"), rows, g, lr, eps, weight_decay);
  } else if (kind == "decayed_adagrad") {
    op.typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double,
                  double)>()
        .call(weight, state_tensor(sum, kind, "sum"), rows, g, lr, eps, weight_decay, decay);
  } else if (kind == "rowwise_adam") {
    op.typed<void(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, const at::Tensor&, double, double, double, double, double)>()
        .call(weight, exp_avg, state_tensor(exp_avg_sq, kind, "exp_avg_sq"), state_tensor(step, kind, "step"), rows, g,
              lr, eps, weight_decay, beta1, beta2);
  } else {
    op.typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, double, double, double, double, double)>()
        .call(weight, state_tensor(exp_avg, kind, "exp_avg"), state_tensor(exp_avg_sq, kind, "exp_avg_sq"),
              state_tensor(step, kind, "step"), rows, g, lr, eps, weight_decay, beta1, beta2);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_sparse, CUDA, m) { m.impl("embedding_row_update", embedding_row_update_cuda); }
