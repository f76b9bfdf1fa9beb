// What sparse_optimizers.cpp (CPU) and sparse_optimizers.cu (CUDA) share: the update rule of every sparse
// optimizer kind, one row or one element at a time, and the checks of the arguments. The PyTorch twin is
// lightning_sparse/optim/reference.py.
//
// Every float operation is rounded on its own: the CUDA build uses the _rn intrinsics, which nvcc never
// contracts into an FMA, and the CPU build is compiled with -ffp-contract=off (setup.py), so both run the
// same roundings in the same order. Only the bias corrections of per-row Adam steps go through
// the device's pow() on CUDA (double, within 2 ulp of the host's) before their cast to float.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace lightning_sparse_optim {

#ifdef __CUDA_ARCH__
LS_HOST_DEVICE inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
LS_HOST_DEVICE inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
LS_HOST_DEVICE inline float sub_rn(float a, float b) { return __fsub_rn(a, b); }
LS_HOST_DEVICE inline float div_rn(float a, float b) { return __fdiv_rn(a, b); }
LS_HOST_DEVICE inline float sqrt_rn(float a) { return __fsqrt_rn(a); }
LS_HOST_DEVICE inline double dmul_rn(double a, double b) { return __dmul_rn(a, b); }
LS_HOST_DEVICE inline double dadd_rn(double a, double b) { return __dadd_rn(a, b); }
#else
inline float mul_rn(float a, float b) { return a * b; }
inline float add_rn(float a, float b) { return a + b; }
inline float sub_rn(float a, float b) { return a - b; }
inline float div_rn(float a, float b) { return a / b; }
inline float sqrt_rn(float a) { return std::sqrt(a); }
inline double dmul_rn(double a, double b) { return a * b; }
inline double dadd_rn(double a, double b) { return a + b; }
#endif

// The float hyper-parameters of one call (the ops take doubles; the rules run in float).
struct Hyper {
  float lr, eps, weight_decay, decay, beta1, beta2;
};

inline Hyper make_hyper(double lr, double eps, double weight_decay, double decay, double beta1, double beta2) {
  return Hyper{static_cast<float>(lr),    static_cast<float>(eps),   static_cast<float>(weight_decay),
               static_cast<float>(decay), static_cast<float>(beta1), static_cast<float>(beta2)};
}

// g + weight_decay * w: the L2 penalty added to a row's summed gradient.
LS_HOST_DEVICE inline float with_weight_decay(float g, float w, float weight_decay) {
  return weight_decay != 0.0f ? add_rn(g, mul_rn(weight_decay, w)) : g;
}

// mean(g^2) of a row, summed in double in column order.
LS_HOST_DEVICE inline float mean_square(const float* g, int64_t dim) {
  double s = 0.0;
  for (int64_t d = 0; d < dim; ++d) s = dadd_rn(s, dmul_rn(static_cast<double>(g[d]), static_cast<double>(g[d])));
  return static_cast<float>(s / static_cast<double>(dim));
}

// Adam's bias corrections 1 - beta^t of both moments, computed in double like the reference.
struct BiasCorrections {
  float first, second;
  LS_HOST_DEVICE BiasCorrections(double beta1, double beta2, int64_t t)
      : first(static_cast<float>(1.0 - pow(beta1, static_cast<double>(t)))),
        second(static_cast<float>(1.0 - pow(beta2, static_cast<double>(t)))) {}
  LS_HOST_DEVICE BiasCorrections(float first_, float second_) : first(first_), second(second_) {}
};

// ---- element-wise rules: w (and its state) at one column, g the summed gradient (+ decay) ----

// sgd: w -= lr * g
LS_HOST_DEVICE inline void sgd_element(float& w, float g, const Hyper& h) { w = sub_rn(w, mul_rn(h.lr, g)); }

// adagrad (torch.optim.Adagrad): s += g^2; w -= lr * g / (sqrt(s) + eps)
LS_HOST_DEVICE inline void adagrad_element(float& w, float& s, float g, const Hyper& h) {
  s = add_rn(s, mul_rn(g, g));
  w = sub_rn(w, div_rn(mul_rn(h.lr, g), add_rn(sqrt_rn(s), h.eps)));
}

// PERSIA's decayed Adagrad: the step is scaled by the accumulator *before* this gradient is added,
// w -= lr * g / sqrt(s + eps); then s = s * decay + g^2.
LS_HOST_DEVICE inline void decayed_adagrad_element(float& w, float& s, float g, const Hyper& h) {
  w = sub_rn(w, div_rn(mul_rn(h.lr, g), sqrt_rn(add_rn(s, h.eps))));
  s = add_rn(mul_rn(s, h.decay), mul_rn(g, g));
}

// adam: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; w -= lr (m / bc1) / (sqrt(v / bc2) + eps)
LS_HOST_DEVICE inline void adam_element(float& w, float& m, float& v, float g, const Hyper& h,
                                        const BiasCorrections& bc) {
  m = add_rn(mul_rn(h.beta1, m), mul_rn(sub_rn(1.0f, h.beta1), g));
  v = add_rn(mul_rn(h.beta2, v), mul_rn(mul_rn(sub_rn(1.0f, h.beta2), g), g));
  w = sub_rn(w, div_rn(mul_rn(h.lr, div_rn(m, bc.first)), add_rn(sqrt_rn(div_rn(v, bc.second)), h.eps)));
}

// ---- row-wise rules: one state value per row, then one element-wise step per column ----

// rowwise adagrad (fbgemm's rule): s += mean(g^2); returns the row's multiplier lr / (sqrt(s) + eps)
LS_HOST_DEVICE inline float rowwise_adagrad_multiplier(float& s, float mean_sq, const Hyper& h) {
  s = add_rn(s, mean_sq);
  return div_rn(h.lr, add_rn(sqrt_rn(s), h.eps));
}

// w -= multiplier * g
LS_HOST_DEVICE inline void scaled_step(float& w, float multiplier, float g) { w = sub_rn(w, mul_rn(multiplier, g)); }

// rowwise adam: v = b2 v + (1 - b2) mean(g^2); returns the row's denominator sqrt(v / bc2) + eps
LS_HOST_DEVICE inline float rowwise_adam_denominator(float& v, float mean_sq, const Hyper& h,
                                                     const BiasCorrections& bc) {
  v = add_rn(mul_rn(h.beta2, v), mul_rn(sub_rn(1.0f, h.beta2), mean_sq));
  return add_rn(sqrt_rn(div_rn(v, bc.second)), h.eps);
}

// rowwise adam, one column: with a first moment m, w -= lr (m / bc1) / denom; without, w -= lr g / denom
LS_HOST_DEVICE inline void rowwise_adam_element(float& w, float* m, float g, float denom, const Hyper& h,
                                                const BiasCorrections& bc) {
  if (m != nullptr) {
    *m = add_rn(mul_rn(h.beta1, *m), mul_rn(sub_rn(1.0f, h.beta1), g));
    w = sub_rn(w, div_rn(mul_rn(h.lr, div_rn(*m, bc.first)), denom));
  } else {
    w = sub_rn(w, div_rn(mul_rn(h.lr, g), denom));
  }
}

// ---- argument checks, on the weight's device ----

inline void check_weight(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& grad) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [rows, dim], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(indices.dim() == 1, "indices must be 1-D, got ", indices.sizes());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == indices.size(0) && grad.size(1) == weight.size(1),
              "grad must have shape [", indices.size(0), ", ", weight.size(1), "], got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == at::kFloat, "grad must be float32, got ", grad.scalar_type());
  TORCH_CHECK(indices.device() == weight.device() && grad.device() == weight.device(),
              "weight, indices and grad must be on one device, got ", weight.device(), ", ", indices.device(), ", ",
              grad.device());
}

inline void check_table(const at::Tensor& t, const at::Tensor& weight, const char* name, bool per_row) {
  TORCH_CHECK(t.device() == weight.device(), name, " must be on the weight's device (", weight.device(), "), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  if (per_row) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == weight.size(0), name, " must have shape [", weight.size(0),
                "] (one value per row), got ", t.sizes());
  } else {
    TORCH_CHECK(t.sizes() == weight.sizes(), name, " must have the weight's shape ", weight.sizes(), ", got ",
                t.sizes());
  }
}

inline void check_step(const at::Tensor& step, const at::Tensor& weight) {
  TORCH_CHECK(step.device() == weight.device() && step.scalar_type() == at::kLong && step.is_contiguous(),
              "step must be a contiguous int64 tensor on the weight's device (", weight.device(), ")");
  TORCH_CHECK(step.dim() == 1 && (step.size(0) == 1 || step.size(0) == weight.size(0)),
              "step must have shape [1] (global step) or [", weight.size(0), "] (per-row steps), got ", step.sizes());
}

}  // namespace lightning_sparse_optim
