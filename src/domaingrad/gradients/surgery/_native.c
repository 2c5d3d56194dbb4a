/* Native kernels of domaingrad's gradient-surgery rules: the sign-agreement pass of
 * Agr-Sum and Agr-Rand with its noise, and the float64 Gram matrices of PCGrad and CorGrad.
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
 * (key0, key1) is a standard normal drawn by the ziggurat method (512 layers; Marsaglia
 * and Tsang, "The Ziggurat Method for Generating Random Variables", J. Stat. Software
 * 2000, with the independent layer index and uniform of Doornik, "An Improved Ziggurat
 * Method to Generate Normal Random Samples", 2005) from SplitMix64 words (Steele, Lea,
 * Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014): the first try
 * uses word mix(key0 + i * GOLDEN); the rare further draws (for about 0.8% of the values)
 * come from the SplitMix64 sequence seeded with mix(key1 + i * GOLDEN).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define DG_LAYERS 512
#ifndef DG_BLOCK
#define DG_BLOCK 1024
#endif

/* GCC/clang vector types: 64-byte vectors of 16 floats or 8 doubles (one AVX-512
 * register, two AVX2 ones, four NEON ones), their integer masks, 8 floats */
typedef float dg_v16f __attribute__((vector_size(64)));
typedef int32_t dg_v16i __attribute__((vector_size(64)));
typedef double dg_v8d __attribute__((vector_size(64)));
typedef int64_t dg_v8l __attribute__((vector_size(64)));
typedef float dg_v8f __attribute__((vector_size(32)));

static const uint64_t DG_GOLDEN = 0x9e3779b97f4a7c15ULL;
static double dg_x[DG_LAYERS + 1]; /* layer widths: x[0] (base, virtual) > x[1] = r > ... > x[512] = 0 */
static double dg_ratio[DG_LAYERS]; /* x[k + 1] / x[k] */
static double dg_f[DG_LAYERS + 1]; /* heights exp(-x[k]^2 / 2) */

/* Set the ziggurat tables (given by Python, so that both implementations share them). */
void dg_set_tables(const double *x, const double *ratio, const double *f) {
    for (int k = 0; k <= DG_LAYERS; k++) dg_x[k] = x[k];
    for (int k = 0; k < DG_LAYERS; k++) dg_ratio[k] = ratio[k];
    for (int k = 0; k <= DG_LAYERS; k++) dg_f[k] = f[k];
}

static inline uint64_t dg_mix(uint64_t z) {
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ULL;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* the symmetric uniform of a word: ((h >> 12) + 1/2) * 2^-51 - 1, in (-1, 1), exact */
static inline double dg_signed_uniform(uint64_t h) { return ((double)(h >> 12) + 0.5) * 0x1.0p-51 - 1.0; }

/* a uniform in [0, 1) with 53 bits */
static inline double dg_uniform(uint64_t h) { return (double)(h >> 11) * 0x1.0p-53; }

/* The value whose first try (word h) fell outside its layer's inner rectangle. */
static double dg_slow_normal(uint64_t h, uint64_t key1, uint64_t i) {
    uint64_t state = dg_mix(key1 + i * DG_GOLDEN);
    for (;;) {
        uint64_t k = h & (DG_LAYERS - 1);
        double u = dg_signed_uniform(h);
        if (fabs(u) < dg_ratio[k]) return u * dg_x[k];
        if (k == 0) { /* the tail beyond r (Marsaglia's method), same sign as u */
            double r = dg_x[1], x, y;
            do {
                state += DG_GOLDEN;
                x = -log(1.0 - dg_uniform(dg_mix(state))) / r;
                state += DG_GOLDEN;
                y = -log(1.0 - dg_uniform(dg_mix(state)));
            } while (y + y <= x * x);
            return u < 0.0 ? -(r + x) : r + x;
        }
        /* the wedge between x[k + 1] and x[k]: a uniform height in [f(x[k]), f(x[k + 1])]
           kept if it is under the curve exp(-x^2 / 2) */
        double x = u * dg_x[k];
        state += DG_GOLDEN;
        if (dg_f[k] + dg_uniform(dg_mix(state)) * (dg_f[k + 1] - dg_f[k]) < exp(-0.5 * (x * x))) return x;
        state += DG_GOLDEN;
        h = dg_mix(state);
    }
}

/* The first tries of values base + a0 .. base + a0 + m - 1 of the counter stream (one
 * block): DST[a] = u * x[k] (the value if the try is kept), slow[a] = 1 where it is not. */
#define DG_FIRST_TRIES(T, DST)                                                                   \
    for (int64_t a = 0; a < m; a++) {                                                            \
        uint64_t h = dg_mix(key0 + (base + (uint64_t)(a0 + a)) * DG_GOLDEN);                     \
        uint64_t k = h & (DG_LAYERS - 1);                                                        \
        double u = dg_signed_uniform(h);                                                         \
        (DST)[a] = (T)(u * dg_x[k]);                                                             \
        slow[a] = !(fabs(u) < dg_ratio[k]);                                                      \
    }

/* The further tries of the block's values with slow[a] set: OUT[a] = the value PLUS (PLUS
 * may be empty). slow has 8 bytes after the block, read a word at a time. */
#define DG_FURTHER_TRIES(T, OUT, PLUS)                                                           \
    for (int64_t w = 0; w < m; w += 8) {                                                         \
        uint64_t any;                                                                            \
        memcpy(&any, slow + w, 8);                                                               \
        if (!any) continue;                                                                      \
        for (int64_t a = w; a < w + 8 && a < m; a++) {                                           \
            if (slow[a]) {                                                                       \
                uint64_t i = base + (uint64_t)(a0 + a);                                          \
                (OUT)[a] = (T)dg_slow_normal(dg_mix(key0 + i * DG_GOLDEN), key1, i) PLUS;        \
            }                                                                                    \
        }                                                                                        \
    }

/* Standard normals of the counter stream, values base .. base + n - 1, into out: the
 * draws of the agreement pass below, on their own. */
#define DG_DEFINE_NORMALS(NAME, T)                                                               \
    void NAME(T *restrict out, int64_t n, uint64_t key0, uint64_t key1, uint64_t base) {         \
        uint8_t slow[DG_BLOCK + 8] = {0};                                                        \
        for (int64_t a0 = 0; a0 < n; a0 += DG_BLOCK) {                                           \
            int64_t m = n - a0 < DG_BLOCK ? n - a0 : DG_BLOCK;                                   \
            DG_FIRST_TRIES(T, out + a0)                                                          \
            DG_FURTHER_TRIES(T, out + a0, )                                                      \
        }                                                                                        \
    }

DG_DEFINE_NORMALS(dg_normals_f32, float)
DG_DEFINE_NORMALS(dg_normals_f64, double)

/* One block of the agreement pass for a compile-time number of domains ND (0: D at run
 * time). g: D rows of `stride` elements; the block is components a0 .. a0 + m - 1.
 * Leaves sum in s, and the smallest / largest value in lo / hi. */
#define DG_REDUCE(T, ND)                                                                         \
    {                                                                                            \
        const int64_t nd = (ND) > 0 ? (ND) : D;                                                  \
        const T *p = g + a0;                                                                     \
        for (int64_t a = 0; a < m; a++) {                                                        \
            T v = p[a];                                                                          \
            T l = v, h = v, t = v;                                                               \
            for (int64_t d = 1; d < nd; d++) {                                                   \
                T x = p[d * stride + a];                                                         \
                l = l < x ? l : x;                                                               \
                h = h > x ? h : x;                                                               \
                t += x;                                                                          \
            }                                                                                    \
            lo[a] = l;                                                                           \
            hi[a] = h;                                                                           \
            s[a] = t;                                                                            \
        }                                                                                        \
    }

/* Component a of the block, after the last multiple of the vector width: the agreement
 * (as 0/1 in mask), the output and the tail sums (the vector loop does the same). */
#define DG_COMBINE(T, a)                                                                         \
    {                                                                                            \
        T l = lo[a], h = hi[a], t = s[a];                                                        \
        int agree = official ? ((l > 0) | (h < 0)) : ((l > 0) | (h < 0) | ((l == 0) & (h == 0))); \
        agree &= (t == t);                                                                       \
        T mk = agree ? (T)1 : (T)0;                                                              \
        T kept_t = t * mk;                                                                       \
        out[a0 + (a)] = agree ? t : z[a] + t * (T)0;                                             \
        mask[a] = mk;                                                                            \
        tail_kept += mk;                                                                         \
        tail_abs += kept_t < 0 ? -kept_t : kept_t;                                               \
    }

/* The agreement pass over components 0 .. n - 1 of D rows (row d at g + d * stride):
 *   keep[a] = 1 (keep may be NULL) where all D values agree in sign (official: all > 0 or all < 0;
 *             paper: also all exactly 0) and their sum is not NaN, else 0;
 *   out[a]  = the sum where keep, else (noisy) the standard normal of value base + a of
 *             the counter stream plus 0 * sum (so that a NaN or infinite sum gives NaN,
 *             as in the torch path), or (not noisy) 0 * sum;
 *   *l1    += sum of |sum| over the kept components (NaN if one is NaN).
 * Returns the number of kept components. */
#define DG_DEFINE_AGREE(NAME, T, VT, VI, W, ABS_BITS)                                            \
    int64_t NAME(const T *restrict g, int64_t D, int64_t stride, int64_t n, T *restrict out,     \
                 uint8_t *restrict keep, int official, int noisy, uint64_t key0, uint64_t key1,   \
                 uint64_t base, double *l1) {                                                    \
        T lo[DG_BLOCK], hi[DG_BLOCK], s[DG_BLOCK], z[DG_BLOCK], mask[DG_BLOCK];                  \
        uint8_t slow[DG_BLOCK + 8] = {0};                                                        \
        int64_t kept = 0;                                                                        \
        double abs_sum = 0.0;                                                                    \
        for (int64_t a0 = 0; a0 < n; a0 += DG_BLOCK) {                                           \
            int64_t m = n - a0 < DG_BLOCK ? n - a0 : DG_BLOCK;                                   \
            switch (D) {                                                                         \
                case 1: DG_REDUCE(T, 1) break;                                                   \
                case 2: DG_REDUCE(T, 2) break;                                                   \
                case 3: DG_REDUCE(T, 3) break;                                                   \
                case 4: DG_REDUCE(T, 4) break;                                                   \
                case 5: DG_REDUCE(T, 5) break;                                                   \
                case 6: DG_REDUCE(T, 6) break;                                                   \
                case 7: DG_REDUCE(T, 7) break;                                                   \
                case 8: DG_REDUCE(T, 8) break;                                                   \
                default: DG_REDUCE(T, 0) break;                                                  \
            }                                                                                    \
            if (noisy) {                                                                         \
                DG_FIRST_TRIES(T, z)                                                             \
            } else {                                                                             \
                for (int64_t a = 0; a < m; a++) {                                                \
                    z[a] = (T)0;                                                                 \
                    slow[a] = 0;                                                                 \
                }                                                                                \
            }                                                                                    \
            VT lane_abs = {0}, lane_kept = {0};                                                  \
            T tail_abs = 0, tail_kept = 0;                                                       \
            int64_t mm = m - m % W;                                                              \
            const VT zero = {0}, one = zero + 1;                                                 \
            const VI abs_bits = (VI){0} + ABS_BITS;                                              \
            for (int64_t a = 0; a < mm; a += W) {                                                \
                VT l, h, t, zz;                                                                  \
                memcpy(&l, lo + a, sizeof l);                                                    \
                memcpy(&h, hi + a, sizeof h);                                                    \
                memcpy(&t, s + a, sizeof t);                                                     \
                memcpy(&zz, z + a, sizeof zz);                                                   \
                VI agree = (VI)((l > zero) | (h < zero));                                        \
                if (!official) agree |= (VI)((l == zero) & (h == zero));                         \
                agree &= (VI)(t == t);                                                           \
                VT mk = (VT)((VI)one & agree);                                                   \
                VT other = zz + t * zero;                                                        \
                VT o = (VT)(((VI)t & agree) | ((VI)other & ~agree));                             \
                memcpy(out + a0 + a, &o, sizeof o);                                              \
                memcpy(mask + a, &mk, sizeof mk);                                                \
                lane_kept += mk;                                                                 \
                lane_abs += (VT)((VI)(t * mk) & abs_bits);                                       \
            }                                                                                    \
            for (int64_t a = mm; a < m; a++) DG_COMBINE(T, a)                                    \
            if (keep)                                                                            \
                for (int64_t a = 0; a < m; a++) keep[a0 + a] = (uint8_t)(mask[a] != (T)0);       \
            for (int64_t a = 0; a < m; a++) slow[a] &= (uint8_t)(mask[a] == (T)0);               \
            DG_FURTHER_TRIES(T, out + a0, + s[a] * (T)0)                                         \
            for (int j = 0; j < W; j++) {                                                        \
                kept += (int64_t)lane_kept[j];                                                   \
                abs_sum += (double)lane_abs[j];                                                  \
            }                                                                                    \
            kept += (int64_t)tail_kept;                                                          \
            abs_sum += (double)tail_abs;                                                         \
        }                                                                                        \
        *l1 += abs_sum;                                                                          \
        return kept;                                                                             \
    }

DG_DEFINE_AGREE(dg_agree_f32, float, dg_v16f, dg_v16i, 16, 0x7fffffff)
DG_DEFINE_AGREE(dg_agree_f64, double, dg_v8d, dg_v8l, 8, 0x7fffffffffffffffLL)

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
