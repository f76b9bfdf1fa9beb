// Hash-table kernels of dynamic embedding tables (CPU, multi-threaded with at::parallel_for).
//
// Ops (namespace lightning_sparse):
//   hash_remap  : batch remap of raw int64 ids to slots with admission (count-min sketch + coin),
//                 counters, last-seen stamps, decayed scores, eviction when full; ids left without a
//                 slot get their fallback row (or -1 when there are no fallback rows).
//   hash_lookup : read-only remap (evaluation), fallback rows alike.
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

#include "hash_table_common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

using namespace lightning_sparse_hash;

// Work per thread below which a loop runs inline: waking pool threads costs far more than a small
// batch's lookups (milliseconds on some VMs), so only large batches and tables fan out.
constexpr int64_t kGrain = 1 << 15;
constexpr int64_t kSlotGrain = 1 << 16;

// The state with the CPU's slot reset.
struct Table : TableView {
  void clear(int64_t s) {
    slot_ids[s] = 0;
    count[s] = 0;
    last_step[s] = 0;
    if (last_time) last_time[s] = 0.0;
    if (score) score[s] = 0.0f;
  }
};

// Fetches the slot ids that a probe from `pos` compares: the first entry's (the hit when the id is
// known, `touch`ed for the caller) and the next two's, which a missing id usually compares as well.
template <typename Touch>
inline void prefetch_probe(const Table& t, uint64_t pos, Touch&& touch) {
  const int32_t e = t.index[pos];
  if (e < 0) return;
  __builtin_prefetch(&t.slot_ids[e]);
  touch(e);
  for (int k = 0; k < 2; ++k) {
    pos = (pos + 1) & t.mask;
    const int32_t f = t.index[pos];
    if (f < 0) return;
    __builtin_prefetch(&t.slot_ids[f]);
  }
}

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
  for (int64_t i = begin; i < std::min(end, begin + kD); ++i) prefetch_probe(t, home[i & (kRing - 1)], touch);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t far = i + 2 * kD, near = i + kD;
    if (far < end) {
      home[far & (kRing - 1)] = t.home(id[far]);
      __builtin_prefetch(&t.index[home[far & (kRing - 1)]]);
    }
    if (near < end) prefetch_probe(t, home[near & (kRing - 1)], touch);
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

Table make_table(const at::Tensor& slot_ids, const at::Tensor& slot_count, const at::Tensor& slot_last_step,
                 const at::Tensor& slot_last_time, const at::Tensor& slot_score, const at::Tensor& free_list,
                 const at::Tensor& index, const at::Tensor& sketch, const at::Tensor& meta,
                 const at::Tensor& counters) {
  TORCH_CHECK(slot_ids.device().is_cpu(), "hash table state must be CPU tensors here, got ", slot_ids.device());
  Table t;
  static_cast<TableView&>(t) = view_state(slot_ids, slot_count, slot_last_step, slot_last_time, slot_score, free_list,
                                          index, sketch, meta, counters);
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

// Scratch memory reused across calls by the calling thread: a fresh multi-megabyte vector per call costs
// page faults and zeroing that can exceed the work done in it.
template <typename T, int kTag>
std::vector<T>& scratch(size_t n) {
  static thread_local std::vector<T> v;
  if (v.size() < n) v.resize(n);
  return v;
}

// Insertion sort of v[0, n) by key(x): linear when every element is already near its place.
template <typename T, typename Key>
void insertion_sort(T* v, size_t n, Key key) {
  for (size_t i = 1; i < n; ++i) {
    if (key(v[i - 1]) <= key(v[i])) continue;
    const T x = v[i];
    const uint64_t kx = key(x);
    size_t j = i;
    for (; j > 0 && key(v[j - 1]) > kx; --j) v[j] = v[j - 1];
    v[j] = x;
  }
}

// Sorts v[0, n) ascending by the uint64 key(x) (equal keys in any order), MSD radix: one scatter by the
// highest bits in which the keys differ, into about n buckets, then the rare large buckets alike and
// one insertion-sort pass that finishes all the small ones (cheaper than a call per tiny bucket).
// Keys spread over the int64 range and dense small keys both take a single scatter.
template <typename T, typename Key>
void msd_sort(T* v, T* tmp, size_t n, Key key) {
  constexpr size_t kSmall = 64;
  if (n > kSmall) {
    uint64_t lo = ~uint64_t(0), hi = 0;
    for (size_t i = 0; i < n; ++i) {
      lo = std::min(lo, key(v[i]));
      hi = std::max(hi, key(v[i]));
    }
    if (lo == hi) return;
    const int top = 64 - __builtin_clzll(lo ^ hi);  // the bits below the common prefix
    const int bits = std::min({top, 16, 63 - __builtin_clzll(n)});
    const int shift = top - bits;
    const uint64_t digit_mask = (uint64_t(1) << bits) - 1;
    std::vector<uint32_t> start((size_t(1) << bits) + 1, 0);
    for (size_t i = 0; i < n; ++i) ++start[((key(v[i]) >> shift) & digit_mask) + 1];
    for (size_t d = 1; d < start.size(); ++d) start[d] += start[d - 1];
    std::vector<uint32_t> next(start.begin(), start.end() - 1);
    for (size_t i = 0; i < n; ++i) tmp[next[(key(v[i]) >> shift) & digit_mask]++] = v[i];
    std::copy(tmp, tmp + n, v);
    for (size_t d = 0; d + 1 < start.size(); ++d)
      if (start[d + 1] - start[d] > kSmall) msd_sort(v + start[d], tmp + start[d], start[d + 1] - start[d], key);
  }
  insertion_sort(v, n, key);
}

// uint64 keys whose unsigned order is the order of the values: int64, and double (-0.0 taken as +0.0,
// as the double comparison does; NaN never reaches here, it fails every `<` filter).
inline uint64_t int_key(int64_t v) { return static_cast<uint64_t>(v) ^ (uint64_t(1) << 63); }
inline uint64_t double_key(double v) {
  uint64_t bits;
  v += 0.0;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits >> 63) ? ~bits : bits | (uint64_t(1) << 63);
}

// The distinct ids among a call's missing occurrences, ascending, with their batch counts.
struct Misses {
  struct Occurrence {
    int64_t id;
    int64_t pos;  // in the batch
  };
  const Occurrence* occ;  // the missing occurrences by id (the calling thread's scratch)
  std::vector<int64_t> ids;
  std::vector<int32_t> count;
  std::vector<int32_t> first;  // occurrences of ids[j]: occ[first[j], first[j + 1])
};

Misses distinct_misses(const int64_t* id, const int64_t* slot, int64_t n, int64_t n_miss) {
  using Occurrence = Misses::Occurrence;
  Misses m;
  Occurrence* occ = scratch<Occurrence, 0>(2 * n_miss + 1).data();
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) {  // branch-free: hits and misses interleave unpredictably
    occ[k] = Occurrence{id[i], i};
    k += slot[i] < 0;
  }
  msd_sort(occ, occ + n_miss + 1, n_miss, [](const Occurrence& o) { return int_key(o.id); });
  m.occ = occ;
  m.ids.reserve(n_miss);
  m.first.reserve(n_miss + 1);
  for (int64_t j = 0; j < n_miss; ++j) {
    if (j == 0 || m.occ[j].id != m.occ[j - 1].id) {
      m.ids.push_back(m.occ[j].id);
      m.first.push_back(static_cast<int32_t>(j));
    }
  }
  m.first.push_back(static_cast<int32_t>(n_miss));
  m.count.resize(m.ids.size());
  for (size_t j = 0; j < m.ids.size(); ++j) m.count[j] = m.first[j + 1] - m.first[j];
  return m;
}

// Adds each distinct missing id's batch count to its counter in every sketch row and returns its
// estimate, the minimum over rows after all of the call's additions. Row by row, adding then reading,
// so that the row's counters stay in cache while its scattered counters are touched.
std::vector<int32_t> sketch_add_and_estimate(const Table& t, const Misses& m) {
  const int64_t nc = static_cast<int64_t>(m.ids.size()), depth = t.depth, width = t.width;
  std::vector<int32_t> est(nc, std::numeric_limits<int32_t>::max());
  if (depth == 0) est.assign(m.count.begin(), m.count.end());  // no sketch: the batch count
  std::vector<int32_t>& col = scratch<int32_t, 1>(nc);
  const uint64_t col_mask = static_cast<uint64_t>(width - 1);
  for (int64_t r = 0; r < depth; ++r) {
    int32_t* row = t.sketch + r * width;
    int32_t* c = col.data();
    const uint64_t salt = sketch_salt(r);
    at::parallel_for(0, nc, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j)
        c[j] = static_cast<int32_t>(mix64(static_cast<uint64_t>(m.ids[j]) + salt) & col_mask);
      if (begin == 0 && end == nc) {  // the only chunk: no other thread touches the counters
        for (int64_t j = begin; j < end; ++j) row[c[j]] += m.count[j];
      } else {
        for (int64_t j = begin; j < end; ++j) __atomic_fetch_add(&row[c[j]], m.count[j], __ATOMIC_RELAXED);
      }
    });
    at::parallel_for(0, nc, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) est[j] = std::min(est[j], row[c[j]]);
    });
  }
  return est;
}

struct Eligible {
  int64_t id;
  int64_t at;  // its index in Misses
};

// The eligible ids (given in id-ascending order) in admission order, priority descending then id
// ascending: a stable counting sort by the integer estimate (LFU, FEATURE_SCORE; LRU gives every
// candidate the same priority).
void order_eligible(std::vector<Eligible>& elig, const std::vector<int32_t>& est, int64_t policy) {
  const size_t n = elig.size();
  if (n < 2) return;
  if (policy == kLRU) return;
  std::vector<Eligible> tmp(n);
  int32_t lo = est[elig[0].at], hi = lo;
  for (const Eligible& e : elig) {
    lo = std::min(lo, est[e.at]);
    hi = std::max(hi, est[e.at]);
  }
  if (static_cast<int64_t>(hi) - lo >= (1 << 20)) {
    std::stable_sort(elig.begin(), elig.end(),
                     [&](const Eligible& a, const Eligible& b) { return est[a.at] > est[b.at]; });
    return;
  }
  std::vector<uint32_t> start(hi - lo + 2, 0);  // bucket d holds estimate hi - d
  for (const Eligible& e : elig) ++start[hi - est[e.at] + 1];
  for (size_t d = 1; d < start.size(); ++d) start[d] += start[d - 1];
  for (const Eligible& e : elig) tmp[start[hi - est[e.at]]++] = e;
  elig.swap(tmp);
}

// Bit j of the result is the top bit of flag[j] (flags are 0 or 0xFF).
inline uint64_t pack_flags(const uint8_t* flag) {
#if defined(__SSE2__)
  uint64_t bits = 0;
  for (int k = 0; k < 4; ++k) {
    const __m128i v = _mm_load_si128(reinterpret_cast<const __m128i*>(flag + 16 * k));
    bits |= static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(v))) << (16 * k);
  }
  return bits;
#else
  uint64_t bits = 0;
  for (int j = 0; j < 64; ++j) bits |= static_cast<uint64_t>(flag[j] >> 7) << j;
  return bits;
#endif
}

// Eviction priority of a live slot at `step`, the lowest evicted first (reference.py: slot_priority).
struct SlotPriority {
  const Table& t;
  int64_t policy;
  int64_t step;
  const Decay& decay;
  double operator()(int64_t s) const {
    if (policy == kLFU) return static_cast<double>(t.count[s]);
    if (policy == kLRU) return static_cast<double>(t.last_step[s]);
    const int64_t dt = std::max<int64_t>(step - t.last_step[s], 0);
    if (policy == kDistanceLFU) return static_cast<double>(t.count[s]) / static_cast<double>(dt + 1);
    return static_cast<double>(t.score[s]) * decay(dt);
  }
};

// The slots that the remaining candidates (priorities `cand_prio`, descending) evict, in pairing order:
// the evictable slots (live, not hit in this call) ordered by (priority, slot) ascending, the i-th lost
// iff cand_prio[i] exceeds its priority, up to the first that holds. Only slots below the best
// candidate can lose; of those, first only the ones below a cut that a sample of slots suggests (see
// below). They are bucketed by an order-preserving uint64 key over their key range (about
// one bucket per slot, at most 2**16); a walk over the histogram finds how far the pairing can reach,
// so only those slots are gathered, in slot order (the tie order), and sorted only where a bucket spans
// several keys.
// LFU counts and LRU steps are integer keys: usually every bucket is one key and nothing is sorted.
std::vector<int64_t> select_victims(const Table& t, const uint64_t* hit_bits, const std::vector<double>& cand_prio,
                                    const SlotPriority& priority) {
  const int64_t rest = static_cast<int64_t>(cand_prio.size());
  const double best = cand_prio[0];
  // integer keys order like the doubles they convert to while below 2**53 (every slot that can lose is)
  const bool int_keys = (priority.policy == kLFU || priority.policy == kLRU) && best < std::ldexp(1.0, 53);
  auto cand_key = [&](double prio) { return int_keys ? int_key(static_cast<int64_t>(prio)) : double_key(prio); };
  const int64_t n_words = (t.capacity + 63) / 64;
  std::vector<uint64_t>& can_lose = scratch<uint64_t, 3>(n_words);  // one bit per slot
  // 1. bit mask of the slots that can lose, below `cut` too: a pass over every slot, kept to flag tests
  // (the keys and their range are then computed for the marked slots only, fewer than all when a cut applies).
  const int32_t* int_value = priority.policy == kLFU ? t.count : t.last_step;
  const int64_t int_best = static_cast<int64_t>(best);
  auto key_at = [&](int64_t s) { return int_keys ? int_key(int_value[s]) : double_key(priority(s)); };
  const int nthreads = at::get_num_threads();
  std::vector<int64_t> n_by(nthreads);
  // One flag byte per slot of a 64-slot word (0xFF: can lose), computed without branches or loop-carried
  // state so that the compiler can unroll it, then packed into the word's bits.
  const int32_t* count = t.count;
  const int32_t* last_step = t.last_step;
  const float* score = t.score;
  const double* small = priority.decay.small;
  const int64_t step = priority.step;
  auto mark = [&](double cut) {
    const int64_t int_cut = cut < std::ldexp(1.0, 62) ? static_cast<int64_t>(cut) : std::numeric_limits<int64_t>::max();
    const int64_t int_lim = std::min(int_best - 1, int_cut);  // int_best >= 0: a value can lose iff <= int_lim
    std::fill(n_by.begin(), n_by.end(), 0);
    at::parallel_for(0, n_words, kSlotGrain / 64, [&](int64_t begin, int64_t end) {
      int64_t marked = 0;
      alignas(16) uint8_t flag[64];
      for (int64_t w = begin; w < end; ++w) {
        const int64_t s0 = w * 64, m = std::min<int64_t>(64, t.capacity - s0);
        if (int_keys) {
          const int32_t* v = int_value + s0;
          const int32_t* c = count + s0;
          for (int64_t j = 0; j < m; ++j) flag[j] = -static_cast<uint8_t>((c[j] > 0) & (v[j] <= int_lim));
        } else if (priority.policy == kDistanceLFU) {
          const int32_t* c = count + s0;
          for (int64_t j = 0; j < m; ++j) {
            const double prio = priority(s0 + j);
            flag[j] = -static_cast<uint8_t>((c[j] > 0) & (prio < best) & (prio <= cut));
          }
        } else {
          const int32_t* c = count + s0;
          const int32_t* ls = last_step + s0;
          const float* sc = score + s0;
          bool far = false;
          for (int64_t j = 0; j < m; ++j) {
            const int64_t dt = std::max<int64_t>(step - ls[j], 0);
            far |= dt >= Decay::kSmall;
            const double prio = static_cast<double>(sc[j]) * small[std::min<int64_t>(dt, Decay::kSmall - 1)];
            flag[j] = -static_cast<uint8_t>((c[j] > 0) & (prio < best) & (prio <= cut));
          }
          if (far) {  // gaps beyond the table: the exact priority
            for (int64_t j = 0; j < m; ++j) {
              if (step - ls[j] < Decay::kSmall) continue;
              const double prio = priority(s0 + j);
              flag[j] = -static_cast<uint8_t>((c[j] > 0) & (prio < best) & (prio <= cut));
            }
          }
        }
        for (int64_t j = m; j < 64; ++j) flag[j] = 0;
        const uint64_t bits = pack_flags(flag) & ~hit_bits[w];
        can_lose[w] = bits;
        marked += __builtin_popcountll(bits);
      }
      n_by[at::get_thread_num()] += marked;
    });
    int64_t marked = 0;
    for (int64_t c : n_by) marked += c;
    return marked;
  };
  // The marked slots with their keys, in slot order (the tie order), and how they pair with the
  // candidates. With a cut, the marked slots are the lowest of all (ties at the cut included), so the
  // pairing over them is the true one as far as it goes: final when it ends by a failure or runs out
  // of candidates, else the next cut is tried.
  struct Ranked {
    uint64_t key;
    int64_t slot;
  };
  auto attempt = [&](double cut, bool& final_) -> std::vector<int64_t> {
    const int64_t marked = mark(cut);
    std::vector<Ranked>& marked_slots = scratch<Ranked, 4>(marked);
    uint64_t lo = ~uint64_t(0), hi = 0;
    {
      int64_t k = 0;
      for (int64_t w = 0; w < n_words; ++w)
        for (uint64_t bits = can_lose[w]; bits != 0; bits &= bits - 1) {
          const int64_t s = w * 64 + __builtin_ctzll(bits);
          const uint64_t key = key_at(s);
          lo = std::min(lo, key);
          hi = std::max(hi, key);
          marked_slots[k++] = Ranked{key, s};
        }
    }
    final_ = cut == std::numeric_limits<double>::infinity();
    if (lo > hi) return {};
    // 2. histogram over the key range, about one bucket per marked slot (at most 2**16)
    const uint64_t range = hi - lo;
    const int bucket_bits = std::min(16, std::max(4, 64 - __builtin_clzll(static_cast<uint64_t>(marked))));
    const int shift = range < (uint64_t(1) << bucket_bits) ? 0 : 64 - __builtin_clzll(range) - bucket_bits;
    const bool exact = shift == 0;  // one key per bucket
    const int64_t n_buckets = static_cast<int64_t>(range >> shift) + 1;
    std::vector<uint32_t> take(n_buckets + 1, 0);
    for (int64_t k = 0; k < marked; ++k) ++take[(marked_slots[k].key - lo) >> shift];
    // 3. walk the buckets in priority order alongside the candidates: stop where the next victim holds
    // its slot (its bucket's lowest key is not below the candidate's) or no candidate is left.
    int64_t reach = 0, b = 0;
    for (; b < n_buckets && reach < rest; ++b) {
      const int64_t c = take[b];
      if (c == 0) continue;
      const uint64_t bucket_lo = lo + (static_cast<uint64_t>(b) << shift);
      if (cand_key(cand_prio[reach]) <= bucket_lo) {
        final_ = true;
        break;
      }
      if (!exact) {
        reach += c;
        continue;
      }
      int64_t i = reach;  // every slot here has key bucket_lo: the first ones (by slot) lose, up to a failure
      const int64_t end = std::min(reach + c, rest);
      while (i < end && cand_key(cand_prio[i]) > bucket_lo) ++i;
      take[b] = static_cast<uint32_t>(i - reach);
      reach = i;
      if (take[b] < c) {
        final_ = true;
        ++b;
        break;
      }
    }
    const int64_t b_end = b;
    // 4. gather those buckets' slots in slot order into their places, then sort multi-key buckets.
    std::vector<uint32_t> start(b_end + 1, 0);
    for (int64_t d = 0; d < b_end; ++d) start[d + 1] = start[d] + take[d];
    std::vector<uint32_t> next(start.begin(), start.end() - 1);
    std::vector<Ranked> ranked(start[b_end]);
    for (int64_t k = 0; k < marked; ++k) {
      const Ranked& r = marked_slots[k];
      const uint64_t d = (r.key - lo) >> shift;
      if (static_cast<int64_t>(d) < b_end && next[d] < start[d + 1]) ranked[next[d]++] = r;
    }
    if (!exact) {
      for (int64_t d = 0; d < b_end; ++d)
        if (start[d + 1] - start[d] > 1)
          std::sort(ranked.begin() + start[d], ranked.begin() + start[d + 1], [](const Ranked& x, const Ranked& y) {
            return x.key < y.key || (x.key == y.key && x.slot < y.slot);
          });
    }
    const int64_t k = std::min<int64_t>(rest, static_cast<int64_t>(ranked.size()));
    std::vector<int64_t> victims;
    victims.reserve(k);
    while (static_cast<int64_t>(victims.size()) < k &&
           cand_prio[victims.size()] > priority(ranked[victims.size()].slot))
      victims.push_back(ranked[victims.size()].slot);
    if (static_cast<int64_t>(victims.size()) < k || static_cast<int64_t>(victims.size()) == rest) final_ = true;
    return victims;
  };
  // An evenly spaced sample estimates the priorities of the lowest slots: the narrow cut lies about twice
  // as far as the sampled pairing reaches (enough when few candidates win), the wide one about twice as
  // far as there are candidates (enough unless nearly all win), then every slot below `best`.
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> cuts;
  if (rest * 3 < t.capacity) {
    const int64_t stride = std::max<int64_t>(1, t.capacity / 2048);
    std::vector<double> sample;
    for (int64_t s = 0; s < t.capacity; s += stride) {
      if (t.count[s] <= 0 || ((hit_bits[s >> 6] >> (s & 63)) & 1)) continue;
      const double prio = priority(s);
      if (prio < best) sample.push_back(prio);
    }
    const int64_t q = 2 * rest / stride + 16;
    if (q < static_cast<int64_t>(sample.size())) {
      std::nth_element(sample.begin(), sample.begin() + q, sample.end());
      // sorted only as far as the walk goes: usually a small prefix (few of the candidates win)
      int64_t sorted = std::min<int64_t>(q, q / 4 + 16);
      std::nth_element(sample.begin(), sample.begin() + sorted, sample.begin() + q);
      std::sort(sample.begin(), sample.begin() + sorted);
      int64_t cross = 0;  // the first sampled slot that holds against the candidate of its estimated rank
      while (cross < q && cross * stride < rest) {
        if (cross == sorted) {
          std::sort(sample.begin() + sorted, sample.begin() + q);
          sorted = q;
        }
        if (cand_prio[cross * stride] <= sample[cross]) break;
        ++cross;
      }
      const int64_t narrow = 2 * cross + 16;
      if (narrow < q) cuts.push_back(sample[narrow]);
      cuts.push_back(sample[q]);
    }
  }
  cuts.push_back(inf);
  for (const double cut : cuts) {
    bool final_ = false;
    std::vector<int64_t> victims = attempt(cut, final_);
    if (final_) return victims;
  }
  return {};  // not reached: the cut inf is final
}

// Erases the index entries of `slots` in order. The victims are scattered: their ids are fetched 16
// ahead, their home lines 8 ahead, and 4 ahead the ids of the entries after theirs, which the backward
// shift rehashes.
void erase_all(Table& t, const std::vector<int64_t>& slots) {
  const int64_t n = static_cast<int64_t>(slots.size());
  for (int64_t j = 0; j < n; ++j) {
    if (j + 16 < n) __builtin_prefetch(&t.slot_ids[slots[j + 16]]);
    if (j + 8 < n) __builtin_prefetch(&t.index[t.home(t.slot_ids[slots[j + 8]])]);
    if (j + 4 < n) {
      uint64_t pos = t.home(t.slot_ids[slots[j + 4]]);
      while (t.index[pos] >= 0 && t.index[pos] != slots[j + 4]) pos = (pos + 1) & t.mask;
      for (int k = 0; k < 4; ++k) {
        pos = (pos + 1) & t.mask;
        const int32_t e = t.index[pos];
        if (e < 0) break;
        __builtin_prefetch(&t.slot_ids[e]);
      }
    }
    t.erase_entry(t.slot_ids[slots[j]], static_cast<int32_t>(slots[j]));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hash_remap_cpu(
    const at::Tensor& ids, const at::Tensor& slot_ids, const at::Tensor& slot_count, const at::Tensor& slot_last_step,
    const at::Tensor& slot_last_time, const at::Tensor& slot_score, const at::Tensor& free_list,
    const at::Tensor& index, const at::Tensor& sketch, const at::Tensor& meta, const at::Tensor& counters,
    const at::Tensor& decay_powers, int64_t step, double now, int64_t policy, int64_t min_count, int64_t coin_threshold,
    int64_t coin_key, int64_t halve_every, int64_t slot_offset, int64_t fallback_offset, int64_t fallback_rows) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong, "hash_remap: ids must be a CPU int64 tensor");
  TORCH_CHECK(fallback_rows >= 0, "hash_remap: fallback_rows must be >= 0, got ", fallback_rows);
  check_step(step, "hash_remap");
  // bounds that keep int32 sketch counters below 2**30 (lightning_sparse/dynamic/config.py)
  TORCH_CHECK(halve_every >= 1 && halve_every <= (int64_t(1) << 28), "hash_remap: halve_every must be in [1, 2**28]");
  TORCH_CHECK(ids.numel() < (int64_t(1) << 28), "hash_remap: a call takes fewer than 2**28 ids, got ", ids.numel());
  check_state(decay_powers, at::kDouble, "decay_powers", at::kCPU);
  TORCH_CHECK(decay_powers.numel() >= 63, "hash_remap: decay_powers needs 63 entries");
  Table t = make_table(slot_ids, slot_count, slot_last_step, slot_last_time, slot_score, free_list, index, sketch, meta,
                       counters);
  check_policy_state(t, policy);
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
    find_pipelined(
        t, id, begin, end, [&](int64_t e) { __builtin_prefetch(&hits_per_slot[e], 1); },
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
        if (t.score) {
          const int64_t dt = std::max<int64_t>(step - t.last_step[s], 0);
          volatile double decayed = static_cast<double>(t.score[s]) * decay(dt);  // no fused multiply-add
          volatile double updated = decayed + static_cast<double>(c);
          t.score[s] = static_cast<float>(updated);
        }
        t.count[s] = add_count(t.count[s], c);
        t.last_step[s] = static_cast<int32_t>(step);
        if (t.last_time) t.last_time[s] = now;
      }
    }
  });
  t.counters[kLookups] += n;
  t.counters[kHits] += n - n_miss;
  // C. distinct missing ids with their batch counts (id order).
  const Misses m = distinct_misses(id, slot, n, n_miss);
  const int64_t n_cand = static_cast<int64_t>(m.ids.size());
  // D. sketch: add batch counts, then estimate, coin and eligibility per distinct id.
  const std::vector<int32_t> est = sketch_add_and_estimate(t, m);
  std::vector<Eligible> elig;
  elig.reserve(n_cand);
  const uint64_t step_salt = static_cast<uint64_t>(step) * kGolden;
  for (int64_t j = 0; j < n_cand; ++j) {
    bool ok = est[j] >= min_count;
    if (ok && coin_threshold < (int64_t(1) << 53)) {
      ok = admission_coin(m.ids[j], coin_key, step_salt) < coin_threshold;
    }
    if (ok) elig.push_back(Eligible{m.ids[j], j});
  }
  t.meta[kSketchAdds] += n_miss;
  t.counters[kRejectedAdmission] += n_cand - static_cast<int64_t>(elig.size());
  if (t.meta[kSketchAdds] >= halve_every) {
    const int64_t total = t.depth * t.width;
    at::parallel_for(0, total, kSlotGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) t.sketch[k] >>= 1;
    });
    t.meta[kSketchAdds] = 0;
    t.counters[kSketchHalvings] += 1;
  }
  // E. order eligible ids (priority desc, id asc) and hand out free slots (stack pops).
  order_eligible(elig, est, policy);
  auto cand_prio = [&](int64_t j) {
    return policy == kLRU ? static_cast<double>(step) : static_cast<double>(est[elig[j].at]);
  };
  const int64_t n_elig = static_cast<int64_t>(elig.size());
  const int64_t free = t.meta[kFreeCount];
  const int64_t n_free = std::min(free, n_elig);
  std::vector<int64_t> assigned;
  assigned.reserve(n_elig);
  for (int64_t j = 0; j < n_free; ++j) assigned.push_back(t.free_at(free - 1 - j));
  t.meta[kFreeCount] = free - n_free;
  // F. the remaining ids compete for evictable slots; the victims leave the index in victim order.
  const int64_t rest = n_elig - n_free;
  if (rest > 0) {
    std::vector<double> rest_prio(rest);
    for (int64_t j = 0; j < rest; ++j) rest_prio[j] = cand_prio(n_free + j);
    const std::vector<int64_t> victims = select_victims(t, hit_bits, rest_prio, SlotPriority{t, policy, step, decay});
    erase_all(t, victims);
    // every victim is assigned below, which writes all of its fields: no need to clear them first
    assigned.insert(assigned.end(), victims.begin(), victims.end());
    const int64_t wins = static_cast<int64_t>(victims.size());
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
    }
    const int64_t s = assigned[j];
    const int32_t f = est[elig[j].at];
    t.slot_ids[s] = elig[j].id;
    t.count[s] = f;
    t.last_step[s] = static_cast<int32_t>(step);
    if (t.last_time) t.last_time[s] = now;
    if (t.score) t.score[s] = static_cast<float>(f);
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
  for (int64_t j = 0; j < n_assigned; ++j)
    for (int32_t k = m.first[elig[j].at]; k < m.first[elig[j].at + 1]; ++k)
      slot[m.occ[k].pos] = assigned[j] + slot_offset;
  if (fallback_rows > 0 && n_miss > 0) {  // the ids still without a slot read their fallback row
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        if (slot[i] < 0) slot[i] = fallback_row(id[i], fallback_offset, fallback_rows);
    });
  }
  at::Tensor assigned_t = at::empty({n_assigned}, ids.options());
  int64_t* a = assigned_t.data_ptr<int64_t>();
  for (int64_t j = 0; j < n_assigned; ++j) a[j] = assigned[j] + slot_offset;
  return {out.view(ids.sizes()), assigned_t};
}

at::Tensor hash_lookup_cpu(const at::Tensor& ids, const at::Tensor& slot_ids, const at::Tensor& index,
                           int64_t slot_offset, int64_t fallback_offset, int64_t fallback_rows) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong, "hash_lookup: ids must be a CPU int64 tensor");
  TORCH_CHECK(fallback_rows >= 0, "hash_lookup: fallback_rows must be >= 0, got ", fallback_rows);
  check_state(slot_ids, at::kLong, "slot_ids", at::kCPU);
  check_state(index, at::kInt, "index", at::kCPU);
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
    find_block(t, id, begin, end, [&](int64_t i, int64_t s) {
      slot[i] = s >= 0 ? s + slot_offset : fallback_row(id[i], fallback_offset, fallback_rows);
    });
  });
  return out.view(ids.sizes());
}

at::Tensor hash_expire_cpu(const at::Tensor& slot_ids, const at::Tensor& slot_count, const at::Tensor& slot_last_step,
                           const at::Tensor& slot_last_time, const at::Tensor& slot_score, const at::Tensor& free_list,
                           const at::Tensor& index, const at::Tensor& sketch, const at::Tensor& meta,
                           const at::Tensor& counters, int64_t step, double now, int64_t ttl_steps,
                           double ttl_seconds) {
  check_step(step, "hash_expire");
  Table t = make_table(slot_ids, slot_count, slot_last_step, slot_last_time, slot_score, free_list, index, sketch, meta,
                       counters);
  check_expire_state(t, ttl_steps, ttl_seconds);
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
  for (int64_t s : expired) t.erase_entry(t.slot_ids[s], static_cast<int32_t>(s));
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
      "int coin_threshold, int coin_key, int halve_every, int slot_offset, int fallback_offset, int fallback_rows) "
      "-> (Tensor, Tensor)");
  m.def(
      "hash_lookup(Tensor ids, Tensor slot_ids, Tensor index, int slot_offset, int fallback_offset, "
      "int fallback_rows) -> Tensor");
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
