// Hash-table kernels of dynamic embedding tables on CUDA: the ops of hash_table.cpp (schemas defined
// there) for state that lives on a GPU, with the same results and bit-identical state.
//
// The policy and its tie-breaking are defined in lightning_sparse/dynamic/reference.py. Parallel kernels
// only do order-independent work: probes of distinct ids, updates of distinct slots, integer atomic adds
// to the sketch (estimates are read in a second kernel, after every add), coins, victim priorities,
// free-stack pushes to distinct places. unique / sort / compaction / scans are ATen's CUDA ops (sorted
// unique, stable sorts), which give the twin's orders exactly. The index mutations, whose order shapes
// the layout (erases with backward shift, then inserts), run one thread per probe cluster, each
// cluster's operations serially in the documented order (hash_table_common.h says why that reproduces
// the serial layout position by position): a kernel of erases over the clusters of the index before
// them, then a kernel of inserts over the clusters of the index after them. Only the operations that
// fall into one cluster share a thread.
//
// Host syncs per remap: the free count, unique's size, the eligible ids' count, and only when the table
// is full the evictable slots' count and the number of wins. lookup has none; expire has one.
//
// Floating point: decayed scores are float64 products of decay powers at the set bits (ascending), then
// one multiply and one add, rounded to the float32 score; distance_lfu's priority is one float64
// division. The __dmul_rn / __dadd_rn / __ddiv_rn / __double2float_rn intrinsics round each step and are
// never fused into an FMA, whatever flags nvcc gets, so they round exactly as the C++ and PyTorch twins do.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "hash_table_common.h"

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

using namespace lightning_sparse_hash;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride loops cover the rest

// The device kernels need nothing beyond the shared view of the state.
using Table = TableView;

// decay ** dt as the product of powers[b] (= decay ** 2**b) at the set bits of dt, ascending.
__device__ __forceinline__ double decay_pow(int64_t dt, const double* powers) {
  double r = 1.0;
  for (int b = 0; b < 63 && (dt >> b) > 0; ++b) {
    if ((dt >> b) & 1) r = __dmul_rn(r, powers[b]);
  }
  return r;
}

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

#define GRID_STRIDE(i, n)                                                                \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// Slot of each id (+ offset); its fallback row when it has none (-1 when fallback_rows is 0).
__global__ void lookup_kernel(Table t, const int64_t* __restrict__ ids, int64_t n, int64_t offset,
                              int64_t fallback_offset, int64_t fallback_rows, int64_t* __restrict__ out) {
  GRID_STRIDE(i, n) {
    const int64_t s = t.find(ids[i]);
    out[i] = s >= 0 ? s + offset : fallback_row(ids[i], fallback_offset, fallback_rows);
  }
}

// Hits: distinct ids have distinct slots, so every slot is written by one thread.
__global__ void hit_kernel(Table t, const int64_t* __restrict__ slot, const int64_t* __restrict__ counts, int64_t u,
                           int64_t step, double now, const double* __restrict__ powers, uint8_t* __restrict__ touched) {
  GRID_STRIDE(j, u) {
    const int64_t s = slot[j];
    if (s < 0) continue;
    const int64_t c = counts[j];
    if (t.score) {
      const int64_t dt = max(step - static_cast<int64_t>(t.last_step[s]), int64_t(0));
      const double decayed = __dmul_rn(static_cast<double>(t.score[s]), decay_pow(dt, powers));
      t.score[s] = __double2float_rn(__dadd_rn(decayed, static_cast<double>(c)));
    }
    t.count[s] = add_count(t.count[s], c);
    t.last_step[s] = static_cast<int32_t>(step);
    if (t.last_time) t.last_time[s] = now;
    touched[s] = 1;
  }
}

__device__ __forceinline__ int64_t sketch_cell(const Table& t, int64_t id, int64_t r) {
  const uint64_t col = mix64(static_cast<uint64_t>(id) + sketch_salt(r)) & static_cast<uint64_t>(t.width - 1);
  return r * t.width + static_cast<int64_t>(col);
}

// Batch counts of the missing distinct ids into the sketch (integer adds: any order gives the same sums).
__global__ void sketch_add_kernel(Table t, const int64_t* __restrict__ uniq, const int64_t* __restrict__ counts,
                                  const int64_t* __restrict__ slot, int64_t u) {
  GRID_STRIDE(j, u) {
    if (slot[j] >= 0) continue;
    const int add = static_cast<int>(counts[j]);
    for (int64_t r = 0; r < t.depth; ++r) atomicAdd(&t.sketch[sketch_cell(t, uniq[j], r)], add);
  }
}

// Estimate (min over rows, after all of this call's adds; the batch count without a sketch), min_count
// and coin of each missing distinct id.
__global__ void admit_kernel(Table t, const int64_t* __restrict__ uniq, const int64_t* __restrict__ counts,
                             const int64_t* __restrict__ slot, int64_t u, int64_t min_count, int64_t coin_threshold,
                             int64_t coin_key, int64_t step, int64_t* __restrict__ estimate,
                             bool* __restrict__ eligible) {
  const uint64_t step_salt = static_cast<uint64_t>(step) * kGolden;
  GRID_STRIDE(j, u) {
    if (slot[j] >= 0) {
      estimate[j] = 0;
      eligible[j] = false;
      continue;
    }
    const int64_t id = uniq[j];
    int64_t est = INT64_MAX;
    for (int64_t r = 0; r < t.depth; ++r) est = min(est, static_cast<int64_t>(t.sketch[sketch_cell(t, id, r)]));
    if (t.depth == 0) est = counts[j];
    bool ok = est >= min_count;
    if (ok && coin_threshold < (int64_t(1) << 53)) { ok = admission_coin(id, coin_key, step_salt) < coin_threshold; }
    estimate[j] = est;
    eligible[j] = ok;
  }
}

// Ages the sketch when this call's adds reached halve_every (decided on the device: no sync). The
// reset of the add count runs in the next kernel, after every thread has read it.
__global__ void halve_sketch_kernel(int32_t* __restrict__ sketch, int64_t cells, const int64_t* __restrict__ meta,
                                    int64_t halve_every) {
  if (meta[kSketchAdds] < halve_every) return;
  GRID_STRIDE(k, cells) { sketch[k] >>= 1; }
}

__global__ void finish_aging_kernel(int64_t* meta, int64_t* counters, int64_t halve_every) {
  if (meta[kSketchAdds] >= halve_every) {
    meta[kSketchAdds] = 0;
    counters[kSketchHalvings] += 1;
  }
}

// Eviction priority (float64) of live slots at `step`: the lowest is evicted first.
__global__ void victim_priority_kernel(Table t, const int64_t* __restrict__ slots, int64_t m, int64_t policy,
                                       int64_t step, const double* __restrict__ powers, double* __restrict__ prio) {
  GRID_STRIDE(j, m) {
    const int64_t s = slots[j];
    const int64_t dt = max(step - static_cast<int64_t>(t.last_step[s]), int64_t(0));
    if (policy == kLFU) {
      prio[j] = static_cast<double>(t.count[s]);
    } else if (policy == kLRU) {
      prio[j] = static_cast<double>(t.last_step[s]);
    } else if (policy == kDistanceLFU) {
      prio[j] = __ddiv_rn(static_cast<double>(t.count[s]), static_cast<double>(dt + 1));
    } else {
      prio[j] = __dmul_rn(static_cast<double>(t.score[s]), decay_pow(dt, powers));
    }
  }
}

__global__ void homes_kernel(Table t, const int64_t* __restrict__ ids, int64_t n, int64_t* __restrict__ out) {
  GRID_STRIDE(i, n) { out[i] = static_cast<int64_t>(t.home(ids[i])); }
}

// One thread per probe cluster: the first op of each group runs the group's ops in order.
__global__ void erase_groups_kernel(Table t, const int64_t* __restrict__ slots, const int64_t* __restrict__ order,
                                    const int64_t* __restrict__ key, int64_t n) {
  GRID_STRIDE(i, n) { erase_group(t, slots, order, key, n, i); }
}

__global__ void insert_groups_kernel(Table t, const int64_t* __restrict__ ids, const int64_t* __restrict__ slots,
                                     const int64_t* __restrict__ order, const int64_t* __restrict__ key, int64_t n) {
  GRID_STRIDE(i, n) { insert_group(t, ids, slots, order, key, n, i); }
}

// A new slot: count = score = the estimate, stamps (step, now). Runs after the erases (which read
// the victims' old slot_ids); every field is written, so an evicted slot needs no clearing first.
__global__ void write_slots_kernel(Table t, const int64_t* __restrict__ assigned, const int64_t* __restrict__ new_ids,
                                   const int64_t* __restrict__ new_f, int64_t n, int64_t step, double now) {
  GRID_STRIDE(j, n) {
    const int64_t s = assigned[j];
    t.slot_ids[s] = new_ids[j];
    t.count[s] = static_cast<int32_t>(new_f[j]);
    t.last_step[s] = static_cast<int32_t>(step);
    if (t.last_time) t.last_time[s] = now;
    if (t.score) t.score[s] = static_cast<float>(new_f[j]);
  }
}

__global__ void expire_mark_kernel(Table t, int64_t step, double now, int64_t ttl_steps, double ttl_seconds,
                                   bool* __restrict__ quiet) {
  GRID_STRIDE(s, t.capacity) {
    const bool by_steps = ttl_steps > 0 && step - static_cast<int64_t>(t.last_step[s]) > ttl_steps;
    const bool by_time = ttl_seconds > 0 && __dsub_rn(now, t.last_time[s]) > ttl_seconds;
    quiet[s] = t.count[s] > 0 && (by_steps || by_time);
  }
}

// A sweep's pushes on the free stack, so that the lowest expired slot pops first: the j-th push is the
// j-th highest slot. The free count moves in the next kernel, after every thread has read it.
__global__ void push_free_kernel(Table t, const int64_t* __restrict__ slots, int64_t m) {
  const int64_t free = t.meta[kFreeCount];
  GRID_STRIDE(j, m) { t.free_list[free + j] = static_cast<int32_t>(slots[m - 1 - j]); }
}

__global__ void finish_sweep_kernel(int64_t* meta, int64_t* counters, int64_t m, int64_t step) {
  meta[kFreeCount] += m;
  meta[kLastSweepStep] = step;
  counters[kExpired] += m;
}

__global__ void clear_slots_kernel(Table t, const int64_t* __restrict__ slots, int64_t m) {
  GRID_STRIDE(j, m) {
    const int64_t s = slots[j];
    t.slot_ids[s] = 0;
    t.count[s] = 0;
    t.last_step[s] = 0;
    if (t.last_time) t.last_time[s] = 0.0;
    if (t.score) t.score[s] = 0.0f;
  }
}

#undef GRID_STRIDE

Table make_table(const at::Tensor& slot_ids, const at::Tensor& slot_count, const at::Tensor& slot_last_step,
                 const at::Tensor& slot_last_time, const at::Tensor& slot_score, const at::Tensor& free_list,
                 const at::Tensor& index, const at::Tensor& sketch, const at::Tensor& meta,
                 const at::Tensor& counters) {
  TORCH_CHECK(slot_ids.device().is_cuda(), "hash table state 'slot_ids' must be a CUDA tensor here, got ",
              slot_ids.device());
  return view_state(slot_ids, slot_count, slot_last_step, slot_last_time, slot_score, free_list, index, sketch, meta,
                    counters);
}

// The device's part of update_index_by_clusters (hash_table_common.h).
struct DeviceClusterRunner {
  Table t;
  cudaStream_t stream;

  at::Tensor homes(const at::Tensor& ids) const {
    const at::Tensor c = ids.contiguous();
    at::Tensor out = at::empty({c.numel()}, c.options());
    homes_kernel<<<blocks_for(c.numel()), kThreads, 0, stream>>>(t, c.data_ptr<int64_t>(), c.numel(),
                                                                 out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  void erase(const ClusterGroups& g, const at::Tensor& slots) const {
    const at::Tensor s = slots.contiguous();
    erase_groups_kernel<<<blocks_for(g.size()), kThreads, 0, stream>>>(
        t, s.data_ptr<int64_t>(), g.order.data_ptr<int64_t>(), g.key.data_ptr<int64_t>(), g.size());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void insert(const ClusterGroups& g, const at::Tensor& ids, const at::Tensor& slots) const {
    const at::Tensor a = ids.contiguous(), s = slots.contiguous();
    insert_groups_kernel<<<blocks_for(g.size()), kThreads, 0, stream>>>(t, a.data_ptr<int64_t>(), s.data_ptr<int64_t>(),
                                                                        g.order.data_ptr<int64_t>(),
                                                                        g.key.data_ptr<int64_t>(), g.size());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> hash_remap_cuda(
    const at::Tensor& ids, const at::Tensor& slot_ids, const at::Tensor& slot_count, const at::Tensor& slot_last_step,
    const at::Tensor& slot_last_time, const at::Tensor& slot_score, const at::Tensor& free_list,
    const at::Tensor& index, const at::Tensor& sketch, const at::Tensor& meta, const at::Tensor& counters,
    const at::Tensor& decay_powers, int64_t step, double now, int64_t policy, int64_t min_count, int64_t coin_threshold,
    int64_t coin_key, int64_t halve_every, int64_t slot_offset, int64_t fallback_offset, int64_t fallback_rows) {
  TORCH_CHECK(fallback_rows >= 0, "hash_remap: fallback_rows must be >= 0, got ", fallback_rows);
  TORCH_CHECK(ids.device() == slot_ids.device() && ids.scalar_type() == at::kLong,
              "hash_remap: ids must be an int64 tensor on the state's device (", slot_ids.device(), "), got ",
              ids.scalar_type(), " on ", ids.device());
  check_step(step, "hash_remap");
  // bounds that keep int32 sketch counters below 2**30 (lightning_sparse/dynamic/config.py)
  TORCH_CHECK(halve_every >= 1 && halve_every <= (int64_t(1) << 28), "hash_remap: halve_every must be in [1, 2**28]");
  TORCH_CHECK(ids.numel() < (int64_t(1) << 28), "hash_remap: a call takes fewer than 2**28 ids, got ", ids.numel());
  const c10::cuda::CUDAGuard guard(slot_ids.device());
  Table t = make_table(slot_ids, slot_count, slot_last_step, slot_last_time, slot_score, free_list, index, sketch, meta,
                       counters);
  check_policy_state(t, policy);
  check_state(decay_powers, at::kDouble, "decay_powers", slot_ids.device());
  TORCH_CHECK(decay_powers.numel() >= 63, "hash_remap: decay_powers needs 63 entries");
  const double* powers = decay_powers.data_ptr<double>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = ids.numel();
  // Nothing in this call changes the free count before the pops (E), so read it now.
  const int64_t free = meta[kFreeCount].item<int64_t>();

  // A. distinct ids (ascending), their batch counts, and their slots.
  const at::Tensor flat = ids.reshape({-1});
  at::Tensor uniq, inverse, counts;
  std::tie(uniq, inverse, counts) =
      at::_unique2(flat, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/true);
  uniq = uniq.contiguous();
  counts = counts.contiguous();
  const int64_t u = uniq.numel();
  at::Tensor slot_u = at::empty({u}, uniq.options());
  at::Tensor touched = at::zeros({t.capacity}, slot_ids.options().dtype(at::kByte));  // hit in this call
  at::Tensor estimate = at::empty({u}, uniq.options());
  at::Tensor eligible = at::empty({u}, uniq.options().dtype(at::kBool));
  if (u > 0) {
    lookup_kernel<<<blocks_for(u), kThreads, 0, stream>>>(t, uniq.data_ptr<int64_t>(), u, 0, 0, 0,
                                                          slot_u.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // B. hits: one update per distinct slot.
    hit_kernel<<<blocks_for(u), kThreads, 0, stream>>>(t, slot_u.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), u,
                                                       step, now, powers, touched.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // C/D. sketch adds of the misses, then estimates, coins and eligibility (a second kernel: every add done).
    sketch_add_kernel<<<blocks_for(u), kThreads, 0, stream>>>(t, uniq.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                                              slot_u.data_ptr<int64_t>(), u);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    admit_kernel<<<blocks_for(u), kThreads, 0, stream>>>(
        t, uniq.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), slot_u.data_ptr<int64_t>(), u, min_count,
        coin_threshold, coin_key, step, estimate.data_ptr<int64_t>(), eligible.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor miss = slot_u.lt(0);
  const at::Tensor hit_occurrences = counts.masked_fill(miss, 0).sum();
  counters.narrow(0, kLookups, 1).add_(n);
  counters.narrow(0, kHits, 1).add_(hit_occurrences);
  counters.narrow(0, kRejectedAdmission, 1).add_(miss.logical_and(eligible.logical_not()).sum());
  meta.narrow(0, kSketchAdds, 1).add_(hit_occurrences.neg().add_(n));  // += missing occurrences
  const int64_t cells = t.depth * t.width;
  if (cells > 0) {
    halve_sketch_kernel<<<blocks_for(cells), kThreads, 0, stream>>>(t.sketch, cells, t.meta, halve_every);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finish_aging_kernel<<<1, 1, 0, stream>>>(t.meta, t.counters, halve_every);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // E. eligible ids by priority desc, id asc: nonzero keeps id order, and a stable ascending sort of the
  // negated integer estimate orders them as the twin's stable descending sort of its float64 copy (exact
  // below 2**53). Under LRU every priority is `step`: id order stands. Then the free-stack pops.
  const at::Tensor elig_pos = at::nonzero(eligible).view({-1});
  const int64_t n_elig = elig_pos.numel();
  at::Tensor cand = uniq.index_select(0, elig_pos);
  at::Tensor cand_f = estimate.index_select(0, elig_pos);
  if (policy != kLRU && n_elig > 1) {
    const at::Tensor order = std::get<1>(at::sort(cand_f.neg(), /*stable=*/true, /*dim=*/0, /*descending=*/false));
    cand = cand.index_select(0, order);
    cand_f = cand_f.index_select(0, order);
  }
  const at::Tensor cand_prio = policy == kLRU
                                   ? at::full({n_elig}, static_cast<double>(step), cand_f.options().dtype(at::kDouble))
                                   : cand_f.to(at::kDouble);
  const int64_t n_free = std::min(free, n_elig);
  // without a free list (no expiry) the free slots are the top `free` ones, popped lowest first
  const at::Tensor free_slots = t.free_list ? free_list.narrow(0, free - n_free, n_free).flip({0}).to(at::kLong)
                                            : at::arange(t.capacity - free, t.capacity - free + n_free, uniq.options());
  meta.narrow(0, kFreeCount, 1).fill_(free - n_free);

  // F. the remaining eligible ids compete with the evictable slots, lowest (priority, slot) first; the
  // i-th id wins the i-th victim iff its priority is strictly greater (wins form a prefix).
  at::Tensor victims = at::empty({0}, uniq.options());
  const int64_t rest = n_elig - n_free;
  if (rest > 0) {
    const at::Tensor evictable = at::nonzero(slot_count.gt(0).logical_and(touched.eq(0))).view({-1});
    const int64_t m = evictable.numel();
    at::Tensor vprio = at::empty({m}, uniq.options().dtype(at::kDouble));
    if (m > 0) {
      victim_priority_kernel<<<blocks_for(m), kThreads, 0, stream>>>(t, evictable.data_ptr<int64_t>(), m, policy, step,
                                                                     powers, vprio.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // stable: ties keep slot-ascending order (priorities are >= +0.0, never -0.0 or NaN)
    const int64_t k = std::min(rest, m);
    const at::Tensor vorder =
        std::get<1>(at::sort(vprio, /*stable=*/true, /*dim=*/0, /*descending=*/false)).narrow(0, 0, k);
    const int64_t wins =
        k > 0 ? cand_prio.narrow(0, n_free, k).gt(vprio.index_select(0, vorder)).sum().item<int64_t>() : 0;
    victims = evictable.index_select(0, vorder.narrow(0, 0, wins));
    counters.narrow(0, kEvicted, 1).add_(wins);
    counters.narrow(0, kRejectedFull, 1).add_(rest - wins);
  }

  // G. index updates (by probe cluster; the erases read the victims' old slot_ids), then the new slots'
  // fields, then the output slots: a hit's slot never moves (victims are never hit slots), a miss has one
  // now iff it was assigned one.
  const at::Tensor assigned = at::cat({free_slots, victims});
  const int64_t n_assigned = assigned.numel();
  const at::Tensor new_ids = cand.narrow(0, 0, n_assigned).contiguous();
  const at::Tensor new_f = cand_f.narrow(0, 0, n_assigned).contiguous();
  if (n_assigned > 0) {
    DeviceClusterRunner run{t, stream};
    update_index_by_clusters(index, slot_ids, victims, new_ids, assigned, run);
    write_slots_kernel<<<blocks_for(n_assigned), kThreads, 0, stream>>>(
        t, assigned.data_ptr<int64_t>(), new_ids.data_ptr<int64_t>(), new_f.data_ptr<int64_t>(), n_assigned, step, now);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  counters.narrow(0, kAdmitted, 1).add_(n_assigned);
  at::Tensor out_u = at::empty({u}, uniq.options());
  if (u > 0) {
    lookup_kernel<<<blocks_for(u), kThreads, 0, stream>>>(t, uniq.data_ptr<int64_t>(), u, slot_offset, fallback_offset,
                                                          fallback_rows, out_u.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor out = out_u.index_select(0, inverse.reshape({-1})).view(ids.sizes());
  return {out, assigned.add(slot_offset)};
}

at::Tensor hash_lookup_cuda(const at::Tensor& ids, const at::Tensor& slot_ids, const at::Tensor& index,
                            int64_t slot_offset, int64_t fallback_offset, int64_t fallback_rows) {
  TORCH_CHECK(fallback_rows >= 0, "hash_lookup: fallback_rows must be >= 0, got ", fallback_rows);
  const at::Device device = slot_ids.device();
  TORCH_CHECK(device.is_cuda(), "hash_lookup: slot_ids must be a CUDA tensor here, got ", device);
  TORCH_CHECK(ids.device() == device && ids.scalar_type() == at::kLong,
              "hash_lookup: ids must be an int64 tensor on the state's device (", device, "), got ", ids.scalar_type(),
              " on ", ids.device());
  check_state(slot_ids, at::kLong, "slot_ids", device);
  check_state(index, at::kInt, "index", device);
  const int64_t h = index.numel();
  TORCH_CHECK(h >= 2 * slot_ids.numel() && (h & (h - 1)) == 0, "hash_lookup: bad index size");
  const c10::cuda::CUDAGuard guard(device);
  Table t{};
  t.slot_ids = slot_ids.data_ptr<int64_t>();
  t.index = index.data_ptr<int32_t>();
  t.mask = static_cast<uint64_t>(h - 1);
  const at::Tensor ids_c = ids.contiguous();
  at::Tensor out = at::empty(ids_c.sizes(), ids_c.options());
  const int64_t n = ids_c.numel();
  if (n > 0) {
    lookup_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        t, ids_c.data_ptr<int64_t>(), n, slot_offset, fallback_offset, fallback_rows, out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.view(ids.sizes());
}

at::Tensor hash_expire_cuda(const at::Tensor& slot_ids, const at::Tensor& slot_count, const at::Tensor& slot_last_step,
                            const at::Tensor& slot_last_time, const at::Tensor& slot_score, const at::Tensor& free_list,
                            const at::Tensor& index, const at::Tensor& sketch, const at::Tensor& meta,
                            const at::Tensor& counters, int64_t step, double now, int64_t ttl_steps,
                            double ttl_seconds) {
  check_step(step, "hash_expire");
  const c10::cuda::CUDAGuard guard(slot_ids.device());
  Table t = make_table(slot_ids, slot_count, slot_last_step, slot_last_time, slot_score, free_list, index, sketch, meta,
                       counters);
  check_expire_state(t, ttl_steps, ttl_seconds);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor quiet = at::empty({t.capacity}, slot_ids.options().dtype(at::kBool));
  expire_mark_kernel<<<blocks_for(t.capacity), kThreads, 0, stream>>>(t, step, now, ttl_steps, ttl_seconds,
                                                                      quiet.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor expired = at::nonzero(quiet).view({-1}).contiguous();  // ascending slots
  const int64_t m = expired.numel();
  if (m > 0) {
    // erased in ascending slot order (by probe cluster), before their slot_ids are cleared
    DeviceClusterRunner run{t, stream};
    update_index_by_clusters(index, slot_ids, expired, expired.narrow(0, 0, 0), expired.narrow(0, 0, 0), run);
    clear_slots_kernel<<<blocks_for(m), kThreads, 0, stream>>>(t, expired.data_ptr<int64_t>(), m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    push_free_kernel<<<blocks_for(m), kThreads, 0, stream>>>(t, expired.data_ptr<int64_t>(), m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // also when nothing expired: it stamps the sweep step
  finish_sweep_kernel<<<1, 1, 0, stream>>>(t.meta, t.counters, m, step);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return expired;
}

// hash_index_update (schema and CPU version: hash_index_clusters.cpp) on the GPU, with the kernels
// that hash_remap and hash_expire use.
std::tuple<at::Tensor, at::Tensor> hash_index_update_cuda(const at::Tensor& index, const at::Tensor& slot_ids,
                                                          const at::Tensor& erase_slots, const at::Tensor& insert_ids,
                                                          const at::Tensor& insert_slots) {
  const at::Device device = slot_ids.device();
  TORCH_CHECK(device.is_cuda(), "hash_index_update: slot_ids must be a CUDA tensor here, got ", device);
  const c10::cuda::CUDAGuard guard(device);
  check_index_update(index, slot_ids, erase_slots, insert_ids, insert_slots, device);
  DeviceClusterRunner run{index_view(index, slot_ids), c10::cuda::getCurrentCUDAStream()};
  const auto clusters = update_index_by_clusters(index, slot_ids, erase_slots, insert_ids, insert_slots, run);
  return {clusters.first, clusters.second};
}

TORCH_LIBRARY_IMPL(lightning_sparse, CUDA, m) {
  m.impl("hash_index_update", hash_index_update_cuda);
  m.impl("hash_remap", hash_remap_cuda);
  m.impl("hash_lookup", hash_lookup_cuda);
  m.impl("hash_expire", hash_expire_cuda);
}
