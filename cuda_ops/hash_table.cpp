// Hash-table kernels of dynamic embedding tables (CPU, multi-threaded with at::parallel_for).
//
// Ops (namespace lightning_sparse):
//   hash_remap  : batch remap of raw int64 ids to slots with admission (count-min sketch + coin),
//                 counters, last-seen stamps, decayed scores, eviction when full.
//   hash_lookup : read-only remap (evaluation).
//   hash_expire : expiry sweep by TTL in steps and/or seconds.
//
// The policy and its tie-breaking are defined in lightning_sparse/dynamic/reference.py, whose pure
// PyTorch twins give bit-identical state. Parallel phases only do order-independent work (lookups,
// integer atomic adds, per-slot updates of distinct slots, per-thread candidate selection merged under
// a total order); everything whose order matters (index inserts/erases, free-stack pops, pairing of
// candidates with victims) runs sequentially in the documented order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr uint64_t kMixM1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMixM2 = 0x94D049BB133111EBULL;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kSaltIndex = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kSaltSketch = 0xA0761D6478BD642FULL;

// positions in meta / counters (lightning_sparse/dynamic/state.py: Meta, Counter)
constexpr int kFreeCount = 0, kSketchAdds = 1, kLastSweepStep = 2;
constexpr int kAdmitted = 0, kEvicted = 1, kExpired = 2, kRejectedFull = 3, kRejectedAdmission = 4,
              kLookups = 5, kHits = 6, kSketchHalvings = 7;
constexpr int kLFU = 0, kLRU = 1, kFeatureScore = 2;
// Work per thread below which a loop runs inline: waking pool threads costs far more than a small
// batch's lookups (milliseconds on some VMs), so only large batches and tables fan out.
constexpr int64_t kGrain = 1 << 15;
constexpr int64_t kSlotGrain = 1 << 16;

inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * kMixM1;
  x = (x ^ (x >> 27)) * kMixM2;
  return x ^ (x >> 31);
}

struct Table {
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

  uint64_t home(int64_t id) const { return mix64(static_cast<uint64_t>(id) + kSaltIndex) & mask; }

  int64_t find(int64_t id) const { return find_from(id, home(id)); }

  int64_t find_from(int64_t id, uint64_t pos) const {
    while (true) {
      const int32_t e = index[pos];
      if (e < 0) return -1;
      if (slot_ids[e] == id) return e;
      pos = (pos + 1) & mask;
    }
  }

  void insert(int64_t id, int32_t slot) {
    uint64_t pos = home(id);
    while (index[pos] >= 0) pos = (pos + 1) & mask;
    index[pos] = slot;
  }

  // Linear-probing delete with backward shift; slot_ids of all indexed slots must still be valid.
  void erase(int64_t id) {
    uint64_t pos = home(id);
    while (slot_ids[index[pos]] != id) pos = (pos + 1) & mask;
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

  void clear(int64_t s) {
    slot_ids[s] = 0;
    count[s] = 0;
    last_step[s] = 0;
    last_time[s] = 0.0;
    score[s] = 0.0;
  }
};

// Looks up ids[begin, end) in a software pipeline: the index entry of id i + 2D is prefetched, the
// slot that the entry of id i + D points to is prefetched (and `touch`ed for the caller's own per-slot
// data), and id i is probed, so the two dependent cache misses per id overlap across 2D ids in flight.
template <typename Touch, typename Emit>
inline void find_pipelined(const Table& t, const int64_t* id, int64_t begin, int64_t end, Touch&& touch, Emit&& emit) {
  constexpr int64_t kD = 16, kRing = 64;  // kRing >= 2 * kD, a power of two
  uint64_t home[kRing];
  const int64_t pre_end = std::min(end, begin + 2 * kD);
  for (int64_t i = begin; i < pre_end; ++i) {
    home[i & (kRing - 1)] = t.home(id[i]);
    __builtin_prefetch(&t.index[home[i & (kRing - 1)]]);
  }
  for (int64_t i = begin; i < std::min(end, begin + kD); ++i) {
    const int32_t e = t.index[home[i & (kRing - 1)]];
    if (e >= 0) {
      __builtin_prefetch(&t.slot_ids[e]);
      touch(e);
    }
  }
  for (int64_t i = begin; i < end; ++i) {
    const int64_t far = i + 2 * kD, near = i + kD;
    if (far < end) {
      home[far & (kRing - 1)] = t.home(id[far]);
      __builtin_prefetch(&t.index[home[far & (kRing - 1)]]);
    }
    if (near < end) {
      const int32_t e = t.index[home[near & (kRing - 1)]];
      if (e >= 0) {
        __builtin_prefetch(&t.slot_ids[e]);
        touch(e);
      }
    }
    emit(i, t.find_from(id[i], home[i & (kRing - 1)]));
  }
}

template <typename Emit>
void find_block(const Table& t, const int64_t* id, int64_t begin, int64_t end, Emit&& emit) {
  find_pipelined(t, id, begin, end, [](int64_t) {}, emit);
}

// decay ** dt as the product of powers[b] (= decay ** 2**b) at the set bits of dt, ascending.
inline double decay_pow(int64_t dt, const double* powers) {
  double r = 1.0;
  for (int b = 0; b < 63 && (dt >> b) > 0; ++b) {
    if ((dt >> b) & 1) r = r * powers[b];
  }
  return r;
}

// decay_pow with the common small gaps tabulated (same values: the table is filled by decay_pow).
struct Decay {
  static constexpr int64_t kSmall = 256;
  double small[kSmall];
  const double* powers;
  explicit Decay(const double* p) : powers(p) {
    for (int64_t dt = 0; dt < kSmall; ++dt) small[dt] = decay_pow(dt, p);
  }
  double operator()(int64_t dt) const { return dt < kSmall ? small[dt] : decay_pow(dt, powers); }
};

void check_state(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "hash table state '", name, "' must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "hash table state '", name, "' must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "hash table state '", name, "' must be contiguous");
}

Table make_table(const at::Tensor& slot_ids, const at::Tensor& slot_count, const at::Tensor& slot_last_step,
                 const at::Tensor& slot_last_time, const at::Tensor& slot_score, const at::Tensor& free_list,
                 const at::Tensor& index, const at::Tensor& sketch, const at::Tensor& meta,
                 const at::Tensor& counters) {
  check_state(slot_ids, at::kLong, "slot_ids");
  check_state(slot_count, at::kLong, "slot_count");
  check_state(slot_last_step, at::kLong, "slot_last_step");
  check_state(slot_last_time, at::kDouble, "slot_last_time");
  check_state(slot_score, at::kDouble, "slot_score");
  check_state(free_list, at::kInt, "free_list");
  check_state(index, at::kInt, "index");
  check_state(sketch, at::kInt, "sketch");
  check_state(meta, at::kLong, "meta");
  check_state(counters, at::kLong, "counters");
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
  Table t;
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

// Per-slot hit counts of the current call. Kept all-zero between calls (only touched entries are reset),
// so a call costs O(batch), not O(capacity). One per calling thread; sized to the largest table seen.
std::vector<int32_t>& hit_scratch(int64_t capacity) {
  static thread_local std::vector<int32_t> scratch;
  if (static_cast<int64_t>(scratch.size()) < capacity) scratch.resize(capacity, 0);
  return scratch;
}

// One bit per slot, set for the slots hit in the current call (all-zero between calls, like hit_scratch):
// 1/32 of the counts' size, so the hit updates walk the slots in ascending order and the victim scan
// tests "hit in this call" from cache.
std::vector<uint64_t>& hit_bits_scratch(int64_t capacity) {
  static thread_local std::vector<uint64_t> bits;
  const int64_t words = (capacity + 63) / 64;
  if (static_cast<int64_t>(bits.size()) < words) bits.resize(words, 0);
  return bits;
}

struct Candidate {
  int64_t id;
  int64_t count;  // batch occurrences, then the sketch estimate
  double prio;
  int64_t src;  // position in the call's distinct missing ids
};

using Victim = std::pair<double, int64_t>;  // (priority, slot): total order, lowest evicted first

// Stable LSD radix sort of v by the uint64 key(x), ascending, one byte per pass; passes whose byte is
// the same for every element are skipped (all histograms come from one sweep).
template <typename T, typename Key>
void radix_sort(std::vector<T>& v, Key key) {
  const size_t n = v.size();
  if (n < 2) return;
  std::vector<uint32_t> hist(8 * 256, 0);
  for (const T& x : v) {
    const uint64_t k = key(x);
    for (int b = 0; b < 8; ++b) ++hist[b * 256 + ((k >> (8 * b)) & 255)];
  }
  std::vector<T> tmp(n);
  for (int b = 0; b < 8; ++b) {
    uint32_t* h = &hist[b * 256];
    const uint64_t first = (key(v[0]) >> (8 * b)) & 255;
    if (h[first] == n) continue;
    uint32_t sum = 0;
    for (int d = 0; d < 256; ++d) {
      const uint32_t c = h[d];
      h[d] = sum;
      sum += c;
    }
    for (const T& x : v) tmp[h[(key(x) >> (8 * b)) & 255]++] = x;
    v.swap(tmp);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hash_remap_cpu(
    const at::Tensor& ids, const at::Tensor& slot_ids, const at::Tensor& slot_count, const at::Tensor& slot_last_step,
    const at::Tensor& slot_last_time, const at::Tensor& slot_score, const at::Tensor& free_list,
    const at::Tensor& index, const at::Tensor& sketch, const at::Tensor& meta, const at::Tensor& counters,
    const at::Tensor& decay_powers, int64_t step, double now, int64_t policy, int64_t min_count,
    int64_t coin_threshold, int64_t coin_key, int64_t halve_every, int64_t slot_offset) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong, "hash_remap: ids must be a CPU int64 tensor");
  TORCH_CHECK(policy >= kLFU && policy <= kFeatureScore, "hash_remap: policy must be 0 (lfu), 1 (lru) or 2 (feature_score)");
  // bounds that keep int32 sketch counters below 2**30 (lightning_sparse/dynamic/config.py)
  TORCH_CHECK(halve_every >= 1 && halve_every <= (int64_t(1) << 28), "hash_remap: halve_every must be in [1, 2**28]");
  TORCH_CHECK(ids.numel() < (int64_t(1) << 28), "hash_remap: a call takes fewer than 2**28 ids, got ", ids.numel());
  check_state(decay_powers, at::kDouble, "decay_powers");
  TORCH_CHECK(decay_powers.numel() >= 63, "hash_remap: decay_powers needs 63 entries");
  Table t = make_table(slot_ids, slot_count, slot_last_step, slot_last_time, slot_score, free_list, index, sketch,
                       meta, counters);
  const Decay decay(decay_powers.data_ptr<double>());
  const at::Tensor ids_c = ids.contiguous();
  const int64_t n = ids_c.numel();
  const int64_t* id = ids_c.data_ptr<int64_t>();
  at::Tensor out = at::empty(ids_c.sizes(), ids_c.options());
  int64_t* slot = out.data_ptr<int64_t>();
  std::vector<int32_t>& scratch = hit_scratch(t.capacity);
  int32_t* hits_per_slot = scratch.data();
  uint64_t* hit_bits = hit_bits_scratch(t.capacity).data();
  const int64_t n_words = (t.capacity + 63) / 64;

  // A. parallel lookup; hit counts per slot (atomic adds when threads share them) and hit bits.
  const int nthreads = at::get_num_threads();
  std::vector<int64_t> misses_by(nthreads, 0);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t misses = 0;
    const bool alone = begin == 0 && end == n;  // the only chunk: no other thread touches the counts
    find_pipelined(t, id, begin, end, [&](int64_t e) { __builtin_prefetch(&hits_per_slot[e], 1); },
                   [&](int64_t i, int64_t s) {
      slot[i] = s;
      if (s < 0) {
        ++misses;
      } else if (alone) {  // branch-free: whether a slot is hit for the first time is unpredictable
        ++hits_per_slot[s];
        hit_bits[s >> 6] |= uint64_t(1) << (s & 63);
      } else if (__atomic_fetch_add(&hits_per_slot[s], 1, __ATOMIC_RELAXED) == 0) {
        __atomic_fetch_or(&hit_bits[s >> 6], uint64_t(1) << (s & 63), __ATOMIC_RELAXED);
      }
    });
    misses_by[at::get_thread_num()] += misses;
  });
  int64_t n_miss = 0;
  for (int k = 0; k < nthreads; ++k) n_miss += misses_by[k];

  // B. hits: one update per distinct slot, in ascending slot order (race-free and order-free); the
  // counts go back to zero as they are used, the hit bits stay for the victim scan.
  at::parallel_for(0, n_words, kSlotGrain / 64, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (uint64_t bits = hit_bits[w]; bits != 0; bits &= bits - 1) {
        const int64_t s = w * 64 + __builtin_ctzll(bits);
        const int64_t c = hits_per_slot[s];
        hits_per_slot[s] = 0;
        const int64_t dt = std::max<int64_t>(step - t.last_step[s], 0);
        volatile double decayed = t.score[s] * decay(dt);  // no fused multiply-add
        t.score[s] = decayed + static_cast<double>(c);
        t.count[s] += c;
        t.last_step[s] = step;
        t.last_time[s] = now;
      }
    }
  });
  t.counters[kLookups] += n;
  t.counters[kHits] += n - n_miss;

  // C. distinct missing ids with their batch counts (sequential small map, first-seen order).
  std::vector<Candidate> cands;
  std::vector<int32_t> miss_pos, miss_cand;  // each missing occurrence: its position, its distinct id
  miss_pos.reserve(n_miss);
  miss_cand.reserve(n_miss);
  if (n_miss > 0) {
    int64_t msize = 2;
    while (msize < 2 * n_miss) msize <<= 1;
    const uint64_t mmask = static_cast<uint64_t>(msize - 1);
    std::vector<int32_t> pos_of(msize, -1);
    for (int64_t i = 0; i < n; ++i) {
      if (slot[i] >= 0) continue;
      miss_pos.push_back(static_cast<int32_t>(i));
      uint64_t p = mix64(static_cast<uint64_t>(id[i])) & mmask;
      while (true) {
        const int32_t e = pos_of[p];
        if (e < 0) {
          pos_of[p] = static_cast<int32_t>(cands.size());
          miss_cand.push_back(pos_of[p]);
          cands.push_back({id[i], 1, 0.0, static_cast<int64_t>(cands.size())});
          break;
        }
        if (cands[e].id == id[i]) {
          ++cands[e].count;
          miss_cand.push_back(e);
          break;
        }
        p = (p + 1) & mmask;
      }
    }
  }
  const int64_t n_cand = static_cast<int64_t>(cands.size());

  // D. sketch: add batch counts (integer atomics), then estimate, coin and eligibility per distinct id.
  const int64_t depth = t.depth, width = t.width;
  // cell[j * depth + r]: the counter of distinct id j in row r, hashed once for both passes
  std::vector<int64_t> cell(n_cand * depth);
  constexpr int64_t kAhead = 16;  // the counters are scattered: fetch a few ids ahead
  at::parallel_for(0, n_cand, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t r = 0; r < depth; ++r) {
        const uint64_t col = mix64(static_cast<uint64_t>(cands[j].id) + kSaltSketch * static_cast<uint64_t>(r + 1)) &
                             static_cast<uint64_t>(width - 1);
        cell[j * depth + r] = r * width + static_cast<int64_t>(col);
      }
    }
  });
  at::parallel_for(0, n_cand, kGrain, [&](int64_t begin, int64_t end) {
    const bool alone = begin == 0 && end == n_cand;
    for (int64_t j = begin; j < end; ++j) {
      if (j + kAhead < end)
        for (int64_t r = 0; r < depth; ++r) __builtin_prefetch(&t.sketch[cell[(j + kAhead) * depth + r]], 1);
      for (int64_t r = 0; r < depth; ++r) {
        int32_t* counter = &t.sketch[cell[j * depth + r]];
        const int32_t add = static_cast<int32_t>(cands[j].count);
        if (alone) {
          *counter += add;
        } else {
          __atomic_fetch_add(counter, add, __ATOMIC_RELAXED);
        }
      }
    }
  });
  std::vector<uint8_t> eligible(n_cand, 0);
  const uint64_t step_salt = static_cast<uint64_t>(step) * kGolden;
  at::parallel_for(0, n_cand, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (j + kAhead < end)
        for (int64_t r = 0; r < depth; ++r) __builtin_prefetch(&t.sketch[cell[(j + kAhead) * depth + r]]);
      int64_t est = INT64_MAX;
      for (int64_t r = 0; r < depth; ++r) est = std::min<int64_t>(est, t.sketch[cell[j * depth + r]]);
      if (depth == 0) est = 0;
      bool ok = est >= min_count;
      if (ok && coin_threshold < (int64_t(1) << 53)) {
        const uint64_t coin = mix64(mix64(static_cast<uint64_t>(cands[j].id) + static_cast<uint64_t>(coin_key)) ^ step_salt) >> 11;
        ok = static_cast<int64_t>(coin) < coin_threshold;
      }
      cands[j].count = est;
      cands[j].prio = policy == kLRU ? static_cast<double>(step) : static_cast<double>(est);
      eligible[j] = ok;
    }
  });
  t.meta[kSketchAdds] += n_miss;
  std::vector<Candidate> elig;
  elig.reserve(n_cand);
  for (int64_t j = 0; j < n_cand; ++j)
    if (eligible[j]) elig.push_back(cands[j]);
  t.counters[kRejectedAdmission] += n_cand - static_cast<int64_t>(elig.size());
  if (t.meta[kSketchAdds] >= halve_every) {
    const int64_t total = depth * width;
    at::parallel_for(0, total, kSlotGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) t.sketch[k] >>= 1;
    });
    t.meta[kSketchAdds] = 0;
    t.counters[kSketchHalvings] += 1;
  }

  // E. order eligible ids (priority desc, id asc) and hand out free slots (stack pops).
  // The priority is the integer estimate (LFU, FEATURE_SCORE) or the same step for all (LRU): a stable
  // radix sort by id ascending, then by estimate descending, gives exactly (prio desc, id asc).
  radix_sort(elig, [](const Candidate& c) { return static_cast<uint64_t>(c.id) ^ (uint64_t(1) << 63); });
  if (policy != kLRU && !elig.empty()) {
    int64_t top = elig[0].count;
    for (const Candidate& c : elig) top = std::max(top, c.count);
    radix_sort(elig, [top](const Candidate& c) { return static_cast<uint64_t>(top - c.count); });
  }
  const int64_t n_elig = static_cast<int64_t>(elig.size());
  const int64_t free = t.meta[kFreeCount];
  const int64_t n_free = std::min(free, n_elig);
  std::vector<int64_t> assigned;
  assigned.reserve(n_elig);
  for (int64_t j = 0; j < n_free; ++j) assigned.push_back(t.free_list[free - 1 - j]);
  t.meta[kFreeCount] = free - n_free;

  // F. compete for evictable slots: the `rest` lowest (priority, slot), paired in order. Only slots below
  // the best remaining candidate's priority can ever lose theirs, so only those are collected: the
  // lowest of them are the lowest overall, and in a steady state there are few or none.
  const int64_t rest = n_elig - n_free;
  if (rest > 0) {
    const double best = elig[n_free].prio;
    auto priority = [&](int64_t s) -> double {
      if (policy == kLFU) return static_cast<double>(t.count[s]);
      if (policy == kLRU) return static_cast<double>(t.last_step[s]);
      return t.score[s] * decay(std::max<int64_t>(step - t.last_step[s], 0));
    };
    auto evictable = [&](int64_t s) { return (t.count[s] > 0) & !((hit_bits[s >> 6] >> (s & 63)) & 1); };
    // Collects the evictable slots with priority < best and <= cut, per thread.
    auto collect = [&](double cut) {
      std::vector<std::vector<Victim>> parts(nthreads);
      // 64 slots (one word of hit bits) at a time: the tests go branch-free into a bit mask, and only
      // the slots that pass are appended.
      at::parallel_for(0, n_words, kSlotGrain / 64, [&](int64_t begin, int64_t end) {
        auto& part = parts[at::get_thread_num()];
        double prio[64];
        for (int64_t w = begin; w < end; ++w) {
          const int64_t s0 = w * 64, m = std::min<int64_t>(64, t.capacity - s0);
          uint64_t pass = 0;
          for (int64_t j = 0; j < m; ++j) {
            const int64_t s = s0 + j;
            prio[j] = priority(s);
            pass |= static_cast<uint64_t>((t.count[s] > 0) & (prio[j] < best) & (prio[j] <= cut)) << j;
          }
          for (pass &= ~hit_bits[w]; pass != 0; pass &= pass - 1) {
            const int j = __builtin_ctzll(pass);
            part.push_back(Victim{prio[j], s0 + j});
          }
        }
      });
      return parts;
    };
    // When not too many victims are needed, an evenly spaced sample gives a cut below which about twice as many
    // lie; if at least `rest` slots pass it, the `rest` lowest overall are among them (ties at the cut
    // included), else fall back to every slot below `best`. Either way the same victims, just cheaper.
    std::vector<std::vector<Victim>> parts;
    if (rest * 3 < t.capacity) {
      const int64_t stride = std::max<int64_t>(1, t.capacity / 8192);
      std::vector<double> sample;
      for (int64_t s = 0; s < t.capacity; s += stride) {
        if (!evictable(s)) continue;
        const double prio = priority(s);
        if (prio < best) sample.push_back(prio);
      }
      const int64_t q = 2 * rest / stride + 16;
      if (q < static_cast<int64_t>(sample.size())) {
        std::nth_element(sample.begin(), sample.begin() + q, sample.end());
        parts = collect(sample[q]);
        int64_t got = 0;
        for (auto& part : parts) got += static_cast<int64_t>(part.size());
        if (got < rest) parts.clear();
      }
    }
    if (parts.empty()) parts = collect(std::numeric_limits<double>::infinity());
    std::vector<Victim> all;
    if (nthreads == 1) {
      all.swap(parts[0]);
    } else {
      for (auto& part : parts) all.insert(all.end(), part.begin(), part.end());
    }
    const int64_t k = std::min<int64_t>(rest, static_cast<int64_t>(all.size()));  // victims that may lose
    // LFU / LRU priorities are non-negative integers below `best`: (priority, slot) packs into one uint64
    // with the same order, which selects and sorts much faster than pairs.
    int slot_bits = 1;
    while ((int64_t(1) << slot_bits) < t.capacity) ++slot_bits;
    bool packed = policy != kFeatureScore && best >= 0.0 && best < std::ldexp(1.0, 62 - slot_bits);
    std::vector<uint64_t> keys;
    if (packed) {
      keys.resize(all.size());
      for (size_t j = 0; j < all.size() && packed; ++j) {
        const double prio = all[j].first;
        packed = prio >= 0.0 && prio == std::floor(prio);
        keys[j] = (static_cast<uint64_t>(prio) << slot_bits) | static_cast<uint64_t>(all[j].second);
      }
    }
    if (packed) {
      if (k < static_cast<int64_t>(keys.size())) std::nth_element(keys.begin(), keys.begin() + k, keys.end());
      keys.resize(k);
      radix_sort(keys, [](uint64_t key) { return key; });
      const uint64_t slot_mask = (uint64_t(1) << slot_bits) - 1;
      for (int64_t j = 0; j < k; ++j)
        all[j] = Victim{static_cast<double>(keys[j] >> slot_bits), static_cast<int64_t>(keys[j] & slot_mask)};
    } else {
      if (k < static_cast<int64_t>(all.size())) std::nth_element(all.begin(), all.begin() + k, all.end());
      // (priority, slot) is a total order: stable radix sorts by slot, then by the priority's bits mapped
      // to an order-preserving uint64 (-0.0 taken as +0.0, as the double comparison does), give the same.
      all.resize(k);
      radix_sort(all, [](const Victim& v) { return static_cast<uint64_t>(v.second); });
      radix_sort(all, [](const Victim& v) {
        uint64_t bits;
        const double prio = v.first + 0.0;
        std::memcpy(&bits, &prio, sizeof bits);
        return (bits >> 63) ? ~bits : bits | (uint64_t(1) << 63);
      });
    }
    int64_t wins = 0;
    while (wins < k && elig[n_free + wins].prio > all[wins].first) ++wins;
    for (int64_t j = 0; j < wins; ++j) {  // the victims are scattered: fetch their ids, then index, ahead
      if (j + 16 < wins) __builtin_prefetch(&t.slot_ids[all[j + 16].second]);
      if (j + 8 < wins) __builtin_prefetch(&t.index[t.home(t.slot_ids[all[j + 8].second])]);
      t.erase(t.slot_ids[all[j].second]);
    }
    for (int64_t j = 0; j < wins; ++j) {
      t.clear(all[j].second);
      assigned.push_back(all[j].second);
    }
    t.counters[kEvicted] += wins;
    t.counters[kRejectedFull] += rest - wins;
  }
  std::fill(hit_bits, hit_bits + n_words, uint64_t(0));  // restore the all-zero scratch

  // G. write the admitted ids, index them in assignment order, then resolve the misses.
  const int64_t n_assigned = static_cast<int64_t>(assigned.size());
  for (int64_t j = 0; j < n_assigned; ++j) {
    if (j + 8 < n_assigned) {
      const int64_t ahead = assigned[j + 8];
      __builtin_prefetch(&t.index[t.home(elig[j + 8].id)]);
      __builtin_prefetch(&t.slot_ids[ahead], 1);
      __builtin_prefetch(&t.count[ahead], 1);
      __builtin_prefetch(&t.last_step[ahead], 1);
      __builtin_prefetch(&t.last_time[ahead], 1);
      __builtin_prefetch(&t.score[ahead], 1);
    }
    const int64_t s = assigned[j];
    t.slot_ids[s] = elig[j].id;
    t.count[s] = elig[j].count;
    t.last_step[s] = step;
    t.last_time[s] = now;
    t.score[s] = static_cast<double>(elig[j].count);
    t.insert(elig[j].id, static_cast<int32_t>(s));
  }
  t.counters[kAdmitted] += n_assigned;
  // A missing id has a slot now iff it was just assigned one (erases only remove other ids), so the
  // misses resolve through their distinct id instead of probing the index again.
  if (slot_offset != 0) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        if (slot[i] >= 0) slot[i] += slot_offset;
    });
  }
  if (n_assigned > 0) {
    std::vector<int64_t> slot_of_cand(n_cand, -1);
    for (int64_t j = 0; j < n_assigned; ++j) slot_of_cand[elig[j].src] = assigned[j] + slot_offset;
    const int64_t n_miss_occ = static_cast<int64_t>(miss_pos.size());
    for (int64_t k = 0; k < n_miss_occ; ++k) slot[miss_pos[k]] = slot_of_cand[miss_cand[k]];
  }
  at::Tensor assigned_t = at::empty({n_assigned}, ids.options());
  int64_t* a = assigned_t.data_ptr<int64_t>();
  for (int64_t j = 0; j < n_assigned; ++j) a[j] = assigned[j] + slot_offset;
  return {out.view(ids.sizes()), assigned_t};
}

at::Tensor hash_lookup_cpu(const at::Tensor& ids, const at::Tensor& slot_ids, const at::Tensor& index,
                           int64_t slot_offset) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong, "hash_lookup: ids must be a CPU int64 tensor");
  check_state(slot_ids, at::kLong, "slot_ids");
  check_state(index, at::kInt, "index");
  const int64_t h = index.numel();
  TORCH_CHECK(h >= 2 * slot_ids.numel() && (h & (h - 1)) == 0, "hash_lookup: bad index size");
  Table t{};
  t.slot_ids = slot_ids.data_ptr<int64_t>();
  t.index = index.data_ptr<int32_t>();
  t.mask = static_cast<uint64_t>(h - 1);
  const at::Tensor ids_c = ids.contiguous();
  const int64_t* id = ids_c.data_ptr<int64_t>();
  at::Tensor out = at::empty(ids_c.sizes(), ids_c.options());
  int64_t* slot = out.data_ptr<int64_t>();
  at::parallel_for(0, ids_c.numel(), kGrain, [&](int64_t begin, int64_t end) {
    find_block(t, id, begin, end, [&](int64_t i, int64_t s) { slot[i] = s >= 0 ? s + slot_offset : -1; });
  });
  return out.view(ids.sizes());
}

at::Tensor hash_expire_cpu(const at::Tensor& slot_ids, const at::Tensor& slot_count, const at::Tensor& slot_last_step,
                           const at::Tensor& slot_last_time, const at::Tensor& slot_score, const at::Tensor& free_list,
                           const at::Tensor& index, const at::Tensor& sketch, const at::Tensor& meta,
                           const at::Tensor& counters, int64_t step, double now, int64_t ttl_steps,
                           double ttl_seconds) {
  Table t = make_table(slot_ids, slot_count, slot_last_step, slot_last_time, slot_score, free_list, index, sketch,
                       meta, counters);
  std::vector<uint8_t> quiet(t.capacity, 0);
  at::parallel_for(0, t.capacity, kSlotGrain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (t.count[s] <= 0) continue;
      const bool by_steps = ttl_steps > 0 && step - t.last_step[s] > ttl_steps;
      const bool by_time = ttl_seconds > 0 && now - t.last_time[s] > ttl_seconds;
      quiet[s] = by_steps || by_time;
    }
  });
  std::vector<int64_t> expired;
  for (int64_t s = 0; s < t.capacity; ++s)
    if (quiet[s]) expired.push_back(s);
  for (int64_t s : expired) t.erase(t.slot_ids[s]);
  for (int64_t s : expired) t.clear(s);
  int64_t free = t.meta[kFreeCount];
  for (auto it = expired.rbegin(); it != expired.rend(); ++it) t.free_list[free++] = static_cast<int32_t>(*it);
  t.meta[kFreeCount] = free;
  t.meta[kLastSweepStep] = step;
  t.counters[kExpired] += static_cast<int64_t>(expired.size());
  at::Tensor result = at::empty({static_cast<int64_t>(expired.size())}, slot_ids.options());
  std::copy(expired.begin(), expired.end(), result.data_ptr<int64_t>());
  return result;
}

TORCH_LIBRARY_FRAGMENT(lightning_sparse, m) {
  m.def(
      "hash_remap(Tensor ids, Tensor(a!) slot_ids, Tensor(b!) slot_count, Tensor(c!) slot_last_step, "
      "Tensor(d!) slot_last_time, Tensor(e!) slot_score, Tensor(f!) free_list, Tensor(g!) index, Tensor(h!) sketch, "
      "Tensor(i!) meta, Tensor(j!) counters, Tensor decay_powers, int step, float now, int policy, int min_count, "
      "int coin_threshold, int coin_key, int halve_every, int slot_offset) -> (Tensor, Tensor)");
  m.def("hash_lookup(Tensor ids, Tensor slot_ids, Tensor index, int slot_offset) -> Tensor");
  m.def(
      "hash_expire(Tensor(a!) slot_ids, Tensor(b!) slot_count, Tensor(c!) slot_last_step, Tensor(d!) slot_last_time, "
      "Tensor(e!) slot_score, Tensor(f!) free_list, Tensor(g!) index, Tensor(h!) sketch, Tensor(i!) meta, "
      "Tensor(j!) counters, int step, float now, int ttl_steps, float ttl_seconds) -> Tensor");
}

TORCH_LIBRARY_IMPL(lightning_sparse, CPU, m) {
  m.impl("hash_remap", hash_remap_cpu);
  m.impl("hash_lookup", hash_lookup_cpu);
  m.impl("hash_expire", hash_expire_cpu);
}
