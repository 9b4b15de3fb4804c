// The decoder layers of adapter_core/serving/lean_decoder.py's step, for its commonest case (every fused
// product 4-bit, no biases, SiLU, adapters on o_proj and down_proj: one user's folded LoRA pairs,
// each row's memory, or none). The 4-bit products are torch's kernel or our own (q4_product, below);
// everything between them
// (norms, rotary embedding, writing the cache, attention, SiLU, the adapters) is plain loops over
// the tensors' memory here: for one token those are a few thousand multiply-adds each, cheaper to
// do than the 1-2 µs it costs to dispatch the several ATen operations each would otherwise take
// (~1,700 per token). The arithmetic is the Python step's, in fp32, summed in another order and
// with our own exp (the tests compare the two).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

using at::BFloat16;
using at::Tensor;

namespace {

// bf16 as its bits: c10::BFloat16's own conversions, written so that loops over them vectorize.
using bf16 = uint16_t;

inline float from_bf16(bf16 b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline bf16 to_bf16(float f) {  // round to nearest even, NaN stays NaN: as torch rounds
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? bf16{0x7FC0} : static_cast<bf16>(rounded);
}

bf16* bits(const Tensor& t) { return reinterpret_cast<bf16*>(t.data_ptr<BFloat16>()); }

constexpr int64_t kLanes = 32;  // independent partial results: two AVX-512 registers, so loops vectorize

inline float plus(float a, float b) { return a + b; }
inline float larger(float a, float b) { return a > b ? a : b; }

// op over term(0) .. term(n - 1), starting from init: kLanes partial results, combined as a tree
// at the end (not a chain of n dependent steps, which the compiler may not reorder into vectors).
template <typename Term, typename Op>
inline __attribute__((always_inline)) float reduce(int64_t n, float init, const Term& term, Op op) {
  float partial[kLanes];
  std::fill(partial, partial + kLanes, init);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) partial[l] = op(partial[l], term(j + l));
  for (int64_t l = 0; j < n; ++j, ++l) partial[l] = op(partial[l], term(j));
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) partial[l] = op(partial[l], partial[l + width]);
  return partial[0];
}

inline __attribute__((always_inline)) float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  return reduce(n, 0.f, [&](int64_t j) { return a[j] * b[j]; }, plus);
}

float sum(const float* x, int64_t n) {
  return reduce(n, 0.f, [&](int64_t j) { return x[j]; }, plus);
}

float max(const float* x, int64_t n) {
  return reduce(n, -std::numeric_limits<float>::infinity(), [&](int64_t j) { return x[j]; }, larger);
}

// e^x for x <= 0 (softmax after subtracting the max, a sigmoid), Cephes' expf: within 1e-7 and,
// unlike std::exp, vectorized by the compiler. Far below (a masked column's -inf) it is 0.
inline float exp_nonpositive(float x) {
  const float input = x;
  const bool vanishes = x < -87.f;  // below the smallest normal float's logarithm
  x = larger(x, -87.f);
  // n = x / ln 2 rounded to the nearest integer (adding and taking away 1.5 * 2^23 rounds it; std::floor would not vectorize)
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  x -= n * 0.693359375f;
  x -= n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.f;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &exponent, sizeof scale);
  return input != input ? input : vanishes ? 0.f : y * scale;  // NaN stays NaN (a bug upstream shows)
}

inline bf16 stored(float f, bf16*) { return to_bf16(f); }
inline float stored(float f, float*) { return f; }

// out (d) = x * rsqrt(mean(x^2) + eps) * w, as the next 4-bit product takes it: bf16 (torch's kernel) or fp32 (ours).
template <typename T>
void rms_norm(const float* __restrict__ x, const float* __restrict__ w, int64_t d, float eps, T* __restrict__ out) {
  const float inv = 1.f / std::sqrt(dot(x, x, d) / static_cast<float>(d) + eps);
  for (int64_t j = 0; j < d; ++j) out[j] = stored(x[j] * inv * w[j], out);
}

// dst (hd) = transformers' apply_rotary_pos_emb on one head: x * cos + rotate_half(x) * sin.
void rotate(const bf16* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin, int64_t hd,
            float* __restrict__ dst) {
  const int64_t half = hd / 2;
  for (int64_t j = 0; j < half; ++j) dst[j] = from_bf16(x[j]) * cos[j] + -from_bf16(x[j + half]) * sin[j];
  for (int64_t j = half; j < hd; ++j) dst[j] = from_bf16(x[j]) * cos[j] + from_bf16(x[j - half]) * sin[j];
}

struct Shape {
  int64_t heads, kv_heads, head_dim;
};

// Attention of a kv head's group of G query heads, q (G, hd), over keys and values (n, hd):
// w (G, n) are the scores on the way; out (G, hd). Each key and value row is read once for the
// whole group. With AVX-512 (and hd a multiple of 16) the group's sums stay in registers: G is a
// template argument for that.
template <int G>
void group_attention(const float* q, const float* keys, const float* values, int64_t n, int64_t hd,
                     const float* attend, float* w, float* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
#if defined(__AVX512F__)
  const bool registers = hd % 16 == 0;
  if (registers) {
    for (int64_t t = 0; t < n; ++t) {
      __m512 sums[G];
      for (int g = 0; g < G; ++g) sums[g] = _mm512_setzero_ps();
      for (int64_t c = 0; c < hd; c += 16) {
        const __m512 k = _mm512_loadu_ps(keys + t * hd + c);
        for (int g = 0; g < G; ++g) sums[g] = _mm512_add_ps(sums[g], _mm512_mul_ps(_mm512_loadu_ps(q + g * hd + c), k));
      }
      for (int g = 0; g < G; ++g) w[g * n + t] = _mm512_reduce_add_ps(sums[g]) * scale;
    }
  } else
#endif
  {
    for (int g = 0; g < G; ++g)
      for (int64_t t = 0; t < n; ++t) w[g * n + t] = dot(q + g * hd, keys + t * hd, hd) * scale;
  }
  for (int g = 0; g < G; ++g) {  // softmax
    float* wg = w + g * n;
    if (attend != nullptr)
      for (int64_t t = 0; t < n; ++t) wg[t] += attend[t];
    const float top = max(wg, n);
    for (int64_t t = 0; t < n; ++t) wg[t] = exp_nonpositive(wg[t] - top);
    const float inv = 1.f / sum(wg, n);
    for (int64_t t = 0; t < n; ++t) wg[t] *= inv;
  }
#if defined(__AVX512F__)
  if (registers) {
    for (int64_t c = 0; c < hd; c += 16) {
      __m512 sums[G];
      for (int g = 0; g < G; ++g) sums[g] = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const __m512 v = _mm512_loadu_ps(values + t * hd + c);
        for (int g = 0; g < G; ++g) sums[g] = _mm512_add_ps(sums[g], _mm512_mul_ps(_mm512_set1_ps(w[g * n + t]), v));
      }
      for (int g = 0; g < G; ++g) _mm512_storeu_ps(out + g * hd + c, sums[g]);
    }
    return;
  }
#endif
  {
    std::fill(out, out + G * hd, 0.f);
    for (int g = 0; g < G; ++g)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < hd; ++j) out[g * hd + j] += w[g * n + t] * values[t * hd + j];
  }
}

using GroupAttention = void (*)(const float*, const float*, const float*, int64_t, int64_t, const float*, float*,
                                float*);

// group_attention for a group of G query heads: 1 to 8 compiled, more in groups of 8 and the rest.
void attend_group(int64_t G, const float* q, const float* keys, const float* values, int64_t n, int64_t hd,
                  const float* attend, float* out) {
  static const GroupAttention by_size[] = {group_attention<1>, group_attention<2>, group_attention<3>,
                                           group_attention<4>, group_attention<5>, group_attention<6>,
                                           group_attention<7>, group_attention<8>};
  std::vector<float> w(std::min<int64_t>(G, 8) * n);  // (G, n) scores
  for (int64_t first = 0; first < G; first += 8) {
    const int64_t size = std::min<int64_t>(8, G - first);
    by_size[size - 1](q + first * hd, keys, values, n, hd, attend, w.data(), out + first * hd);
  }
}

// One row's new token: rotary embedding of its queries (into q (H, hd) fp32) and keys, and its key
// and value written into the row's cache (H_kv, capacity, hd) at column `width`. qkv
// (H + 2 H_kv, hd) bf16 is the product's output.
void rotate_and_write(const bf16* qkv, const float* cos, const float* sin, Shape s, int64_t kv_stride,
                      int64_t width, float* q, float* keys, float* values) {
  const int64_t hd = s.head_dim;
  for (int64_t h = 0; h < s.heads; ++h) rotate(qkv + h * hd, cos, sin, hd, q + h * hd);
  for (int64_t g = 0; g < s.kv_heads; ++g) {
    rotate(qkv + (s.heads + g) * hd, cos, sin, hd, keys + g * kv_stride + width * hd);
    const bf16* v = qkv + (s.heads + s.kv_heads + g) * hd;
    float* column = values + g * kv_stride + width * hd;
    for (int64_t j = 0; j < hd; ++j) column[j] = from_bf16(v[j]);
  }
}

// z (I) = silu(gate) * up from the product's bf16 [gate | up] (2 I), in fp32 and bf16.
void silu_times_up(const bf16* __restrict__ gate_up, int64_t inner, float* __restrict__ z, bf16* __restrict__ z_bf16) {
  for (int64_t j = 0; j < inner; ++j) {
    const float g = from_bf16(gate_up[j]);
    const float e = exp_nonpositive(-std::abs(g));  // sigmoid(g) from e^-|g|: no overflow either side
    const float sigmoid = g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
    z[j] = g * sigmoid * from_bf16(gate_up[inner + j]);
    z_bf16[j] = to_bf16(z[j]);
  }
}

// What a user's adapter adds to one adapted product (AdapterLinear.delta): h (d_out) += u lora_B^T,
// where t = lora_A x (r) and u = t, or u = t M with the row's memory M (r, r). lora_A (r, d_in) and
// lora_B^T (r, d_out) are one user's folded pair, or the layer's own (lora_B times its scaling)
// with a memory per row.
struct Adapter {
  const float* lora_a;
  const float* lora_b_t;
  const float* memory;  // (B, r, r), or null: the folded pair
  int64_t rank, d_in, d_out;

  // Checked against the batch's rows and the product's sizes: the loops index by them.
  Adapter(const Tensor& a, const Tensor& b_t, const Tensor& m, int64_t rows, int64_t in, int64_t out)
      : lora_a(a.data_ptr<float>()), lora_b_t(b_t.data_ptr<float>()),
        memory(m.numel() ? m.data_ptr<float>() : nullptr), rank(a.size(0)), d_in(in), d_out(out) {
    for (const Tensor& t : {a, b_t, m})
      TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat, "adapters: contiguous fp32");
    TORCH_CHECK(a.dim() == 2 && a.size(1) == in && b_t.dim() == 2 && b_t.size(0) == rank && b_t.size(1) == out,
                "an adapter: lora_A (r, d_in), lora_B^T (r, d_out)");
    TORCH_CHECK(m.numel() == 0 || (m.dim() == 3 && m.size(0) == rows && m.size(1) == rank && m.size(2) == rank),
                "memories: (B, r, r), one per row");
  }

  // Rows [begin, end) of x (B, d_in) into h (B, d_out): each weight row is read once for all of them.
  void add(const float* x, int64_t begin, int64_t end, float* h) const {
    const int64_t n = end - begin;
    std::vector<float> t(n * rank), u(n * rank, 0.f);  // (n, r)
    for (int64_t k = 0; k < rank; ++k)
      for (int64_t r = 0; r < n; ++r) t[r * rank + k] = dot(lora_a + k * d_in, x + (begin + r) * d_in, d_in);
    if (memory == nullptr) {
      u = t;
    } else {
      for (int64_t r = 0; r < n; ++r) {
        const float* m = memory + (begin + r) * rank * rank;
        for (int64_t k = 0; k < rank; ++k)
          for (int64_t s = 0; s < rank; ++s) u[r * rank + s] += t[r * rank + k] * m[k * rank + s];
      }
    }
    for (int64_t k = 0; k < rank; ++k)
      for (int64_t r = 0; r < n; ++r) {
        float* out = h + (begin + r) * d_out;
        const float* w = lora_b_t + k * d_out;
        const float uk = u[r * rank + k];
        for (int64_t j = 0; j < d_out; ++j) out[j] += uk * w[j];
      }
  }
};

// Our own 4-bit product (int4.py's "blocks" layout) for CPUs with AVX2 but not AVX-512, where torch's
// kernel converts every weight to fp32 and is bound by that arithmetic (docs/decode-speed.md): as
// llama.cpp does, each group of 32 inputs is rounded to int8 with its own scale dx, and the products
// are integer sums:  sum_j (q_j d + m) x_j  =  d dx sum_j q_j xq_j  +  m dx sum_j xq_j.
// nibbles (N, G, 16) uint8: byte j holds q_j (low 4 bits) and q_{j+16}; dm (N, G, 2) fp16: d, m (as
// GGUF's Q4_1 stores them: decoding reads every weight once per token, and memory is what it waits on).
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
constexpr int64_t kGroup = 32;

struct RoundedInput {  // x (B, K) by groups of 32: int8 values, their scale dx and dx * their sum
  std::vector<int8_t> q;
  std::vector<float> scale, scaled_sum;
};

template <typename T>
RoundedInput round_to_int8(const T* x, int64_t b, int64_t k) {
  const int64_t groups = k / kGroup;
  RoundedInput in{std::vector<int8_t>(b * k), std::vector<float>(b * groups), std::vector<float>(b * groups)};
  for (int64_t r = 0; r < b; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      float v[kGroup], amax = 0.f;
      bool finite = true;
      for (int64_t j = 0; j < kGroup; ++j) {
        const T e = x[r * k + g * kGroup + j];
        if constexpr (std::is_same_v<T, bf16>) v[j] = from_bf16(e); else v[j] = e;
        amax = larger(amax, std::fabs(v[j]));
        finite = finite && std::isfinite(v[j]);
      }
      // a group too small for its inverse (below the smallest normal float) counts as zeros; a NaN
      // or an infinity makes the group's products NaN, as in any other product, not a finite number
      const float dx = !finite ? std::numeric_limits<float>::quiet_NaN()
                               : amax < std::numeric_limits<float>::min() ? 0.f : amax / 127.f;
      const float inv = finite && dx > 0.f ? 1.f / dx : 0.f;
      int32_t total = 0;
      for (int64_t j = 0; j < kGroup; ++j) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(v[j] * inv));
        in.q[r * k + g * kGroup + j] = static_cast<int8_t>(q);
        total += q;
      }
      in.scale[r * groups + g] = dx;
      in.scaled_sum[r * groups + g] = dx * static_cast<float>(total);
    }
  return in;
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// Outputs [begin, end) of R input rows from row `first`: each weight group is unpacked once for the R rows.
template <int R>
void q4_rows(const uint8_t* nibbles, const uint16_t* dm, const RoundedInput& in, int64_t first, int64_t k,
             int64_t begin, int64_t end, int64_t n_out, float* out) {
  const int64_t groups = k / kGroup;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = begin; n < end; ++n) {
    __m256 acc[R];
    float offsets[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), offsets[r] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(nibbles + (n * groups + g) * 16));
      const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low4);  // 32 x 0..15
      const float d = _cvtsh_ss(dm[(n * groups + g) * 2]), m = _cvtsh_ss(dm[(n * groups + g) * 2 + 1]);
      for (int r = 0; r < R; ++r) {
        const int64_t row = first + r;
        const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in.q.data() + row * k + g * kGroup));
        const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), ones);  // 8 x int32, |.| <= 15 * 127 * 4
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(d * in.scale[row * groups + g]), acc[r]);
        offsets[r] += m * in.scaled_sum[row * groups + g];
      }
    }
    for (int r = 0; r < R; ++r) out[(first + r) * n_out + n] = horizontal_sum(acc[r]) + offsets[r];
  }
}

// x (B, K) bf16 or fp32 -> (B, N) fp32.
Tensor q4_product(const Tensor& x_, const Tensor& nibbles, const Tensor& dm) {
  const Tensor x = x_.contiguous();
  TORCH_CHECK(x.dim() == 2 && nibbles.dim() == 3 && nibbles.size(2) == 16 && nibbles.scalar_type() == at::kByte &&
                  nibbles.is_contiguous() && x.size(1) == nibbles.size(1) * kGroup,
              "x (B, K), nibbles (N, K / 32, 16) uint8 contiguous");
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 3 &&
                  dm.size(0) == nibbles.size(0) && dm.size(1) == nibbles.size(1) && dm.size(2) == 2,
              "dm (N, K / 32, 2) fp16 contiguous");
  const int64_t b = x.size(0), k = x.size(1), n_out = nibbles.size(0);
  const RoundedInput in = x.scalar_type() == at::kBFloat16 ? round_to_int8(bits(x), b, k)
                                                            : round_to_int8(x.data_ptr<float>(), b, k);
  Tensor out = at::empty({b, n_out}, x.options().dtype(at::kFloat));
  const uint8_t* w = nibbles.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  float* o = out.data_ptr<float>();
  // each thread's share of the outputs, by blocks of 16 outputs: a block's weights (~7 KB at K = 576)
  // stay in L1 while every tile of rows reads them, so memory is read once whatever the batch
  constexpr int64_t kBlock = 16;
  at::parallel_for(0, n_out, kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; block += kBlock) {
      const int64_t last = std::min(block + kBlock, end);
      int64_t first = 0;
      for (; first + 4 <= b; first += 4) q4_rows<4>(w, s, in, first, k, block, last, n_out, o);
      switch (b - first) {
        case 3: q4_rows<3>(w, s, in, first, k, block, last, n_out, o); break;
        case 2: q4_rows<2>(w, s, in, first, k, block, last, n_out, o); break;
        case 1: q4_rows<1>(w, s, in, first, k, block, last, n_out, o); break;
        default: break;
      }
    }
  });
  return out;
}
#else
Tensor q4_product(const Tensor&, const Tensor&, const Tensor&) {
  TORCH_CHECK(false, "the own 4-bit product needs AVX2, F16C and FMA (int4.own_kernel() chooses torch's kernel elsewhere)");
  return Tensor();
}
#endif

// A 4-bit product (B, K) -> (B, N) bf16: ours where the weights are in our layout (3-d; x fp32), else
// torch's (x bf16).
Tensor int4_product(const Tensor& x, const Tensor& packed, int64_t group, const Tensor& scales) {
  if (packed.dim() == 3) return q4_product(x, packed, scales).to(at::kBFloat16);
  return at::_weight_int4pack_mm_for_cpu(x, packed, group, scales);  // (B, d_out) bf16
}

// Rows [begin, end) one after another for one user (each piece is too small to share), over both
// threads for a batch.
template <typename F>
void for_rows(int64_t rows, const F& f) {
  at::parallel_for(0, rows, 1, f);
}

// f(row) for each row, as for_rows shares them.
template <typename F>
void each_row(int64_t rows, const F& f) {
  for_rows(rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

}  // namespace

// h (B, D) fp32 is updated in place and returned: the hidden state after the last decoder layer.
// cos, sin (B, hd) fp32; attend (B, width + 1) additive fp32, or none (no padding).
// Per layer i: norms[2i], norms[2i+1]; products[8i..8i+7]: packed and scales of qkv, o, gate_up,
// down; keys[i], values[i] (B, H_kv, capacity, hd) fp32, column `width` written; adapters[6i..6i+5]:
// o's then down's lora_A (r, d_in), lora_B^T (r, d_out) and memories (B, r, r) or an empty tensor
// (one folded pair for every row), contiguous fp32 (the whole list empty: no adapter).
Tensor decoder_layers(Tensor h, const Tensor& cos_, const Tensor& sin_, const c10::optional<Tensor>& attend_,
                      const std::vector<Tensor>& norms, double eps, const std::vector<Tensor>& products,
                      int64_t group, const std::vector<Tensor>& keys, const std::vector<Tensor>& values,
                      int64_t width, int64_t heads, int64_t kv_heads, int64_t head_dim,
                      const std::vector<Tensor>& adapters) {
  // The shapes the loops below index by, checked once: a mismatch must fail, not read past a tensor.
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == at::kFloat, "h: (B, D) contiguous fp32");
  const int64_t b = h.size(0), d = h.size(1), n = width + 1;
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && head_dim % 2 == 0, "heads: groups of the kv heads, even size");
  TORCH_CHECK(norms.size() == 2 * keys.size() && products.size() == 8 * keys.size() && values.size() == keys.size() &&
                  (adapters.empty() || adapters.size() == 6 * keys.size()),
              "one entry per layer in each list");
  const Shape shape{heads, kv_heads, head_dim};
  const int64_t q_size = heads * head_dim, per_kv = heads / kv_heads;
  const Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
  TORCH_CHECK(cos.numel() == b * head_dim && sin.numel() == b * head_dim, "cos, sin: (B, head_dim)");
  const Tensor attend = attend_.has_value() ? attend_->contiguous() : Tensor();
  TORCH_CHECK(!attend.defined() || (attend.scalar_type() == at::kFloat && attend.numel() == b * n),
              "attend: (B, width + 1) fp32");
  for (size_t i = 0; i < keys.size(); ++i)
    for (const Tensor& cache : {keys[i], values[i]})
      TORCH_CHECK(cache.scalar_type() == at::kFloat && cache.dim() == 4 && cache.size(0) == b &&
                      cache.size(1) == kv_heads && cache.size(2) > width && cache.size(3) == head_dim &&
                      cache.stride(3) == 1 && cache.stride(2) == head_dim && cache.strides() == keys[i].strides(),
                  "the cache: (B, H_kv, capacity > width, head_dim) fp32, columns contiguous");
  const bool adapted = !adapters.empty();
  // the weights' layout says which kernel runs (int4.py chose one for all): ours takes the products'
  // inputs in fp32 and rounds them to int8 itself; torch's takes them in bf16
  const bool own = products[0].dim() == 3;
  for (size_t j = 0; j < products.size(); j += 2)
    TORCH_CHECK((products[j].dim() == 3) == own, "every product in one kernel's layout");
  const auto in_bf16 = h.options().dtype(at::kBFloat16);
  Tensor x = at::empty({b, d}, own ? h.options() : in_bf16);  // a norm's output, the next product's input
  float* hp = h.data_ptr<float>();
  const auto norm = [&](const Tensor& w, int64_t r) {
    if (own) rms_norm(hp + r * d, w.data_ptr<float>(), d, static_cast<float>(eps), x.data_ptr<float>() + r * d);
    else rms_norm(hp + r * d, w.data_ptr<float>(), d, static_cast<float>(eps), bits(x) + r * d);
  };
  Tensor q = at::empty({b, q_size}, h.options());  // the rotated queries
  Tensor mixed = at::empty({b, q_size}, h.options()), mixed_bf16 = at::empty({b, q_size}, in_bf16);
  Tensor z, z_bf16;  // the MLP's inner activation, allocated at the first layer (its width)

  for (size_t i = 0; i < keys.size(); ++i) {
    float *kp = keys[i].data_ptr<float>(), *vp = values[i].data_ptr<float>();
    const int64_t row_stride = keys[i].stride(0), head_stride = keys[i].stride(1);
    each_row(b, [&](int64_t r) { norm(norms[2 * i], r); });
    const Tensor qkv = int4_product(x, products[8 * i], group, products[8 * i + 1]);  // (B, q + 2 kv) bf16
    TORCH_CHECK(qkv.size(1) == q_size + 2 * kv_heads * head_dim, "qkv: (B, (H + 2 H_kv) head_dim)");
    each_row(b, [&](int64_t r) {
      rotate_and_write(bits(qkv) + r * qkv.size(1), cos.data_ptr<float>() + r * head_dim,
                       sin.data_ptr<float>() + r * head_dim, shape, head_stride, width,
                       q.data_ptr<float>() + r * q_size, kp + r * row_stride, vp + r * row_stride);
    });
    // each (row, kv head) pair's attention; over both threads once there is enough of it (a long
    // context, a batch): a chunk of pairs covers at least kColumnsPerChunk cached columns
    constexpr int64_t kColumnsPerChunk = 4096;
    at::parallel_for(0, b * kv_heads, std::max<int64_t>(1, kColumnsPerChunk / n), [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t r = pair / kv_heads, g = pair % kv_heads;  // query head g * per_kv + j reads kv head g
        const int64_t first = r * q_size + g * per_kv * head_dim;
        attend_group(per_kv, q.data_ptr<float>() + first, kp + r * row_stride + g * head_stride,
                     vp + r * row_stride + g * head_stride, n, head_dim,
                     attend.defined() ? attend.data_ptr<float>() + r * n : nullptr, mixed.data_ptr<float>() + first);
      }
    });
    if (!own) {
      const float* mp = mixed.data_ptr<float>();
      bf16* mb = bits(mixed_bf16);
      for (int64_t j = 0; j < b * q_size; ++j) mb[j] = to_bf16(mp[j]);
    }
    h.add_(int4_product(own ? mixed : mixed_bf16, products[8 * i + 2], group, products[8 * i + 3]));
    if (adapted) {
      const Adapter o(adapters[6 * i], adapters[6 * i + 1], adapters[6 * i + 2], b, q_size, d);
      for_rows(b, [&](int64_t begin, int64_t end) { o.add(mixed.data_ptr<float>(), begin, end, hp); });
    }
    each_row(b, [&](int64_t r) { norm(norms[2 * i + 1], r); });
    const Tensor gate_up = int4_product(x, products[8 * i + 4], group, products[8 * i + 5]);  // (B, 2 I) bf16
    const int64_t inner = gate_up.size(1) / 2;
    if (!z.defined()) {
      z = at::empty({b, inner}, h.options());
      z_bf16 = at::empty({b, inner}, in_bf16);
    }
    TORCH_CHECK(z.size(1) == inner, "every layer's MLP: the same width");
    each_row(b, [&](int64_t r) {
      silu_times_up(bits(gate_up) + r * 2 * inner, inner, z.data_ptr<float>() + r * inner, bits(z_bf16) + r * inner);
    });
    h.add_(int4_product(own ? z : z_bf16, products[8 * i + 6], group, products[8 * i + 7]));
    if (adapted) {
      const Adapter down(adapters[6 * i + 3], adapters[6 * i + 4], adapters[6 * i + 5], b, inner, d);
      for_rows(b, [&](int64_t begin, int64_t end) { down.add(z.data_ptr<float>(), begin, end, hp); });
    }
  }
  return h;
}

// exp_nonpositive and to_bf16 over a tensor, for the tests (the kernels' own arithmetic).
Tensor exp_nonpositive_of(const Tensor& x_) {
  const Tensor x = x_.contiguous().to(at::kFloat), out = at::empty_like(x);
  for (int64_t j = 0; j < x.numel(); ++j) out.data_ptr<float>()[j] = exp_nonpositive(x.data_ptr<float>()[j]);
  return out;
}

Tensor to_bf16_of(const Tensor& x_) {
  const Tensor x = x_.contiguous().to(at::kFloat), out = at::empty_like(x, x.options().dtype(at::kBFloat16));
  for (int64_t j = 0; j < x.numel(); ++j) bits(out)[j] = to_bf16(x.data_ptr<float>()[j]);
  return out;
}

// Whether q4_product was compiled in (it needs AVX2, F16C and FMA).
bool q4_built() {
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}

// Whether int4.py should lay 4-bit weights out for q4_product: with AVX2 and without AVX-512, where
// torch's kernel was measured at half llama.cpp's speed (with AVX-512 it matched llama.cpp).
bool q4_kernel() {
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__) && !defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

bool avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is let go for the step (~5 ms): other Python threads (the web server's) go on meanwhile
  m.def("decoder_layers", &decoder_layers, "the lean decode step's decoder layers (adapter_core/serving/lean_decoder.py)",
        py::call_guard<py::gil_scoped_release>());
  m.def("exp_nonpositive", &exp_nonpositive_of, "the kernels' exp, element by element (for tests)");
  m.def("to_bf16", &to_bf16_of, "the kernels' rounding to bf16, element by element (for tests)");
  m.def("avx512", &avx512, "whether the attention's AVX-512 path was compiled in");
  m.def("q4_built", &q4_built, "whether q4_product was compiled in (AVX2, F16C, FMA)");
  m.def("q4_kernel", &q4_kernel, "whether int4.py lays 4-bit weights out for q4_product on this CPU");

}

// Our 4-bit product as a torch operator, torch.ops.memchat.q4_product(x (B, K), nibbles, dm) -> (B, N)
// fp32: called from Python (int4.matmul) it goes through torch's dispatcher, so tools that watch
// operators (bench.measure's FLOP counter) see it, and the GIL is let go while it runs.
TORCH_LIBRARY(memchat, m) {
  m.def("q4_product(Tensor x, Tensor nibbles, Tensor dm) -> Tensor");
}

TORCH_LIBRARY_IMPL(memchat, CPU, m) {
  m.impl("q4_product", &q4_product);
}
