/* aligna's native code (`aligna/kernels.py` is its Python side and its documentation): two
 * passes over float32 logits that torch's operators make slow on a CPU, and dropout masks.
 *
 * log_softmax_rows, for the searches: each row is read from memory once: its maximum m, then
 * s = sum_j exp(x_j - m) while the row is still in the core's cache, then
 * x_j <- x_j - (m + log s) + add_row, written back, and on the way the n best outputs of each
 * group of rows (a sentence's beams) picked. cross_entropy_rows, for training: per row, the
 * label-smoothed loss and its gradient, softmax - eps / V - (1 - eps) [gold], in the same passes.
 *
 * torch's log_softmax spends nearly all its time in its exp (SLEEF's, to 1 ulp: about 1 ns a
 * value on a Zen 3 core); this one is a Cephes-style polynomial on 8 floats at a time (AVX2 +
 * FMA, chosen at run time; as accurate to a few ulp). The portable loops (the C library's expf)
 * run where AVX2 does not, in the tests: aligna itself leaves such processors to torch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* The n best values of a group of rows so far, best first, with their positions in the group
 * (row in the group * cols + column). Equal values keep the earlier position first. */
typedef struct {
    float *value;
    int64_t *index;
    Py_ssize_t n, count;
} Best;

static inline void best_add(Best *b, float v, int64_t position) {
    Py_ssize_t i;
    if (b->count < b->n) {
        i = b->count++;
    } else {
        if (!(v > b->value[b->n - 1])) return;
        i = b->n - 1;
    }
    for (; i > 0 && b->value[i - 1] < v; i--) {
        b->value[i] = b->value[i - 1];
        b->index[i] = b->index[i - 1];
    }
    b->value[i] = v;
    b->index[i] = position;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define ALIGNA_X86 1
#include <immintrin.h>

/* exp(x) for x <= 0 (x - max), Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2,
 * exp(r) by a degree-7 polynomial, times 2^n through the exponent bits. */
__attribute__((target("avx2,fma"))) static inline __m256 exp_avx2(__m256 x) {
    /* exp(-87.34) = FLT_MIN: no denormal 2^n. max_ps returns its second operand where either is
     * NaN: x second, so a NaN logit stays NaN (and makes its row NaN, as in torch) */
    x = _mm256_max_ps(_mm256_set1_ps(-87.3365f), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) static float hmax_avx2(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* Long sums: float lanes that each add V/8 terms round away the small ones added to a large
 * partial sum (~1e-5 low, relative, at V = 32,000). So the float lanes add BLOCK floats (16 terms
 * a lane, the fast inner loop) and each block's sum goes into double lanes. */
#define BLOCK 128

__attribute__((target("avx2,fma"))) static __m256d add_wide(__m256d sum, __m256 v) {
    return _mm256_add_pd(_mm256_add_pd(sum, _mm256_cvtps_pd(_mm256_castps256_ps128(v))),
                         _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

__attribute__((target("avx2,fma"))) static double hsum_wide(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

__attribute__((target("avx2,fma"))) static void row_avx2(float *x, Py_ssize_t n, float add, Best *best, int64_t base) {
    Py_ssize_t j = 0, whole = n - n % 8;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (; j < whole; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + j));
    float m = hmax_avx2(vmax);
    for (; j < n; j++) m = x[j] > m ? x[j] : m;
    int none = m == -INFINITY; /* every logit -inf: every log-probability -inf (torch gives nan) */
    if (!isfinite(m)) m = 0.0f;
    __m256 vm = _mm256_set1_ps(m);
    __m256d wide = _mm256_setzero_pd();
    Py_ssize_t pairs = whole - whole % 16;
    for (j = 0; j < pairs;) {
        Py_ssize_t end = pairs - j > 2 * BLOCK ? j + 2 * BLOCK : pairs;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (; j < end; j += 16) { /* two sums: two exps in flight */
            s0 = _mm256_add_ps(s0, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm)));
            s1 = _mm256_add_ps(s1, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), vm)));
        }
        wide = add_wide(wide, _mm256_add_ps(s0, s1));
    }
    for (; j < whole; j += 8) wide = add_wide(wide, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm)));
    double s = hsum_wide(wide);
    for (; j < n; j++) s += expf(x[j] - m);
    float c = none ? -INFINITY : add - (m + (float)log(s));
    __m256 shift = _mm256_set1_ps(c);
    for (j = 0; j < whole; j += 8) {
        __m256 out = _mm256_add_ps(_mm256_loadu_ps(x + j), shift);
        _mm256_storeu_ps(x + j, out);
        if (best == NULL) continue;
        /* most vectors hold nothing better than the n-th best so far: one comparison skips them */
        int above = best->count < best->n ? 0xff : _mm256_movemask_ps(_mm256_cmp_ps(
            out, _mm256_set1_ps(best->value[best->n - 1]), _CMP_GT_OQ));
        for (; above; above &= above - 1) {
            int lane = __builtin_ctz(above);
            best_add(best, x[j + lane], base + j + lane);
        }
    }
    for (; j < n; j++) {
        x[j] += c;
        if (best != NULL) best_add(best, x[j], base + j);
    }
}

#endif

/* A row's loss, lse - (1 - eps) x_g - eps mean(x), from the sum of its logits: NaN where a logit
 * is (as torch's; the vector exp would clamp it away), and no smoothing term at eps 0 (where
 * 0 * a -inf logit would be NaN). */
static double row_loss(double lse, float gold, double total, float eps, Py_ssize_t n) {
    if (isnan(total)) return NAN;
    return lse - (1.0 - eps) * gold - (eps > 0.0f ? eps * total / (double)n : 0.0);
}

#ifdef ALIGNA_X86
__attribute__((target("avx2,fma"))) static double cross_entropy_row_avx2(const float *x, float *grad, Py_ssize_t n,
                                                                        int64_t gold, float eps) {
    Py_ssize_t j = 0, whole = n - n % 8;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    __m256d wide = _mm256_setzero_pd();
    while (j < whole) {
        Py_ssize_t end = whole - j > BLOCK ? j + BLOCK : whole;
        __m256 vsum = _mm256_setzero_ps();
        for (; j < end; j += 8) {
            __m256 v = _mm256_loadu_ps(x + j);
            vmax = _mm256_max_ps(vmax, v);
            vsum = _mm256_add_ps(vsum, v);
        }
        wide = add_wide(wide, vsum);
    }
    float m = hmax_avx2(vmax);
    double total = hsum_wide(wide);
    for (; j < n; j++) {
        m = x[j] > m ? x[j] : m;
        total += x[j];
    }
    __m256 vm = _mm256_set1_ps(m);
    wide = _mm256_setzero_pd();
    for (j = 0; j < whole;) {
        Py_ssize_t end = whole - j > BLOCK ? j + BLOCK : whole;
        __m256 s0 = _mm256_setzero_ps();
        for (; j < end; j += 8) {
            __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm));
            _mm256_storeu_ps(grad + j, e);
            s0 = _mm256_add_ps(s0, e);
        }
        wide = add_wide(wide, s0);
    }
    double s = hsum_wide(wide);
    for (; j < n; j++) s += (grad[j] = expf(x[j] - m));
    float scale = (float)(1.0 / s), floor = eps / (float)n;
    __m256 vscale = _mm256_set1_ps(scale), vfloor = _mm256_set1_ps(floor);
    for (j = 0; j < whole; j += 8)
        _mm256_storeu_ps(grad + j, _mm256_fmsub_ps(_mm256_loadu_ps(grad + j), vscale, vfloor));
    for (; j < n; j++) grad[j] = grad[j] * scale - floor;
    grad[gold] -= 1.0f - eps;
    return row_loss(m + log(s), x[gold], total, eps, n);
}
#endif

static void row_portable(float *x, Py_ssize_t n, float add, Best *best, int64_t base) {
    float m = -INFINITY;
    for (Py_ssize_t j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
    int none = m == -INFINITY; /* as in row_avx2 */
    if (!isfinite(m)) m = 0.0f;
    double s = 0.0;
    for (Py_ssize_t j = 0; j < n; j++) s += expf(x[j] - m);
    float c = none ? -INFINITY : add - (m + (float)log(s));
    for (Py_ssize_t j = 0; j < n; j++) {
        x[j] += c;
        if (best != NULL) best_add(best, x[j], base + j);
    }
}

static int portable = 0; /* set_portable */

static int vector_code(void) {
#ifdef ALIGNA_X86
    return !portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* log_softmax_rows(x, rows, cols, add, group, n, values, indices): x, add, values and indices
 * are addresses: x (rows, cols) float32, contiguous; add (rows,) float32, or 0 for none. With
 * n > 0, also the n best outputs of each `group` consecutive rows (a beam's rows, taken as one
 * row of group * cols), best first: values (rows / group, n) float32, indices (rows / group, n)
 * int64 positions in that row. Releases the GIL while it runs. */
static PyObject *log_softmax_rows(PyObject *self, PyObject *args) {
    unsigned long long x_address, add_address, values_address, indices_address;
    Py_ssize_t rows, cols, group, n;
    if (!PyArg_ParseTuple(args, "KnnKnnKK", &x_address, &rows, &cols, &add_address, &group, &n, &values_address,
                          &indices_address))
        return NULL;
    if (rows < 0 || cols < 1 || group < 1 || rows % group || n < 0 || n > group * cols) {
        PyErr_SetString(PyExc_ValueError, "log_softmax_rows: inconsistent sizes");
        return NULL;
    }
    float *x = (float *)(uintptr_t)x_address;
    const float *add = (const float *)(uintptr_t)add_address;
    Best best = {(float *)(uintptr_t)values_address, (int64_t *)(uintptr_t)indices_address, n, 0};
    int wide = vector_code();
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++) {
        Best *b = NULL;
        if (n > 0) {
            b = &best;
            if (i % group == 0) { /* a new group: its own n slots */
                best.value = (float *)(uintptr_t)values_address + (i / group) * n;
                best.index = (int64_t *)(uintptr_t)indices_address + (i / group) * n;
                best.count = 0;
            }
        }
        int64_t base = (int64_t)(i % group) * cols;
#ifdef ALIGNA_X86
        if (wide) {
            row_avx2(x + i * cols, cols, add ? add[i] : 0.0f, b, base);
            continue;
        }
#endif
        row_portable(x + i * cols, cols, add ? add[i] : 0.0f, b, base);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* One row of the label-smoothed cross-entropy: returns the row's loss, lse - (1 - eps) x_g -
 * eps mean(x), and writes its gradient, softmax(x) - eps / V - (1 - eps) [j = g], into grad. */
static double cross_entropy_row(const float *x, float *grad, Py_ssize_t n, int64_t gold, float eps, int wide) {
    float m = -INFINITY;
    double total = 0.0;
#ifdef ALIGNA_X86
    if (wide) return cross_entropy_row_avx2(x, grad, n, gold, eps);
#endif
    for (Py_ssize_t j = 0; j < n; j++) {
        m = x[j] > m ? x[j] : m;
        total += x[j];
    }
    double s = 0.0;
    for (Py_ssize_t j = 0; j < n; j++) s += (grad[j] = expf(x[j] - m));
    float scale = (float)(1.0 / s), floor = eps / (float)n;
    for (Py_ssize_t j = 0; j < n; j++) grad[j] = grad[j] * scale - floor;
    grad[gold] -= 1.0f - eps;
    return row_loss(m + log(s), x[gold], total, eps, n);
}

/* cross_entropy_rows(logits, rows, cols, targets, eps, ignore, grad, losses): addresses of
 * logits (rows, cols) float32, targets (rows,) int64, grad (rows, cols) float32 and losses
 * (rows,) float32; rows whose target is `ignore` get loss 0 and gradient 0. */
static PyObject *cross_entropy_rows(PyObject *self, PyObject *args) {
    unsigned long long x_address, targets_address, grad_address, losses_address;
    Py_ssize_t rows, cols;
    float eps;
    long long ignore;
    if (!PyArg_ParseTuple(args, "KnnKfLKK", &x_address, &rows, &cols, &targets_address, &eps, &ignore, &grad_address,
                          &losses_address))
        return NULL;
    const float *x = (const float *)(uintptr_t)x_address;
    const int64_t *targets = (const int64_t *)(uintptr_t)targets_address;
    float *grad = (float *)(uintptr_t)grad_address, *losses = (float *)(uintptr_t)losses_address;
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (targets[i] != ignore && (targets[i] < 0 || targets[i] >= cols)) {
            PyErr_Format(PyExc_IndexError, "target %lld is out of range for %zd classes", (long long)targets[i], cols);
            return NULL;
        }
    }
    int wide = vector_code();
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (targets[i] == ignore) {
            memset(grad + i * cols, 0, (size_t)cols * sizeof(float));
            losses[i] = 0.0f;
        } else {
            losses[i] = (float)cross_entropy_row(x + i * cols, grad + i * cols, cols, targets[i], eps, wide);
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Dropout masks. Value i of a mask is kept when hash(i) >= threshold (threshold = p * 2^32),
 * where hash is murmur3's 32-bit finalizer applied twice: to a Weyl sequence i * 0x9E3779B9 +
 * seed_lo, then to that xor seed_hi. The first alone would make every mask a shifted window of
 * one sequence of 2^32 values; the second, keyed by the other half of the seed, does not. A
 * counter-based hash (each value from its position, as Philox in torch's CUDA dropout) computes
 * 8 values at a time with no state carried between them: the AVX2 and portable loops give the
 * same bits. */
static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

static inline uint32_t mask_hash(uint32_t i, uint32_t seed_lo, uint32_t seed_hi) {
    return fmix32(fmix32(i * 0x9E3779B9u + seed_lo) ^ seed_hi);
}

#ifdef ALIGNA_X86
__attribute__((target("avx2"))) static inline __m256i fmix32_avx2(__m256i h) {
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x85EBCA6Bu));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0xC2B2AE35u));
    return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

/* The first n - n % 8 values; returns how many it wrote. */
__attribute__((target("avx2"))) static Py_ssize_t dropout_mask_avx2(float *out, Py_ssize_t n, uint32_t threshold,
                                                                    float scale, uint32_t seed_lo, uint32_t seed_hi) {
    const __m256i step = _mm256_set1_epi32(8), golden = _mm256_set1_epi32((int)0x9E3779B9u);
    const __m256i lo = _mm256_set1_epi32((int)seed_lo), hi = _mm256_set1_epi32((int)seed_hi);
    const __m256i flip = _mm256_set1_epi32((int)0x80000000u); /* unsigned compare as signed */
    const __m256i below = _mm256_xor_si256(_mm256_set1_epi32((int)threshold), flip);
    const __m256 keep = _mm256_set1_ps(scale);
    __m256i i = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    Py_ssize_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256i h = fmix32_avx2(_mm256_add_epi32(_mm256_mullo_epi32(i, golden), lo));
        h = _mm256_xor_si256(fmix32_avx2(_mm256_xor_si256(h, hi)), flip);
        __m256i dropped = _mm256_cmpgt_epi32(below, h); /* hash < threshold */
        _mm256_storeu_ps(out + j, _mm256_andnot_ps(_mm256_castsi256_ps(dropped), keep));
        i = _mm256_add_epi32(i, step);
    }
    return j;
}
#endif

/* dropout_mask(out, n, threshold, scale, seed): out (n,) float32 (an address) <- scale where
 * the value is kept, 0 where dropped; threshold = p * 2^32 in [0, 2^32); seed: 64 bits. */
static PyObject *dropout_mask(PyObject *self, PyObject *args) {
    unsigned long long out_address, seed;
    Py_ssize_t n;
    unsigned long threshold;
    float scale;
    if (!PyArg_ParseTuple(args, "KnkfK", &out_address, &n, &threshold, &scale, &seed)) return NULL;
    if (n < 0 || n > (Py_ssize_t)UINT32_MAX + 1 || threshold > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "dropout_mask: n must be in [0, 2^32] and threshold in [0, 2^32)");
        return NULL;
    }
    float *out = (float *)(uintptr_t)out_address;
    uint32_t lo = (uint32_t)seed, hi = (uint32_t)(seed >> 32), t = (uint32_t)threshold;
    int wide = vector_code();
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t j = 0;
#ifdef ALIGNA_X86
    if (wide) j = dropout_mask_avx2(out, n, t, scale, lo, hi);
#endif
    for (; j < n; j++) out[j] = mask_hash((uint32_t)j, lo, hi) >= t ? scale : 0.0f;
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *vectorized(PyObject *self, PyObject *args) { return PyBool_FromLong(vector_code()); }

/* set_portable(flag): the portable code even where AVX2 runs (for the tests of that code). */
static PyObject *set_portable(PyObject *self, PyObject *args) {
    int flag;
    if (!PyArg_ParseTuple(args, "p", &flag)) return NULL;
    portable = flag;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"log_softmax_rows", log_softmax_rows, METH_VARARGS, "In-place row-wise log-softmax plus a per-row constant."},
    {"vectorized", vectorized, METH_NOARGS, "Whether the AVX2 code runs on this processor."},
    {"cross_entropy_rows", cross_entropy_rows, METH_VARARGS, "Label-smoothed cross-entropy and its gradient, per row."},
    {"set_portable", set_portable, METH_VARARGS, "Run the portable code even where AVX2 runs (tests)."},
    {"dropout_mask", dropout_mask, METH_VARARGS, "A dropout mask: scale where kept, 0 where dropped."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
