// What hash_table.cpp (CPU) and hash_table.cu (CUDA) share: the hash functions, the layout of the state
// (lightning_sparse/dynamic/state.py, hashing.py) and its validation. Both files must agree on these to
// the bit, so they live here once.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <utility>

#include "host_device.h"

namespace lightning_sparse_hash {

constexpr uint64_t kMixM1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMixM2 = 0x94D049BB133111EBULL;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kSaltIndex = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kSaltSketch = 0xA0761D6478BD642FULL;
constexpr uint64_t kSaltFallback = 0x8EBC6AF09C88C6E3ULL;

// positions in meta / counters (lightning_sparse/dynamic/state.py: Meta, Counter)
constexpr int kFreeCount = 0, kSketchAdds = 1, kLastSweepStep = 2;
constexpr int kAdmitted = 0, kEvicted = 1, kExpired = 2, kRejectedFull = 3, kRejectedAdmission = 4, kLookups = 5,
              kHits = 6, kSketchHalvings = 7;
// eviction policies (state.py: POLICY_CODE)
constexpr int kLFU = 0, kLRU = 1, kFeatureScore = 2, kDistanceLFU = 3;
// per-slot counts are int32 and saturate here (state.py: MAX_COUNT)
constexpr int64_t kMaxCount = 2147483647;

// A hit's new count: count + c, saturating (state.py: MAX_COUNT).
LS_HOST_DEVICE inline int32_t add_count(int32_t count, int64_t c) {
  const int64_t sum = static_cast<int64_t>(count) + c;
  return static_cast<int32_t>(sum < kMaxCount ? sum : kMaxCount);
}

// splitmix64's finaliser (hashing.py: mix64)
LS_HOST_DEVICE inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * kMixM1;
  x = (x ^ (x >> 27)) * kMixM2;
  return x ^ (x >> 31);
}

// Salt of sketch row r (hashing.py: sketch_columns); the column is mix64(id + salt) & (width - 1).
LS_HOST_DEVICE inline uint64_t sketch_salt(int64_t row) { return kSaltSketch * static_cast<uint64_t>(row + 1); }

// The 53-bit admission coin of an id at a step, given step_salt = step * kGolden (hashing.py: coin_from_key).
LS_HOST_DEVICE inline int64_t admission_coin(int64_t id, int64_t coin_key, uint64_t step_salt) {
  return static_cast<int64_t>(mix64(mix64(static_cast<uint64_t>(id) + static_cast<uint64_t>(coin_key)) ^ step_salt) >>
                              11);
}

// The row an id without a slot reads: offset + hash(id) % rows, or -1 when the table keeps no fallback
// rows (hashing.py: fallback_rows_of).
LS_HOST_DEVICE inline int64_t fallback_row(int64_t id, int64_t offset, int64_t rows) {
  if (rows <= 0) return -1;
  return offset +
         static_cast<int64_t>((mix64(static_cast<uint64_t>(id) + kSaltFallback) >> 33) % static_cast<uint64_t>(rows));
}

// Raw pointers into the state tensors (all on one device) and their sizes. last_time, score and
// free_list are null when the policy keeps none (empty tensors, state.py: TableTensors).
struct TableView {
  int64_t* slot_ids;
  int32_t* count;
  int32_t* last_step;
  double* last_time;
  float* score;
  int32_t* free_list;
  int32_t* index;
  int32_t* sketch;
  int64_t* meta;
  int64_t* counters;
  int64_t capacity;
  uint64_t mask;
  int64_t depth;
  int64_t width;

  // The k-th entry of the free stack; without a free list (no expiry) the free slots are the top ones,
  // entry k = capacity - 1 - k, as the list would hold them.
  LS_HOST_DEVICE int64_t free_at(int64_t k) const { return free_list ? free_list[k] : capacity - 1 - k; }

  // home position of an id in the index (hashing.py: index_home)
  LS_HOST_DEVICE uint64_t home(int64_t id) const { return mix64(static_cast<uint64_t>(id) + kSaltIndex) & mask; }

  // The index maps id -> slot by linear probing (reference.py: lookup_local, _index_insert, _index_erase).
  LS_HOST_DEVICE int64_t find(int64_t id) const { return find_from(id, home(id)); }

  LS_HOST_DEVICE int64_t find_from(int64_t id, uint64_t pos) const {
    while (true) {
      const int32_t e = index[pos];
      if (e < 0) return -1;
      if (slot_ids[e] == id) return e;
      pos = (pos + 1) & mask;
    }
  }

  // Deletes the entry of `slot`, which holds `id`, found by its slot number (no slot ids read). A slot
  // that is not indexed (only in a corrupt state) is left alone rather than probing forever.
  LS_HOST_DEVICE void erase_entry(int64_t id, int32_t slot) {
    uint64_t pos = home(id);
    while (true) {
      const int32_t e = index[pos];
      if (e < 0) return;
      if (e == slot) break;
      pos = (pos + 1) & mask;
    }
    erase_at(pos);
  }

  LS_HOST_DEVICE void insert(int64_t id, int32_t slot) {
    uint64_t pos = home(id);
    while (index[pos] >= 0) pos = (pos + 1) & mask;
    index[pos] = slot;
  }

  // Deletes the entry at `pos` with backward shift (no tombstones): later entries of the probe run move
  // into the hole unless their home lies cyclically in (hole, probe]. The slot_ids of all indexed slots
  // must still be valid.
  LS_HOST_DEVICE void erase_at(uint64_t pos) {
    uint64_t hole = pos, probe = pos;
    while (true) {
      probe = (probe + 1) & mask;
      const int32_t e = index[probe];
      if (e < 0) break;
      const uint64_t want = home(slot_ids[e]);
      const bool stays = hole <= probe ? (hole < want && want <= probe) : (want > hole || want <= probe);
      if (!stays) {
        index[hole] = e;
        hole = probe;
      }
    }
    index[hole] = -1;
  }
};

inline void check_state(const at::Tensor& t, at::ScalarType dtype, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "hash table state '", name, "' must be on ", device,
              " (with the other state), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "hash table state '", name, "' must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "hash table state '", name, "' must be contiguous");
}

// Validates the state tensors (dtypes, sizes, one device: that of slot_ids) and views them.
inline TableView view_state(const at::Tensor& slot_ids, const at::Tensor& slot_count, const at::Tensor& slot_last_step,
                            const at::Tensor& slot_last_time, const at::Tensor& slot_score, const at::Tensor& free_list,
                            const at::Tensor& index, const at::Tensor& sketch, const at::Tensor& meta,
                            const at::Tensor& counters) {
  const at::Device device = slot_ids.device();
  check_state(slot_ids, at::kLong, "slot_ids", device);
  check_state(slot_count, at::kInt, "slot_count", device);
  check_state(slot_last_step, at::kInt, "slot_last_step", device);
  check_state(slot_last_time, at::kDouble, "slot_last_time", device);
  check_state(slot_score, at::kFloat, "slot_score", device);
  check_state(free_list, at::kInt, "free_list", device);
  check_state(index, at::kInt, "index", device);
  check_state(sketch, at::kInt, "sketch", device);
  check_state(meta, at::kLong, "meta", device);
  check_state(counters, at::kLong, "counters", device);
  const int64_t c = slot_ids.numel();
  TORCH_CHECK(slot_count.numel() == c && slot_last_step.numel() == c,
              "hash table slot_count and slot_last_step must have ", c, " entries (one per slot)");
  for (const at::Tensor* optional : {&slot_last_time, &slot_score, &free_list}) {
    TORCH_CHECK(optional->numel() == c || optional->numel() == 0,
                "hash table slot_last_time, slot_score and free_list must have ", c, " entries or none");
  }
  const int64_t h = index.numel();
  TORCH_CHECK(h >= 2 * c && (h & (h - 1)) == 0, "hash table index must have a power-of-two size >= 2 * capacity");
  TORCH_CHECK(sketch.dim() == 2, "hash table sketch must be 2-D (depth, width)");
  const int64_t w = sketch.size(1);
  TORCH_CHECK(sketch.size(0) == 0 || (w > 0 && (w & (w - 1)) == 0), "sketch width must be a power of two");
  TORCH_CHECK(meta.numel() >= 3 && counters.numel() >= 8, "hash table meta/counters too short");
  TableView t;
  t.slot_ids = slot_ids.data_ptr<int64_t>();
  t.count = slot_count.data_ptr<int32_t>();
  t.last_step = slot_last_step.data_ptr<int32_t>();
  t.last_time = slot_last_time.numel() ? slot_last_time.data_ptr<double>() : nullptr;
  t.score = slot_score.numel() ? slot_score.data_ptr<float>() : nullptr;
  t.free_list = free_list.numel() ? free_list.data_ptr<int32_t>() : nullptr;
  t.index = index.data_ptr<int32_t>();
  t.sketch = sketch.data_ptr<int32_t>();
  t.meta = meta.data_ptr<int64_t>();
  t.counters = counters.data_ptr<int64_t>();
  t.capacity = c;
  t.mask = static_cast<uint64_t>(h - 1);
  t.depth = sketch.size(0);
  t.width = w;
  return t;
}

// What a remap with `policy` and a sweep with these TTLs need beyond the slot ids, counts and steps.
inline void check_policy_state(const TableView& t, int64_t policy) {
  TORCH_CHECK(policy >= kLFU && policy <= kDistanceLFU,
              "hash_remap: policy must be 0 (lfu), 1 (lru), 2 (feature_score) or 3 (distance_lfu)");
  TORCH_CHECK(policy != kFeatureScore || t.score != nullptr,
              "hash_remap: policy feature_score needs slot_score with one entry per slot");
}

// Steps are stored as int32 (state.py: slot_last_step; config.py: MAX_STEP).
inline void check_step(int64_t step, const char* op) {
  TORCH_CHECK(step >= 0 && step <= kMaxCount, op, ": step must be in [0, 2**31 - 1] (steps are stored as int32), got ",
              step);
}

inline void check_expire_state(const TableView& t, int64_t ttl_steps, double ttl_seconds) {
  TORCH_CHECK(
      (ttl_steps <= 0 && ttl_seconds <= 0) || t.free_list != nullptr,
      "hash_expire: this table keeps no free list (its config has no expiry); set expiry.ttl_steps or ttl_seconds");
  TORCH_CHECK(ttl_seconds <= 0 || t.last_time != nullptr,
              "hash_expire: this table keeps no wall-clock stamps (its config has no expiry.ttl_seconds)");
}

// The index and slot ids alone (what hash_index_update needs), viewed.
inline TableView index_view(const at::Tensor& index, const at::Tensor& slot_ids) {
  TableView t{};
  t.slot_ids = slot_ids.data_ptr<int64_t>();
  t.index = index.data_ptr<int32_t>();
  t.capacity = slot_ids.numel();
  t.mask = static_cast<uint64_t>(index.numel() - 1);
  return t;
}

// Validates hash_index_update's arguments: what the serial update needs to end (every erased slot
// indexed once, at most `capacity` entries after), in the state's dtypes, on `device`.
inline void check_index_update(const at::Tensor& index, const at::Tensor& slot_ids, const at::Tensor& erase_slots,
                               const at::Tensor& insert_ids, const at::Tensor& insert_slots, const at::Device& device) {
  check_state(index, at::kInt, "index", device);
  check_state(slot_ids, at::kLong, "slot_ids", device);
  check_state(erase_slots, at::kLong, "erase_slots", device);
  check_state(insert_ids, at::kLong, "insert_ids", device);
  check_state(insert_slots, at::kLong, "insert_slots", device);
  const int64_t c = slot_ids.numel(), h = index.numel();
  TORCH_CHECK(h >= 2 * c && (h & (h - 1)) == 0, "hash_index_update: the index must have a power-of-two size >= 2 * ", c,
              " (the slots' count), got ", h);
  TORCH_CHECK(erase_slots.dim() == 1 && insert_ids.dim() == 1 && insert_slots.sizes() == insert_ids.sizes(),
              "hash_index_update: erase_slots, insert_ids and insert_slots must be 1-D, one slot per inserted id");
  for (const at::Tensor& slots : {erase_slots, insert_slots}) {
    TORCH_CHECK(slots.numel() == 0 || (slots.min().item<int64_t>() >= 0 && slots.max().item<int64_t>() < c),
                "hash_index_update: slots must lie in [0, ", c, ")");
  }
  const at::Tensor entries = index.masked_select(index.ge(0)).to(at::kLong);
  TORCH_CHECK(std::get<0>(at::_unique(entries)).numel() == entries.numel(),
              "hash_index_update: the index holds a slot twice");
  TORCH_CHECK(std::get<0>(at::_unique(erase_slots)).numel() == erase_slots.numel() &&
                  at::isin(erase_slots, entries).all().item<bool>(),
              "hash_index_update: erase_slots must be distinct indexed slots");
  TORCH_CHECK(entries.numel() - erase_slots.numel() + insert_ids.numel() <= c,
              "hash_index_update: more entries than the ", c, " slots after the update");
}

// ---- Index updates by independent probe clusters ---------------------------------------------------
//
// A remap erases its victims from the index in victim order, then inserts the admitted ids in assignment
// order; a sweep erases the expired ids in slot order. Inside a probe cluster (a maximal run of occupied
// positions) that order decides the layout: which of two colliding ids takes the earlier position, and
// which entry a backward shift moves into a hole. Across clusters it decides nothing, because no
// operation reads or writes beyond the empty positions around its cluster:
// - An erase probes from the id's home (in the entry's cluster) to its entry, then shifts later entries
//   of that cluster back, up to its next empty position. It writes only positions that were occupied, so
//   no erase fills an empty position: erases in different clusters of the index as it was before them
//   touch disjoint positions.
// - An insert probes from its home to the first empty position and fills it. Every position it passes
//   or fills is occupied once all inserts are done: inserts in different clusters of the index as it is
//   after them touch disjoint positions. Those final clusters are known before inserting: linear probing
//   fills the same set of positions whatever the insertion order (only which id lands where depends on
//   it), and empty_after_inserts finds that set with a scan.
// So each cluster's operations, run serially in their original relative order, write exactly what the
// serial update writes there, whatever runs concurrently in other clusters. The CUDA kernels run one
// thread per cluster (hash_table.cu); the CPU op hash_index_update runs the same plan cluster by
// cluster in reverse order, so tests check the decomposition on the host (hash_index_clusters.cpp).
// What stays serial: the operations of one cluster, in one thread.

// Positions fit int32 up to 2**30 entries (sums below stay under 2**31: a call has < 2**28 ids).
inline at::ScalarType position_dtype(int64_t h) { return h <= (int64_t(1) << 30) ? at::kInt : at::kLong; }

// The cluster of each index position, named by the nearest empty position at or before it, cyclically
// (a cluster that wraps past the end belongs to the last empty position). `empty` has a true somewhere.
inline at::Tensor cluster_of_position(const at::Tensor& empty) {
  const int64_t h = empty.numel();
  const at::Tensor marked = at::where(empty, at::arange(h, empty.options().dtype(position_dtype(h))), -1);
  const at::Tensor last = std::get<0>(at::cummax(marked, 0));
  return at::where(last.lt(0), marked.max(), last);
}

// Which positions of `index` are still empty after inserting ids whose home positions are `homes` (int64),
// provided some position stays empty. Keys waiting to be placed are carried forward: a(p) = homes at p
// minus [p empty], carry_out(p) = max(0, carry_out(p - 1) + a(p)), which with S = cumsum(a) and a carry x
// into position 0 is S(p) - min(-x, min(S(0..p))). Started with x = 0 the carry is exact from the first
// position that stays empty on, hence at the end, where it is the true x of the cyclic index.
inline at::Tensor empty_after_inserts(const at::Tensor& index, const at::Tensor& homes) {
  const int64_t h = index.numel();
  const at::ScalarType dt = position_dtype(h);
  const at::Tensor empty = index.lt(0);
  const at::Tensor sorted_homes = std::get<0>(at::sort(homes.to(dt)));
  const at::Tensor positions = at::arange(h, index.options().dtype(dt));
  // homes at or before each position, and at each position (searchsorted: deterministic, no atomics)
  const at::Tensor up_to = at::searchsorted(sorted_homes, positions, /*out_int32=*/dt == at::kInt, /*right=*/true);
  const at::Tensor arriving = at::diff(up_to, 1, 0, at::zeros({1}, up_to.options()));
  const at::Tensor s = up_to - at::cumsum(empty, 0, dt);
  const at::Tensor low = std::get<0>(at::cummin(s, 0));
  const at::Tensor wrap = (s - low.clamp_max(0)).select(0, h - 1);
  const at::Tensor carry_in = at::roll(s - at::minimum(low, wrap.neg()), {1}, {0});
  return empty.logical_and(carry_in.add(arriving).eq(0));
}

// Operations grouped by the cluster they touch: op order[i] belongs to cluster key[i]; keys ascend, and
// within a run of equal keys (one group) the op numbers ascend, which is the order to run them in.
struct ClusterGroups {
  at::Tensor order;  // int64 op numbers
  at::Tensor key;    // int64 cluster of each, as named by cluster_of_position
  at::Tensor of_op;  // the cluster of each op, in op order (for tests)
  int64_t size() const { return order.numel(); }
};

inline ClusterGroups group_by_cluster(const at::Tensor& cluster, const at::Tensor& homes) {
  ClusterGroups g;
  g.of_op = cluster.index_select(0, homes).to(at::kLong);
  std::tie(g.key, g.order) = at::sort(g.of_op, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return g;
}

// The first op of each group runs the whole group serially; the others return. i: a position in
// ClusterGroups.order. erase_group erases the entries of slots[op] (whose slot_ids still hold their
// ids); insert_group indexes ids[op] -> slots[op].
LS_HOST_DEVICE inline void erase_group(TableView& t, const int64_t* slots, const int64_t* order, const int64_t* key,
                                       int64_t n, int64_t i) {
  if (i > 0 && key[i - 1] == key[i]) return;
  for (int64_t j = i; j < n && key[j] == key[i]; ++j) {
    const int64_t s = slots[order[j]];
    t.erase_entry(t.slot_ids[s], static_cast<int32_t>(s));
  }
}

LS_HOST_DEVICE inline void insert_group(TableView& t, const int64_t* ids, const int64_t* slots, const int64_t* order,
                                        const int64_t* key, int64_t n, int64_t i) {
  if (i > 0 && key[i - 1] == key[i]) return;
  for (int64_t j = i; j < n && key[j] == key[i]; ++j) t.insert(ids[order[j]], static_cast<int32_t>(slots[order[j]]));
}

// Erases the index entries of `erase_slots` (int64, whose slot_ids still hold their ids) in order, then
// indexes insert_ids[j] -> insert_slots[j] in order, with the results of doing so serially, one cluster
// per group. `run` supplies the device's part: homes(ids) -> int64 home positions, erase(groups, slots),
// insert(groups, ids, slots), each running every group given. Returns the cluster of each erase and
// each insert (op order).
template <typename Runner>
std::pair<at::Tensor, at::Tensor> update_index_by_clusters(const at::Tensor& index, const at::Tensor& slot_ids,
                                                           const at::Tensor& erase_slots, const at::Tensor& insert_ids,
                                                           const at::Tensor& insert_slots, Runner& run) {
  at::Tensor erase_cluster = at::empty({0}, erase_slots.options()),
             insert_cluster = at::empty({0}, insert_ids.options());
  if (erase_slots.numel() > 0) {
    const at::Tensor homes = run.homes(slot_ids.index_select(0, erase_slots));
    const ClusterGroups groups = group_by_cluster(cluster_of_position(index.lt(0)), homes);
    run.erase(groups, erase_slots);
    erase_cluster = groups.of_op;
  }
  if (insert_ids.numel() > 0) {
    const at::Tensor homes = run.homes(insert_ids);
    const ClusterGroups groups = group_by_cluster(cluster_of_position(empty_after_inserts(index, homes)), homes);
    run.insert(groups, insert_ids, insert_slots);
    insert_cluster = groups.of_op;
  }
  return {erase_cluster, insert_cluster};
}

}  // namespace lightning_sparse_hash
