// hash_index_update: the index mutations of one remap (victims erased in victim order, then the admitted
// ids inserted in assignment order) or one sweep (expired slots erased, nothing inserted), run by
// independent probe clusters as the CUDA kernels run them (hash_table_common.h: update_index_by_clusters).
//
// The CUDA kernels give every cluster its own thread; this CPU version runs the same plan with the
// groups taken last cluster first, the opposite of their position order, so that a test comparing it
// with the serial twin (lightning_sparse/dynamic/reference.py: update_index) on colliding, wrapping
// inputs fails whenever the plan lets one cluster depend on another. It also returns the cluster of
// every operation, which the tests check against the index before the erases and after the inserts.
// hash_remap / hash_expire on the CPU keep their own serial loops (same results, prefetched).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "hash_table_common.h"

#include <cstdint>
#include <tuple>

namespace {

using namespace lightning_sparse_hash;

struct HostClusterRunner {
  TableView t;

  at::Tensor homes(const at::Tensor& ids) const {
    const at::Tensor c = ids.contiguous();
    at::Tensor out = at::empty({c.numel()}, c.options());
    const int64_t* id = c.data_ptr<int64_t>();
    int64_t* h = out.data_ptr<int64_t>();
    for (int64_t i = 0; i < c.numel(); ++i) h[i] = static_cast<int64_t>(t.home(id[i]));
    return out;
  }

  void erase(const ClusterGroups& g, const at::Tensor& slots) {
    const at::Tensor s = slots.contiguous();
    for (int64_t i = g.size() - 1; i >= 0; --i)
      erase_group(t, s.data_ptr<int64_t>(), g.order.data_ptr<int64_t>(), g.key.data_ptr<int64_t>(), g.size(), i);
  }

  void insert(const ClusterGroups& g, const at::Tensor& ids, const at::Tensor& slots) {
    const at::Tensor a = ids.contiguous(), s = slots.contiguous();
    for (int64_t i = g.size() - 1; i >= 0; --i)
      insert_group(t, a.data_ptr<int64_t>(), s.data_ptr<int64_t>(), g.order.data_ptr<int64_t>(),
                   g.key.data_ptr<int64_t>(), g.size(), i);
  }
};

std::tuple<at::Tensor, at::Tensor> hash_index_update_cpu(const at::Tensor& index, const at::Tensor& slot_ids,
                                                         const at::Tensor& erase_slots, const at::Tensor& insert_ids,
                                                         const at::Tensor& insert_slots) {
  const at::Device cpu(at::kCPU);
  check_index_update(index, slot_ids, erase_slots, insert_ids, insert_slots, cpu);
  HostClusterRunner run{index_view(index, slot_ids)};
  const auto clusters = update_index_by_clusters(index, slot_ids, erase_slots.contiguous(), insert_ids.contiguous(),
                                                 insert_slots.contiguous(), run);
  return {clusters.first, clusters.second};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lightning_sparse, m) {
  m.def(
      "hash_index_update(Tensor(a!) index, Tensor slot_ids, Tensor erase_slots, Tensor insert_ids, "
      "Tensor insert_slots) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lightning_sparse, CPU, m) { m.impl("hash_index_update", hash_index_update_cpu); }
