// What embedding_row_grads.cpp (CPU) and embedding_row_grads.cu (CUDA) share: the pooling modes, the
// validation of the arguments, the scale of one occurrence and the float64 accumulation step. The twin in
// lightning_sparse/optim/row_grads.py computes the same numbers in the same order.
//
// Order: the gradient of a row is the sum over its occurrences in ascending position of `indices`,
// starting from 0.0, one rounded multiply and one rounded add per element each time. The CUDA build uses
// __dmul_rn / __dadd_rn, which nvcc never fuses into an FMA, and the CPU build -ffp-contract=off (setup.py),
// so both kernels give the same bits.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "host_device.h"

namespace lightning_sparse_row_grads {

// fbgemm's PoolingMode values
constexpr int64_t kSum = 0, kMean = 1, kNone = 2;

// Multiplier of one occurrence's output-gradient row: its per-sample weight (1 without), divided by the
// bag's length under MEAN pooling. One rounding at most (a division), in float64.
LS_HOST_DEVICE inline double occurrence_scale(bool has_weight, float weight, bool mean, int64_t bag_length) {
  const double w = has_weight ? static_cast<double>(weight) : 1.0;
  return mean ? w / static_cast<double>(bag_length) : w;
}

// acc + scale * g, each operation rounded to float64 separately.
LS_HOST_DEVICE inline double accumulate(double acc, double scale, float g) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(acc, __dmul_rn(scale, static_cast<double>(g)));
#else
  const double product = scale * static_cast<double>(g);
  return acc + product;
#endif
}

// The checked arguments of one call, with the listed features sorted ascending (so their occurrences come
// in ascending position of `indices`).
struct Args {
  int64_t num_features;
  int64_t batch;
  int64_t dim;
  int64_t pooling_mode;
  int64_t num_indices;
  std::vector<int64_t> features;        // ascending
  std::vector<int64_t> column_offsets;  // of features[k]
};

// Validates everything that does not need the values of indices/offsets (those are checked while read, on
// their device). The messages name the argument and what would fit.
inline Args check_args(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& offsets,
                       const c10::optional<at::Tensor>& per_sample_weights, const at::Tensor& features,
                       const at::Tensor& column_offsets, int64_t dim, int64_t num_features, int64_t pooling_mode) {
  const char* op = "embedding_row_grads: ";
  const at::Device device = grad_output.device();
  TORCH_CHECK(grad_output.scalar_type() == at::kFloat, op, "grad_output must be float32, got ",
              grad_output.scalar_type());
  TORCH_CHECK(grad_output.dim() == 2, op, "grad_output must be 2-D, got shape ", grad_output.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
              "indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt, op,
              "offsets must be int64 or int32, got ", offsets.scalar_type());
  TORCH_CHECK(indices.dim() == 1 && offsets.dim() == 1, op, "indices and offsets must be 1-D, got shapes ",
              indices.sizes(), " and ", offsets.sizes());
  TORCH_CHECK(indices.device() == device && offsets.device() == device, op,
              "grad_output, indices and offsets must be on one device, got ", device, ", ", indices.device(), ", ",
              offsets.device());
  TORCH_CHECK(pooling_mode == kSum || pooling_mode == kMean || pooling_mode == kNone, op,
              "pooling_mode must be 0 (SUM), 1 (MEAN) or 2 (NONE), got ", pooling_mode);
  TORCH_CHECK(num_features >= 1, op, "num_features must be >= 1, got ", num_features);
  TORCH_CHECK(dim >= 1, op, "dim must be >= 1, got ", dim);
  TORCH_CHECK(offsets.numel() >= 1, op, "offsets must hold num_features * batch + 1 entries, got none");
  const int64_t bags = offsets.numel() - 1;
  TORCH_CHECK(bags % num_features == 0, op, "offsets has ", offsets.numel(), " entries, not num_features (",
              num_features, ") * batch + 1: a variable batch size per feature is not supported");
  const int64_t n = indices.numel();
  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    const at::Tensor& w = *per_sample_weights;
    TORCH_CHECK(w.scalar_type() == at::kFloat, op, "per_sample_weights must be float32, got ", w.scalar_type());
    TORCH_CHECK(w.dim() == 1 && w.numel() == n, op, "per_sample_weights must have shape [", n,
                "] (one per index), got ", w.sizes());
    TORCH_CHECK(w.device() == device, op, "per_sample_weights must be on ", device, ", got ", w.device());
  }
  TORCH_CHECK(features.device().is_cpu() && column_offsets.device().is_cpu(), op,
              "features and column_offsets must be CPU tensors (a few numbers per table)");
  TORCH_CHECK(features.scalar_type() == at::kLong && column_offsets.scalar_type() == at::kLong, op,
              "features and column_offsets must be int64, got ", features.scalar_type(), " and ",
              column_offsets.scalar_type());
  TORCH_CHECK(features.dim() == 1 && column_offsets.sizes() == features.sizes(), op,
              "features and column_offsets must be 1-D of one length, got shapes ", features.sizes(), " and ",
              column_offsets.sizes());
  Args a{num_features, bags / num_features, dim, pooling_mode, n, {}, {}};
  if (pooling_mode == kNone) {
    TORCH_CHECK(grad_output.size(0) == n && grad_output.size(1) >= dim, op,
                "grad_output of a sequence (NONE) lookup must have shape [", n, ", >= ", dim,
                "] (one row per index), got ", grad_output.sizes());
  } else {
    TORCH_CHECK(grad_output.size(0) == a.batch, op, "grad_output must have one row per sample (batch ", a.batch,
                " = (offsets.numel() - 1) / num_features), got shape ", grad_output.sizes());
  }
  const at::Tensor f_sorted = features.contiguous(), c_sorted = column_offsets.contiguous();
  std::vector<std::pair<int64_t, int64_t>> listed;
  for (int64_t k = 0; k < features.numel(); ++k) {
    const int64_t f = f_sorted.data_ptr<int64_t>()[k], c = c_sorted.data_ptr<int64_t>()[k];
    TORCH_CHECK(f >= 0 && f < num_features, op, "feature ", f, " out of range [0, ", num_features, ")");
    if (pooling_mode != kNone) {
      TORCH_CHECK(c >= 0 && c + dim <= grad_output.size(1), op, "columns [", c, ", ", c + dim, ") of feature ", f,
                  " do not fit in grad_output of width ", grad_output.size(1));
    }
    listed.emplace_back(f, c);
  }
  std::sort(listed.begin(), listed.end());
  for (size_t k = 0; k < listed.size(); ++k) {
    TORCH_CHECK(k == 0 || listed[k].first != listed[k - 1].first, op, "feature ", listed[k].first, " is listed twice");
    a.features.push_back(listed[k].first);
    a.column_offsets.push_back(listed[k].second);
  }
  return a;
}

}  // namespace lightning_sparse_row_grads
