/* Native kernels of domaingrad's gradient-surgery rules: the sign-agreement pass of
 * Agr-Sum and Agr-Rand with its noise, and the float64 Gram matrices and weighted sums of
 * PCGrad and CorGrad.
 *
 * Compiled on first use by _native.py with the system C compiler and loaded with ctypes;
 * the Python side falls back to torch operations where no compiler is found. One call
 * handles one contiguous range of at most a few hundred thousand components of one
 * tensor group; the Python side cuts the work into fixed ranges and runs them on
 * several threads (ctypes releases the GIL), so results do not depend on the number of
 * threads.
 *
 * Floating-point rules: compiled with -ffp-contract=off and without -ffast-math, so
 * every sum is computed in the order written here (fixed lanes of the 64-byte vector
 * types below, summed in order), whatever the hardware's vector width: the results are
 * the same on every x86 or ARM machine, with or without AVX-512.
 *
 * The noise is domaingrad's counter stream (see _noise.py for its definition and the
 * torch implementation that gives the same values): value i of a call with keys
 * (key0, key1) is a standard normal, a float32 number, drawn by the ziggurat method (512
 * layers; Marsaglia and Tsang, "The Ziggurat Method for Generating Random Variables",
 * J. Stat. Software 2000, with the independent layer index and uniform of Doornik, "An
 * Improved Ziggurat Method to Generate Normal Random Samples", 2005) from SplitMix64 words
 * (Steele, Lea, Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014): its
 * first try is half i mod 2 of word mix(key0 + (i / 2) * GOLDEN) (so one word gives two
 * values); the rare further draws (for about 0.8% of the values) come from the SplitMix64
 * sequence seeded with mix(key1 + i * GOLDEN).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h> /* the table gathers of the first tries */
#endif

#define DG_LAYERS 512
#ifndef DG_BLOCK
#define DG_BLOCK 1024
#endif
/* the most components whose noise needs further tries listed at once (a multiple of DG_BLOCK) */
#ifndef DG_REDO_LIST
#define DG_REDO_LIST 2048
#endif

/* GCC/clang vector types: 64-byte vectors of 16 floats or 8 doubles (one AVX-512
 * register, two AVX2 ones, four NEON ones), their integer masks, the noise's words
 * (8 of 64 bits, 16 of 32 bits), 8 floats and their masks, lane bytes */
typedef float dg_v16f __attribute__((vector_size(64)));
typedef int32_t dg_v16i __attribute__((vector_size(64)));
typedef double dg_v8d __attribute__((vector_size(64)));
typedef int64_t dg_v8l __attribute__((vector_size(64)));
typedef uint64_t dg_v8u __attribute__((vector_size(64)));
typedef float dg_v8f __attribute__((vector_size(32)));
typedef int32_t dg_v8i __attribute__((vector_size(32)));
typedef uint32_t dg_v16w __attribute__((vector_size(64)));
typedef int8_t dg_v16c __attribute__((vector_size(16)));
typedef int8_t dg_v8c __attribute__((vector_size(8)));

static const uint64_t DG_GOLDEN = 0x9e3779b97f4a7c15ULL;
static double dg_x[DG_LAYERS + 1]; /* layer widths: x[0] (base, virtual) > x[1] = r > ... > x[512] = 0 */
static double dg_f[DG_LAYERS + 1]; /* heights exp(-x[k]^2 / 2) */
/* per layer, for a try's 22-bit magnitude a: the value a * w[k] (w[k] = float32(x[k] 2^-22))
 * is kept when a < t[k] (t[k] = ceil(2^22 x[k + 1] / x[k])); one 8-byte entry, the bits of
 * w[k] low and t[k] high, so that one gather gives both */
static uint64_t dg_wt[DG_LAYERS] __attribute__((aligned(64)));

/* Set the ziggurat tables (given by Python, so that both implementations share them). */
void dg_set_tables(const double *x, const double *f, const float *w, const uint32_t *t) {
    for (int k = 0; k <= DG_LAYERS; k++) {
        dg_x[k] = x[k];
        dg_f[k] = f[k];
    }
    for (int k = 0; k < DG_LAYERS; k++) {
        uint32_t bits;
        memcpy(&bits, w + k, 4);
        dg_wt[k] = (uint64_t)bits | ((uint64_t)t[k] << 32);
    }
}

/* w[k] and t[k] of layer k (see dg_wt) */
static inline void dg_layer(uint32_t k, float *w, uint32_t *t) {
    uint64_t e = dg_wt[k];
    uint32_t bits = (uint32_t)e;
    memcpy(w, &bits, 4);
    *t = (uint32_t)(e >> 32);
}

/* SplitMix64's output function on Z in place: a uint64_t, or a vector of them */
#define DG_MIX(Z)                                                                                \
    do {                                                                                         \
        (Z) ^= (Z) >> 30;                                                                        \
        (Z) *= 0xbf58476d1ce4e5b9ULL;                                                            \
        (Z) ^= (Z) >> 27;                                                                        \
        (Z) *= 0x94d049bb133111ebULL;                                                            \
        (Z) ^= (Z) >> 31;                                                                        \
    } while (0)

static inline uint64_t dg_mix(uint64_t z) {
    DG_MIX(z);
    return z;
}

/* a uniform in [0, 1) with 53 bits */
static inline double dg_uniform(uint64_t h) { return (double)(h >> 11) * 0x1.0p-53; }

/* A try with the 32-bit word r: layer k = r mod 512, sign bit 9, magnitude a = r >> 10;
 * returns +-a * w[k] (one float32 rounding) and sets *kept to a < t[k]. */
static inline float dg_try(uint32_t r, int *kept) {
    uint32_t a = r >> 10, t;
    float w;
    dg_layer(r & (DG_LAYERS - 1), &w, &t);
    float v = (float)a * w;
    *kept = a < t;
    return r & 512 ? -v : v;
}

/* The word of value i's first try: half i mod 2 of mix(key0 + (i / 2) * GOLDEN). */
static inline uint32_t dg_first_word(uint64_t key0, uint64_t i) {
    uint64_t h = dg_mix(key0 + (i >> 1) * DG_GOLDEN);
    return (uint32_t)(i & 1 ? h >> 32 : h);
}

/* Value i where its first try (word r) was not kept: the further tries on the sequence
 * mix(s + t * GOLDEN), t = 1, 2, ..., s = mix(key1 + i * GOLDEN). */
static float dg_further_tries(uint32_t r, uint64_t key1, uint64_t i) {
    uint64_t state = dg_mix(key1 + i * DG_GOLDEN);
    for (;;) {
        int kept;
        float v = dg_try(r, &kept);
        if (kept) return v;
        uint32_t k = r & (DG_LAYERS - 1);
        if (k == 0) { /* the tail beyond x[1] = r (Marsaglia's method), with the try's sign */
            double rr = dg_x[1], x, y;
            do {
                state += DG_GOLDEN;
                x = -log(1.0 - dg_uniform(dg_mix(state))) / rr;
                state += DG_GOLDEN;
                y = -log(1.0 - dg_uniform(dg_mix(state)));
            } while (y + y <= x * x);
            float tail = (float)(rr + x);
            return r & 512 ? -tail : tail;
        }
        /* the wedge between x[k + 1] and x[k]: a uniform height in [f(x[k]), f(x[k + 1])]
           kept if it is under the curve exp(-v^2 / 2), in float64 */
        double vd = (double)v;
        state += DG_GOLDEN;
        if (dg_f[k] + dg_uniform(dg_mix(state)) * (dg_f[k + 1] - dg_f[k]) < exp(-0.5 * (vd * vd))) return v;
        state += DG_GOLDEN;
        r = (uint32_t)dg_mix(state);
    }
}

/* Value i of the counter stream. */
static inline float dg_normal(uint64_t key0, uint64_t key1, uint64_t i) {
    int kept;
    uint32_t r = dg_first_word(key0, i);
    float v = dg_try(r, &kept);
    return kept ? v : dg_further_tries(r, key1, i);
}

/* The words of the first tries of values i .. i + 15: the little-endian halves of 8
 * SplitMix64 words (9 for odd i). */
static inline dg_v16w dg_first_words16(uint64_t key0, uint64_t i) {
    const dg_v8u lanes = (dg_v8u){0, 1, 2, 3, 4, 5, 6, 7} * DG_GOLDEN;
    dg_v8u z = (key0 + (i >> 1) * DG_GOLDEN) + lanes;
    DG_MIX(z);
    dg_v16w r;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (!(i & 1)) {
        memcpy(&r, &z, sizeof r);
        return r;
    }
#endif
    uint32_t halves[18];
    for (int j = 0; j < 8; j++) {
        halves[2 * j] = (uint32_t)z[j];
        halves[2 * j + 1] = (uint32_t)(z[j] >> 32);
    }
    uint64_t last = dg_mix(key0 + ((i >> 1) + 8) * DG_GOLDEN);
    halves[16] = (uint32_t)last;
    halves[17] = (uint32_t)(last >> 32);
    memcpy(&r, halves + (i & 1), sizeof r);
    return r;
}

/* The first tries of values i .. i + 15, 16 lanes of dg_try (same operations, same
 * bits); *redo is -1 in the lanes whose try is not kept, else 0. */
static inline dg_v16f dg_first_tries16(uint64_t key0, uint64_t i, dg_v16i *redo) {
    dg_v16w r = dg_first_words16(key0, i);
    dg_v16w k = r & (DG_LAYERS - 1), a = r >> 10, sign = (r << 22) & 0x80000000u;
    dg_v16f w;
    dg_v16w t;
#if defined(__AVX512F__) /* 8-byte gathers give both table entries, split in registers */
    __m512i e0 = _mm512_i32gather_epi64(_mm512_castsi512_si256((__m512i)k), (const void *)dg_wt, 8);
    __m512i e1 = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64((__m512i)k, 1), (const void *)dg_wt, 8);
    w = (dg_v16f)_mm512_permutex2var_epi32(e0, _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0), e1);
    t = (dg_v16w)_mm512_permutex2var_epi32(e0, _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1), e1);
#else
    for (int j = 0; j < 16; j++) {
        float wj;
        uint32_t tj;
        dg_layer(k[j], &wj, &tj);
        w[j] = wj;
        t[j] = tj;
    }
#endif
    dg_v16f v = __builtin_convertvector((dg_v16i)a, dg_v16f) * w;
    *redo = (dg_v16i)(a >= t);
    return (dg_v16f)((dg_v16w)v ^ sign);
}

/* The first tries of the W lanes of one vector of the agreement pass, values i .. i + W - 1,
 * as T (float64: the first 8 of 16); *redo as in dg_first_tries16. */
static inline dg_v16f dg_tries_f32(uint64_t key0, uint64_t i, dg_v16i *redo) { return dg_first_tries16(key0, i, redo); }

static inline dg_v8d dg_tries_f64(uint64_t key0, uint64_t i, dg_v8l *redo) {
    dg_v16i r;
    dg_v16f v = dg_first_tries16(key0, i, &r);
    dg_v8f lo;
    dg_v8i rlo;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&rlo, &r, sizeof rlo);
    *redo = __builtin_convertvector(rlo, dg_v8l);
    return __builtin_convertvector(lo, dg_v8d);
}

/* NAME(v): bit j set where lane j of the W-lane mask v is not 0 (the lanes to visit,
 * lowest first); TEST is AVX-512's test instruction for the lane width. */
#if defined(__AVX512F__)
#define DG_DEFINE_LANES(NAME, VI, W, TEST)                                                       \
    static inline uint32_t NAME(VI v) { return (uint32_t)TEST((__m512i)v, (__m512i)v); }
#else
#define DG_DEFINE_LANES(NAME, VI, W, TEST)                                                       \
    static inline uint32_t NAME(VI v) {                                                          \
        uint32_t bits = 0;                                                                       \
        for (int j = 0; j < (W); j++) bits |= (uint32_t)(v[j] != 0) << j;                        \
        return bits;                                                                             \
    }
#endif

DG_DEFINE_LANES(dg_lanes_f32, dg_v16i, 16, _mm512_test_epi32_mask)
DG_DEFINE_LANES(dg_lanes_f64, dg_v8l, 8, _mm512_test_epi64_mask)

/* Standard normals of the counter stream, values base .. base + n - 1, into out: the
 * noise of the agreement pass below, on its own. */
#define DG_DEFINE_NORMALS(NAME, T)                                                               \
    void NAME(T *restrict out, int64_t n, uint64_t key0, uint64_t key1, uint64_t base) {         \
        int64_t body = n - n % 16;                                                               \
        for (int64_t a = 0; a < body; a += 16) {                                                 \
            dg_v16i redo;                                                                        \
            dg_v16f v = dg_first_tries16(key0, base + (uint64_t)a, &redo);                       \
            for (int j = 0; j < 16; j++) out[a + j] = (T)v[j];                                   \
            for (uint32_t b = dg_lanes_f32(redo); b; b &= b - 1) {                               \
                uint64_t i = base + (uint64_t)a + (uint64_t)__builtin_ctz(b);                    \
                out[i - base] = (T)dg_further_tries(dg_first_word(key0, i), key1, i);            \
            }                                                                                    \
        }                                                                                        \
        for (int64_t a = body; a < n; a++) out[a] = (T)dg_normal(key0, key1, base + (uint64_t)a); \
    }

DG_DEFINE_NORMALS(dg_normals_f32, float)
DG_DEFINE_NORMALS(dg_normals_f64, double)

/* The vector part (components a0 .. a0 + mm - 1, mm a multiple of W) of one block of the
 * agreement pass, for a compile-time number of domains ND (0: D at run time). Per W
 * components, all in registers: the D rows' min, max and sum (added in domain order), the
 * agreement, the first tries of the noise where some lane disagrees, the output, the mask
 * and the lanes' sums. The disagreeing lanes whose first try is not kept are listed in
 * redo_at, for their further tries after the loop. */
#define DG_AGREE_VECTOR(T, VT, VI, VC, W, SFX, ND)                                               \
    {                                                                                            \
        const int64_t nd = (ND) > 0 ? (ND) : D;                                                  \
        for (int64_t a = 0; a < mm; a += W) {                                                    \
            const T *p = g + a0 + a;                                                             \
            VT l, h, t;                                                                          \
            memcpy(&t, p, sizeof t);                                                             \
            l = t;                                                                               \
            h = t;                                                                               \
            for (int64_t d = 1; d < nd; d++) {                                                   \
                VT x;                                                                            \
                memcpy(&x, p + d * stride, sizeof x);                                            \
                VI lt = (VI)(x < l), gt = (VI)(x > h);                                           \
                l = (VT)(((VI)x & lt) | ((VI)l & ~lt));                                          \
                h = (VT)(((VI)x & gt) | ((VI)h & ~gt));                                          \
                t += x;                                                                          \
            }                                                                                    \
            VI agree = (VI)((l > zero) | (h < zero));                                            \
            if (!official) agree |= (VI)((l == zero) & (h == zero));                             \
            agree &= (VI)(t == t);                                                               \
            VT zz = zero;                                                                        \
            if (noisy && dg_lanes_##SFX(~agree)) {                                               \
                VI redo;                                                                         \
                zz = dg_tries_##SFX(key0, base + (uint64_t)(a0 + a), &redo);                     \
                for (uint32_t b = dg_lanes_##SFX(redo & ~agree); b; b &= b - 1)                  \
                    redo_at[redos++] = a0 + a + __builtin_ctz(b);                                \
            }                                                                                    \
            VT mk = (VT)((VI)one & agree);                                                       \
            VT other = zz + t * zero;                                                            \
            VT o = (VT)(((VI)t & agree) | ((VI)other & ~agree));                                 \
            memcpy(out + a0 + a, &o, sizeof o);                                                  \
            if (keep) {                                                                          \
                VC kb = __builtin_convertvector(agree & one_i, VC);                              \
                memcpy(keep + a0 + a, &kb, sizeof kb);                                           \
            }                                                                                    \
            lane_kept += mk;                                                                     \
            lane_abs += (VT)((VI)(t * mk) & abs_bits);                                           \
        }                                                                                        \
    }

/* Component c after the block's last multiple of W, in scalar code: the operations of one
 * lane of DG_AGREE_VECTOR (same bits), into the block's tail sums. */
#define DG_AGREE_ONE(T, c)                                                                       \
    {                                                                                            \
        T v = g[c], l = v, h = v, t = v;                                                         \
        for (int64_t d = 1; d < D; d++) {                                                        \
            T x = g[d * stride + (c)];                                                           \
            l = x < l ? x : l;                                                                   \
            h = x > h ? x : h;                                                                   \
            t += x;                                                                              \
        }                                                                                        \
        int agree = official ? ((l > 0) | (h < 0)) : ((l > 0) | (h < 0) | ((l == 0) & (h == 0))); \
        agree &= (t == t);                                                                       \
        T zz = noisy && !agree ? (T)dg_normal(key0, key1, base + (uint64_t)(c)) : (T)0;         \
        out[c] = agree ? t : zz + t * (T)0;                                                      \
        if (keep) keep[c] = (uint8_t)agree;                                                      \
        T mk = agree ? (T)1 : (T)0;                                                              \
        T kept_t = t * mk;                                                                       \
        tail_kept += mk;                                                                         \
        tail_abs += kept_t < 0 ? -kept_t : kept_t;                                               \
    }

/* The further tries of the listed components redo_at[0 .. redos - 1]: the value plus
 * 0 * sum (the sum again, in domain order, so that a NaN sum gives NaN). */
#define DG_REDO(T)                                                                               \
    {                                                                                            \
        for (int64_t q = 0; q < redos; q++) {                                                    \
            int64_t c = redo_at[q];                                                              \
            uint64_t i = base + (uint64_t)c;                                                     \
            T t = g[c];                                                                          \
            for (int64_t d = 1; d < D; d++) t += g[d * stride + c];                              \
            out[c] = (T)dg_further_tries(dg_first_word(key0, i), key1, i) + t * (T)0;            \
        }                                                                                        \
        redos = 0;                                                                               \
    }

/* The agreement pass over components 0 .. n - 1 of D rows (row d at g + d * stride):
 *   keep[a] = 1 (keep may be NULL) where all D values agree in sign (official: all > 0 or all < 0;
 *             paper: also all exactly 0) and their sum is not NaN, else 0;
 *   out[a]  = the sum where keep, else (noisy) the standard normal of value base + a of
 *             the counter stream plus 0 * sum (so that a NaN or infinite sum gives NaN,
 *             as in the torch path), or (not noisy) 0 + 0 * sum;
 *   *l1    += sum of |sum| over the kept components (NaN if one is NaN): per block of
 *             DG_BLOCK components, W lanes (component a in lane a mod W) summed in lane
 *             order, then the components after the last multiple of W, in order.
 * Returns the number of kept components. One pass over the rows: the noise is drawn in
 * the same loop (only for vectors with a disagreeing lane), the rare further tries of up
 * to DG_REDO_LIST values at a time, away from the loop (where they cost three times as
 * much). */
#define DG_DEFINE_AGREE(NAME, T, VT, VI, VC, W, SFX, ABS_BITS)                                   \
    int64_t NAME(const T *restrict g, int64_t D, int64_t stride, int64_t n, T *restrict out,     \
                 uint8_t *restrict keep, int official, int noisy, uint64_t key0, uint64_t key1,   \
                 uint64_t base, double *l1) {                                                    \
        int64_t kept = 0;                                                                        \
        double abs_sum = 0.0;                                                                    \
        int64_t redo_at[DG_REDO_LIST], redos = 0;                                                \
        const VT zero = {0}, one = zero + 1;                                                     \
        const VI abs_bits = (VI){0} + ABS_BITS, one_i = (VI){0} + 1;                             \
        for (int64_t a0 = 0; a0 < n; a0 += DG_BLOCK) {                                           \
            int64_t m = n - a0 < DG_BLOCK ? n - a0 : DG_BLOCK;                                   \
            int64_t mm = m - m % W;                                                              \
            if (redos > DG_REDO_LIST - DG_BLOCK) DG_REDO(T)                                      \
            VT lane_abs = {0}, lane_kept = {0};                                                  \
            T tail_abs = 0, tail_kept = 0;                                                       \
            switch (D) {                                                                         \
                case 1: DG_AGREE_VECTOR(T, VT, VI, VC, W, SFX, 1) break;                         \
                case 2: DG_AGREE_VECTOR(T, VT, VI, VC, W, SFX, 2) break;                         \
                case 3: DG_AGREE_VECTOR(T, VT, VI, VC, W, SFX, 3) break;                         \
                case 4: DG_AGREE_VECTOR(T, VT, VI, VC, W, SFX, 4) break;                         \
                case 5: DG_AGREE_VECTOR(T, VT, VI, VC, W, SFX, 5) break;                         \
                case 6: DG_AGREE_VECTOR(T, VT, VI, VC, W, SFX, 6) break;                         \
                case 7: DG_AGREE_VECTOR(T, VT, VI, VC, W, SFX, 7) break;                         \
                case 8: DG_AGREE_VECTOR(T, VT, VI, VC, W, SFX, 8) break;                         \
                default: DG_AGREE_VECTOR(T, VT, VI, VC, W, SFX, 0) break;                        \
            }                                                                                    \
            for (int64_t c = a0 + mm; c < a0 + m; c++) DG_AGREE_ONE(T, c)                        \
            for (int j = 0; j < W; j++) {                                                        \
                kept += (int64_t)lane_kept[j];                                                   \
                abs_sum += (double)lane_abs[j];                                                  \
            }                                                                                    \
            kept += (int64_t)tail_kept;                                                          \
            abs_sum += (double)tail_abs;                                                         \
        }                                                                                        \
        DG_REDO(T)                                                                               \
        *l1 += abs_sum;                                                                          \
        return kept;                                                                             \
    }

DG_DEFINE_AGREE(dg_agree_f32, float, dg_v16f, dg_v16i, dg_v16c, 16, f32, 0x7fffffff)
DG_DEFINE_AGREE(dg_agree_f64, double, dg_v8d, dg_v8l, dg_v8c, 8, f64, 0x7fffffffffffffffLL)

/* out[a] *= keep[a] ? kept_factor : other_factor (Agr-Rand's noise scale, the mean). */
#define DG_DEFINE_SCALE(NAME, T)                                                                 \
    void NAME(T *restrict out, const uint8_t *restrict keep, int64_t n, double kept_factor,      \
              double other_factor) {                                                             \
        const T kf = (T)kept_factor, of = (T)other_factor;                                       \
        for (int64_t a = 0; a < n; a++) out[a] *= keep[a] ? kf : of;                             \
    }

DG_DEFINE_SCALE(dg_scale_f32, float)
DG_DEFINE_SCALE(dg_scale_f64, double)

/* The D x D Gram matrix of components 0 .. n - 1 of D rows (row d at g + d * stride):
 * gram[i * D + j] = sum_a g[i][a] g[j][a], every product and sum in float64 (the
 * products of float32 values are exact, so a fused multiply-add gives the same bits as a
 * multiply and an add), in a fixed order whatever the vector width or the machine: in
 * blocks of DG_GRAM_BLOCK components, component a adding into lane a mod 8 of its pair's
 * accumulator, the 8 lanes summed in order at the end of each block and the blocks
 * added in order, the components after the last multiple of 8 last. gram is overwritten.
 * D <= 8 runs the register-blocked kernels below; larger D (<= DG_GRAM_MAX_D) a plain
 * loop over the pairs. */
#define DG_GRAM_MAX_D 32
#define DG_GRAM_BLOCK 2048


static inline dg_v8d dg_load8_f32(const float *p) {
    dg_v8f f;
    memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, dg_v8d);
}

static inline dg_v8d dg_load8_f64(const double *p) {
    dg_v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The pairs (i, j), I0 <= i < I1, i <= j < ND, of one block of m components (m % 8 == 0),
 * the rows held in vector registers, added to gram. */
#define DG_GRAM_TILE(SFX, ND, I0, I1)                                                            \
    {                                                                                            \
        dg_v8d acc[(ND) * ((ND) + 1) / 2];                                                       \
        memset(acc, 0, sizeof acc);                                                              \
        for (int64_t a = 0; a < m; a += 8) {                                                     \
            dg_v8d v[ND];                                                                        \
            for (int d = (I0); d < (ND); d++) v[d] = dg_load8_##SFX(p + d * stride + a);         \
            int q = 0;                                                                           \
            for (int i = (I0); i < (I1); i++)                                                    \
                for (int j = i; j < (ND); j++, q++) acc[q] += v[i] * v[j];                       \
        }                                                                                        \
        int q = 0;                                                                               \
        for (int i = (I0); i < (I1); i++)                                                        \
            for (int j = i; j < (ND); j++, q++) {                                                \
                double t = 0.0;                                                                  \
                for (int k = 0; k < 8; k++) t += acc[q][k];                                      \
                gram[i * (ND) + j] += t;                                                         \
            }                                                                                    \
    }

/* one kernel per number of domains; at most 21 pairs per pass, so that the pairs'
 * accumulators and the rows fit in the registers */
#define DG_GRAM_PASSES_1(SFX) DG_GRAM_TILE(SFX, 1, 0, 1)
#define DG_GRAM_PASSES_2(SFX) DG_GRAM_TILE(SFX, 2, 0, 2)
#define DG_GRAM_PASSES_3(SFX) DG_GRAM_TILE(SFX, 3, 0, 3)
#define DG_GRAM_PASSES_4(SFX) DG_GRAM_TILE(SFX, 4, 0, 4)
#define DG_GRAM_PASSES_5(SFX) DG_GRAM_TILE(SFX, 5, 0, 5)
#define DG_GRAM_PASSES_6(SFX) DG_GRAM_TILE(SFX, 6, 0, 6)
#define DG_GRAM_PASSES_7(SFX) DG_GRAM_TILE(SFX, 7, 0, 2) DG_GRAM_TILE(SFX, 7, 2, 7)
#define DG_GRAM_PASSES_8(SFX) DG_GRAM_TILE(SFX, 8, 0, 3) DG_GRAM_TILE(SFX, 8, 3, 8)

#define DG_DEFINE_GRAM_SMALL(NAME, T, SFX, ND, ATTR)                                             \
    ATTR static void NAME(const T *restrict g, int64_t stride, int64_t n, double *restrict gram) { \
        int64_t body = n - n % 8;                                                                \
        for (int64_t b = 0; b < body; b += DG_GRAM_BLOCK) {                                      \
            const T *p = g + b;                                                                  \
            int64_t m = body - b < DG_GRAM_BLOCK ? body - b : DG_GRAM_BLOCK;                     \
            DG_GRAM_PASSES_##ND(SFX)                                                             \
        }                                                                                        \
        for (int64_t i = 0; i < (ND); i++)                                                       \
            for (int64_t j = i; j < (ND); j++)                                                   \
                for (int64_t a = body; a < n; a++)                                               \
                    gram[i * (ND) + j] += (double)g[i * stride + a] * (double)g[j * stride + a]; \
    }

/* float32: products are exact, so contracting them into fused multiply-adds changes no bit */
#if defined(__GNUC__) && !defined(__clang__)
#define DG_EXACT_PRODUCTS __attribute__((optimize("fp-contract=fast")))
#else
#define DG_EXACT_PRODUCTS
#endif

#define DG_DEFINE_GRAM_FAMILY(T, SFX, ATTR)                                                      \
    DG_DEFINE_GRAM_SMALL(dg_gram1_##SFX, T, SFX, 1, ATTR)                                        \
    DG_DEFINE_GRAM_SMALL(dg_gram2_##SFX, T, SFX, 2, ATTR)                                        \
    DG_DEFINE_GRAM_SMALL(dg_gram3_##SFX, T, SFX, 3, ATTR)                                        \
    DG_DEFINE_GRAM_SMALL(dg_gram4_##SFX, T, SFX, 4, ATTR)                                        \
    DG_DEFINE_GRAM_SMALL(dg_gram5_##SFX, T, SFX, 5, ATTR)                                        \
    DG_DEFINE_GRAM_SMALL(dg_gram6_##SFX, T, SFX, 6, ATTR)                                        \
    DG_DEFINE_GRAM_SMALL(dg_gram7_##SFX, T, SFX, 7, ATTR)                                        \
    DG_DEFINE_GRAM_SMALL(dg_gram8_##SFX, T, SFX, 8, ATTR)                                        \
    void dg_gram_##SFX(const T *restrict g, int64_t D, int64_t stride, int64_t n, double *restrict gram) { \
        for (int64_t k = 0; k < D * D; k++) gram[k] = 0.0;                                       \
        switch (D) {                                                                             \
            case 1: dg_gram1_##SFX(g, stride, n, gram); break;                                   \
            case 2: dg_gram2_##SFX(g, stride, n, gram); break;                                   \
            case 3: dg_gram3_##SFX(g, stride, n, gram); break;                                   \
            case 4: dg_gram4_##SFX(g, stride, n, gram); break;                                   \
            case 5: dg_gram5_##SFX(g, stride, n, gram); break;                                   \
            case 6: dg_gram6_##SFX(g, stride, n, gram); break;                                   \
            case 7: dg_gram7_##SFX(g, stride, n, gram); break;                                   \
            case 8: dg_gram8_##SFX(g, stride, n, gram); break;                                   \
            default: /* many domains: one pair at a time, 8 lanes, blocks as above */             \
                for (int64_t i = 0; i < D; i++)                                                  \
                    for (int64_t j = i; j < D; j++) {                                            \
                        int64_t body = n - n % 8;                                                \
                        double total = 0.0;                                                      \
                        for (int64_t b = 0; b < body; b += DG_GRAM_BLOCK) {                      \
                            int64_t m = body - b < DG_GRAM_BLOCK ? body - b : DG_GRAM_BLOCK;     \
                            dg_v8d acc = {0};                                                    \
                            for (int64_t a = b; a < b + m; a += 8)                               \
                                acc += dg_load8_##SFX(g + i * stride + a) * dg_load8_##SFX(g + j * stride + a); \
                            double t = 0.0;                                                      \
                            for (int k = 0; k < 8; k++) t += acc[k];                             \
                            total += t;                                                          \
                        }                                                                        \
                        for (int64_t a = body; a < n; a++)                                       \
                            total += (double)g[i * stride + a] * (double)g[j * stride + a];      \
                        gram[i * D + j] = total;                                                 \
                    }                                                                            \
        }                                                                                        \
        for (int64_t i = 0; i < D; i++)                                                          \
            for (int64_t j = 0; j < i; j++) gram[i * D + j] = gram[j * D + i];                   \
    }

DG_DEFINE_GRAM_FAMILY(float, f32, DG_EXACT_PRODUCTS)
DG_DEFINE_GRAM_FAMILY(double, f64, )

/* out[a] = sum_d c[d] g[d][a] for components 0 .. n - 1 of D rows (row d at g + d *
 * stride): PCGrad's and CorGrad's weighted sum of the domain gradients, the coefficients
 * c[d] = coef[d] rounded to T (as the torch path does), every product and sum in float64
 * in domain order, rounded once to T. For float32 the products are exact, so fused
 * multiply-adds give the same bits. Per component: the result does not depend on how the
 * components are cut into ranges. */
#define DG_DEFINE_COMBINE(NAME, T, SFX, VT8, ATTR)                                               \
    ATTR void NAME(const T *restrict g, int64_t D, int64_t stride, int64_t n, const double *restrict coef, \
                   T *restrict out) {                                                            \
        double c[DG_GRAM_MAX_D];                                                                 \
        for (int64_t d = 0; d < D; d++) c[d] = (double)(T)coef[d];                               \
        int64_t body = n - n % 8;                                                                \
        for (int64_t a = 0; a < body; a += 8) {                                                  \
            dg_v8d acc = dg_load8_##SFX(g + a) * c[0];                                           \
            for (int64_t d = 1; d < D; d++) acc += dg_load8_##SFX(g + d * stride + a) * c[d];    \
            VT8 o = __builtin_convertvector(acc, VT8);                                           \
            memcpy(out + a, &o, sizeof o);                                                       \
        }                                                                                        \
        for (int64_t a = body; a < n; a++) {                                                     \
            double acc = (double)g[a] * c[0];                                                    \
            for (int64_t d = 1; d < D; d++) acc += (double)g[d * stride + a] * c[d];             \
            out[a] = (T)acc;                                                                     \
        }                                                                                        \
    }

DG_DEFINE_COMBINE(dg_combine_f32, float, f32, dg_v8f, DG_EXACT_PRODUCTS)
DG_DEFINE_COMBINE(dg_combine_f64, double, f64, dg_v8d, )
