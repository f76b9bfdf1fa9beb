// Exact per-row gradients of one embedding table from the gradient of an fbgemm TBE's output, on CPU.
//
// fbgemm's TBE fuses the optimizer into its backward and never hands out the gradient of its weights; the
// kinds it cannot fuse are trained by our kernels (sparse_optimizers.cpp), which need, per table, the rows
// a batch touched and their summed gradient. That gradient is a scatter of the output gradient:
//   grads[row] = sum over occurrences i of row (in the table's features) of scale_i * g_i,
// g_i the occurrence's bag slice of grad_output (its own row under NONE pooling), scale_i its per-sample
// weight (1 without) divided by the bag's length under MEAN. It is summed in float64, in ascending
// position of `indices` (embedding_row_grads_common.h), so the CUDA twin and the PyTorch twin
// (lightning_sparse/optim/row_grads.py) give the same bits.
//
// How: one pass lists the occurrences of the table's features (row, source offset in grad_output, scale);
// an LSD radix sort of (row << occurrence bits | occurrence) keys on the row bits groups them by row,
// keeping ascending positions within a row; each unique row then sums its occurrences straight from
// grad_output into its float64 output row. No [occurrences, dim] copy is ever made.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "embedding_row_grads_common.h"
#include "sparse_optimizers_cpu.h"

#include <algorithm>
#include <cstdint>
#include <tuple>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <utility>
#include <vector>

namespace lightning_sparse {
namespace {

using namespace lightning_sparse_row_grads;

int bit_width(uint64_t x) {
  int bits = 0;
  while (x > 0) {
    ++bits;
    x >>= 1;
  }
  return bits;
}

// Stable LSD radix sort of `keys` by their bits [low, low + bits), in passes of at most 12 bits.
void radix_sort_bits(std::vector<uint64_t>& keys, int low, int bits) {
  if (bits <= 0 || keys.size() < 2) return;
  const int passes = (bits + 11) / 12;
  const int digit = (bits + passes - 1) / passes;
  const size_t n = keys.size();
  std::vector<uint64_t> tmp(n);
  std::vector<size_t> count(size_t(1) << digit);
  const uint64_t mask = (uint64_t(1) << digit) - 1;
  for (int p = 0; p < passes; ++p) {
    const int shift = low + p * digit;
    std::fill(count.begin(), count.end(), 0);
    for (size_t i = 0; i < n; ++i) ++count[(keys[i] >> shift) & mask];
    size_t sum = 0;
    for (size_t& c : count) {
      const size_t here = c;
      c = sum;
      sum += here;
    }
    for (size_t i = 0; i < n; ++i) tmp[count[(keys[i] >> shift) & mask]++] = keys[i];
    keys.swap(tmp);
  }
}

// The output (float64, [unique, dim]) is written once and read by the next kernel, not by this one:
// non-temporal stores skip reading its lines into the cache first, which halves its memory traffic, the
// cost of this op for wide tables.
inline void store_row(double* dst, const double* src, int64_t dim) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    int64_t d = 0;
    for (; d + 2 <= dim; d += 2) _mm_stream_pd(dst + d, _mm_loadu_pd(src + d));
    for (; d < dim; ++d) dst[d] = src[d];
    return;
  }
#endif
  std::copy(src, src + dim, dst);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Where an occurrence's gradient slice starts in grad_output (elements) and its multiplier: read together.
struct Source {
  int64_t offset;
  double scale;
};

struct Occurrences {
  std::vector<int64_t> row;
  std::vector<Source> source;
};

template <typename index_t, typename offset_t>
Occurrences list_occurrences(const Args& a, const at::Tensor& grad_output, const at::Tensor& indices,
                             const at::Tensor& offsets, const float* weights) {
  const index_t* idx = indices.data_ptr<index_t>();
  const offset_t* off = offsets.data_ptr<offset_t>();
  const int64_t n = a.num_indices, bags = offsets.numel() - 1;
  TORCH_CHECK(off[0] >= 0 && off[bags] <= n, "embedding_row_grads: offsets must lie in [0, ", n,
              "] (the number of indices), got first ", int64_t(off[0]), " and last ", int64_t(off[bags]));
  for (int64_t i = 0; i < bags; ++i) {
    TORCH_CHECK(off[i] <= off[i + 1], "embedding_row_grads: offsets must be non-decreasing, but offsets[", i,
                "] = ", int64_t(off[i]), " > offsets[", i + 1, "] = ", int64_t(off[i + 1]));
  }
  const int64_t stride = grad_output.stride(0);
  const bool mean = a.pooling_mode == kMean, none = a.pooling_mode == kNone;
  size_t total = 0;
  for (const int64_t f : a.features) total += off[(f + 1) * a.batch] - off[f * a.batch];
  Occurrences o;
  o.row.resize(total);
  o.source.resize(total);
  size_t k = 0;
  for (size_t j = 0; j < a.features.size(); ++j) {
    const int64_t f = a.features[j], col = a.column_offsets[j];
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t start = off[f * a.batch + b], end = off[f * a.batch + b + 1];
      for (int64_t i = start; i < end; ++i, ++k) {
        const int64_t r = idx[i];
        TORCH_CHECK(r >= 0, "embedding_row_grads: negative row id ", r, " at indices[", i, "] (feature ", f, ")");
        o.row[k] = r;
        o.source[k] = {none ? i * stride : b * stride + col,
                       occurrence_scale(weights != nullptr, weights ? weights[i] : 0.0f, mean, end - start)};
      }
    }
  }
  return o;
}

// Occurrence numbers grouped by row (rows ascending, occurrences ascending within a row), the start of
// each row's group (+ the end) and the row of each group.
void group_by_row(const std::vector<int64_t>& row, std::vector<uint32_t>& order, std::vector<size_t>& starts,
                  std::vector<int64_t>& unique_rows) {
  const size_t m = row.size();
  order.resize(m);
  starts.clear();
  unique_rows.clear();
  if (m == 0) {
    starts.push_back(0);
    return;
  }
  const int64_t max_row = *std::max_element(row.begin(), row.end());
  const int occ_bits = bit_width(m - 1), row_bits = bit_width(static_cast<uint64_t>(max_row));
  std::vector<int64_t> sorted_rows(m);
  if (occ_bits + row_bits <= 64) {
    std::vector<uint64_t> keys(m);
    for (size_t i = 0; i < m; ++i) keys[i] = (static_cast<uint64_t>(row[i]) << occ_bits) | i;
    radix_sort_bits(keys, occ_bits, row_bits);  // the occurrence bits start ascending: the sort is stable
    const uint64_t occ_mask = occ_bits == 0 ? 0 : (~uint64_t(0) >> (64 - occ_bits));
    for (size_t i = 0; i < m; ++i) {
      order[i] = static_cast<uint32_t>(keys[i] & occ_mask);
      sorted_rows[i] = static_cast<int64_t>(keys[i] >> occ_bits);
    }
  } else {  // huge row ids: a comparison sort of (row, occurrence), the same order
    std::vector<std::pair<int64_t, uint32_t>> pairs(m);
    for (size_t i = 0; i < m; ++i) pairs[i] = {row[i], static_cast<uint32_t>(i)};
    std::sort(pairs.begin(), pairs.end());
    for (size_t i = 0; i < m; ++i) {
      order[i] = pairs[i].second;
      sorted_rows[i] = pairs[i].first;
    }
  }
  for (size_t i = 0; i < m; ++i) {
    if (i == 0 || sorted_rows[i] != sorted_rows[i - 1]) {
      starts.push_back(i);
      unique_rows.push_back(sorted_rows[i]);
    }
  }
  starts.push_back(m);
}

template <typename index_t, typename offset_t>
std::tuple<at::Tensor, at::Tensor> row_grads_typed(const Args& a, const at::Tensor& grad_output,
                                                   const at::Tensor& indices, const at::Tensor& offsets,
                                                   const float* weights) {
  const Occurrences o = list_occurrences<index_t, offset_t>(a, grad_output, indices, offsets, weights);
  TORCH_CHECK(o.row.size() < (size_t(1) << 32), "embedding_row_grads: more than 2**32 occurrences in one call");
  std::vector<uint32_t> order;
  std::vector<size_t> starts;
  std::vector<int64_t> unique_rows;
  group_by_row(o.row, order, starts, unique_rows);
  const int64_t unique = static_cast<int64_t>(unique_rows.size());
  const int64_t dim = a.dim;
  at::Tensor rows = at::empty({unique}, indices.options().dtype(at::kLong));
  std::copy(unique_rows.begin(), unique_rows.end(), rows.data_ptr<int64_t>());
  at::Tensor grads = at::empty({unique, dim}, grad_output.options().dtype(at::kDouble));
  double* out_p = grads.data_ptr<double>();
  const float* g_p = grad_output.data_ptr<float>();
  const int threads = at::get_num_threads();
  const int64_t work = static_cast<int64_t>(o.row.size()) * dim;
  // Fork only for >= ~1M multiply-adds (see sparse_optimizers.cpp: a preempted thread stalls the barrier).
#pragma omp parallel num_threads(threads) if (work >= (int64_t(1) << 20))
  {
    std::vector<double> buf(dim);  // one row's sum, in L1
    const size_t m = order.size();
#pragma omp for schedule(static) nowait
    for (int64_t u = 0; u < unique; ++u) {
      // The next rows' occurrences are scattered: fetch a source a few groups ahead, and the gradient slice
      // of one fetched earlier (measured: ~25% less time for the benchmark's shape).
      const size_t next = starts[u];
      if (next + 16 < m) __builtin_prefetch(&o.source[order[next + 16]]);
      if (next + 8 < m) {
        const char* slice = reinterpret_cast<const char*>(g_p + o.source[order[next + 8]].offset);
        for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(float)); b += 64) __builtin_prefetch(slice + b);
      }
      std::fill(buf.begin(), buf.end(), 0.0);
      for (size_t k = starts[u]; k < starts[u + 1]; ++k) {
        const Source& source = o.source[order[k]];
        const float* src = g_p + source.offset;
        for (int64_t d = 0; d < dim; ++d) buf[d] = accumulate(buf[d], source.scale, src[d]);
      }
      store_row(out_p + u * dim, buf.data(), dim);
    }
    stream_fence();  // each thread's streamed stores, before the region's closing barrier
  }
  return {rows, grads};
}

std::tuple<at::Tensor, at::Tensor> embedding_row_grads_cpu(const at::Tensor& grad_output, const at::Tensor& indices,
                                                           const at::Tensor& offsets,
                                                           const c10::optional<at::Tensor>& per_sample_weights,
                                                           const at::Tensor& features, const at::Tensor& column_offsets,
                                                           int64_t dim, int64_t num_features, int64_t pooling_mode) {
  TORCH_CHECK(grad_output.device().is_cpu(), "embedding_row_grads: expected CPU tensors here, got ",
              grad_output.device());
  const Args a = check_args(grad_output, indices, offsets, per_sample_weights, features, column_offsets, dim,
                            num_features, pooling_mode);
  const at::Tensor go = grad_output.stride(1) == 1 ? grad_output : grad_output.contiguous();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  at::Tensor w;
  if (per_sample_weights.has_value() && per_sample_weights->defined()) w = per_sample_weights->contiguous();
  const float* w_p = w.defined() ? w.data_ptr<float>() : nullptr;
  const bool idx64 = idx.scalar_type() == at::kLong, off64 = off.scalar_type() == at::kLong;
  if (idx64 && off64) return row_grads_typed<int64_t, int64_t>(a, go, idx, off, w_p);
  if (idx64) return row_grads_typed<int64_t, int32_t>(a, go, idx, off, w_p);
  if (off64) return row_grads_typed<int32_t, int64_t>(a, go, idx, off, w_p);
  return row_grads_typed<int32_t, int32_t>(a, go, idx, off, w_p);
}

// embedding_row_update: the gradient of each unique row as above (float64, same order), rounded to float32
// once, + weight decay, then the kind's row update (sparse_optimizers_cpu.h): the bits of embedding_row_grads
// -> .float() -> sparse_opt_<kind>, without the [unique, dim] float64 buffer, its cast, and a second pass
// over the rows. Rows are updated as they are summed (each once: they are unique).
template <typename index_t, typename offset_t>
void row_update_typed(const Args& a, const at::Tensor& grad_output, const at::Tensor& indices,
                      const at::Tensor& offsets, const float* weights, const at::Tensor& weight,
                      const lightning_sparse_optim::RowUpdate& update, double weight_decay) {
  using namespace lightning_sparse_optim;
  const Occurrences o = list_occurrences<index_t, offset_t>(a, grad_output, indices, offsets, weights);
  TORCH_CHECK(o.row.size() < (size_t(1) << 32), "embedding_row_update: more than 2**32 occurrences in one call");
  std::vector<uint32_t> order;
  std::vector<size_t> starts;
  std::vector<int64_t> unique_rows;
  group_by_row(o.row, order, starts, unique_rows);
  const int64_t unique = static_cast<int64_t>(unique_rows.size());
  const int64_t dim = a.dim, num_rows = weight.size(0);
  if (unique > 0) {
    TORCH_CHECK(unique_rows.back() < num_rows, "row index ", unique_rows.back(), " out of range [0, ", num_rows, ")");
  }
  float* w_p = weight.data_ptr<float>();
  const float* g_p = grad_output.data_ptr<float>();
  std::vector<RowTable> tables = update.tables();
  tables.push_back(row_table(w_p, dim));
  const float wd = static_cast<float>(weight_decay);
  const int threads = at::get_num_threads();
  const int64_t work = static_cast<int64_t>(o.row.size()) * dim;
#pragma omp parallel num_threads(threads) if (work >= (int64_t(1) << 20))
  {
    std::vector<double> sum(dim);  // one row's float64 gradient
    std::vector<float> g(dim);     // ... rounded once, + decay
    const size_t m = order.size();
#pragma omp for schedule(static)
    for (int64_t u = 0; u < unique; ++u) {
      const size_t next = starts[u];
      if (next + 16 < m) __builtin_prefetch(&o.source[order[next + 16]]);
      if (next + 8 < m) {
        const char* slice = reinterpret_cast<const char*>(g_p + o.source[order[next + 8]].offset);
        for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(float)); b += 64) __builtin_prefetch(slice + b);
      }
      if (u + kPrefetchDistance < unique) prefetch_row(tables, unique_rows[u + kPrefetchDistance]);
      std::fill(sum.begin(), sum.end(), 0.0);
      for (size_t k = starts[u]; k < starts[u + 1]; ++k) {
        const Source& source = o.source[order[k]];
        const float* src = g_p + source.offset;
        for (int64_t d = 0; d < dim; ++d) sum[d] = accumulate(sum[d], source.scale, src[d]);
      }
      const int64_t row = unique_rows[u];
      float* w_row = w_p + row * dim;
// 0 + g, as sparse_opt_<kind> sums a row's one gradient into a zeroed buffer (turns -0 into +0)
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d)
        g[d] = with_weight_decay(add_rn(0.0f, static_cast<float>(sum[d])), w_row[d], wd);
      update(row, w_row, g.data(), dim);
    }
  }
}

void embedding_row_update_cpu(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& offsets,
                              const c10::optional<at::Tensor>& per_sample_weights, const at::Tensor& features,
                              const at::Tensor& column_offsets, int64_t dim, int64_t num_features, int64_t pooling_mode,
                              c10::string_view kind, const at::Tensor& weight, const c10::optional<at::Tensor>& sum,
                              const c10::optional<at::Tensor>& exp_avg, const c10::optional<at::Tensor>& exp_avg_sq,
                              const c10::optional<at::Tensor>& step, double lr, double eps, double weight_decay,
                              double beta1, double beta2, double decay) {
  using namespace lightning_sparse_optim;
  TORCH_CHECK(grad_output.device().is_cpu() && weight.device().is_cpu(),
              "embedding_row_update: expected CPU tensors here, got ", grad_output.device(), " and ", weight.device());
  const Args a = check_args(grad_output, indices, offsets, per_sample_weights, features, column_offsets, dim,
                            num_features, pooling_mode);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == dim, "embedding_row_update: weight must have shape [rows, ", dim,
              "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  const RowUpdate update(parse_kind(std::string(kind)), weight, KindState{sum, exp_avg, exp_avg_sq, step},
                         make_hyper(lr, eps, weight_decay, decay, beta1, beta2), beta1, beta2);
  const at::Tensor go = grad_output.stride(1) == 1 ? grad_output : grad_output.contiguous();
  const at::Tensor idx = indices.contiguous(), off = offsets.contiguous();
  at::Tensor w;
  if (per_sample_weights.has_value() && per_sample_weights->defined()) w = per_sample_weights->contiguous();
  const float* w_p = w.defined() ? w.data_ptr<float>() : nullptr;
  const bool idx64 = idx.scalar_type() == at::kLong, off64 = off.scalar_type() == at::kLong;
  if (idx64 && off64) return row_update_typed<int64_t, int64_t>(a, go, idx, off, w_p, weight, update, weight_decay);
  if (idx64) return row_update_typed<int64_t, int32_t>(a, go, idx, off, w_p, weight, update, weight_decay);
  if (off64) return row_update_typed<int32_t, int64_t>(a, go, idx, off, w_p, weight, update, weight_decay);
  return row_update_typed<int32_t, int32_t>(a, go, idx, off, w_p, weight, update, weight_decay);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lightning_sparse, m) {
  m.def(
      "embedding_row_grads(Tensor grad_output, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "Tensor features, Tensor column_offsets, int dim, int num_features, int pooling_mode) -> (Tensor rows, "
      "Tensor grads)");
  m.def(
      "embedding_row_update(Tensor grad_output, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "Tensor features, Tensor column_offsets, int dim, int num_features, int pooling_mode, str kind, "
      "Tensor(a!) weight, Tensor(b!)? sum, Tensor(c!)? exp_avg, Tensor(d!)? exp_avg_sq, Tensor(e!)? step, "
      "float lr, float eps, float weight_decay, float beta1, float beta2, float decay) -> ()");
}

TORCH_LIBRARY_IMPL(lightning_sparse, CPU, m) {
  m.impl("embedding_row_grads", &embedding_row_grads_cpu);
  m.impl("embedding_row_update", &embedding_row_update_cpu);
}

}  // namespace lightning_sparse
