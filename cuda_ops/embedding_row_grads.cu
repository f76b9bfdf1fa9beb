// Exact per-row gradients of one embedding table from the gradient of an fbgemm TBE's output, on CUDA:
// the op of embedding_row_grads.cpp (schema defined there) for tensors on a GPU, with the same bits.
//
// One thread per bag of the table's features marks its positions and writes each occurrence's row,
// source offset in grad_output and scale; the marked positions (ascending, at::nonzero) are sorted by
// row with ATen's stable sort, so a row's occurrences stay in ascending position; then one thread per
// (unique row, column) sums its occurrences from 0.0 in that order with the shared accumulate() of
// embedding_row_grads_common.h (__dmul_rn / __dadd_rn: never fused into an FMA), the order and the
// rounding of the CPU kernel. Host syncs: one for the error flags, those of nonzero and unique.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "embedding_row_grads_common.h"

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

using namespace lightning_sparse_row_grads;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest

// error flags, reported by the host after one sync
constexpr int kOffsetsOutOfRange = 1, kOffsetsDecreasing = 2, kNegativeRow = 4;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

#define GRID_STRIDE(i, n)                                                                \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename offset_t>
__global__ void check_offsets_kernel(const offset_t* __restrict__ off, int64_t bags, int64_t n,
                                     int* __restrict__ flags) {
  GRID_STRIDE(i, bags + 1) {
    const int64_t o = off[i];
    if (o < 0 || o > n) atomicOr(flags, kOffsetsOutOfRange);
    if (i < bags && o > static_cast<int64_t>(off[i + 1])) atomicOr(flags, kOffsetsDecreasing);
  }
}

// One thread per bag (k, b) of the listed features: marks the bag's positions and describes each occurrence.
template <typename index_t, typename offset_t>
__global__ void occurrence_kernel(const index_t* __restrict__ idx, const offset_t* __restrict__ off,
                                  const float* __restrict__ weights, const int64_t* __restrict__ features,
                                  const int64_t* __restrict__ columns, int64_t listed_bags, int64_t batch, int64_t n,
                                  int64_t stride, bool mean, bool none, int64_t* __restrict__ row,
                                  int64_t* __restrict__ src, double* __restrict__ scale, bool* __restrict__ marked,
                                  int* __restrict__ flags) {
  GRID_STRIDE(j, listed_bags) {
    const int64_t k = j / batch, b = j % batch;
    const int64_t f = features[k];
    const int64_t start = off[f * batch + b], end = off[f * batch + b + 1];
    if (start < 0 || end > n || start > end) continue;  // flagged by check_offsets_kernel
    for (int64_t i = start; i < end; ++i) {
      const int64_t r = idx[i];
      if (r < 0) atomicOr(flags, kNegativeRow);
      row[i] = r;
      src[i] = none ? i * stride : b * stride + columns[k];
      scale[i] = occurrence_scale(weights != nullptr, weights ? weights[i] : 0.0f, mean, end - start);
      marked[i] = true;
    }
  }
}

// One thread per (unique row u, column d): the sum over the row's occurrences, ascending positions.
__global__ void accumulate_kernel(const float* __restrict__ grad_output, const int64_t* __restrict__ position,
                                  const int64_t* __restrict__ segment_end, const int64_t* __restrict__ src,
                                  const double* __restrict__ scale, int64_t unique, int64_t dim,
                                  double* __restrict__ out) {
  GRID_STRIDE(t, unique * dim) {
    const int64_t u = t / dim, d = t % dim;
    double acc = 0.0;
    for (int64_t k = u == 0 ? 0 : segment_end[u - 1]; k < segment_end[u]; ++k) {
      const int64_t i = position[k];
      acc = accumulate(acc, scale[i], grad_output[src[i] + d]);
    }
    out[t] = acc;
  }
}

template <typename index_t, typename offset_t>
std::tuple<at::Tensor, at::Tensor> row_grads_typed(const Args& a, const at::Tensor& go, const at::Tensor& idx,
                                                   const at::Tensor& off, const at::Tensor& w) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorOptions long_opts = idx.options().dtype(at::kLong);
  const int64_t n = a.num_indices, bags = off.numel() - 1;
  at::Tensor flags = at::zeros({1}, idx.options().dtype(at::kInt));
  check_offsets_kernel<offset_t>
      <<<blocks_for(bags + 1), kThreads, 0, stream>>>(off.data_ptr<offset_t>(), bags, n, flags.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t listed_bags = static_cast<int64_t>(a.features.size()) * a.batch;
  at::Tensor row = at::empty({n}, long_opts), src = at::empty({n}, long_opts);
  at::Tensor scale = at::empty({n}, go.options().dtype(at::kDouble));
  at::Tensor marked = at::zeros({n}, idx.options().dtype(at::kBool));
  if (listed_bags > 0 && n > 0) {
    const at::Tensor features = at::tensor(a.features, at::kLong).to(idx.device());
    const at::Tensor columns = at::tensor(a.column_offsets, at::kLong).to(idx.device());
    occurrence_kernel<index_t, offset_t><<<blocks_for(listed_bags), kThreads, 0, stream>>>(
        idx.data_ptr<index_t>(), off.data_ptr<offset_t>(), w.defined() ? w.data_ptr<float>() : nullptr,
        features.data_ptr<int64_t>(), columns.data_ptr<int64_t>(), listed_bags, a.batch, n, go.stride(0),
        a.pooling_mode == kMean, a.pooling_mode == kNone, row.data_ptr<int64_t>(), src.data_ptr<int64_t>(),
        scale.data_ptr<double>(), marked.data_ptr<bool>(), flags.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int flag = flags.item<int>();
  TORCH_CHECK(!(flag & kOffsetsOutOfRange), "embedding_row_grads: offsets must lie in [0, ", n,
              "] (the number of indices)");
  TORCH_CHECK(!(flag & kOffsetsDecreasing), "embedding_row_grads: offsets must be non-decreasing");
  TORCH_CHECK(!(flag & kNegativeRow), "embedding_row_grads: negative row id in indices of features ", a.features);

  const at::Tensor position = at::nonzero(marked).view({-1});  // ascending
  const at::Tensor keys = row.index_select(0, position);
  at::Tensor sorted_keys, perm;
  std::tie(sorted_keys, perm) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor ordered = position.index_select(0, perm).contiguous();
  at::Tensor rows, counts;
  std::tie(rows, std::ignore, counts) =
      at::unique_consecutive(sorted_keys, /*return_inverse=*/false, /*return_counts=*/true, /*dim=*/0);
  const int64_t unique = rows.numel();
  const at::Tensor segment_end = counts.cumsum(0).contiguous();
  at::Tensor grads = at::empty({unique, a.dim}, go.options().dtype(at::kDouble));
  if (unique > 0) {
    accumulate_kernel<<<blocks_for(unique * a.dim), kThreads, 0, stream>>>(
        go.data_ptr<float>(), ordered.data_ptr<int64_t>(), segment_end.data_ptr<int64_t>(), src.data_ptr<int64_t>(),
        scale.data_ptr<double>(), unique, a.dim, grads.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {rows.contiguous(), grads};
}

std::tuple<at::Tensor, at::Tensor> embedding_row_grads_cuda(const at::Tensor& grad_output, const at::Tensor& indices,
                                                            const at::Tensor& offsets,
                                                            const c10::optional<at::Tensor>& per_sample_weights,
                                                            const at::Tensor& features,
                                                            const at::Tensor& column_offsets, int64_t dim,
                                                            int64_t num_features, int64_t pooling_mode) {
  TORCH_CHECK(grad_output.device().is_cuda(), "embedding_row_grads: expected CUDA tensors here, got ",
              grad_output.device());
  const Args a = check_args(grad_output, indices, offsets, per_sample_weights, features, column_offsets, dim,
                            num_features, pooling_mode);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const at::Tensor go = grad_output.stride(1) == 1 ? grad_output : grad_output.contiguous();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  at::Tensor w;
  if (per_sample_weights.has_value() && per_sample_weights->defined()) w = per_sample_weights->contiguous();
  const bool idx64 = idx.scalar_type() == at::kLong, off64 = off.scalar_type() == at::kLong;
  if (idx64 && off64) return row_grads_typed<int64_t, int64_t>(a, go, idx, off, w);
  if (idx64) return row_grads_typed<int64_t, int32_t>(a, go, idx, off, w);
  if (off64) return row_grads_typed<int32_t, int64_t>(a, go, idx, off, w);
  return row_grads_typed<int32_t, int32_t>(a, go, idx, off, w);
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_sparse, CUDA, m) { m.impl("embedding_row_grads", embedding_row_grads_cuda); }
