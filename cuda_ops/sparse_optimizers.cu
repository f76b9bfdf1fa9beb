// Fused sparse (row-wise) optimizer updates for embedding tables on CUDA: the ops of sparse_optimizers.cpp
// (schemas defined there) for tables that live on a GPU, with the rules of sparse_optimizers_common.h.
//
// The occurrences are grouped by row with ATen's stable sort (positions ascending within a row, as the
// CPU kernel groups them); one thread per (unique row, column) sums them in that order and adds the L2
// decay; the kinds with per-row state then run one thread per unique row (mean(g^2) summed in column
// order in double, Adam steps, bias corrections), and every kind one thread per (unique row, column) for
// the element-wise step. Unique rows are distinct, so no two threads write one state value. The float
// operations are the CPU's, each rounded on its own, so the results equal the CPU kernel's; only the
// bias corrections of per-row Adam steps use the device's pow() (global steps: the host's, as on CPU).
// Host syncs: the ids' range check, unique's size and, for a global Adam step, its value.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "sparse_optimizers_common.h"

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

using namespace lightning_sparse_optim;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

#define GRID_STRIDE(i, n)                                                                \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

enum class Kind { kSgd, kAdagrad, kRowwiseAdagrad, kDecayedAdagrad, kRowwiseAdam, kAdam };

// The unique rows of a batch (ascending) and their summed gradients (+ decay).
struct Batch {
  at::Tensor rows;    // int64 [U]
  at::Tensor summed;  // float [U, D]
  int64_t unique = 0;
};

// Sum of each unique row's occurrence gradients in ascending position, then + weight_decay * w.
__global__ void sum_rows_kernel(const float* __restrict__ grad, const int64_t* __restrict__ order,
                                const int64_t* __restrict__ segment_end, const int64_t* __restrict__ rows,
                                const float* __restrict__ weight, int64_t unique, int64_t dim, float weight_decay,
                                float* __restrict__ summed) {
  GRID_STRIDE(t, unique * dim) {
    const int64_t u = t / dim, d = t % dim;
    float acc = 0.0f;
    for (int64_t k = u == 0 ? 0 : segment_end[u - 1]; k < segment_end[u]; ++k) {
      acc = add_rn(acc, grad[order[k] * dim + d]);
    }
    summed[t] = with_weight_decay(acc, weight[rows[u] * dim + d], weight_decay);
  }
}

Batch group_rows(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& grad, double weight_decay) {
  TORCH_CHECK(weight.device().is_cuda(), "weight must be a CUDA tensor here, got ", weight.device());
  check_weight(weight, indices, grad);
  Batch b;
  const int64_t n = indices.size(0), num_rows = weight.size(0), dim = weight.size(1);
  if (n == 0) return b;
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor ends = at::stack({sorted[0], sorted[n - 1]}).cpu();
  const int64_t lowest = ends[0].item<int64_t>(), highest = ends[1].item<int64_t>();
  TORCH_CHECK(lowest >= 0, "row index ", lowest, " out of range [0, ", num_rows, ")");
  TORCH_CHECK(highest < num_rows, "row index ", highest, " out of range [0, ", num_rows, ")");
  at::Tensor counts;
  std::tie(b.rows, std::ignore, counts) =
      at::unique_consecutive(sorted, /*return_inverse=*/false, /*return_counts=*/true, /*dim=*/0);
  b.rows = b.rows.contiguous();
  b.unique = b.rows.numel();
  const at::Tensor segment_end = counts.cumsum(0).contiguous();
  const at::Tensor g = grad.contiguous(), occurrence = order.contiguous();
  b.summed = at::empty({b.unique, dim}, weight.options());
  sum_rows_kernel<<<blocks_for(b.unique * dim), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      g.data_ptr<float>(), occurrence.data_ptr<int64_t>(), segment_end.data_ptr<int64_t>(), b.rows.data_ptr<int64_t>(),
      weight.data_ptr<float>(), b.unique, dim, static_cast<float>(weight_decay), b.summed.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return b;
}

// Pointers of one update; state pointers are null when the kind has none.
struct Update {
  float* w = nullptr;
  float* s = nullptr;       // sum (Adagrad kinds)
  float* m = nullptr;       // exp_avg
  float* v = nullptr;       // exp_avg_sq
  int64_t* step = nullptr;  // per-row steps, or null for a global step
  const int64_t* rows = nullptr;
  const float* summed = nullptr;
  float* row_value = nullptr;  // per unique row: rowwise Adagrad's multiplier, rowwise Adam's denominator
  float* bc1 = nullptr;        // per unique row bias corrections (Adam kinds)
  float* bc2 = nullptr;
  int64_t unique = 0, dim = 0;
  Hyper h{};
  float global_bc1 = 1.0f, global_bc2 = 1.0f;
  double beta1 = 0.0, beta2 = 0.0;
};

// One thread per unique row: Adam steps and bias corrections, row-wise state and the row's factor.
template <Kind K>
__global__ void row_kernel(Update p) {
  GRID_STRIDE(u, p.unique) {
    const int64_t row = p.rows[u];
    BiasCorrections bc(p.global_bc1, p.global_bc2);
    if constexpr (K == Kind::kAdam || K == Kind::kRowwiseAdam) {
      if (p.step != nullptr) bc = BiasCorrections(p.beta1, p.beta2, ++p.step[row]);
      p.bc1[u] = bc.first;
      p.bc2[u] = bc.second;
    }
    const float* g = p.summed + u * p.dim;
    if constexpr (K == Kind::kRowwiseAdagrad) {
      p.row_value[u] = rowwise_adagrad_multiplier(p.s[row], mean_square(g, p.dim), p.h);
    }
    if constexpr (K == Kind::kRowwiseAdam) {
      p.row_value[u] = rowwise_adam_denominator(p.v[row], mean_square(g, p.dim), p.h, bc);
    }
  }
}

// One thread per (unique row, column): the element-wise step.
template <Kind K>
__global__ void element_kernel(Update p) {
  GRID_STRIDE(t, p.unique * p.dim) {
    const int64_t u = t / p.dim, d = t % p.dim;
    const int64_t i = p.rows[u] * p.dim + d;
    const float g = p.summed[t];
    if constexpr (K == Kind::kSgd) sgd_element(p.w[i], g, p.h);
    if constexpr (K == Kind::kAdagrad) adagrad_element(p.w[i], p.s[i], g, p.h);
    if constexpr (K == Kind::kRowwiseAdagrad) scaled_step(p.w[i], p.row_value[u], g);
    if constexpr (K == Kind::kDecayedAdagrad) decayed_adagrad_element(p.w[i], p.s[i], g, p.h);
    if constexpr (K == Kind::kRowwiseAdam) {
      const BiasCorrections bc(p.bc1[u], p.bc2[u]);
      rowwise_adam_element(p.w[i], p.m ? p.m + i : nullptr, g, p.row_value[u], p.h, bc);
    }
    if constexpr (K == Kind::kAdam) adam_element(p.w[i], p.m[i], p.v[i], g, p.h, BiasCorrections(p.bc1[u], p.bc2[u]));
  }
}

// Runs the kernels of kind K on a grouped batch; `p` carries the state pointers and hyper-parameters.
template <Kind K>
void run(const at::Tensor& weight, const Batch& b, Update p) {
  if (b.unique == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  p.w = weight.data_ptr<float>();
  p.rows = b.rows.data_ptr<int64_t>();
  p.summed = b.summed.data_ptr<float>();
  p.unique = b.unique;
  p.dim = weight.size(1);
  at::Tensor scratch;
  constexpr bool per_row = K == Kind::kRowwiseAdagrad || K == Kind::kRowwiseAdam || K == Kind::kAdam;
  if (per_row) {
    scratch = at::empty({3, b.unique}, weight.options());
    p.row_value = scratch[0].data_ptr<float>();
    p.bc1 = scratch[1].data_ptr<float>();
    p.bc2 = scratch[2].data_ptr<float>();
    row_kernel<K><<<blocks_for(b.unique), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  element_kernel<K><<<blocks_for(b.unique * p.dim), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Advances a global step (on the host's view of it, as the CPU kernel) or selects per-row steps.
void begin_step(const at::Tensor& step, const at::Tensor& weight, Update& p, double beta1, double beta2) {
  check_step(step, weight);
  p.beta1 = beta1;
  p.beta2 = beta2;
  if (step.size(0) == 1) {  // global step: advanced once per call, rows present or not
    step.add_(1);
    const BiasCorrections bc(beta1, beta2, step.item<int64_t>());
    p.global_bc1 = bc.first;
    p.global_bc2 = bc.second;
  } else {
    p.step = step.data_ptr<int64_t>();
  }
}

void sgd(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& grad, double lr, double weight_decay) {
  const c10::cuda::CUDAGuard guard(weight.device());
  Update p;
  p.h = make_hyper(lr, 0.0, weight_decay, 0.0, 0.0, 0.0);
  run<Kind::kSgd>(weight, group_rows(weight, indices, grad, weight_decay), p);
}

void adagrad(const at::Tensor& weight, const at::Tensor& sum, const at::Tensor& indices, const at::Tensor& grad,
             double lr, double eps, double weight_decay) {
  const c10::cuda::CUDAGuard guard(weight.device());
  check_table(sum, weight, "sum", false);
  Update p;
  p.s = sum.data_ptr<float>();
  p.h = make_hyper(lr, eps, weight_decay, 0.0, 0.0, 0.0);
  run<Kind::kAdagrad>(weight, group_rows(weight, indices, grad, weight_decay), p);
}

void rowwise_adagrad(const at::Tensor& weight, const at::Tensor& sum, const at::Tensor& indices, const at::Tensor& grad,
                     double lr, double eps, double weight_decay) {
  const c10::cuda::CUDAGuard guard(weight.device());
  check_table(sum, weight, "sum", true);
  Update p;
  p.s = sum.data_ptr<float>();
  p.h = make_hyper(lr, eps, weight_decay, 0.0, 0.0, 0.0);
  run<Kind::kRowwiseAdagrad>(weight, group_rows(weight, indices, grad, weight_decay), p);
}

void decayed_adagrad(const at::Tensor& weight, const at::Tensor& sum, const at::Tensor& indices, const at::Tensor& grad,
                     double lr, double eps, double weight_decay, double decay) {
  const c10::cuda::CUDAGuard guard(weight.device());
  check_table(sum, weight, "sum", false);
  Update p;
  p.s = sum.data_ptr<float>();
  p.h = make_hyper(lr, eps, weight_decay, decay, 0.0, 0.0);
  run<Kind::kDecayedAdagrad>(weight, group_rows(weight, indices, grad, weight_decay), p);
}

void rowwise_adam(const at::Tensor& weight, const c10::optional<at::Tensor>& exp_avg, const at::Tensor& exp_avg_sq,
                  const at::Tensor& step, const at::Tensor& indices, const at::Tensor& grad, double lr, double eps,
                  double weight_decay, double beta1, double beta2) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const bool first_moment = exp_avg.has_value() && exp_avg->defined();
  if (first_moment) check_table(*exp_avg, weight, "exp_avg", false);
  check_table(exp_avg_sq, weight, "exp_avg_sq", true);
  Update p;
  begin_step(step, weight, p, beta1, beta2);
  p.m = first_moment ? exp_avg->data_ptr<float>() : nullptr;
  p.v = exp_avg_sq.data_ptr<float>();
  p.h = make_hyper(lr, eps, weight_decay, 0.0, beta1, beta2);
  run<Kind::kRowwiseAdam>(weight, group_rows(weight, indices, grad, weight_decay), p);
}

void adam(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& step,
          const at::Tensor& indices, const at::Tensor& grad, double lr, double eps, double weight_decay, double beta1,
          double beta2) {
  const c10::cuda::CUDAGuard guard(weight.device());
  check_table(exp_avg, weight, "exp_avg", false);
  check_table(exp_avg_sq, weight, "exp_avg_sq", false);
  Update p;
  begin_step(step, weight, p, beta1, beta2);
  p.m = exp_avg.data_ptr<float>();
  p.v = exp_avg_sq.data_ptr<float>();
  p.h = make_hyper(lr, eps, weight_decay, 0.0, beta1, beta2);
  run<Kind::kAdam>(weight, group_rows(weight, indices, grad, weight_decay), p);
}

}  // namespace

TORCH_LIBRARY_IMPL(lightning_sparse, CUDA, m) {
  m.impl("sparse_opt_sgd", &sgd);
  m.impl("sparse_opt_adagrad", &adagrad);
  m.impl("sparse_opt_rowwise_adagrad", &rowwise_adagrad);
  m.impl("sparse_opt_decayed_adagrad", &decayed_adagrad);
  m.impl("sparse_opt_rowwise_adam", &rowwise_adam);
  m.impl("sparse_opt_adam", &adam);
}
