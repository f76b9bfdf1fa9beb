// What hash_table.cpp (CPU) and hash_table.cu (CUDA) share: the hash functions, the layout of the state
// (lightning_sparse/dynamic/state.py, hashing.py) and its validation. Both files must agree on these to
// the bit, so they live here once.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#ifdef __CUDACC__
#define LS_HOST_DEVICE __host__ __device__
#else
#define LS_HOST_DEVICE
#endif

namespace lightning_sparse_hash {

constexpr uint64_t kMixM1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMixM2 = 0x94D049BB133111EBULL;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kSaltIndex = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kSaltSketch = 0xA0761D6478BD642FULL;

// positions in meta / counters (lightning_sparse/dynamic/state.py: Meta, Counter)
constexpr int kFreeCount = 0, kSketchAdds = 1, kLastSweepStep = 2;
constexpr int kAdmitted = 0, kEvicted = 1, kExpired = 2, kRejectedFull = 3, kRejectedAdmission = 4,
              kLookups = 5, kHits = 6, kSketchHalvings = 7;
// eviction policies (state.py: POLICY_CODE)
constexpr int kLFU = 0, kLRU = 1, kFeatureScore = 2;

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
  return static_cast<int64_t>(mix64(mix64(static_cast<uint64_t>(id) + static_cast<uint64_t>(coin_key)) ^ step_salt) >> 11);
}

// Raw pointers into the state tensors (all on one device) and their sizes.
struct TableView {
  int64_t* slot_ids;
  int64_t* count;
  int64_t* last_step;
  double* last_time;
  double* score;
  int32_t* free_list;
  int32_t* index;
  int32_t* sketch;
  int64_t* meta;
  int64_t* counters;
  int64_t capacity;
  uint64_t mask;
  int64_t depth;
  int64_t width;

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
  check_state(slot_count, at::kLong, "slot_count", device);
  check_state(slot_last_step, at::kLong, "slot_last_step", device);
  check_state(slot_last_time, at::kDouble, "slot_last_time", device);
  check_state(slot_score, at::kDouble, "slot_score", device);
  check_state(free_list, at::kInt, "free_list", device);
  check_state(index, at::kInt, "index", device);
  check_state(sketch, at::kInt, "sketch", device);
  check_state(meta, at::kLong, "meta", device);
  check_state(counters, at::kLong, "counters", device);
  const int64_t c = slot_ids.numel();
  TORCH_CHECK(slot_count.numel() == c && slot_last_step.numel() == c && slot_last_time.numel() == c &&
                  slot_score.numel() == c && free_list.numel() == c,
              "hash table slot tensors must all have capacity ", c, " entries");
  const int64_t h = index.numel();
  TORCH_CHECK(h >= 2 * c && (h & (h - 1)) == 0, "hash table index must have a power-of-two size >= 2 * capacity");
  TORCH_CHECK(sketch.dim() == 2, "hash table sketch must be 2-D (depth, width)");
  const int64_t w = sketch.size(1);
  TORCH_CHECK(sketch.size(0) == 0 || (w > 0 && (w & (w - 1)) == 0), "sketch width must be a power of two");
  TORCH_CHECK(meta.numel() >= 3 && counters.numel() >= 8, "hash table meta/counters too short");
  TableView t;
  t.slot_ids = slot_ids.data_ptr<int64_t>();
  t.count = slot_count.data_ptr<int64_t>();
  t.last_step = slot_last_step.data_ptr<int64_t>();
  t.last_time = slot_last_time.data_ptr<double>();
  t.score = slot_score.data_ptr<double>();
  t.free_list = free_list.data_ptr<int32_t>();
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

}  // namespace lightning_sparse_hash
