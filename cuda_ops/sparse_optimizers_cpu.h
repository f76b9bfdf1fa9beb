// Every sparse optimizer kind's update of one row on CPU, bound to its state tensors: what the CPU ops
// sparse_opt_<kind> (sparse_optimizers.cpp, a batch of row gradients) and embedding_row_update
// (embedding_row_grads.cpp, straight from a lookup's output gradient) both run for each unique row, so the
// two give the same bits. The rules themselves are those of sparse_optimizers_common.h (shared with CUDA).
#pragma once

#include <ATen/ATen.h>

#include "sparse_optimizers_common.h"

#include <cstdint>
#include <string>
#include <vector>

namespace lightning_sparse_optim {

enum class Kind { kSgd, kAdagrad, kRowwiseAdagrad, kDecayedAdagrad, kRowwiseAdam, kAdam };

inline Kind parse_kind(const std::string& name) {
  if (name == "sgd") return Kind::kSgd;
  if (name == "adagrad") return Kind::kAdagrad;
  if (name == "rowwise_adagrad") return Kind::kRowwiseAdagrad;
  if (name == "decayed_adagrad") return Kind::kDecayedAdagrad;
  if (name == "rowwise_adam") return Kind::kRowwiseAdam;
  if (name == "adam") return Kind::kAdam;
  TORCH_CHECK(false, "unknown sparse optimizer kind '", name,
              "': expected sgd, adagrad, rowwise_adagrad, decayed_adagrad, rowwise_adam or adam");
}

// A row-major table read and written per row: the weight, or an optimizer state.
struct RowTable {
  const void* base;
  int64_t row_bytes;
};

template <typename T>
RowTable row_table(const T* base, int64_t per_row) {
  return RowTable{base, per_row * static_cast<int64_t>(sizeof(T))};
}

// Rows a batch touches are scattered over the table: each one would stall on memory. Asking for the rows a
// few iterations ahead overlaps those misses (measured: most of the update's time went to them).
constexpr int64_t kPrefetchDistance = 8;

inline void prefetch_row(const std::vector<RowTable>& tables, int64_t row) {
  for (const RowTable& t : tables) {
    const char* p = static_cast<const char*>(t.base) + row * t.row_bytes;
    for (int64_t b = 0; b < t.row_bytes; b += 64) __builtin_prefetch(p + b, 1, 3);
  }
}

// The Adam step count of a row (a per-row counter, or one global counter advanced once per call) and its
// bias corrections; a global step's are computed once per call rather than once per row (two pow()s).
struct StepView {
  int64_t* p;
  bool global;
  BiasCorrections global_bc;
  double beta1, beta2;
  BiasCorrections advance(int64_t row) const { return global ? global_bc : BiasCorrections(beta1, beta2, ++p[row]); }
};

inline StepView begin_step(const at::Tensor& step, const at::Tensor& weight, double beta1, double beta2) {
  check_step(step, weight);
  int64_t* p = step.data_ptr<int64_t>();
  if (step.size(0) == 1) {  // global step: advanced once per call, rows present or not
    const int64_t t = ++p[0];
    return StepView{p, true, BiasCorrections(beta1, beta2, t), beta1, beta2};
  }
  return StepView{p, false, BiasCorrections(1.0f, 1.0f), beta1, beta2};
}

// The state tensors of one table; which ones a kind needs is checked by RowUpdate.
struct KindState {
  c10::optional<at::Tensor> sum, exp_avg, exp_avg_sq, step;
};

inline const at::Tensor& required(const c10::optional<at::Tensor>& t, const char* kind, const char* name) {
  TORCH_CHECK(t.has_value() && t->defined(), "sparse optimizer kind ", kind, " needs its state tensor '", name, "'");
  return *t;
}

// One kind's per-row update with the state checked and bound. Constructing it advances a global Adam
// step (once per call, rows present or not, as torch.optim.SparseAdam and fbgemm do).
class RowUpdate {
 public:
  RowUpdate(Kind kind, const at::Tensor& weight, const KindState& state, const Hyper& h, double beta1, double beta2)
      : kind_(kind), h_(h) {
    const int64_t dim = weight.size(1);
    switch (kind) {
      case Kind::kSgd:
        break;
      case Kind::kAdagrad:
      case Kind::kDecayedAdagrad: {
        const at::Tensor& sum = required(state.sum, kind == Kind::kAdagrad ? "adagrad" : "decayed_adagrad", "sum");
        check_table(sum, weight, "sum", false);
        s_ = sum.data_ptr<float>();
        tables_.push_back(row_table(s_, dim));
        break;
      }
      case Kind::kRowwiseAdagrad: {
        const at::Tensor& sum = required(state.sum, "rowwise_adagrad", "sum");
        check_table(sum, weight, "sum", true);
        s_ = sum.data_ptr<float>();
        tables_.push_back(row_table(s_, 1));
        break;
      }
      case Kind::kRowwiseAdam: {
        const bool first_moment = state.exp_avg.has_value() && state.exp_avg->defined();
        if (first_moment) check_table(*state.exp_avg, weight, "exp_avg", false);
        const at::Tensor& v = required(state.exp_avg_sq, "rowwise_adam", "exp_avg_sq");
        check_table(v, weight, "exp_avg_sq", true);
        steps_ = begin_step(required(state.step, "rowwise_adam", "step"), weight, beta1, beta2);
        m_ = first_moment ? state.exp_avg->data_ptr<float>() : nullptr;
        v_ = v.data_ptr<float>();
        tables_.push_back(row_table(v_, 1));
        if (first_moment) tables_.push_back(row_table(m_, dim));
        if (!steps_.global) tables_.push_back(row_table(steps_.p, 1));
        break;
      }
      case Kind::kAdam: {
        const at::Tensor& m = required(state.exp_avg, "adam", "exp_avg");
        const at::Tensor& v = required(state.exp_avg_sq, "adam", "exp_avg_sq");
        check_table(m, weight, "exp_avg", false);
        check_table(v, weight, "exp_avg_sq", false);
        steps_ = begin_step(required(state.step, "adam", "step"), weight, beta1, beta2);
        m_ = m.data_ptr<float>();
        v_ = v.data_ptr<float>();
        tables_.push_back(row_table(m_, dim));
        tables_.push_back(row_table(v_, dim));
        if (!steps_.global) tables_.push_back(row_table(steps_.p, 1));
        break;
      }
    }
  }

  // The state tables a row's update reads and writes (to prefetch with the weight).
  const std::vector<RowTable>& tables() const { return tables_; }

  // Updates row `row` (its weight `w`) with its summed gradient (+ decay) `g`.
  void operator()(int64_t row, float* w, const float* g, int64_t dim) const {
    const Hyper& h = h_;
    switch (kind_) {
      case Kind::kSgd: {
#pragma omp simd  // columns are independent; vector ops round like scalar ones
        for (int64_t d = 0; d < dim; ++d) sgd_element(w[d], g[d], h);
        break;
      }
      case Kind::kAdagrad: {
        float* s = s_ + row * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) adagrad_element(w[d], s[d], g[d], h);
        break;
      }
      case Kind::kRowwiseAdagrad: {
        const float multiplier = rowwise_adagrad_multiplier(s_[row], mean_square(g, dim), h);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) scaled_step(w[d], multiplier, g[d]);
        break;
      }
      case Kind::kDecayedAdagrad: {
        float* s = s_ + row * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) decayed_adagrad_element(w[d], s[d], g[d], h);
        break;
      }
      case Kind::kRowwiseAdam: {
        const BiasCorrections bc = steps_.advance(row);
        const float denom = rowwise_adam_denominator(v_[row], mean_square(g, dim), h, bc);
        float* m = m_ ? m_ + row * dim : nullptr;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) rowwise_adam_element(w[d], m ? m + d : nullptr, g[d], denom, h, bc);
        break;
      }
      case Kind::kAdam: {
        const BiasCorrections bc = steps_.advance(row);
        float* m = m_ + row * dim;
        float* v = v_ + row * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) adam_element(w[d], m[d], v[d], g[d], h, bc);
        break;
      }
    }
  }

 private:
  Kind kind_;
  Hyper h_;
  float* s_ = nullptr;
  float* m_ = nullptr;
  float* v_ = nullptr;
  StepView steps_{nullptr, true, BiasCorrections(1.0f, 1.0f), 0.0, 0.0};
  std::vector<RowTable> tables_;
};

}  // namespace lightning_sparse_optim
