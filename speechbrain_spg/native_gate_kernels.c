/*
 * Hand-written CPU kernels of the self-pinching gate (x86-64, AVX2 + FMA,
 * OpenMP). Built and loaded by native_gate.py, which documents them.
 *
 * Every kernel makes ONE pass over its float32 arrays, eight weights per
 * AVX2 vector, sums in float32 per chunk and in double across chunks, and
 * writes its sums to `result`. Threshold, temperature and the gradient of
 * the soft-zero count are read from 0-d tensors (no read-back in Python).
 * The mask is
 *     M = sigmoid(min((W^2 - t^2) / (2 tau), 80)),
 * as in fused_gate.py: above 80 the sigmoid is exactly 1 in float32. The
 * exponential is evaluated only for arguments in [-80, 0] (exp(-|x|)), so
 * no intermediate is ever a subnormal number (x86 CPUs compute those
 * through a slow path); below -80 the mask is 0 (the sigmoid is below
 * 1.8e-35 there), so fully pinched weights give exact zeros.
 *
 * Authors
 *  * speechbrain-spg developers 2026
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* Weights per OpenMP work item (64 KiB of float32). */
#define SPG_CHUNK 16384
/* Clip of the sigmoid's argument (fused_gate.SIGMOID_SATURATION). */
#define SPG_SATURATION 80.0f

/* exp(x) for x in [-80, 0]: Cody-Waite range reduction x = n ln2 + r and a
 * degree-7 polynomial for exp(r) (the coefficients of Cephes' expf), within
 * about 1 ulp; 2^n is built in the exponent bits (n >= -116: normal). */
static inline __m256 exp_nonpositive(__m256 x)
{
    const __m256 n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r),
                        _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i exponent = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

/* sigmoid(z) for z clipped at 80, and 0 below -80: with e = exp(-|z|),
 * 1 / (1 + e) for z >= 0 and e / (1 + e) below. A NaN stays NaN. */
static inline __m256 sigmoid_clipped(__m256 z)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 one = _mm256_set1_ps(1.0f);
    /* min(80, a) returns a when a is NaN. */
    const __m256 magnitude = _mm256_min_ps(_mm256_set1_ps(SPG_SATURATION),
                                           _mm256_andnot_ps(sign, z));
    const __m256 e = exp_nonpositive(_mm256_xor_ps(magnitude, sign));
    /* blendv picks by the sign bit of z. */
    const __m256 numerator = _mm256_blendv_ps(one, e, z);
    const __m256 pinched = _mm256_cmp_ps(
        z, _mm256_set1_ps(-SPG_SATURATION), _CMP_LT_OQ);
    return _mm256_andnot_ps(pinched,
                            _mm256_div_ps(numerator, _mm256_add_ps(one, e)));
}

/* The mask of eight weights; squared threshold and 1 / (2 tau) given. */
static inline __m256 mask_of(__m256 w, __m256 t2, __m256 inv_two_tau)
{
    return sigmoid_clipped(
        _mm256_mul_ps(_mm256_fmsub_ps(w, w, t2), inv_two_tau));
}

/* v with its subnormal lanes set to zero (fused_gate.flush_subnormal): a
 * subnormal gated weight slows down every matrix product that reads it. */
static inline __m256 flush_subnormal(__m256 v)
{
    /* An ordered compare: a NaN is not below, and stays NaN. */
    const __m256 subnormal = _mm256_cmp_ps(
        _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v),
        _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
    return _mm256_andnot_ps(subnormal, v);
}

/* Lanes below `lanes` set (for the last, partial vector of a chunk). */
static inline __m256i lanes_below(int64_t lanes)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)lanes),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline __m256 load(const float *p, int64_t lanes)
{
    return lanes >= 8 ? _mm256_loadu_ps(p)
                      : _mm256_maskload_ps(p, lanes_below(lanes));
}

static inline void store(float *p, __m256 v, int64_t lanes)
{
    if (lanes >= 8)
        _mm256_storeu_ps(p, v);
    else
        _mm256_maskstore_ps(p, lanes_below(lanes), v);
}

/* v, with the lanes past the end of the array zeroed (before summing). */
static inline __m256 valid(__m256 v, int64_t lanes)
{
    return lanes >= 8
               ? v
               : _mm256_and_ps(v, _mm256_castsi256_ps(lanes_below(lanes)));
}

static inline double sum_lanes(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v),
                          _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return (double)_mm_cvtss_f32(s);
}

/* Chunk bounds of work item c. */
#define SPG_CHUNK_BOUNDS(c, n, lo, hi)                                        \
    const int64_t lo = (c) * SPG_CHUNK;                                        \
    const int64_t hi = lo + SPG_CHUNK < (n) ? lo + SPG_CHUNK : (n)

static inline int64_t chunks_of(int64_t n)
{
    return (n + SPG_CHUNK - 1) / SPG_CHUNK;
}

/* out = W * M (subnormal values flushed to 0); result[0] = sum(M). */
void spg_forward(const float *weight, float *out, int64_t n,
                 const float *threshold, const float *temperature,
                 float *result, int threads)
{
    const float t = *threshold, tau = *temperature;
    const __m256 t2 = _mm256_set1_ps(t * t);
    const __m256 inv_two_tau = _mm256_set1_ps(1.0f / (2.0f * tau));
    double total = 0.0;
#pragma omp parallel for num_threads(threads) if (n > SPG_CHUNK) \
    reduction(+ : total) schedule(static)
    for (int64_t c = 0; c < chunks_of(n); ++c) {
        SPG_CHUNK_BOUNDS(c, n, lo, hi);
        __m256 mask_sum = _mm256_setzero_ps();
        for (int64_t i = lo; i < hi; i += 8) {
            const int64_t lanes = hi - i;
            const __m256 w = load(weight + i, lanes);
            const __m256 m = mask_of(w, t2, inv_two_tau);
            mask_sum = _mm256_add_ps(mask_sum, valid(m, lanes));
            store(out + i, flush_subnormal(_mm256_mul_ps(w, m)), lanes);
        }
        total += sum_lanes(mask_sum);
    }
    result[0] = (float)total;
}

/* result[0] = sum(M), result[1] = sum(M (1 - M) / tau). */
void spg_soft_zeros(const float *weight, int64_t n, const float *threshold,
                    const float *temperature, float *result, int threads)
{
    const float t = *threshold, tau = *temperature;
    const __m256 t2 = _mm256_set1_ps(t * t);
    const __m256 inv_two_tau = _mm256_set1_ps(1.0f / (2.0f * tau));
    const __m256 inv_tau = _mm256_set1_ps(1.0f / tau);
    const __m256 one = _mm256_set1_ps(1.0f);
    double total = 0.0, slopes = 0.0;
#pragma omp parallel for num_threads(threads) if (n > SPG_CHUNK) \
    reduction(+ : total, slopes) schedule(static)
    for (int64_t c = 0; c < chunks_of(n); ++c) {
        SPG_CHUNK_BOUNDS(c, n, lo, hi);
        __m256 mask_sum = _mm256_setzero_ps();
        __m256 slope_sum = _mm256_setzero_ps();
        for (int64_t i = lo; i < hi; i += 8) {
            const int64_t lanes = hi - i;
            const __m256 m = valid(
                mask_of(load(weight + i, lanes), t2, inv_two_tau), lanes);
            mask_sum = _mm256_add_ps(mask_sum, m);
            slope_sum = _mm256_add_ps(
                slope_sum,
                _mm256_mul_ps(_mm256_mul_ps(m, _mm256_sub_ps(one, m)), inv_tau));
        }
        total += sum_lanes(mask_sum);
        slopes += sum_lanes(slope_sum);
    }
    result[0] = (float)total;
    result[1] = (float)slopes;
}

/* The chain rule for eight weights at grad_at, from their mask
 * (fused_gate's _chain_rule): with slope = M (1 - M) / tau, the gradient g
 * there becomes g (M + W^2 slope), and acc plus slope (g_zeros - g W) over
 * the valid lanes is returned (lanes past the end hold w = g = 0, which
 * would add slope * g_zeros). */
static inline __m256 chain_rule(float *grad_at, __m256 w, __m256 m,
                                __m256 g, __m256 inv_tau,
                                __m256 grad_zeros, __m256 acc,
                                int64_t lanes)
{
    const __m256 slope = _mm256_mul_ps(
        _mm256_mul_ps(m, _mm256_sub_ps(_mm256_set1_ps(1.0f), m)), inv_tau);
    const __m256 term =
        _mm256_mul_ps(slope, _mm256_fnmadd_ps(g, w, grad_zeros));
    store(grad_at,
          _mm256_mul_ps(g, _mm256_fmadd_ps(_mm256_mul_ps(w, w), slope, m)),
          lanes);
    return _mm256_add_ps(acc, valid(term, lanes));
}

/* Backward recomputing the mask: out becomes the weight gradient (out may
 * be grad: in place); result[0] = t sum(slope (grad_zeros - grad W)), the
 * threshold gradient. */
void spg_backward(const float *weight, const float *grad, float *out,
                  int64_t n,
                  const float *threshold, const float *temperature,
                  const float *grad_zeros, float *result, int threads)
{
    const float t = *threshold, tau = *temperature;
    const __m256 t2 = _mm256_set1_ps(t * t);
    const __m256 inv_two_tau = _mm256_set1_ps(1.0f / (2.0f * tau));
    const __m256 inv_tau = _mm256_set1_ps(1.0f / tau);
    const __m256 gz = _mm256_set1_ps(*grad_zeros);
    double total = 0.0;
#pragma omp parallel for num_threads(threads) if (n > SPG_CHUNK) \
    reduction(+ : total) schedule(static)
    for (int64_t c = 0; c < chunks_of(n); ++c) {
        SPG_CHUNK_BOUNDS(c, n, lo, hi);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = lo; i < hi; i += 8) {
            const int64_t lanes = hi - i;
            const __m256 w = load(weight + i, lanes);
            const __m256 g = load(grad + i, lanes);
            const __m256 m = mask_of(w, t2, inv_two_tau);
            acc = chain_rule(out + i, w, m, g, inv_tau, gz, acc, lanes);
        }
        total += sum_lanes(acc);
    }
    result[0] = (float)(t * total);
}

/* Backward reading the mask back from gated = W * M: M = gated / W where
 * |gated| is a normal number, the mask at W = 0 elsewhere (as
 * fused_gate's _backward_from_gated_math_inplace). Same outputs as
 * spg_backward. */
void spg_backward_from_gated(const float *weight, const float *gated,
                             const float *grad, float *out, int64_t n,
                             const float *threshold,
                             const float *temperature, const float *grad_zeros,
                             float *result, int threads)
{
    const float t = *threshold, tau = *temperature;
    const float at_zero = (float)(1.0 / (1.0 + exp((double)t * t / (2.0 * tau))));
    const __m256 inv_tau = _mm256_set1_ps(1.0f / tau);
    const __m256 gz = _mm256_set1_ps(*grad_zeros);
    const __m256 tiny = _mm256_set1_ps(1.17549435e-38f);
    const __m256 mask_at_zero = _mm256_set1_ps(at_zero);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    double total = 0.0;
#pragma omp parallel for num_threads(threads) if (n > SPG_CHUNK) \
    reduction(+ : total) schedule(static)
    for (int64_t c = 0; c < chunks_of(n); ++c) {
        SPG_CHUNK_BOUNDS(c, n, lo, hi);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = lo; i < hi; i += 8) {
            const int64_t lanes = hi - i;
            const __m256 w = load(weight + i, lanes);
            const __m256 wm = load(gated + i, lanes);
            const __m256 g = load(grad + i, lanes);
            const __m256 normal =
                _mm256_cmp_ps(_mm256_andnot_ps(sign, wm), tiny, _CMP_GE_OQ);
            const __m256 m = _mm256_blendv_ps(
                mask_at_zero, _mm256_div_ps(wm, w), normal);
            acc = chain_rule(out + i, w, m, g, inv_tau, gz, acc, lanes);
        }
        total += sum_lanes(acc);
    }
    result[0] = (float)(t * total);
}
