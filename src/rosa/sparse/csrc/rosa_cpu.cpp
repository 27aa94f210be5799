// RoSA's three sparse operations on CPU: fp32 or bf16 operands read as they are, fp32 accumulation,
// token-tiled, parallel over OpenMP threads, deterministic (the result does not depend on the thread count).
//
// Plain C ABI, loaded with ctypes by rosa/sparse/cpu_build.py: no torch or Python headers, so the library builds in
// seconds with any C++17 compiler and does not depend on the torch version. Indices reaching these functions were
// validated by rosa.sparse.support; compiled with -DROSA_BOUNDS_CHECK they are checked again here (tests).
//
// S is rows x cols in CSR. "The operand" is the dense input whose columns the nonzeros index (X for spmm and sddmm,
// dY for spmm_t). Tokens are cut into panels of TB; a panel of the operand is packed feature-major into fp32,
// P[c][0:TB] = operand(t0:t0+TB, c), zero-padded, so that a nonzero (r, c) reads one contiguous run of TB floats.
// The columns are cut into blocks of CB so that a block of the panel (CB x TB floats) stays in a core's L2 cache
// while every row's nonzeros in that block use it (`Segments`: where each row's nonzeros cross into a block).
//
//   spmm / spmm_t: out(t, r) = sum_k v_k P[c_k][t]. Tasks are (panel, range of rows); a task packs its own panel
//     and carries each row's TB accumulators across the column blocks in a small buffer (the running sum goes on
//     in CSR order). Each output element belongs to one task.
//   sddmm: out[k] = sum_t dY(t, r_k) P[c_k][t]. Tasks are (chunk of panels, range of rows); a task packs its
//     panels of X and of its rows of dY and sums the chunk's dot products for its nonzeros. The chunks (at most
//     kMaxChunks, fixed by the token count) are added in order at the end.
//
// Threads take tasks as they come (no barrier inside a call: a thread the OS deschedules delays only its own
// task), and every sum runs in an order fixed by the shapes, so the result does not depend on the thread count.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kF32 = 0;
constexpr int kBF16 = 1;
constexpr int kRowBlock = 32;    // rows whose results go out together: whole cache lines of each output row
constexpr int kPackChunk = 128;  // columns of a panel packed together (see transpose)
constexpr int kLanes = 8;        // floats per vector (32 bytes)

typedef float vec __attribute__((vector_size(32)));

inline vec vload(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void vstore(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN made quiet: torch's own conversion
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = f32_to_bf16(v); }

// --- 8 x 8 transposes: dst[i * ds + j] = src[j * ss + i] for i, j < 8 ------------------------------------------

#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(uint16_t* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <typename TS, typename TD>
inline void transpose8(const TS* src, int64_t ss, TD* dst, int64_t ds) {
  __m256 r0 = load8(src), r1 = load8(src + ss), r2 = load8(src + 2 * ss), r3 = load8(src + 3 * ss);
  __m256 r4 = load8(src + 4 * ss), r5 = load8(src + 5 * ss), r6 = load8(src + 6 * ss), r7 = load8(src + 7 * ss);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  store8(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
  store8(dst + ds, _mm256_permute2f128_ps(s1, s5, 0x20));
  store8(dst + 2 * ds, _mm256_permute2f128_ps(s2, s6, 0x20));
  store8(dst + 3 * ds, _mm256_permute2f128_ps(s3, s7, 0x20));
  store8(dst + 4 * ds, _mm256_permute2f128_ps(s0, s4, 0x31));
  store8(dst + 5 * ds, _mm256_permute2f128_ps(s1, s5, 0x31));
  store8(dst + 6 * ds, _mm256_permute2f128_ps(s2, s6, 0x31));
  store8(dst + 7 * ds, _mm256_permute2f128_ps(s3, s7, 0x31));
}
#else
template <typename TS, typename TD>
inline void transpose8(const TS* src, int64_t ss, TD* dst, int64_t ds) {
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) put(dst + i * ds + j, to_f32(src[j * ss + i]));
}
#endif

// dst[i * ds + j] = src(j, i) = src[j * st + i * sc] for i < ni, j < nj, as fp32 or bf16. Where the source rows
// are contiguous (sc == 1) it goes in 8 x 8 blocks through registers, CI values of i at a time: the source is read
// along its rows and the destination rows of a chunk are completed while they are in L1 (CI = 8 when the
// destination rows are far apart, as the rows of a layer's output are; wider when they are close, as in a panel).
template <int CI, typename TS, typename TD>
void transpose(const TS* src, int64_t st, int64_t sc, int64_t ni, int64_t nj, TD* dst, int64_t ds) {
  static_assert(CI % 8 == 0, "chunks are whole 8 x 8 blocks");
  int64_t ni8 = 0, nj8 = 0;
  if (sc == 1) {
    ni8 = ni / 8 * 8;
    nj8 = nj / 8 * 8;
    for (int64_t ic = 0; ic < ni8; ic += CI) {
      const int64_t ie = std::min(ni8, ic + CI);
      for (int64_t j0 = 0; j0 < nj8; j0 += 8)
        for (int64_t i0 = ic; i0 < ie; i0 += 8) transpose8(src + j0 * st + i0, st, dst + i0 * ds + j0, ds);
    }
  }
  for (int64_t i = 0; i < ni8; ++i)
    for (int64_t j = nj8; j < nj; ++j) put(dst + i * ds + j, to_f32(src[j * st + i * sc]));
  for (int64_t i = ni8; i < ni; ++i)
    for (int64_t j = 0; j < nj; ++j) put(dst + i * ds + j, to_f32(src[j * st + i * sc]));
}

// A strided 2-D operand: element (t, c) at data + t * st + c * sc (in elements).
struct View {
  const void* data;
  int dtype;
  int64_t st, sc;
};

// Pack columns [c0, c1) of tokens [t0, t0 + tb) of `v` into p[c * TB + j] (fp32), zero for tb <= j < TB.
template <int TB>
void pack_panel(const View& v, int64_t t0, int tb, int64_t c0, int64_t c1, float* p) {
  float* dst = p + c0 * TB;
  if (v.dtype == kF32) {
    const float* src = static_cast<const float*>(v.data) + t0 * v.st + c0 * v.sc;
    transpose<kPackChunk>(src, v.st, v.sc, c1 - c0, tb, dst, TB);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(v.data) + t0 * v.st + c0 * v.sc;
    transpose<kPackChunk>(src, v.st, v.sc, c1 - c0, tb, dst, TB);
  }
  if (tb < TB)
    for (int64_t c = c0; c < c1; ++c) std::memset(p + c * TB + tb, 0, sizeof(float) * (TB - tb));
}

// Where the nonzeros of rows [r0, r0 + n) cross into the next column block: seg[(r - r0) * (blocks + 1) + b] is the
// first nonzero of row r whose column is >= b * cb (columns are sorted within a row). Each task fills its own.
struct Segments {
  int64_t blocks, r0;
  int32_t* seg;
  int32_t begin(int64_t r, int64_t b) const { return seg[(r - r0) * (blocks + 1) + b]; }
  int32_t end(int64_t r, int64_t b) const { return seg[(r - r0) * (blocks + 1) + b + 1]; }
};

Segments fill_segments(const int32_t* ro, const int32_t* ci, int64_t r0, int64_t r1, int64_t cb, int64_t blocks,
                       int32_t* seg) {
  for (int64_t r = r0; r < r1; ++r) {
    int32_t k = ro[r];
    const int32_t end = ro[r + 1];
    int32_t* out = seg + (r - r0) * (blocks + 1);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t lo = b * cb;
      while (k < end && ci[k] < lo) ++k;
      out[b] = k;
    }
    out[blocks] = end;
  }
  return Segments{blocks, r0, seg};
}

// Work below which one thread does it all: waking the others costs more than they would save.
constexpr int64_t kMinWorkPerThread = 1 << 20;

int threads_for(int nthreads, int64_t tasks, int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(nthreads), tasks, work / kMinWorkPerThread})));
}

// Scratch memory for one call: `per_thread` floats for each thread, 64-byte aligned.
struct Scratch {
  float* data = nullptr;
  size_t per_thread = 0;
  Scratch(size_t floats, int threads) : per_thread((floats + 15) / 16 * 16) {
    data = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * std::max<size_t>(per_thread, 16) * threads));
  }
  ~Scratch() { std::free(data); }
  float* of(int thread) const { return data + per_thread * size_t(thread); }
};

// First row of share `part` of `parts` when a row costs its nonzeros plus a fixed overhead.
int64_t row_split(const int32_t* ro, int64_t rows, int64_t part, int64_t parts) {
  if (part <= 0) return 0;
  if (part >= parts) return rows;
  constexpr int64_t kRowCost = 4;  // a row's own work (its accumulators, its store), in nonzeros
  const int64_t goal = (int64_t(ro[rows]) + kRowCost * rows) * part / parts;
  int64_t lo = 0, hi = rows;  // the smallest r whose cost reaches the goal
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (int64_t(ro[mid]) + kRowCost * mid < goal)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// a[0:NV] += sum of values[k - k0] * P[ci[k]] over k in [k0, k1) (values: the row's own). With fewer than 8 vectors a nonzero, U = 8 / NV
// interleaved sets of accumulators keep 8 independent FMA chains in flight; they are summed in a fixed tree.
template <int NV>
inline void row_axpy(vec* a, const float* p, const float* values, const int32_t* ci, int32_t k0, int32_t k1) {
  constexpr int TB = NV * kLanes;
  constexpr int U = NV >= 8 ? 1 : 8 / NV;
  vec part[U][NV];
  for (int q = 0; q < NV; ++q) part[0][q] = a[q];
  for (int u = 1; u < U; ++u)
    for (int q = 0; q < NV; ++q) part[u][q] = vec{};
  int32_t k = k0;
  for (; k + U <= k1; k += U)
    for (int u = 0; u < U; ++u) {
      const float v = values[k + u - k0];
      const float* x = p + int64_t(ci[k + u]) * TB;
      for (int q = 0; q < NV; ++q) part[u][q] += v * vload(x + q * kLanes);
    }
  for (; k < k1; ++k) {
    const float v = values[k - k0];
    const float* x = p + int64_t(ci[k]) * TB;
    for (int q = 0; q < NV; ++q) part[0][q] += v * vload(x + q * kLanes);
  }
  for (int width = 1; width < U; width *= 2)  // ((p0 + p1) + (p2 + p3)) + ...
    for (int u = 0; u + width < U; u += 2 * width)
      for (int q = 0; q < NV; ++q) part[u][q] += part[u + width][q];
  for (int q = 0; q < NV; ++q) a[q] = part[0][q];
}

// One spmm task: rows [ra, rb) of panel t0 (p: the packed panel; acc: (rb - ra) x TB floats when there are several
// column blocks).
template <int TB, typename TOut>
void spmm_task(const float* p, const float* values, const int32_t* ci, const Segments& s, int64_t ra, int64_t rb,
               float* acc, TOut* out, int64_t out_stride, int64_t t0, int tb) {
  constexpr int NV = TB / kLanes;
  alignas(64) float buf[kRowBlock * TB];
  for (int64_t b = 0; b < s.blocks; ++b) {
    const bool last = b + 1 == s.blocks;
    for (int64_t r0 = ra; r0 < rb; r0 += kRowBlock) {
      const int nr = int(std::min<int64_t>(kRowBlock, rb - r0));
      for (int i = 0; i < nr; ++i) {
        const int64_t r = r0 + i;
        float* run = acc + (r - ra) * TB;  // the row's running sums between blocks
        vec a[NV];
        for (int q = 0; q < NV; ++q) a[q] = b == 0 ? vec{} : vload(run + q * kLanes);
        const int32_t k0 = s.begin(r, b);
        row_axpy<NV>(a, p, values + k0, ci, k0, s.end(r, b));
        float* dst = last ? buf + i * TB : run;
        for (int q = 0; q < NV; ++q) vstore(dst + q * kLanes, a[q]);
      }
      if (last) transpose<8>(buf, TB, 1, tb, nr, out + t0 * out_stride + r0, out_stride);  // out(t0 + j, r0 + i)
    }
  }
}

template <int TB>
int spmm_impl(const View& x, int64_t tokens, int64_t cols, const float* values, const int32_t* ro, const int32_t* ci,
              int64_t rows, void* out, int out_dtype, int64_t cb, int nthreads) {
  const int64_t panels = (tokens + TB - 1) / TB;
  const int64_t blocks = std::max<int64_t>(1, (cols + cb - 1) / cb);
  // Tasks: every panel, its rows cut in enough ranges to give each thread about two tasks.
  const int64_t ranges = std::max<int64_t>(1, (2 * nthreads + panels - 1) / std::max<int64_t>(panels, 1));
  const int64_t tasks = panels * ranges;
  int64_t max_rows = 0;  // the most rows any task holds
  for (int64_t part = 0; part < ranges; ++part)
    max_rows = std::max(max_rows, row_split(ro, rows, part + 1, ranges) - row_split(ro, rows, part, ranges));
  // Per thread: the packed panel, the rows' running sums, their segments.
  const size_t panel_floats = size_t(std::max<int64_t>(cols, 1)) * TB;
  const size_t acc_floats = blocks > 1 ? size_t(max_rows) * TB : 0;
  const Scratch scratch(panel_floats + acc_floats + size_t(max_rows) * size_t(blocks + 1), nthreads);
  if (scratch.data == nullptr) return 2;
  const int nt = threads_for(nthreads, tasks, int64_t(ro[rows]) * tokens + tokens * (rows + cols));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t pi = task / ranges, part = task % ranges;
    const int64_t ra = row_split(ro, rows, part, ranges), rb = row_split(ro, rows, part + 1, ranges);
    const int64_t t0 = pi * TB;
    const int tb = int(std::min<int64_t>(TB, tokens - t0));
    float* p = scratch.of(omp_get_thread_num());
    float* acc = p + panel_floats;
    int32_t* seg = reinterpret_cast<int32_t*>(acc + acc_floats);
    const Segments segs = fill_segments(ro, ci, ra, rb, cb, blocks, seg);
    pack_panel<TB>(x, t0, tb, 0, cols, p);
    if (out_dtype == kF32)
      spmm_task<TB>(p, values, ci, segs, ra, rb, acc, static_cast<float*>(out), rows, t0, tb);
    else
      spmm_task<TB>(p, values, ci, segs, ra, rb, acc, static_cast<uint16_t*>(out), rows, t0, tb);
  }
  return 0;
}

// The sum of a vector's lanes, in the order of the vectorised reduction below.
inline float lane_sum(vec a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

#if defined(__AVX2__)
// The lane sums of eight vectors, as one vector (the same additions, in the same order, as lane_sum).
inline __m256 lane_sums8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// out[k] (+)= dot(g, P[ci[k]]) over k in [k0, k1): eight nonzeros at a time where the target allows (eight
// independent FMA chains, one reduction for the eight), one at a time otherwise; both give the same bits.
template <int NV>
inline void row_dots(const vec* g, const float* p, const int32_t* ci, int32_t k0, int32_t k1, bool first, float* out) {
  constexpr int TB = NV * kLanes;
  int32_t k = k0;
#if defined(__AVX2__)
  for (; k + 8 <= k1; k += 8) {
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) {
      const float* x = p + int64_t(ci[k + u]) * TB;
      vec s = g[0] * vload(x);
      for (int q = 1; q < NV; ++q) s += g[q] * vload(x + q * kLanes);
      acc[u] = (__m256)s;
    }
    const __m256 dots = lane_sums8(acc);
    _mm256_storeu_ps(out + k, first ? dots : _mm256_add_ps(_mm256_loadu_ps(out + k), dots));
  }
#endif
  for (; k < k1; ++k) {
    const float* x = p + int64_t(ci[k]) * TB;
    vec s = g[0] * vload(x);
    for (int q = 1; q < NV; ++q) s += g[q] * vload(x + q * kLanes);
    const float dot = lane_sum(s);
    out[k] = first ? dot : out[k] + dot;
  }
}

// One thread's rows [ra, rb) of a panel for sddmm (d: the rows' dY panel, (rb - ra) x TB floats).
template <int TB>
void sddmm_rows(const float* p, const float* d, const int32_t* ci, const Segments& s, int64_t ra, int64_t rb,
                bool first, float* out) {
  constexpr int NV = TB / kLanes;
  for (int64_t b = 0; b < s.blocks; ++b) {
    for (int64_t r = ra; r < rb; ++r) {
      const int32_t k0 = s.begin(r, b), k1 = s.end(r, b);
      if (k0 == k1) continue;
      vec g[NV];
      for (int q = 0; q < NV; ++q) g[q] = vload(d + (r - ra) * TB + q * kLanes);
      row_dots<NV>(g, p, ci, k0, k1, first, out);
    }
  }
}

// The tokens of sddmm are summed in at most this many chunks of whole panels (a partial sum each, added in chunk
// order at the end), whatever the number of threads: the chunks and the order of every sum depend on the shapes
// alone.
constexpr int64_t kMaxChunks = 4;

template <int TB>
int sddmm_impl(const View& dy, const View& x, int64_t tokens, int64_t rows, int64_t cols, const int32_t* ro,
               const int32_t* ci, float* out, int64_t cb, int nthreads) {
  const int64_t panels = (tokens + TB - 1) / TB;
  const int64_t nnz = ro[rows];
  if (panels == 0) {
    std::memset(out, 0, sizeof(float) * size_t(nnz));
    return 0;
  }
  const int64_t blocks = std::max<int64_t>(1, (cols + cb - 1) / cb);
  const int64_t per_chunk = (panels + kMaxChunks - 1) / kMaxChunks;
  const int64_t chunks = (panels + per_chunk - 1) / per_chunk;
  // Tasks: every chunk, its rows cut in enough ranges to give each thread about two tasks.
  const int64_t ranges = std::max<int64_t>(1, (2 * nthreads + chunks - 1) / chunks);
  const int64_t tasks = chunks * ranges;
  int64_t max_rows = 0;
  for (int64_t part = 0; part < ranges; ++part)
    max_rows = std::max(max_rows, row_split(ro, rows, part + 1, ranges) - row_split(ro, rows, part, ranges));
  // Per thread: the packed panel of x, the rows' panel of dy, their segments.
  const size_t panel_floats = size_t(std::max<int64_t>(cols, 1)) * TB;
  const size_t dy_floats = size_t(max_rows) * TB;
  const Scratch scratch(panel_floats + dy_floats + size_t(max_rows) * size_t(blocks + 1), nthreads);
  float* partial = chunks > 1 ? static_cast<float*>(std::malloc(sizeof(float) * size_t(chunks * nnz))) : out;
  if (scratch.data == nullptr || partial == nullptr) {
    if (partial != out) std::free(partial);
    return 2;
  }
  const int nt = threads_for(nthreads, tasks, nnz * tokens + tokens * (rows + cols));
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t c = task / ranges, part = task % ranges;
      const int64_t ra = row_split(ro, rows, part, ranges), rb = row_split(ro, rows, part + 1, ranges);
      if (rb == ra) continue;
      float* p = scratch.of(omp_get_thread_num());
      float* d = p + panel_floats;
      const Segments segs = fill_segments(ro, ci, ra, rb, cb, blocks, reinterpret_cast<int32_t*>(d + dy_floats));
      float* dst = partial + (chunks > 1 ? c * nnz : 0);
      const int64_t first = c * per_chunk, last = std::min(panels, first + per_chunk);
      for (int64_t pi = first; pi < last; ++pi) {
        const int64_t t0 = pi * TB;
        const int tb = int(std::min<int64_t>(TB, tokens - t0));
        pack_panel<TB>(x, t0, tb, 0, cols, p);
        if (dy.dtype == kF32) {
          const float* src = static_cast<const float*>(dy.data) + t0 * dy.st + ra * dy.sc;
          transpose<kPackChunk>(src, dy.st, dy.sc, rb - ra, tb, d, TB);
        } else {
          const uint16_t* src = static_cast<const uint16_t*>(dy.data) + t0 * dy.st + ra * dy.sc;
          transpose<kPackChunk>(src, dy.st, dy.sc, rb - ra, tb, d, TB);
        }
        if (tb < TB)
          for (int64_t r = 0; r < rb - ra; ++r) std::memset(d + r * TB + tb, 0, sizeof(float) * (TB - tb));
        sddmm_rows<TB>(p, d, ci, segs, ra, rb, pi == first, dst);
      }
    }
    if (chunks > 1) {  // out = ((chunk 0 + chunk 1) + chunk 2) + ...
#pragma omp for schedule(static)
      for (int64_t k = 0; k < nnz; ++k) {
        float sum = partial[k];
        for (int64_t c = 1; c < chunks; ++c) sum += partial[c * nnz + k];
        out[k] = sum;
      }
    }
  }
  if (partial != out) std::free(partial);
  return 0;
}

#ifdef ROSA_BOUNDS_CHECK
bool csr_ok(const int32_t* ro, const int32_t* ci, int64_t rows, int64_t cols) {
  if (ro[0] != 0) return false;
  for (int64_t r = 0; r < rows; ++r)
    if (ro[r + 1] < ro[r]) return false;
  for (int64_t k = 0; k < ro[rows]; ++k)
    if (ci[k] < 0 || ci[k] >= cols) return false;
  return true;
}
#define ROSA_CHECK_CSR(ro, ci, rows, cols) \
  if (!csr_ok(ro, ci, rows, cols)) return 3;
#else
#define ROSA_CHECK_CSR(ro, ci, rows, cols)
#endif

bool dtype_ok(int d) { return d == kF32 || d == kBF16; }

}  // namespace

extern "C" {

// The ABI version: cpu_build.py refuses a library whose version differs from its own.
int rosa_cpu_abi_version() { return 2; }

int rosa_cpu_bounds_checked() {
#ifdef ROSA_BOUNDS_CHECK
  return 1;
#else
  return 0;
#endif
}

// out (tokens x rows, row-major, out_dtype) = operand (tokens x cols) @ S^T, S rows x cols in CSR (values in CSR
// order; the transposed product gets them gathered through the permutation by the caller, once a call).
// tb: tokens per panel (8, 16, 32 or 64); cb: columns per block.
// Returns 0, or 1 for a bad argument, 2 when out of memory, 3 when a bounds-checked build finds a bad index.
int rosa_spmm(const void* x, int x_dtype, int64_t x_st, int64_t x_sc, int64_t tokens, int64_t cols,
              const float* values, const int32_t* ro, const int32_t* ci, int64_t rows, void* out, int out_dtype,
              int tb, int64_t cb, int nthreads) {
  if (!dtype_ok(x_dtype) || !dtype_ok(out_dtype) || tokens < 0 || cols < 0 || rows < 0 || cb < 1 || nthreads < 1)
    return 1;
  ROSA_CHECK_CSR(ro, ci, rows, cols)
  const View v{x, x_dtype, x_st, x_sc};
  switch (tb) {
    case 8:
      return spmm_impl<8>(v, tokens, cols, values, ro, ci, rows, out, out_dtype, cb, nthreads);
    case 16:
      return spmm_impl<16>(v, tokens, cols, values, ro, ci, rows, out, out_dtype, cb, nthreads);
    case 32:
      return spmm_impl<32>(v, tokens, cols, values, ro, ci, rows, out, out_dtype, cb, nthreads);
    case 64:
      return spmm_impl<64>(v, tokens, cols, values, ro, ci, rows, out, out_dtype, cb, nthreads);
    default:
      return 1;
  }
}

// out[k] = sum_t dy(t, row_k) * x(t, col_k) in fp32, for S rows x cols in CSR order.
int rosa_sddmm(const void* dy, int dy_dtype, int64_t dy_st, int64_t dy_sc, const void* x, int x_dtype, int64_t x_st,
               int64_t x_sc, int64_t tokens, int64_t rows, int64_t cols, const int32_t* ro, const int32_t* ci,
               float* out, int tb, int64_t cb, int nthreads) {
  if (!dtype_ok(dy_dtype) || !dtype_ok(x_dtype) || tokens < 0 || rows < 0 || cols < 0 || cb < 1 || nthreads < 1)
    return 1;
  ROSA_CHECK_CSR(ro, ci, rows, cols)
  const View d{dy, dy_dtype, dy_st, dy_sc}, v{x, x_dtype, x_st, x_sc};
  switch (tb) {
    case 8:
      return sddmm_impl<8>(d, v, tokens, rows, cols, ro, ci, out, cb, nthreads);
    case 16:
      return sddmm_impl<16>(d, v, tokens, rows, cols, ro, ci, out, cb, nthreads);
    case 32:
      return sddmm_impl<32>(d, v, tokens, rows, cols, ro, ci, out, cb, nthreads);
    case 64:
      return sddmm_impl<64>(d, v, tokens, rows, cols, ro, ci, out, cb, nthreads);
    default:
      return 1;
  }
}

}  // extern "C"
