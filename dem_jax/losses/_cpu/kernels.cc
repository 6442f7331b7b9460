// Fused CPU kernels for dem_jax.losses (XLA FFI custom calls).
//
// XLA's CPU backend writes every row reduction of a loss to memory and reads
// the logits again for the next one; these kernels make one pass over each
// row while it is in cache. They compute exactly the closed forms of the
// Python code in ../_dem.py and ../_adadem.py (same centring on the row
// maximum, same handling of masked (-inf) classes), which remains the
// reference and the path used on GPU/TPU and for traced tau/alpha.
//
// Rows are processed in one of two layouts, with the loss math written once
// for vectors of 16 floats (templates over the layout):
//   RowTile  - one example at a time, 16 of its classes per vector (C > 32);
//   LaneTile - 16 examples at a time, one per vector lane, looping over the
//              classes of a transposed tile (few classes: pixel-wise
//              segmentation with C = 19 would waste most of a vector).
// Work is split over XLA's intra-op thread pool by blocks of rows.
//
// A value and gradient takes a forward and a backward kernel, except for
// RowTile rows of EM/CADF/GMC/DEM and AdaDEM-Norm, whose forward kernel also
// writes the gradient at cotangent 1 (each exponential computed once) and
// whose backward pass scales each row by its cotangent (ScaleRows).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// The loss math is inlined into each kernel's row loop: an out-of-line copy,
// called with the tile by reference, was vectorised with gathers (5x slower).
#define ALWAYS_INLINE inline __attribute__((always_inline))

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef uint32_t u16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int64_t kMaxLaneClasses = 32;  // LaneTile for C <= this
constexpr float kLowest = -std::numeric_limits<float>::max();
constexpr float kMax = std::numeric_limits<float>::max();

// ---------------------------------------------------------------------------
// Vector math: V is v16 (16 floats) in both layouts; Sel/Max/Min also take
// floats.
// ---------------------------------------------------------------------------

template <class V> struct Traits;
template <> struct Traits<v16> {
  using I = i16;
  using U = u16;
  static v16 Splat(float x) { return v16{} + x; }
  static v16 ToFloat(i16 x) { return __builtin_convertvector(x, v16); }
};

template <class To, class From>
inline To Bits(From x) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &x, sizeof(t));
  return t;
}

template <class V> inline V S(float x) { return Traits<V>::Splat(x); }
template <class M, class V> inline V Sel(M m, V a, V b) { return m ? a : b; }
template <class V> inline V Max(V a, V b) { return Sel(a > b, a, b); }
template <class V> inline V Min(V a, V b) { return Sel(a < b, a, b); }
#if defined(__AVX512F__)
// vmaxps/vminps give exactly the selects above (the second operand when
// either is NaN or both are zeros) in one instruction instead of a compare
// and a blend.
inline v16 Max(v16 a, v16 b) { return Bits<v16>(_mm512_max_ps(Bits<__m512>(a), Bits<__m512>(b))); }
inline v16 Min(v16 a, v16 b) { return Bits<v16>(_mm512_min_ps(Bits<__m512>(a), Bits<__m512>(b))); }
#endif
template <class V> inline V Abs(V a) { return Sel(a < S<V>(0.f), -a, a); }
inline float HorizontalSum(v16 a) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(Bits<__m512>(a));
#else
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += a[l];
  return s;
#endif
}
inline bool Any(v16 a) {
  bool any = false;
  for (int l = 0; l < kLanes; ++l) any |= a[l] != 0.0f;
  return any;
}

// exp(x) for x <= 0 (relative error ~2 ulp); exactly 0 below -87 and at -inf.
// Below -87 the arithmetic is garbage (NaN at -inf) and the final select
// discards it, so x needs no clamp.
template <class V>
inline V ExpNeg(V x) {
  using U = typename Traits<V>::U;  // unsigned: wraps in the discarded lanes
  V t = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23 + n: n rounded
  V n = t - 12582912.0f;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = S<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<V, v16>) {
    // p * 2^n in one instruction (the same rounding: 2^n is a normal float
    // for x >= -87) instead of building 2^n and multiplying.
    __mmask16 live = _mm512_cmp_ps_mask(Bits<__m512>(x), _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
    return Bits<V>(_mm512_maskz_scalef_ps(live, Bits<__m512>(p), Bits<__m512>(n)));
  }
#endif
  // 2^n: n sits in t's low mantissa bits; shifting it into the exponent
  // drops the bits of 1.5 * 2^23.
  auto scale = Bits<V>((Bits<U>(t) + 127u) << 23);
  return Sel(x < S<V>(-87.0f), S<V>(0.0f), p * scale);
}

#if defined(__AVX512F__)
// exp(x) for x <= 0 with a table, for the one-example layout: with
// x = (16 k + f) ln2 / 16 + r, |r| <= ln2 / 32, exp(x) = 2^k (T_f + T_f (e^r - 1)),
// T_f = 2^(f / 16) read from 16 floats by one permute (f is in the low bits
// of t, as n is in ExpNeg) and e^r - 1 from a cubic. Relative error < 2 ulp
// over [-87, 0] (1.4 for ExpNeg), exactly 0 below -87 and at -inf; a row of
// 1000 exponentials with their sums takes about 20% fewer cycles, as the
// polynomial's dependency chain is 4 operations instead of 8.
inline v16 ExpNegTable(v16 x) {
  alignas(64) static const float kPow2[16] = {
      1.0f, 1.04427373f, 1.09050775f, 1.13878858f, 1.18920708f, 1.24185777f,
      1.29683959f, 1.35425556f, 1.41421354f, 1.47682619f, 1.54221082f, 1.61049032f,
      1.68179286f, 1.75625217f, 1.8340081f, 1.91520655f};
  __m512 v = Bits<__m512>(x);
  __m512 t = _mm512_fmadd_ps(v, _mm512_set1_ps(23.0831203f), _mm512_set1_ps(12582912.0f));
  __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(12582912.0f));  // round(16 x / ln2)
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.0433197021f), v);  // ln2 / 16, 12 bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.99663646e-06f), r);      // and the rest
  __m512 q = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 6.0f), _mm512_set1_ps(0.5f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
  q = _mm512_mul_ps(q, r);  // e^r - 1
  __m512 tf = _mm512_permutexvar_ps(_mm512_castps_si512(t), _mm512_load_ps(kPow2));
  __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  // 2^floor(n / 16) = 2^k by vscalefps.
  return Bits<v16>(_mm512_maskz_scalef_ps(live, _mm512_fmadd_ps(tf, q, tf),
                                          _mm512_mul_ps(n, _mm512_set1_ps(0.0625f))));
}
#endif

// log(x) for normal x > 0 (relative error ~2 ulp).
template <class V>
inline V Log(V x) {
  using T = Traits<V>;
  using I = typename T::I;
  I bits = Bits<I>(x);
  I e = ((bits >> 23) & 0xff) - 126;
  V m = Bits<V>((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  auto small = m < S<V>(0.70710678f);
  V ef = T::ToFloat(e) - Sel(small, S<V>(1.0f), S<V>(0.0f));
  V u = Sel(small, m + m, m) - 1.0f;
  V z = u * u;
  V y = S<V>(7.0376836292e-2f);
  y = y * u - 1.1514610310e-1f;
  y = y * u + 1.1676998740e-1f;
  y = y * u - 1.2420140846e-1f;
  y = y * u + 1.4249322787e-1f;
  y = y * u - 1.6668057665e-1f;
  y = y * u + 2.0000714765e-1f;
  y = y * u - 2.4999993993e-1f;
  y = y * u + 3.3333331174e-1f;
  y = y * u * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  return u + y + ef * 0.693359375f;
}

// ---------------------------------------------------------------------------
// Layouts. Each gives the logits (and MEC rows) of its examples as V per
// class j, and Sum/Max/Min/Each loops over the classes.
// ---------------------------------------------------------------------------

template <class V> struct V3 { V a, b, c; };

// One example, 16 classes per vector; per-example values are splats (all
// lanes equal), so the math below runs unchanged on both layouts. The last
// vector of a row whose C is not a multiple of 16 loads its missing classes
// as -inf: they are then masked classes, which add exactly 0 to every sum of
// this file and get 0 probability (their outputs are not stored).
struct RowTile {
  using V = v16;
  static constexpr bool kOneExample = true;
  int64_t c;
  const float* z;
  const float* mec_row = nullptr;  // this example's MEC row, if any
  float* out = nullptr;            // gradient row, if any
  // Rows of the next example (its logits, its MEC row) to bring into cache
  // while this one is computed: `Prefetch(j)` asks for their line j.
  const float* next[2] = {nullptr, nullptr};
  // Write the gradient row around the caches (see kStreamBytes).
  bool stream_out = false;

  int64_t Vectors() const { return (c + kLanes - 1) / kLanes; }
  void Prefetch(int64_t j) const {
    for (const float* row : next)
      if (row != nullptr) __builtin_prefetch(row + j * kLanes, 0, 3);
  }
  // Loads and stores of vector j of a row of c floats (the last vector of
  // the row: its first c % 16 lanes).
  V Load(const float* p, int64_t j, float fill = 0.0f) const {
    int64_t rest = c - j * kLanes;
#if defined(__AVX512F__)
    if (rest >= kLanes) return Bits<V>(_mm512_loadu_ps(p + j * kLanes));
    return Bits<V>(_mm512_mask_loadu_ps(_mm512_set1_ps(fill),
                                        static_cast<__mmask16>((1u << rest) - 1u),
                                        p + j * kLanes));
#else
    V v = S<V>(fill);
    std::memcpy(&v, p + j * kLanes, sizeof(float) * std::min<int64_t>(rest, kLanes));
    return v;
#endif
  }
  void Store(float* p, int64_t j, V v) const {
    int64_t rest = c - j * kLanes;
#if defined(__AVX512F__)
    if (rest >= kLanes) {
      _mm512_storeu_ps(p + j * kLanes, Bits<__m512>(v));
    } else {
      _mm512_mask_storeu_ps(p + j * kLanes, static_cast<__mmask16>((1u << rest) - 1u),
                            Bits<__m512>(v));
    }
#else
    std::memcpy(p + j * kLanes, &v, sizeof(float) * std::min<int64_t>(rest, kLanes));
#endif
  }
  V Z(int64_t j) const { return Load(z, j, -std::numeric_limits<float>::infinity()); }
#if defined(__AVX512F__)
  static V Exp(V x) { return ExpNegTable(x); }
#else
  static V Exp(V x) { return ExpNeg(x); }
#endif
  V M(int64_t j) const { return Load(mec_row, j); }
  void Out(int64_t j, V v) const {
#if defined(__AVX512F__)
    float* q = out + j * kLanes;
    if (stream_out && c - j * kLanes >= kLanes && (reinterpret_cast<uintptr_t>(q) & 31) == 0) {
      // Two 32-byte non-temporal stores: rows of C = 1000 start 32 bytes
      // off a cache line every other row.
      __m512 w = Bits<__m512>(v);
      _mm256_stream_ps(q, _mm512_castps512_ps256(w));
      _mm256_stream_ps(q + 8, _mm512_extractf32x8_ps(w, 1));
      return;
    }
#endif
    Store(out, j, v);
  }

  template <class F> V Sum(F f) const {
    V s = S<V>(0.0f);
    for (int64_t j = 0; j < Vectors(); ++j) s += f(j);
    return S<V>(HorizontalSum(s));
  }
  // Three sums in one pass: f(j) returns a V3.
  template <class F> V3<V> Sum3(F f) const {
    V3<V> s{S<V>(0.0f), S<V>(0.0f), S<V>(0.0f)};
    for (int64_t j = 0; j < Vectors(); ++j) {
      V3<V> r = f(j);
      s.a += r.a;
      s.b += r.b;
      s.c += r.c;
    }
    return {S<V>(HorizontalSum(s.a)), S<V>(HorizontalSum(s.b)), S<V>(HorizontalSum(s.c))};
  }
  template <class F> V MaxOf(F f) const {
    V s = S<V>(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < Vectors(); ++j) s = Max(s, f(j));
    float m = s[0];
    for (int l = 1; l < kLanes; ++l) m = Max(m, s[l]);
    return S<V>(m);
  }
  template <class F> void Each(F f) const {
    for (int64_t j = 0; j < Vectors(); ++j) f(j);
  }
};

struct LaneTile {
  using V = v16;
  static constexpr bool kOneExample = false;
  int64_t c;
  const float* z;              // transposed [c][16]
  const float* mec = nullptr;  // transposed MEC rows [c][16], if any
  float* out = nullptr;        // transposed gradient [c][16], if any

  // Loads and stores of class j of a transposed [c][16] tile.
  static V Load(const float* p, int64_t j) {
    V v;
    std::memcpy(&v, p + j * kLanes, sizeof(v));
    return v;
  }
  static void Store(float* p, int64_t j, V v) { std::memcpy(p + j * kLanes, &v, sizeof(v)); }
  V Z(int64_t j) const { return Load(z, j); }
  // ExpNeg: to the bit what the README's 10-class experiments ran with.
  static V Exp(V x) { return ExpNeg(x); }
  void Prefetch(int64_t) const {}  // tiles are transposed copies, in cache
  V M(int64_t j) const { return Load(mec, j); }
  void Out(int64_t j, V v) const { Store(out, j, v); }

  template <class F> V Sum(F f) const {
    V s = S<V>(0.0f);
    for (int64_t j = 0; j < c; ++j) s += f(j);
    return s;
  }
  template <class F> V3<V> Sum3(F f) const {
    V3<V> s{S<V>(0.0f), S<V>(0.0f), S<V>(0.0f)};
    for (int64_t j = 0; j < c; ++j) {
      V3<V> r = f(j);
      s.a += r.a;
      s.b += r.b;
      s.c += r.c;
    }
    return s;
  }
  template <class F> V MaxOf(F f) const {
    V s = S<V>(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < c; ++j) s = Max(s, f(j));
    return s;
  }
  template <class F> V MinOf(F f) const {
    V s = S<V>(std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < c; ++j) s = Min(s, f(j));
    return s;
  }
  template <class F> void Each(F f) const {
    for (int64_t j = 0; j < c; ++j) f(j);
  }
};

// ---------------------------------------------------------------------------
// Threading over blocks of rows on XLA's intra-op pool. The caller takes
// blocks too and waits only for blocks other threads have started, so it
// never waits on a task that has not run.
// ---------------------------------------------------------------------------

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Rows [0, rows) in `count` blocks of `per` rows (the last one shorter).
struct Blocks {
  int64_t count, per;
};

// Few blocks for small work (one below 32K elements), at most `max_blocks`,
// otherwise four per thread, each a multiple of `align` rows.
inline Blocks PlanBlocks(int64_t threads, int64_t rows, int64_t cols, int64_t align,
                         int64_t max_blocks) {
  if (threads <= 1 || max_blocks <= 1 || rows * cols < (1 << 15) || rows < 2 * align)
    return {1, rows};
  int64_t blocks = std::min({threads * 4, rows / align, max_blocks});
  int64_t per = (rows + blocks - 1) / blocks;
  per = (per + align - 1) / align * align;
  return {(rows + per - 1) / per, per};
}

// body(i, begin, end) for each block i of the plan, over the pool's threads.
template <class F>
void RunBlocks(ffi::ThreadPool& pool, Blocks plan, int64_t rows, F&& body) {
  if (plan.count <= 1) {
    body(int64_t{0}, int64_t{0}, rows);
    return;
  }
  auto progress = std::make_shared<Progress>();
  int64_t blocks = plan.count, per = plan.per;
  auto work = [progress, blocks, per, rows, &body]() {
    for (;;) {
      int64_t i = progress->next.fetch_add(1);
      if (i >= blocks) return;
      body(i, i * per, std::min(rows, (i + 1) * per));
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  // A task that starts after every block is taken returns at once; it holds
  // `progress` (shared), never `body` (which lives until the last block ends).
  for (int64_t t = 1; t < std::min<int64_t>(pool.num_threads(), blocks); ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (progress->done.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
}

template <class F>
void ParallelBlocks(ffi::ThreadPool& pool, int64_t rows, int64_t cols, int64_t align,
                    F&& body) {
  Blocks plan = PlanBlocks(pool.num_threads(), rows, cols, align,
                           std::numeric_limits<int64_t>::max());
  RunBlocks(pool, plan, rows, [&](int64_t, int64_t b, int64_t e) { body(b, e); });
}

// ---------------------------------------------------------------------------
// LaneTile transposes: 16 example rows <-> a [c][16] tile. With AVX-512,
// 16 classes at a time through a register transpose; scalar copies for the
// remaining classes (and on other CPUs). Pure data movement: the results are
// the same to the bit either way.
// ---------------------------------------------------------------------------

#if defined(__AVX512F__)
// r[i] holds row i (16 floats); afterwards r[j] holds column j.
inline void Transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {
    __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int m = 0; m < 4; ++m) {
    __m512 v0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44);
    __m512 v1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
    __m512 w0 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
    __m512 w1 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
    r[m] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[4 + m] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[8 + m] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}
#endif

// tile[j * 16 + l] = rows[l][j] for j < c.
inline void RowsToTile(const float* const rows[kLanes], int64_t c, float* tile) {
  int64_t j0 = 0;
#if defined(__AVX512F__)
  for (; j0 + kLanes <= c; j0 += kLanes) {
    __m512 r[kLanes];
    for (int l = 0; l < kLanes; ++l) r[l] = _mm512_loadu_ps(rows[l] + j0);
    Transpose16(r);
    for (int j = 0; j < kLanes; ++j) _mm512_storeu_ps(tile + (j0 + j) * kLanes, r[j]);
  }
#endif
  for (int l = 0; l < kLanes; ++l)
    for (int64_t j = j0; j < c; ++j) tile[j * kLanes + l] = rows[l][j];
}

// rows[l][j] = tile[j * 16 + l] for j < c and l < lanes.
inline void TileToRows(const float* tile, int64_t c, int lanes, float* const rows[kLanes]) {
  int64_t j0 = 0;
#if defined(__AVX512F__)
  for (; j0 + kLanes <= c; j0 += kLanes) {
    __m512 r[kLanes];
    for (int j = 0; j < kLanes; ++j) r[j] = _mm512_loadu_ps(tile + (j0 + j) * kLanes);
    Transpose16(r);
    for (int l = 0; l < lanes; ++l) _mm512_storeu_ps(rows[l] + j0, r[l]);
  }
#endif
  for (int l = 0; l < lanes; ++l)
    for (int64_t j = j0; j < c; ++j) rows[l][j] = tile[j * kLanes + l];
}

// Runs `row_fn(tile, row)` (C > 32) or `lane_fn(tile, first_row, lanes)` over
// rows [begin, end), each tile holding the logits; the callers point the tile
// at MEC rows and outputs. For LaneTile, the last group repeats its last row
// in the unused lanes (their results are dropped).
template <class RowFn, class LaneFn>
void ForRows(int64_t begin, int64_t end, int64_t c, const float* z, RowFn row_fn,
             LaneFn lane_fn) {
  if (c > kMaxLaneClasses) {
    for (int64_t r = begin; r < end; ++r) {
      RowTile t{c, z + r * c};
      row_fn(t, r);
    }
    return;
  }
  alignas(64) float tz[kMaxLaneClasses * kLanes];
  for (int64_t r0 = begin; r0 < end; r0 += kLanes) {
    int lanes = static_cast<int>(std::min<int64_t>(kLanes, end - r0));
    const float* rows[kLanes];
    for (int l = 0; l < kLanes; ++l) rows[l] = z + (r0 + std::min(l, lanes - 1)) * c;
    RowsToTile(rows, c, tz);
    LaneTile t{c, tz};
    lane_fn(t, r0, lanes);
  }
}

// A RowTile's per-example values: k floats <-> k splats (the value of lane 0).
inline void Splats(const float* src, int k, v16* v) {
  for (int i = 0; i < k; ++i) v[i] = S<v16>(src[i]);
}
inline void Firsts(const v16* v, int k, float* dst) {
  for (int i = 0; i < k; ++i) dst[i] = v[i][0];
}

// All `stride` scalars (1, 3 or 4) of a tile's examples at once:
// v[k][l] <-> buf[(r0 + l) * stride + k]. A full tile of 16 moves with a few
// vector permutes on AVX-512 (element by element, these moves cost as much
// as a value pass's arithmetic); a partial tile (the last one repeating its
// last example in the unused lanes), and other CPUs, go element by element.
// Pure data movement: the same bits either way.
#if defined(__AVX512F__)
inline __m512i LaneIota() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
#endif

inline void GetLanes(const float* src, int64_t r0, int64_t stride, int lanes, v16* v) {
#if defined(__AVX512F__)
  if (lanes == kLanes && (stride == 1 || stride == 3 || stride == 4)) {
    const float* p = src + r0 * stride;
    if (stride == 1) {
      v[0] = Bits<v16>(_mm512_loadu_ps(p));
      return;
    }
    __m512 a0 = _mm512_loadu_ps(p), a1 = _mm512_loadu_ps(p + 16);
    __m512 a2 = _mm512_loadu_ps(p + 32);
    __m512 a3 = stride == 4 ? _mm512_loadu_ps(p + 48) : a2;
    __m512i base = _mm512_mullo_epi32(LaneIota(), _mm512_set1_epi32(static_cast<int>(stride)));
    for (int64_t k = 0; k < stride; ++k) {
      __m512i g = _mm512_add_epi32(base, _mm512_set1_epi32(static_cast<int>(k)));
      // Elements 0-31 come from (a0, a1), 32-63 from (a2, a3): the
      // permutes read the low 5 bits of g.
      __m512 lo = _mm512_permutex2var_ps(a0, g, a1);
      __m512 hi = _mm512_permutex2var_ps(a2, g, a3);
      __mmask16 upper = _mm512_cmpge_epi32_mask(g, _mm512_set1_epi32(32));
      v[k] = Bits<v16>(_mm512_mask_blend_ps(upper, lo, hi));
    }
    return;
  }
#endif
  for (int64_t k = 0; k < stride; ++k)
    for (int l = 0; l < kLanes; ++l) v[k][l] = src[(r0 + std::min(l, lanes - 1)) * stride + k];
}

inline void PutLanes(float* dst, int64_t r0, int64_t stride, int lanes, const v16* v) {
#if defined(__AVX512F__)
  if (lanes == kLanes && (stride == 1 || stride == 3 || stride == 4)) {
    float* p = dst + r0 * stride;
    if (stride == 1) {
      _mm512_storeu_ps(p, Bits<__m512>(v[0]));
      return;
    }
    __m512 v0 = Bits<__m512>(v[0]), v1 = Bits<__m512>(v[1]), v2 = Bits<__m512>(v[2]);
    __m512 v3 = stride == 4 ? Bits<__m512>(v[3]) : v2;
    for (int64_t o = 0; o < stride; ++o) {
      // Element g = 16 o + e of the output is component k of example l.
      __m512i g = _mm512_add_epi32(LaneIota(), _mm512_set1_epi32(static_cast<int>(16 * o)));
      __m512i l = stride == 4 ? _mm512_srli_epi32(g, 2)
                              : _mm512_srli_epi32(_mm512_mullo_epi32(g, _mm512_set1_epi32(43691)), 17);
      __m512i k = _mm512_sub_epi32(g, _mm512_mullo_epi32(l, _mm512_set1_epi32(static_cast<int>(stride))));
      // Components 0, 1 from (v0, v1), 2, 3 from (v2, v3): bit 4 of the
      // index picks the odd one.
      __m512i idx = _mm512_or_si512(l, _mm512_slli_epi32(_mm512_and_si512(k, _mm512_set1_epi32(1)), 4));
      __m512 lo = _mm512_permutex2var_ps(v0, idx, v1);
      __m512 hi = _mm512_permutex2var_ps(v2, idx, v3);
      __mmask16 upper = _mm512_cmpge_epi32_mask(k, _mm512_set1_epi32(2));
      _mm512_storeu_ps(p + 16 * o, _mm512_mask_blend_ps(upper, lo, hi));
    }
    return;
  }
#endif
  for (int64_t k = 0; k < stride; ++k)
    for (int l = 0; l < lanes; ++l) dst[(r0 + l) * stride + k] = v[k][l];
}

// Centred logits: zc = max(z - max z, lowest) (masked classes -> lowest, so
// exp gives 0 and 0 * zc stays 0), and the row maximum (0 if all masked).
template <class T>
inline typename T::V RowMax(const T& t) {
  using V = typename T::V;
  V m = t.MaxOf([&](int64_t j) { return t.Z(j); });
  return Sel(Abs(m) <= S<V>(kMax), m, S<V>(0.0f));
}

// ---------------------------------------------------------------------------
// EM / CADF / GMC / DEM. Residual stats per example: (max, lse_p, lse_q, mean)
// with mean = E_p[zc] (entropy) or E_q[zc] (the others).
// ---------------------------------------------------------------------------

enum Mode : int64_t { kEntropy = 0, kCadf = 1, kGmc = 2, kDem = 3 };
constexpr int64_t kDemStats = 4;

template <class V> struct Moments { V lse, mean, inv_sum; };

// log sum exp(zc) and E_p[zc] of the centred logits `zc(j)`; `on_exp(j, e)`
// sees each exp(zc_j) (AdaDEM keeps them).
template <class T, class Zc, class OnExp>
ALWAYS_INLINE Moments<typename T::V> SoftmaxMoments(const T& t, Zc zc, OnExp on_exp) {
  using V = typename T::V;
  using W = V3<V>;
  W r = t.Sum3([&](int64_t j) {
    V x = zc(j), e = t.Exp(x);
    on_exp(j, e);
    return W{e, e * x, S<V>(0.0f)};
  });
  V sum = Max(r.a, S<V>(1.0f)), inv = 1.0f / sum;
  return {Log(sum), r.b * inv, inv};
}

// Keeps no exponential (the forward pass alone).
struct KeepNone {
  template <class V> void P(int64_t, V) const {}
  template <class V> void Q(int64_t, V) const {}
};

// `keep.P(j, exp(zc_j))` and `keep.Q(j, exp(zc_j / tau))` see each
// exponential the mode needs as it is made, and `inv` (if given) receives
// 1 / sum of each: what DemForwardGrad needs for the gradient.
template <class T, class Keep = KeepNone>
ALWAYS_INLINE void DemForward(const T& t, int64_t mode, float tau, float alpha,
                              typename T::V* value, typename T::V stats[kDemStats],
                              Keep keep = Keep(), typename T::V* inv = nullptr) {
  using V = typename T::V;
  V m = RowMax(t);
  auto zc = [&](int64_t j) { return Max(t.Z(j) - m, S<V>(kLowest)); };
  V lse_p = S<V>(0.f), lse_q = S<V>(0.f), mean = S<V>(0.f);
  bool need_p = mode != kCadf, need_q = mode == kCadf || mode == kDem;
  using W = V3<V>;
  if (mode == kEntropy) {
    Moments<V> mo = SoftmaxMoments(t, zc, [&](int64_t j, V e) { keep.P(j, e); });
    lse_p = mo.lse;
    mean = mo.mean;
    if (inv != nullptr) inv[0] = mo.inv_sum;
    *value = lse_p - mean;
  } else {
    float inv_tau = 1.0f / tau;
    W r;
    if (need_p && need_q) {
      r = t.Sum3([&](int64_t j) {
        V x = zc(j), e = t.Exp(x), f = t.Exp(x * inv_tau);
        keep.P(j, e);
        keep.Q(j, f);
        return W{e, f, f * x};
      });
    } else if (need_q) {
      r = t.Sum3([&](int64_t j) {
        V x = zc(j), f = t.Exp(x * inv_tau);
        keep.Q(j, f);
        return W{S<V>(0.0f), f, f * x};
      });
    } else {
      r = t.Sum3([&](int64_t j) {
        V e = t.Exp(zc(j));
        keep.P(j, e);
        return W{e, S<V>(0.0f), S<V>(0.0f)};
      });
    }
    if (need_p) {
      V sum = Max(r.a, S<V>(1.0f));
      lse_p = Log(sum);
      if (inv != nullptr) inv[0] = 1.0f / sum;
    }
    if (need_q) {
      V sum = Max(r.b, S<V>(1.0f));
      lse_q = Log(sum);
      mean = r.c / sum;
      if (inv != nullptr) inv[1] = 1.0f / sum;
    }
    if (mode == kGmc) *value = alpha * (lse_p + m);
    else if (mode == kCadf) *value = -mean - m;
    else *value = -mean + alpha * lse_p + (alpha - 1.0f) * m;
  }
  stats[0] = m; stats[1] = lse_p; stats[2] = lse_q; stats[3] = mean;
}

// dz = g (alpha p) [GMC]  - g (q / tau)(zc - E_q zc + tau) [CADF]; for the
// entropy both at once: g p (E_p zc - zc).
template <class T>
ALWAYS_INLINE void DemBackward(const T& t, int64_t mode, float tau, float alpha,
                        const typename T::V stats[kDemStats], typename T::V g) {
  using V = typename T::V;
  V m = stats[0], lse_p = stats[1], lse_q = stats[2], mean = stats[3];
  float inv_tau = 1.0f / tau;
  auto zc = [&](int64_t j) { return Max(t.Z(j) - m, S<V>(kLowest)); };
  if (mode == kEntropy) {
    t.Each([&](int64_t j) {
      V x = zc(j);
      t.Out(j, g * t.Exp(x - lse_p) * (mean - x));
    });
  } else if (mode == kGmc) {
    V ga = g * alpha;
    t.Each([&](int64_t j) { t.Out(j, ga * t.Exp(zc(j) - lse_p)); });
  } else if (mode == kCadf) {
    V gt = g * inv_tau;
    t.Each([&](int64_t j) {
      V x = zc(j);
      t.Out(j, -gt * t.Exp(x * inv_tau - lse_q) * (x - mean + tau));
    });
  } else {
    V ga = g * alpha, gt = g * inv_tau;
    t.Each([&](int64_t j) {
      V x = zc(j);
      V gmc = ga * t.Exp(x - lse_p);
      V cadf = gt * t.Exp(x * inv_tau - lse_q) * (x - mean + tau);
      t.Out(j, gmc - cadf);
    });
  }
}

int64_t Rows(const ffi::AnyBuffer& z, int64_t* c) {
  auto dims = z.dimensions();
  *c = dims.back();
  return *c == 0 ? 0 : static_cast<int64_t>(z.element_count()) / *c;
}

ffi::Error DemFwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer z, int64_t mode, float tau,
                      float alpha, ffi::Result<ffi::AnyBuffer> value,
                      ffi::Result<ffi::AnyBuffer> stats) {
  int64_t c;
  int64_t n = Rows(z, &c);
  const float* zp = z.typed_data<float>();
  float* vp = value->typed_data<float>();
  float* sp = stats->typed_data<float>();
  ParallelBlocks(pool, n, c, kLanes, [&](int64_t b, int64_t e) {
    ForRows(b, e, c, zp,
        [&](const RowTile& t, int64_t r) {
          v16 v, s[kDemStats];
          DemForward(t, mode, tau, alpha, &v, s);
          Firsts(&v, 1, vp + r);
          Firsts(s, kDemStats, sp + r * kDemStats);
        },
        [&](const LaneTile& t, int64_t r0, int lanes) {
          v16 v, s[kDemStats];
          DemForward(t, mode, tau, alpha, &v, s);
          PutLanes(vp, r0, 1, lanes, &v);
          PutLanes(sp, r0, kDemStats, lanes, s);
        });
  });
  return ffi::Error::Success();
}

// DemForward for rows of C > 32 that also writes the per-example gradient
// (DemBackward at g = 1) to t.out, for a value and gradient: each
// exponential is computed once and kept (in t.out, and in `scratch` for DEM's
// second one) from the sums to the gradient, so DEM costs two exponentials
// per logit instead of four, the others one instead of two. The backward
// pass then only scales each row by its cotangent (ScaleRows).
ALWAYS_INLINE void DemForwardGrad(const RowTile& t, int64_t mode, float tau, float alpha,
                                  float* scratch, float* value) {
  using V = v16;
  struct Keep {
    const RowTile& t;
    float *p, *q;
    void P(int64_t j, V e) const { t.Store(p, j, e); }
    void Q(int64_t j, V f) const { t.Store(q, j, f); }
  };
  float* out = t.out;
  V v, st[kDemStats], inv[2];
  DemForward(t, mode, tau, alpha, &v, st, Keep{t, out, mode == kDem ? scratch : out}, inv);
  *value = v[0];
  V m = st[0], mean = st[3];
  auto zc = [&](int64_t j) { return Max(t.Z(j) - m, S<V>(kLowest)); };
  auto kept = [&](int64_t j) { return t.Load(out, j); };
  V gp = alpha * inv[0], gq = inv[1] / tau;
  if (mode == kEntropy) {
    t.Each([&](int64_t j) { t.Out(j, kept(j) * inv[0] * (mean - zc(j))); });
  } else if (mode == kGmc) {
    t.Each([&](int64_t j) { t.Out(j, gp * kept(j)); });
  } else if (mode == kCadf) {
    t.Each([&](int64_t j) { t.Out(j, -gq * kept(j) * (zc(j) - mean + tau)); });
  } else {
    t.Each([&](int64_t j) {
      t.Out(j, gp * kept(j) - gq * t.Load(scratch, j) * (zc(j) - mean + tau));
    });
  }
}

// The value-and-gradient kernels of rows of C > 32: `row_fn(t, &value[r],
// scratch)` for each row r, with t.out at its gradient row and a scratch row
// of `scratch` floats per block.
template <class RowFn>
ffi::Error ValueGradRows(ffi::ThreadPool& pool, const ffi::AnyBuffer& z,
                         ffi::Result<ffi::AnyBuffer>& value, ffi::Result<ffi::AnyBuffer>& grad,
                         int64_t scratch, RowFn row_fn) {
  int64_t c;
  int64_t n = Rows(z, &c);
  if (n > 0 && c <= kMaxLaneClasses)
    return ffi::Error::InvalidArgument(
        "the value-and-gradient kernels take rows of more than 32 classes");
  const float* zp = z.typed_data<float>();
  float* vp = value->typed_data<float>();
  float* gp = grad->typed_data<float>();
  ParallelBlocks(pool, n, c, kLanes, [&](int64_t b, int64_t e) {
    std::vector<float> buf(scratch);
    for (int64_t r = b; r < e; ++r) {
      RowTile t{c, zp + r * c};
      t.out = gp + r * c;
      row_fn(t, vp + r, buf.data());
    }
  });
  return ffi::Error::Success();
}

ffi::Error DemFwdGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer z, int64_t mode, float tau,
                          float alpha, ffi::Result<ffi::AnyBuffer> value,
                          ffi::Result<ffi::AnyBuffer> grad) {
  int64_t scratch = mode == kDem ? z.dimensions().back() : 0;
  return ValueGradRows(pool, z, value, grad, scratch,
                       [&](const RowTile& t, float* v, float* buf) {
                         DemForwardGrad(t, mode, tau, alpha, buf, v);
                       });
}

// dz[r, :] = g[r] * grad[r, :], in place (dz is grad's buffer).
ffi::Error ScaleRowsImpl(ffi::ThreadPool pool, ffi::AnyBuffer grad, ffi::AnyBuffer g,
                         ffi::Result<ffi::AnyBuffer> dz) {
  int64_t c;
  int64_t n = Rows(grad, &c);
  const float* src = grad.typed_data<float>();
  const float* gp = g.typed_data<float>();
  float* dp = dz->typed_data<float>();
  ParallelBlocks(pool, n, c, kLanes, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float s = gp[r];
      const float* a = src + r * c;
      float* o = dp + r * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) o[j] = s * a[j];
    }
  });
  return ffi::Error::Success();
}

// Writes a transposed [c][16] gradient tile back to rows r0..r0+lanes.
inline void StoreTile(const float* tile, float* dst, int64_t r0, int lanes, int64_t c) {
  float* rows[kLanes];
  for (int l = 0; l < kLanes; ++l) rows[l] = dst + (r0 + std::min(l, lanes - 1)) * c;
  TileToRows(tile, c, lanes, rows);
}

ffi::Error DemBwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer z, ffi::AnyBuffer stats,
                      ffi::AnyBuffer g, int64_t mode, float tau, float alpha,
                      ffi::Result<ffi::AnyBuffer> dz) {
  int64_t c;
  int64_t n = Rows(z, &c);
  const float* zp = z.typed_data<float>();
  const float* sp = stats.typed_data<float>();
  const float* gp = g.typed_data<float>();
  float* dp = dz->typed_data<float>();
  ParallelBlocks(pool, n, c, kLanes, [&](int64_t b, int64_t e) {
    alignas(64) float tile[kMaxLaneClasses * kLanes];
    ForRows(b, e, c, zp,
        [&](RowTile& t, int64_t r) {
          v16 s[kDemStats];
          Splats(sp + r * kDemStats, kDemStats, s);
          t.out = dp + r * c;
          DemBackward(t, mode, tau, alpha, s, S<v16>(gp[r]));
        },
        [&](LaneTile& t, int64_t r0, int lanes) {
          v16 s[kDemStats];
          GetLanes(sp, r0, kDemStats, lanes, s);
          t.out = tile;
          v16 g;
          GetLanes(gp, r0, 1, lanes, &g);
          DemBackward(t, mode, tau, alpha, s, g);
          StoreTile(tile, dp, r0, lanes, c);
        });
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------
// AdaDEM. Stats per example: the entropy's softmax stats with delta in the
// slot of lse_q, (max, lse, delta, E_p zc), plus the pseudo-label (first
// argmax).
// ---------------------------------------------------------------------------

// The pseudo-label: the first index at the row maximum m (an all-masked row
// has none and gets 0, as jnp.argmax gives).
inline float FirstArgmaxOf(const RowTile& t, float m) {
#if defined(__AVX512F__)
  // A compare mask per 16 classes and its lowest set bit (a scalar scan of
  // the block that holds the maximum took 11% of AdaDEM's statistics pass).
  __m512 mv = _mm512_set1_ps(m);
  int64_t j = 0;
  for (; j + kLanes <= t.c; j += kLanes) {
    __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(t.z + j), mv, _CMP_EQ_OQ);
    if (hit) return static_cast<float>(j + __builtin_ctz(hit));
  }
  if (j < t.c) {
    __mmask16 live = static_cast<__mmask16>((1u << (t.c - j)) - 1u);
    __mmask16 hit = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, t.z + j), mv,
                                            _CMP_EQ_OQ);
    if (hit) return static_cast<float>(j + __builtin_ctz(hit));
  }
  return 0.0f;
#else
  constexpr int64_t kBlock = 64;  // a vectorised test per block, then a scan
  for (int64_t j0 = 0; j0 < t.c; j0 += kBlock) {
    int64_t end = std::min(t.c, j0 + kBlock);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = j0; j < end; ++j) hit |= (t.z[j] == m);
    if (hit) {
      for (int64_t j = j0; j < end; ++j)
        if (t.z[j] == m) return static_cast<float>(j);
    }
  }
  return 0.0f;
#endif
}

inline v16 FirstArgmax(const RowTile& t, v16 m) { return S<v16>(FirstArgmaxOf(t, m[0])); }

inline v16 FirstArgmax(const LaneTile& t, v16 m) {
  float none = static_cast<float>(t.c);
  v16 first = t.MinOf([&](int64_t j) {
    return Sel(t.Z(j) == m, S<v16>(static_cast<float>(j)), S<v16>(none));
  });
  return Sel(first < S<v16>(none), first, S<v16>(0.0f));
}

enum Norm : int64_t { kNoNorm = 0, kL1 = 1, kL2 = 2, kLinf = 3 };
constexpr int64_t kAdaRes = 3;  // (1 / delta, scale, empty) per example
constexpr float kDeltaFloor = 1e-6f;

// Where AdaStatsOf sends the pseudo-label and p: `Label(y)` is called as
// soon as the label is known (before the exponentials, so that the MEC
// update's table row can come into cache meanwhile), `P(j, p_j)` with each
// vector of p. This one drops both.
struct DropP {
  template <class V> void Label(V) const {}
  template <class V> void P(int64_t, V) const {}
};

// Stores p in a row of c floats or a transposed [c][16] tile.
template <class T>
struct StoreP {
  const T& t;
  float* p;
  void Label(typename T::V) const {}
  void P(int64_t j, typename T::V v) const { t.Store(p, j, v); }
};

// AdaDEM's statistics of the tile's examples: `st` = (max, lse, delta,
// E_p zc), `yhat` the pseudo-label (first argmax; nullptr for AdaDEM-Norm,
// which has none) and p, sent to `sink` (above). delta is the norm of the
// CADF reward p (zc - E_p zc + 1) (the EM reward p (zc - E_p zc) for
// AdaDEM-V); 1 without a norm. One example per call (RowTile) keeps the
// exponentials of the sum in `e` (a row of c floats, which may be where the
// sink stores p) and reuses them, p = exp(zc) / sum; sixteen (LaneTile, few
// classes) compute p = exp(zc - lse) again, to the bit what these kernels
// gave before the reuse (the README's 10-class experiments were run with it).
template <class T, class Sink>
ALWAYS_INLINE void AdaStatsOf(const T& t, int64_t norm, bool delta_from_entropy, float* e,
                              typename T::V st[kDemStats], typename T::V* yhat, Sink sink) {
  using V = typename T::V;
  constexpr bool kReuse = T::kOneExample;
  V m = RowMax(t);
  if (yhat != nullptr) {
    *yhat = FirstArgmax(t, m);
    sink.Label(*yhat);
  }
  auto zc = [&](int64_t j) { return Max(t.Z(j) - m, S<V>(kLowest)); };
  Moments<V> mo = SoftmaxMoments(t, zc, [&](int64_t j, V ej) {
    if constexpr (kReuse) t.Store(e, j, ej);
    t.Prefetch(j);
  });
  V inv = mo.inv_sum, mean = mo.mean, lse = mo.lse;
  auto prob = [&](int64_t j) {
    if constexpr (kReuse) return t.Load(e, j) * inv;
    else return t.Exp(zc(j) - lse);
  };
  float shift = delta_from_entropy ? 0.0f : 1.0f;
  auto reward = [&](int64_t j) {  // sends p on the way
    V pj = prob(j);
    sink.P(j, pj);
    return pj * (zc(j) - mean + shift);
  };
  V delta = S<V>(1.0f);
  if (norm == kNoNorm) {
    t.Each([&](int64_t j) { sink.P(j, prob(j)); });
  } else if (norm == kL1) {
    delta = t.Sum([&](int64_t j) { return Abs(reward(j)); });
  } else if (norm == kL2) {
    V sq = t.Sum([&](int64_t j) { V x = reward(j); return x * x; });
    for (int l = 0; l < kLanes; ++l) delta[l] = std::sqrt(sq[l]);
  } else if (norm == kLinf) {
    delta = t.MaxOf([&](int64_t j) { return Abs(reward(j)); });
  }
  st[0] = m; st[1] = lse; st[2] = delta; st[3] = mean;
}

// Value (T + c . z) / delta and the residuals of the backward pass; c is the
// MEC row renormalised over the live classes (or p for the GMC). `st` holds
// the softmax statistics with delta in place of the unused lse_q.
template <class T>
ALWAYS_INLINE void AdaForward(const T& t, const typename T::V st[kDemStats], bool gmc,
                              typename T::V* value, typename T::V res[kAdaRes]) {
  using V = typename T::V;
  V m = st[0], mean = st[3], delta = st[2];
  auto zc = [&](int64_t j) { return Max(t.Z(j) - m, S<V>(kLowest)); };
  V inv_delta = 1.0f / Max(delta, S<V>(kDeltaFloor));
  V numerator, scale = S<V>(0.0f), empty = S<V>(0.0f);
  if (gmc) {
    numerator = st[1] - mean;  // T + logsumexp = H
  } else {
    using W = V3<V>;
    // live = 1 for a class that is not masked (zc > lowest).
    auto live = [&](V x) { return Sel(x > S<V>(kLowest), S<V>(1.0f), S<V>(0.0f)); };
    W a = t.Sum3([&](int64_t j) {
      t.Prefetch(j);
      V x = zc(j), ml = t.M(j) * live(x);
      return W{ml, ml * x, S<V>(0.0f)};
    });
    empty = Sel(a.a > S<V>(0.0f), S<V>(0.0f), S<V>(1.0f));
    if (Any(empty)) {  // rare: the uniform row over the live classes instead
      W u = t.Sum3([&](int64_t j) {
        V x = zc(j), l = live(x);
        return W{l, l * x, S<V>(0.0f)};
      });
      a.a += empty * u.a;
      a.b += empty * u.b;
    }
    scale = 1.0f / a.a;
    numerator = scale * a.b - mean;
  }
  *value = numerator * inv_delta;
  res[0] = inv_delta; res[1] = scale; res[2] = empty;
}

// dz = g / delta (c - p (zc - E_p zc + 1)): calibrator minus CADF reward.
// `prob(j, zc_j)` gives p_j.
template <bool kGmc, class T, class Prob>
ALWAYS_INLINE void AdaGradient(const T& t, const typename T::V st[kDemStats],
                               const typename T::V res[kAdaRes], typename T::V g, Prob prob) {
  using V = typename T::V;
  V m = st[0], mean = st[3];
  V gd = g * res[0], scale = res[1], empty = res[2];
  t.Each([&](int64_t j) {
    t.Prefetch(j);
    V x = Max(t.Z(j) - m, S<V>(kLowest));
    V p = prob(j, x);
    V cadf = p * (x - mean + 1.0f);
    V cal;
    if constexpr (kGmc) {
      cal = p;
    } else {
      V live = Sel(x > S<V>(kLowest), S<V>(1.0f), S<V>(0.0f));
      cal = (t.M(j) + empty) * live * scale;
    }
    t.Out(j, gd * (cal - cadf));
  });
}

// The backward pass: p = exp(zc - lse) again.
template <bool kGmc, class T>
ALWAYS_INLINE void AdaBackward(const T& t, const typename T::V st[kDemStats],
                               const typename T::V res[kAdaRes], typename T::V g) {
  using V = typename T::V;
  V lse = st[1];
  AdaGradient<kGmc>(t, st, res, g, [&](int64_t, V x) { return t.Exp(x - lse); });
}

template <class T>
ALWAYS_INLINE void AdaBackward(const T& t, const typename T::V st[kDemStats], bool gmc,
                        const typename T::V res[kAdaRes], typename T::V g) {
  if (gmc) AdaBackward<true>(t, st, res, g);
  else AdaBackward<false>(t, st, res, g);
}

// Each LaneTile's MEC rows (by pseudo-label) from the (C, C) state, as a
// transposed [C][16] tile: with AVX-512 a permute per class from the state
// transposed once per call (transposing 16 rows per tile, the classes beyond
// 16 by scalar copies, cost more than the arithmetic that reads them);
// otherwise a transpose of the 16 rows.
class MecLanes {
 public:
  MecLanes(const float* mec, int64_t c) : mec_(mec), c_(c) {
#if defined(__AVX512F__)
    if (mec == nullptr || c > kMaxLaneClasses) return;
    mec_t_.assign(c * 2 * kLanes, 0.0f);  // [j][k] = mec[k][j], k padded to 32
    for (int64_t k = 0; k < c; ++k)
      for (int64_t j = 0; j < c; ++j) mec_t_[j * 2 * kLanes + k] = mec[k * c + j];
#endif
  }
  // Fills `tile` with the rows of examples r0 .. r0 + lanes (the last one
  // repeated in unused lanes).
  void Tile(const int32_t* yp, int64_t r0, int lanes, float* tile) const {
#if defined(__AVX512F__)
    alignas(64) int32_t y[kLanes];
    for (int l = 0; l < kLanes; ++l) y[l] = yp[r0 + std::min(l, lanes - 1)];
    __m512i labels = _mm512_load_si512(y);
    for (int64_t j = 0; j < c_; ++j) {
      const float* col = mec_t_.data() + j * 2 * kLanes;
      _mm512_storeu_ps(tile + j * kLanes,
                       _mm512_permutex2var_ps(_mm512_loadu_ps(col), labels,
                                              _mm512_loadu_ps(col + kLanes)));
    }
#else
    const float* rows[kLanes];
    for (int l = 0; l < kLanes; ++l)
      rows[l] = mec_ + static_cast<int64_t>(yp[r0 + std::min(l, lanes - 1)]) * c_;
    RowsToTile(rows, c_, tile);
#endif
  }

 private:
  const float* mec_;
  int64_t c_;
  std::vector<float> mec_t_;
};

// Software prefetch: rows of C = 1000 are about a 4 KiB page each, where the
// hardware prefetcher stops, and MEC rows are read by pseudo-label, in no
// order it could follow. Each pass over example r's row (RowTile) asks for
// one line of row r + 1 (and of its MEC row) per vector it computes
// (`RowTile::Prefetch`): the next rows arrive while this one is computed,
// and the requests are spread out (requesting all lines of a row at once,
// as this file did before, stalled the computation behind them: with the
// spread requests, and the MEC update's table row requested the same way,
// a 4096 x 1000 AdaDEM value and gradient went from about 2.05 to 1.8-1.85
// ms, best of eight alternated runs).
inline void PrefetchNext(RowTile& t, const float* zp, const float* mp, const int32_t* yp,
                         int64_t r, int64_t e) {
  if (r + 1 >= e) return;
  t.next[0] = zp + (r + 1) * t.c;
  if (mp != nullptr) t.next[1] = mp + static_cast<int64_t>(yp[r + 1]) * t.c;
}

// A gradient at least this large is written with non-temporal stores (around
// the caches, as glibc's memcpy does beyond a similar size): it cannot stay
// in cache for its consumer anyway, and ordinary stores first read every
// line they write. 4096 x 1000 AdaDEM value and gradient: about 2-4% faster
// (1.76-1.82 -> 1.74 ms, best of eight alternated runs, twice).
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// Values and backward residuals of every example, with the MEC state `mp`
// (rows read by pseudo-label) or the GMC; stats [N, 4] carry delta.
void AdaValues(ffi::ThreadPool& pool, const float* zp, int64_t n, int64_t c, const float* sp,
               const int32_t* yp, const float* mp, bool gmc, float* vp, float* rp) {
  MecLanes lanes_mec(gmc ? nullptr : mp, gmc ? 0 : c);
  ParallelBlocks(pool, n, c, kLanes, [&](int64_t b, int64_t e) {
    alignas(64) float tm[kMaxLaneClasses * kLanes];
    ForRows(b, e, c, zp,
        [&](RowTile& t, int64_t r) {
          PrefetchNext(t, zp, gmc ? nullptr : mp, yp, r, e);
          if (!gmc) t.mec_row = mp + static_cast<int64_t>(yp[r]) * c;
          v16 st[kDemStats], v, out[kAdaRes];
          Splats(sp + r * kDemStats, kDemStats, st);
          AdaForward(t, st, gmc, &v, out);
          Firsts(&v, 1, vp + r);
          Firsts(out, kAdaRes, rp + r * kAdaRes);
        },
        [&](LaneTile& t, int64_t r0, int lanes) {
          if (!gmc) {
            lanes_mec.Tile(yp, r0, lanes, tm);
            t.mec = tm;
          }
          v16 st[kDemStats], v, out[kAdaRes];
          GetLanes(sp, r0, kDemStats, lanes, st);
          AdaForward(t, st, gmc, &v, out);
          PutLanes(vp, r0, 1, lanes, &v);
          PutLanes(rp, r0, kAdaRes, lanes, out);
        });
  });
}

// Tables kept between calls take at most this much memory.
constexpr int64_t kSumsBudget = int64_t{64} << 20;

// The MEC update's sums over one block of rows: a private (C, C) table of
// w * p per pseudo-label and the counts of w. A class row is zeroed when the
// block first meets the class, so a block pays only for the classes it has.
class ClassSums {
 public:
  explicit ClassSums(int64_t c)
      : c_(c), table_(Table(c)), counts_(c, 0.0f), seen_(c, 0), scratch_(c) {}
  ~ClassSums() { Recycle(std::move(table_), c_); }
  ClassSums(const ClassSums&) = delete;
  ClassSums& operator=(const ClassSums&) = delete;

  // Where an example of class k with weight w adds w * p (C floats): class
  // k's row (zeroed when first met), or a scratch row for w = 0 (masked
  // examples take no part in the update).
  float* Begin(int64_t k, float w) {
    if (w == 0.0f) return scratch_.data();
    float* row = table_.get() + k * c_;
    if (!seen_[k]) {
      seen_[k] = 1;
      std::memset(row, 0, sizeof(float) * c_);
    }
    counts_[k] += w;
    return row;
  }
  void Add(int64_t k, float w, const float* p) {
    float* row = Begin(k, w);
#pragma omp simd
    for (int64_t j = 0; j < c_; ++j) row[j] += w * p[j];
  }
  bool Seen(int64_t k) const { return seen_[k] != 0; }
  float* Row(int64_t k) { return table_.get() + k * c_; }
  float Count(int64_t k) const { return counts_[k]; }

 private:
  // Tables are kept for the next call (up to kSumsBudget in all): fresh
  // memory costs a page fault per 4 KiB on first touch, which for C = 1000
  // took longer than the whole pass.
  static std::mutex& PoolLock() {
    static std::mutex lock;
    return lock;
  }
  static std::vector<std::pair<int64_t, std::unique_ptr<float[]>>>& Pool() {
    static auto* pool = new std::vector<std::pair<int64_t, std::unique_ptr<float[]>>>();
    return *pool;
  }
  static std::unique_ptr<float[]> Table(int64_t c) {
    std::lock_guard<std::mutex> guard(PoolLock());
    auto& pool = Pool();
    for (auto it = pool.begin(); it != pool.end(); ++it) {
      if (it->first != c) continue;
      std::unique_ptr<float[]> table = std::move(it->second);
      pool.erase(it);
      return table;
    }
    return std::unique_ptr<float[]>(new float[c * c]);
  }
  static void Recycle(std::unique_ptr<float[]> table, int64_t c) {
    std::lock_guard<std::mutex> guard(PoolLock());
    auto& pool = Pool();
    int64_t held = 0;
    for (const auto& entry : pool) held += entry.first * entry.first;
    if ((held + c * c) * 4 <= kSumsBudget) pool.emplace_back(c, std::move(table));
  }

  int64_t c_;
  std::unique_ptr<float[]> table_;
  std::vector<float> counts_;
  std::vector<uint8_t> seen_;
  std::vector<float> scratch_;
};

// stats [N, 4] (max, lse, delta, E_p zc), yhat [N] (first argmax) and, per
// class, `sums` [C, C] of w * p and `counts` [C] of w (the MEC update's
// segment sums), in one pass over the logits: each block of rows adds into
// a private table, and the tables are added in block order (the same input
// gives the same sums to the last bit, for a given number of threads). With
// `old` (the MEC state) the update is done here too, `sums` receiving the new
// state (it may be `old` itself: rows of absent classes are then not touched),
// and the values `vp` and residuals `rp` follow from a second pass.
void AdaStatsImpl(ffi::ThreadPool& pool, const float* zp, int64_t n, int64_t c,
                  int64_t norm, bool delta_from_entropy, float* sp, int32_t* yp,
                  const float* wp, float* sums, float* counts, const float* old,
                  float momentum, float* vp, float* rp) {
  bool lanes_layout = c <= kMaxLaneClasses;
  int64_t threads = pool.num_threads();
  // Many classes: a block per thread. Each (C, C) table is touched only in
  // the rows of its block's classes (the rest is never written, so a fresh
  // table's untouched pages take no memory): beyond the tables kept between
  // calls, at most the logits' size.
  int64_t max_blocks = lanes_layout ? std::numeric_limits<int64_t>::max() : threads;
  Blocks plan = PlanBlocks(threads, n, c, kLanes, max_blocks);
  std::vector<std::unique_ptr<ClassSums>> parts(plan.count);
  RunBlocks(pool, plan, n, [&](int64_t i, int64_t b, int64_t e) {
    parts[i] = std::make_unique<ClassSums>(c);
    ClassSums& part = *parts[i];
    // Many classes: p goes straight into the table row of the example's
    // class, whose lines are requested one per vector of the exponentials
    // (`Prefetch`) once the pseudo-label is known.
    std::vector<float> exps(lanes_layout ? 0 : c);
    ForRows(b, e, c, zp,
        [&](RowTile& t, int64_t r) {
          PrefetchNext(t, zp, nullptr, yp, r, e);
          struct AddToTable {
            RowTile& t;
            ClassSums& part;
            float w;
            float* row = nullptr;
            void Label(v16 y) {
              row = part.Begin(static_cast<int64_t>(y[0]), w);
              t.next[1] = row;
            }
            void P(int64_t j, v16 p) const { t.Store(row, j, t.Load(row, j) + w * p); }
          } add{t, part, wp[r]};
          v16 st[kDemStats], y;
          AdaStatsOf(t, norm, delta_from_entropy, exps.data(), st, &y, add);
          Firsts(st, kDemStats, sp + r * kDemStats);
          yp[r] = static_cast<int32_t>(y[0]);
        },
        [&](const LaneTile& t, int64_t r0, int lanes) {
          v16 pt[kMaxLaneClasses], st[kDemStats], y;
          AdaStatsOf(t, norm, delta_from_entropy, nullptr, st, &y,
                     StoreP<LaneTile>{t, reinterpret_cast<float*>(pt)});
          PutLanes(sp, r0, kDemStats, lanes, st);
          // Back to one row per example, so that each is added with vector ops.
          alignas(64) float rows_p[kLanes * kMaxLaneClasses];
          float* rows[kLanes];
          for (int l = 0; l < kLanes; ++l) rows[l] = rows_p + l * c;
          TileToRows(reinterpret_cast<const float*>(pt), c, lanes, rows);
          for (int l = 0; l < lanes; ++l) {
            yp[r0 + l] = static_cast<int32_t>(y[l]);
            part.Add(yp[r0 + l], wp[r0 + l], rows[l]);
          }
        });
  });
  // Per class: the blocks' rows in block order, then the sums (or the update).
  ParallelBlocks(pool, c, c * plan.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      float* acc = nullptr;
      counts[k] = 0.0f;
      for (auto& part : parts) {
        if (!part->Seen(k)) continue;
        float* row = part->Row(k);
        if (acc == nullptr) {
          acc = row;
        } else {
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) acc[j] += row[j];
        }
        counts[k] += part->Count(k);
      }
      float* out = sums + k * c;
      if (old == nullptr) {  // the sums themselves
        if (acc != nullptr) std::memcpy(out, acc, sizeof(float) * c);
        else std::memset(out, 0, sizeof(float) * c);
        continue;
      }
      if (acc != nullptr && counts[k] > 0.0f) {
        const float* prev = old + k * c;
        float inv = 1.0f / counts[k], keep = 1.0f - momentum;
#pragma omp simd
        for (int64_t j = 0; j < c; ++j) out[j] = keep * prev[j] + momentum * (acc[j] * inv);
      } else if (out != old + k * c) {  // absent class: the old row
        std::memcpy(out, old + k * c, sizeof(float) * c);
      }
    }
  });
  // A pass over the rows for the values: for many classes, reading the rows
  // grouped by pseudo-label while each new class row is in cache measured
  // slower (1.3 against 0.85 ms at 4096 x 1000) than reading MEC rows here.
  if (old != nullptr) AdaValues(pool, zp, n, c, sp, yp, sums, false, vp, rp);
}

ffi::Error AdaStatsFfi(ffi::ThreadPool pool, ffi::AnyBuffer z, ffi::AnyBuffer weights,
                       int64_t norm, int64_t delta_from_entropy,
                       ffi::Result<ffi::AnyBuffer> stats, ffi::Result<ffi::AnyBuffer> yhat,
                       ffi::Result<ffi::AnyBuffer> sums, ffi::Result<ffi::AnyBuffer> counts) {
  int64_t c;
  int64_t n = Rows(z, &c);
  AdaStatsImpl(pool, z.typed_data<float>(), n, c, norm, delta_from_entropy,
               stats->typed_data<float>(), yhat->typed_data<int32_t>(),
               weights.typed_data<float>(), sums->typed_data<float>(),
               counts->typed_data<float>(), nullptr, 0.0f, nullptr, nullptr);
  return ffi::Error::Success();
}

ffi::Error AdaStatsUpdateFfi(ffi::ThreadPool pool, ffi::AnyBuffer z, ffi::AnyBuffer weights,
                             ffi::AnyBuffer mec, float momentum, int64_t norm,
                             int64_t delta_from_entropy,
                             ffi::Result<ffi::AnyBuffer> stats,
                             ffi::Result<ffi::AnyBuffer> yhat,
                             ffi::Result<ffi::AnyBuffer> new_mec,
                             ffi::Result<ffi::AnyBuffer> value,
                             ffi::Result<ffi::AnyBuffer> res) {
  int64_t c;
  int64_t n = Rows(z, &c);
  std::vector<float> counts(c);  // the update's per-class weights, used here only
  AdaStatsImpl(pool, z.typed_data<float>(), n, c, norm, delta_from_entropy,
               stats->typed_data<float>(), yhat->typed_data<int32_t>(),
               weights.typed_data<float>(), new_mec->typed_data<float>(),
               counts.data(), mec.typed_data<float>(), momentum,
               value->typed_data<float>(), res->typed_data<float>());
  return ffi::Error::Success();
}

ffi::Error AdaFwdFfi(ffi::ThreadPool pool, ffi::AnyBuffer z, ffi::AnyBuffer stats,
                     ffi::AnyBuffer yhat, ffi::AnyBuffer mec, int64_t gmc,
                     ffi::Result<ffi::AnyBuffer> value, ffi::Result<ffi::AnyBuffer> res) {
  int64_t c;
  int64_t n = Rows(z, &c);
  AdaValues(pool, z.typed_data<float>(), n, c, stats.typed_data<float>(),
            yhat.typed_data<int32_t>(), mec.typed_data<float>(), gmc != 0,
            value->typed_data<float>(), res->typed_data<float>());
  return ffi::Error::Success();
}

// AdaDEM-Norm (the GMC calibrator, no MEC): nothing waits for a batch
// statistic, so the softmax statistics and the value come from one pass.
ffi::Error AdaNormFwdFfi(ffi::ThreadPool pool, ffi::AnyBuffer z, int64_t norm,
                         int64_t delta_from_entropy, ffi::Result<ffi::AnyBuffer> value,
                         ffi::Result<ffi::AnyBuffer> stats, ffi::Result<ffi::AnyBuffer> res) {
  int64_t c;
  int64_t n = Rows(z, &c);
  const float* zp = z.typed_data<float>();
  float* vp = value->typed_data<float>();
  float* sp = stats->typed_data<float>();
  float* rp = res->typed_data<float>();
  ParallelBlocks(pool, n, c, kLanes, [&](int64_t b, int64_t e) {
    std::vector<float> p(c <= kMaxLaneClasses ? 0 : c);
    ForRows(b, e, c, zp,
        [&](RowTile& t, int64_t r) {
          v16 st[kDemStats], v, out[kAdaRes];
          AdaStatsOf(t, norm, delta_from_entropy, p.data(), st, nullptr, DropP{});
          AdaForward(t, st, true, &v, out);
          Firsts(&v, 1, vp + r);
          Firsts(st, kDemStats, sp + r * kDemStats);
          Firsts(out, kAdaRes, rp + r * kAdaRes);
        },
        [&](LaneTile& t, int64_t r0, int lanes) {
          v16 st[kDemStats], v, out[kAdaRes];
          AdaStatsOf(t, norm, delta_from_entropy, nullptr, st, nullptr, DropP{});
          AdaForward(t, st, true, &v, out);
          PutLanes(vp, r0, 1, lanes, &v);
          PutLanes(sp, r0, kDemStats, lanes, st);
          PutLanes(rp, r0, kAdaRes, lanes, out);
        });
  });
  return ffi::Error::Success();
}

// AdaDEM-Norm for rows of C > 32, for a value and gradient: the value and the
// gradient at cotangent 1 in one pass, p kept in the gradient's row from the
// statistics to the gradient (one exponential per logit; ScaleRows is the
// backward pass).
ffi::Error AdaNormFwdGradFfi(ffi::ThreadPool pool, ffi::AnyBuffer z, int64_t norm,
                             int64_t delta_from_entropy, ffi::Result<ffi::AnyBuffer> value,
                             ffi::Result<ffi::AnyBuffer> grad) {
  return ValueGradRows(pool, z, value, grad, 0, [&](const RowTile& t, float* v, float*) {
    v16 st[kDemStats], value, res[kAdaRes];
    AdaStatsOf(t, norm, delta_from_entropy, t.out, st, nullptr, StoreP<RowTile>{t, t.out});
    AdaForward(t, st, true, &value, res);
    *v = value[0];
    AdaGradient<true>(t, st, res, S<v16>(1.0f), [&](int64_t j, v16) { return t.Load(t.out, j); });
  });
}

ffi::Error AdaBwdFfi(ffi::ThreadPool pool, ffi::AnyBuffer z, ffi::AnyBuffer stats,
                     ffi::AnyBuffer yhat, ffi::AnyBuffer mec, ffi::AnyBuffer res,
                     ffi::AnyBuffer g, int64_t gmc, ffi::Result<ffi::AnyBuffer> dz) {
  int64_t c;
  int64_t n = Rows(z, &c);
  const float* zp = z.typed_data<float>();
  const float* sp = stats.typed_data<float>();
  const int32_t* yp = yhat.typed_data<int32_t>();
  const float* mp = mec.typed_data<float>();
  const float* rp = res.typed_data<float>();
  const float* gp = g.typed_data<float>();
  float* dp = dz->typed_data<float>();
  MecLanes lanes_mec(gmc ? nullptr : mp, gmc ? 0 : c);
  bool stream = n * c * static_cast<int64_t>(sizeof(float)) >= kStreamBytes;
  ParallelBlocks(pool, n, c, kLanes, [&](int64_t b, int64_t e) {
    alignas(64) float tm[kMaxLaneClasses * kLanes];
    alignas(64) float tile[kMaxLaneClasses * kLanes];
    ForRows(b, e, c, zp,
        [&](RowTile& t, int64_t r) {
          PrefetchNext(t, zp, gmc ? nullptr : mp, yp, r, e);
          if (!gmc) t.mec_row = mp + static_cast<int64_t>(yp[r]) * c;
          t.out = dp + r * c;
          t.stream_out = stream;
          v16 st[kDemStats], rs[kAdaRes];
          Splats(sp + r * kDemStats, kDemStats, st);
          Splats(rp + r * kAdaRes, kAdaRes, rs);
          AdaBackward(t, st, gmc, rs, S<v16>(gp[r]));
        },
        [&](LaneTile& t, int64_t r0, int lanes) {
          if (!gmc) {
            lanes_mec.Tile(yp, r0, lanes, tm);
            t.mec = tm;
          }
          v16 st[kDemStats], rs[kAdaRes];
          GetLanes(sp, r0, kDemStats, lanes, st);
          GetLanes(rp, r0, kAdaRes, lanes, rs);
          t.out = tile;
          v16 g;
          GetLanes(gp, r0, 1, lanes, &g);
          AdaBackward(t, st, gmc, rs, g);
          StoreTile(tile, dp, r0, lanes, c);
        });
#if defined(__AVX512F__)
    if (stream) _mm_sfence();  // the streamed rows are visible when the block ends
#endif
  });
  return ffi::Error::Success();
}

}  // namespace

// The handlers: arguments, attributes and results in the order of the
// functions above (Buf = any-dtype buffer; the Python side passes float32
// and int32 arrays of the documented shapes).
using Buf = ffi::AnyBuffer;

XLA_FFI_DEFINE_HANDLER_SYMBOL(DemFwd, DemFwdImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>()
        .Attr<int64_t>("mode").Attr<float>("tau").Attr<float>("alpha")
        .Ret<Buf>().Ret<Buf>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DemBwd, DemBwdImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>().Arg<Buf>().Arg<Buf>()
        .Attr<int64_t>("mode").Attr<float>("tau").Attr<float>("alpha")
        .Ret<Buf>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DemFwdGrad, DemFwdGradImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>()
        .Attr<int64_t>("mode").Attr<float>("tau").Attr<float>("alpha")
        .Ret<Buf>().Ret<Buf>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScaleRows, ScaleRowsImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>().Arg<Buf>().Ret<Buf>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaStats, AdaStatsFfi,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>().Arg<Buf>()
        .Attr<int64_t>("norm").Attr<int64_t>("delta_from_entropy")
        .Ret<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaStatsUpdate, AdaStatsUpdateFfi,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>().Arg<Buf>().Arg<Buf>()
        .Attr<float>("momentum").Attr<int64_t>("norm").Attr<int64_t>("delta_from_entropy")
        .Ret<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>().Ret<Buf>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaFwd, AdaFwdFfi,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>()
        .Attr<int64_t>("gmc")
        .Ret<Buf>().Ret<Buf>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaNormFwd, AdaNormFwdFfi,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>()
        .Attr<int64_t>("norm").Attr<int64_t>("delta_from_entropy")
        .Ret<Buf>().Ret<Buf>().Ret<Buf>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaNormFwdGrad, AdaNormFwdGradFfi,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>()
        .Attr<int64_t>("norm").Attr<int64_t>("delta_from_entropy")
        .Ret<Buf>().Ret<Buf>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdaBwd, AdaBwdFfi,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>().Arg<Buf>()
        .Attr<int64_t>("gmc")
        .Ret<Buf>());
