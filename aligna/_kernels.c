/* aligna's one native kernel: a row-wise log-softmax over float32 logits, in place, for
 * the searches on a CPU (`aligna/kernels.py` is its Python side and its documentation).
 *
 * Each row is read from memory once: its maximum m, then s = sum_j exp(x_j - m) while the row
 * is still in the core's cache, then x_j <- x_j - (m + log s) + add_row, written back.
 * torch's log_softmax computes the same in more time on a CPU, nearly all of it in its exp
 * (SLEEF's, to 1 ulp: about 1 ns a value on a Zen 3 core); this one is a Cephes-style
 * polynomial on 8 floats at a time (AVX2 + FMA, chosen at run time, as accurate to a few
 * ulp), with the C library's expf on other processors.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define ALIGNA_X86 1
#include <immintrin.h>

/* exp(x) for x <= 0 (x - max), Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2,
 * exp(r) by a degree-7 polynomial, times 2^n through the exponent bits. */
__attribute__((target("avx2,fma"))) static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365f)); /* exp(-87.34) = FLT_MIN: no denormal 2^n */
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

__attribute__((target("avx2,fma"))) static float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static void row_avx2(float *x, Py_ssize_t n, float add) {
    Py_ssize_t j = 0, whole = n - n % 8;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (; j < whole; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + j));
    float m = hmax_avx2(vmax);
    for (; j < n; j++) m = x[j] > m ? x[j] : m;
    if (!isfinite(m)) m = 0.0f; /* -inf everywhere: log 0 below gives -inf, torch's nan aside */
    __m256 vm = _mm256_set1_ps(m), s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (j = 0; j + 16 <= whole; j += 16) { /* two sums: two exps in flight */
        s0 = _mm256_add_ps(s0, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm)));
        s1 = _mm256_add_ps(s1, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), vm)));
    }
    for (; j < whole; j += 8) s0 = _mm256_add_ps(s0, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm)));
    double s = hsum_avx2(_mm256_add_ps(s0, s1));
    for (; j < n; j++) s += expf(x[j] - m);
    __m256 shift = _mm256_set1_ps(add - (m + (float)log(s)));
    for (j = 0; j < whole; j += 8) _mm256_storeu_ps(x + j, _mm256_add_ps(_mm256_loadu_ps(x + j), shift));
    float c = add - (m + (float)log(s));
    for (; j < n; j++) x[j] += c;
}
#endif

static void row_portable(float *x, Py_ssize_t n, float add) {
    float m = -INFINITY;
    for (Py_ssize_t j = 0; j < n; j++) m = x[j] > m ? x[j] : m;
    if (!isfinite(m)) m = 0.0f;
    double s = 0.0;
    for (Py_ssize_t j = 0; j < n; j++) s += expf(x[j] - m);
    float c = add - (m + (float)log(s));
    for (Py_ssize_t j = 0; j < n; j++) x[j] += c;
}

/* log_softmax_rows(x, rows, cols, add): x and add are addresses of float32 arrays, x (rows,
 * cols) contiguous, add (rows,) or 0 for none. Releases the GIL while it runs. */
static PyObject *log_softmax_rows(PyObject *self, PyObject *args) {
    unsigned long long x_address, add_address;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "KnnK", &x_address, &rows, &cols, &add_address)) return NULL;
    float *x = (float *)(uintptr_t)x_address;
    const float *add = (const float *)(uintptr_t)add_address;
    Py_BEGIN_ALLOW_THREADS
#ifdef ALIGNA_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        for (Py_ssize_t i = 0; i < rows; i++) row_avx2(x + i * cols, cols, add ? add[i] : 0.0f);
    } else
#endif
    {
        for (Py_ssize_t i = 0; i < rows; i++) row_portable(x + i * cols, cols, add ? add[i] : 0.0f);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *vectorized(PyObject *self, PyObject *args) {
#ifdef ALIGNA_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) Py_RETURN_TRUE;
#endif
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"log_softmax_rows", log_softmax_rows, METH_VARARGS, "In-place row-wise log-softmax plus a per-row constant."},
    {"vectorized", vectorized, METH_NOARGS, "Whether the AVX2 code runs on this processor."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
