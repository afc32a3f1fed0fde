/*
 * prunet's sparse kernel: y = x W^T + b for pruned Linear layers at small batch sizes, one layer
 * or a chain of them (ReLU fused) in one call.
 *
 * W is held in CSR, rows = output features: int32 row pointers, uint16 column indices and, per
 * survivor, a float32 value, an IEEE half, or a uint8 index into the layer's codebook of at most
 * 256 float32 values (a weight-shared layer). A survivor costs 6, 4 or 3 bytes, against torch
 * CSR's 12 (int64 index, float32 value) and SciPy's 8. At batch 1 the product reads each survivor
 * once for two flops: it is bound by memory, so the bytes per survivor are the time.
 *
 * Batch 1 is a row-wise gather (y[r] = sum v * x[col]). For B > 1 the input is transposed once to
 * feature-major (in, Bp), Bp = B rounded up to 8, so a survivor's column of x is Bp contiguous
 * floats: its value is read once and multiplied into up to 32 batch lanes held in registers. A
 * chain keeps its activations feature-major from layer to layer and writes (B, out) only at the
 * end. The padding lanes carry values of their own that never mix with the real lanes.
 *
 * Rows are shared among threads with OpenMP when it is compiled in (-fopenmp) and the call has
 * enough work to pay for waking them; the caller passes torch's thread count. Built by
 * `make native` (the Makefile) or prunet.sparse.native.compile_library(); loaded by
 * prunet/sparse/native.py, which mirrors prunet_layer and checks PRUNET_SPMM_ABI.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define PRUNET_SPMM_ABI 1

enum { VALUES_F32 = 0, VALUES_F16 = 1, VALUES_CODEBOOK = 2 };
enum { FEATURE_OPENMP = 1, FEATURE_F16C = 2, FEATURE_AVX2 = 4, FEATURE_FMA = 8 };
enum { OK = 0, BAD_ARGUMENTS = 1, OUT_OF_MEMORY = 2 };

/* One layer; every field 8 bytes wide, so the Python mirror needs no padding rules. */
typedef struct {
    int64_t rows;            /* out_features */
    int64_t cols;            /* in_features, at most 65536 */
    int64_t kind;            /* VALUES_* */
    int64_t relu;            /* nonzero: y = max(y, 0) */
    const int32_t *row_ptr;  /* rows + 1 offsets into col and values */
    const uint16_t *col;     /* the column of each survivor */
    const void *values;      /* per survivor: float32, half bits (uint16) or codebook index (uint8) */
    const float *codebook;   /* VALUES_CODEBOOK: the layer's float32 values */
    const float *bias;       /* rows floats, or NULL */
} prunet_layer;

/* Survivors decoded at a time into a buffer on the stack (1 KiB). */
#define CHUNK 256
/* Rows a thread takes at a time: big enough that taking them costs nothing, small enough to balance. */
#define ROWS_PER_TASK 16
/* Work (survivors times vectors of 8 lanes) below which one thread does the call: tens of microseconds.
   Waking other threads costs a few microseconds on an idle machine, and far more on a busy one. */
#define PARALLEL_WORK (1 << 16)

/* Eight floats in one register (two with SSE only); the compiler lowers it to what the CPU has. */
typedef float v8 __attribute__((vector_size(32)));

int64_t prunet_spmm_abi(void) { return PRUNET_SPMM_ABI; }

int64_t prunet_spmm_features(void)
{
    int64_t f = 0;
#ifdef _OPENMP
    f |= FEATURE_OPENMP;
#endif
#ifdef __F16C__
    f |= FEATURE_F16C;
#endif
#ifdef __AVX2__
    f |= FEATURE_AVX2;
#endif
#ifdef __FMA__
    f |= FEATURE_FMA;
#endif
    return f;
}

/* IEEE half to float, exactly, without F16C: every half is a float. */
static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    float f;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);                 /* inf, nan */
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);   /* rebias 15 -> 127 */
    } else {
        f = (float)mantissa * 5.9604644775390625e-8f;                 /* zero, subnormal: m * 2^-24 */
        memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The float32 values of survivors [begin, begin + n), n <= CHUNK: the layer's own array when it
   stores float32, else decoded into buf. */
static const float *values_at(const prunet_layer *L, int64_t begin, int n, float *buf)
{
    int i = 0;
    if (L->kind == VALUES_F32)
        return (const float *)L->values + begin;
    if (L->kind == VALUES_F16) {
        const uint16_t *h = (const uint16_t *)L->values + begin;
#ifdef __F16C__
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
        for (; i < n; i++)
            buf[i] = half_to_float(h[i]);
    } else {
        const uint8_t *k = (const uint8_t *)L->values + begin;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        for (; i + 8 <= n; i += 8) {  /* eight indices from one 64-bit load, taken apart in registers */
            uint64_t e;
            memcpy(&e, k + i, sizeof e);
            for (int t = 0; t < 8; t++)
                buf[i + t] = L->codebook[(e >> (8 * t)) & 0xff];
        }
#endif
        for (; i < n; i++)
            buf[i] = L->codebook[k[i]];
    }
    return buf;
}

static int chunk_at(int64_t begin, int64_t end)
{
    return end - begin < CHUNK ? (int)(end - begin) : CHUNK;
}

/* Bytes per survivor of each VALUES_* kind. */
static const int VALUE_BYTES[3] = {4, 2, 1};

/* Asks for the column and value of survivor i + AHEAD to be brought into the cache while survivor i is
   multiplied: one call per 16 survivors covers a 64-byte line of float32 values and half a line of
   columns. The hardware prefetcher follows these two streams too, but it starts over at every 4 KiB page
   and runs only a little ahead; with the matrix in memory, not in the cache (as it is once the other
   layers of a forward pass have run), a batch-1 product on AlexNet fc6 at 9% took about 1.35 times as
   long without this on a 2-core Intel Xeon (docs/benchmarks.md); 512 survivors ahead was as fast as 1024
   and faster than 256 or 2048 there (-DAHEAD=N). A prefetch never faults, so the addresses past the last
   survivor that the last rows ask for are harmless; they are computed as integers, since a pointer that
   far past its array would be undefined behaviour in C. */
#ifndef AHEAD
#define AHEAD 512
#endif
static inline void prefetch_ahead(const prunet_layer *L, int64_t i)
{
    const uintptr_t ahead = (uintptr_t)(i + AHEAD);
    __builtin_prefetch((const void *)((uintptr_t)L->col + ahead * sizeof(uint16_t)), 0, 3);
    __builtin_prefetch((const void *)((uintptr_t)L->values + ahead * (uintptr_t)VALUE_BYTES[L->kind]), 0, 3);
}

#if defined(__AVX__) && defined(__FMA__)
#define GATHER8 1
/* x at the 8 columns c[0..8), as one vector. Scalar loads, not vgatherdps (slower on the AMD cores this
   was measured on); the columns come in two 64-bit loads taken apart in registers, so a survivor
   costs one load of x rather than two. */
static inline __m256 gather8(const float *x, const uint16_t *c)
{
    uint64_t lo, hi;
    memcpy(&lo, c, sizeof lo);
    memcpy(&hi, c + 4, sizeof hi);
    __m128 a = _mm_load_ss(x + (lo & 0xffff)), b = _mm_load_ss(x + (hi & 0xffff));
    a = _mm_insert_ps(a, _mm_load_ss(x + ((lo >> 16) & 0xffff)), 0x10);
    b = _mm_insert_ps(b, _mm_load_ss(x + ((hi >> 16) & 0xffff)), 0x10);
    a = _mm_insert_ps(a, _mm_load_ss(x + ((lo >> 32) & 0xffff)), 0x20);
    b = _mm_insert_ps(b, _mm_load_ss(x + ((hi >> 32) & 0xffff)), 0x20);
    a = _mm_insert_ps(a, _mm_load_ss(x + (lo >> 48)), 0x30);
    b = _mm_insert_ps(b, _mm_load_ss(x + (hi >> 48)), 0x30);
    return _mm256_set_m128(b, a);
}

static float sum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* Batch 1: row r of W times x: survivors 16 at a time in two vector sums, where the CPU has AVX and
   FMA, the rest in four scalar sums in flight to hide the gathers' latency. */
static float row_dot(const prunet_layer *L, int64_t r, const float *x)
{
    float buf[CHUNK];
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#ifdef GATHER8
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
#endif
    const int64_t end = L->row_ptr[r + 1];
    for (int64_t b = L->row_ptr[r]; b < end; b += CHUNK) {
        const int n = chunk_at(b, end);
        const float *v = values_at(L, b, n, buf);
        const uint16_t *c = L->col + b;
        int j = 0;
#ifdef GATHER8
        for (; j + 16 <= n; j += 16) {
            prefetch_ahead(L, b + j);
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j), gather8(x, c + j), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j + 8), gather8(x, c + j + 8), s1);
        }
#endif
        for (; j + 4 <= n; j += 4) {
            if ((j & 15) == 0)
                prefetch_ahead(L, b + j);
            a0 += v[j] * x[c[j]];
            a1 += v[j + 1] * x[c[j + 1]];
            a2 += v[j + 2] * x[c[j + 2]];
            a3 += v[j + 3] * x[c[j + 3]];
        }
        for (; j < n; j++)
            a0 += v[j] * x[c[j]];
    }
#ifdef GATHER8
    a0 += sum8(_mm256_add_ps(s0, s1));
#endif
    return (a0 + a1) + (a2 + a3);
}

/* acc[0..w) += v[j] * xt[c[j] * ldx + 8k ...] over n survivors, survivors [begin, begin + n) of layer L:
   w (1..4) registers of 8 lanes.
   Inlined at each call with w constant, so the unused accumulators and branches disappear. */
static inline __attribute__((always_inline)) void lanes(const prunet_layer *L, int64_t begin, const float *v,
                                                        const uint16_t *c, int n, const float *xt, int64_t ldx,
                                                        v8 *acc, const int w)
{
    v8 a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    for (int j = 0; j < n; j++) {
        if ((j & 15) == 0)
            prefetch_ahead(L, begin + j);
        const v8 *x = (const v8 *)(xt + (int64_t)c[j] * ldx);  /* 32-byte aligned: ldx % 8 == 0 */
        const float s = v[j];
        a0 += s * x[0];
        if (w > 1) a1 += s * x[1];
        if (w > 2) a2 += s * x[2];
        if (w > 3) a3 += s * x[3];
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

/* Batch lanes [lane, lane + 8w) of row r: out[k] = sum v * xt[col * ldx + lane + k]. */
static void row_lanes(const prunet_layer *L, int64_t r, const float *xt, int64_t ldx, int64_t lane, int w,
                      float *out)
{
    float buf[CHUNK];
    v8 acc[4] = {{0}};
    const int64_t end = L->row_ptr[r + 1];
    for (int64_t b = L->row_ptr[r]; b < end; b += CHUNK) {
        const int n = chunk_at(b, end);
        const float *v = values_at(L, b, n, buf);
        const uint16_t *c = L->col + b;
        const float *x = xt + lane;
        switch (w) {
        case 4: lanes(L, b, v, c, n, x, ldx, acc, 4); break;
        case 3: lanes(L, b, v, c, n, x, ldx, acc, 3); break;
        case 2: lanes(L, b, v, c, n, x, ldx, acc, 2); break;
        default: lanes(L, b, v, c, n, x, ldx, acc, 1); break;
        }
    }
    memcpy(out, acc, (size_t)w * sizeof(v8));
}

static float finish(const prunet_layer *L, int64_t r, float y)
{
    if (L->bias)
        y += L->bias[r];
    return L->relu && y < 0.0f ? 0.0f : y;  /* a NaN stays NaN, as in torch.relu */
}

/* Row r of a layer on feature-major input xt (in, ldx): lane k goes to y[r * row_stride + k * lane_stride],
   for the first `keep` lanes. ldx is 1 (batch 1) or a multiple of 8. */
static void layer_row(const prunet_layer *L, int64_t r, const float *xt, int64_t ldx, float *y,
                      int64_t row_stride, int64_t lane_stride, int64_t keep)
{
    if (ldx == 1) {
        y[r * row_stride] = finish(L, r, row_dot(L, r, xt));
        return;
    }
    for (int64_t lane = 0; lane < keep; lane += 32) {
        float out[32];
        const int w = ldx - lane < 32 ? (int)((ldx - lane) / 8) : 4;
        row_lanes(L, r, xt, ldx, lane, w, out);
        const int64_t n = keep - lane < 32 ? keep - lane : 32;
        for (int64_t k = 0; k < n; k++)
            y[r * row_stride + (lane + k) * lane_stride] = finish(L, r, out[k]);
    }
}

/* x (batch, in) -> xt (in, ldx) for features [f0, f1), the padding lanes zero. */
static void transpose_in(const float *x, int64_t batch, int64_t in, float *xt, int64_t ldx, int64_t f0, int64_t f1)
{
    for (int64_t f = f0; f < f1; f++) {
        for (int64_t b = 0; b < batch; b++)
            xt[f * ldx + b] = x[b * in + f];
        for (int64_t b = batch; b < ldx; b++)
            xt[f * ldx + b] = 0.0f;
    }
}

/* One call's arguments, shared by the threads. */
typedef struct {
    const prunet_layer *layers;
    int64_t count, batch, ldx;
    const float *x;
    float *y, *xt, *buf[2];
} chain_call;

/* The chain, by every thread of the team when `shared` (the loops divided by `omp for`, each ending in a
   barrier), else by the caller alone: an `omp for` outside a parallel region still costs runtime calls. */
static void run_chain(const chain_call *c, int shared)
{
    const float *in = c->x;
    if (c->ldx > 1) {
        const int64_t features = c->layers[0].cols;
        if (shared) {
#pragma omp for schedule(static)
            for (int64_t f = 0; f < features; f++)
                transpose_in(c->x, c->batch, features, c->xt, c->ldx, f, f + 1);
        } else {
            transpose_in(c->x, c->batch, features, c->xt, c->ldx, 0, features);
        }
        in = c->xt;
    }
    for (int64_t i = 0; i < c->count; i++) {
        const prunet_layer *L = &c->layers[i];
        const int last = i == c->count - 1;
        float *out = last ? c->y : c->buf[i % 2];
        const int64_t row_stride = last ? 1 : c->ldx, lane_stride = last ? L->rows : 1;
        const int64_t keep = last ? c->batch : c->ldx;
        if (shared && !last) {
#pragma omp for schedule(dynamic, ROWS_PER_TASK)
            for (int64_t r = 0; r < L->rows; r++)
                layer_row(L, r, in, c->ldx, out, row_stride, lane_stride, keep);
        } else if (shared) {  /* the end of the parallel region is the last layer's barrier */
#pragma omp for schedule(dynamic, ROWS_PER_TASK) nowait
            for (int64_t r = 0; r < L->rows; r++)
                layer_row(L, r, in, c->ldx, out, row_stride, lane_stride, keep);
        } else {
            for (int64_t r = 0; r < L->rows; r++)
                layer_row(L, r, in, c->ldx, out, row_stride, lane_stride, keep);
        }
        in = out;
    }
}

static int check_chain(const prunet_layer *layers, int64_t count, const float *x, const float *y, int64_t batch)
{
    if (!layers || count < 1 || !x || !y || batch < 1)
        return BAD_ARGUMENTS;
    for (int64_t i = 0; i < count; i++) {
        const prunet_layer *L = &layers[i];
        if (L->rows < 1 || L->cols < 1 || L->cols > 65536 || !L->row_ptr || L->kind < 0 || L->kind > 2)
            return BAD_ARGUMENTS;
        if (i > 0 && L->cols != layers[i - 1].rows)
            return BAD_ARGUMENTS;
    }
    return OK;
}

static void *aligned_floats(int64_t n)
{
    size_t bytes = ((size_t)(n > 0 ? n : 1) * sizeof(float) + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes);
}

/*
 * y (batch, out) = the chain of `count` layers applied to x (batch, in); each layer's output is the
 * next one's input (layers[i].cols == layers[i - 1].rows). Returns OK, BAD_ARGUMENTS or OUT_OF_MEMORY.
 */
int prunet_chain(const prunet_layer *layers, int64_t count, const float *x, float *y, int64_t batch,
                 int64_t threads)
{
    int rc = check_chain(layers, count, x, y, batch);
    if (rc != OK)
        return rc;
    chain_call c = {layers, count, batch, batch == 1 ? 1 : (batch + 7) / 8 * 8, x, y, NULL, {NULL, NULL}};
    int64_t widest = 1, work = 0;
    for (int64_t i = 0; i < count; i++) {
        if (i < count - 1 && layers[i].rows > widest)
            widest = layers[i].rows;
        work += (int64_t)layers[i].row_ptr[layers[i].rows] * ((c.ldx + 7) / 8);  /* 8 lanes: one vector op */
    }
    if (c.ldx > 1)
        c.xt = aligned_floats(layers[0].cols * c.ldx);
    if (count > 1) {
        c.buf[0] = aligned_floats(widest * c.ldx);
        c.buf[1] = aligned_floats(widest * c.ldx);
    }
    if ((c.ldx > 1 && !c.xt) || (count > 1 && (!c.buf[0] || !c.buf[1]))) {
        rc = OUT_OF_MEMORY;
    } else if (threads > 1 && work >= PARALLEL_WORK) {
#pragma omp parallel num_threads((int)threads)
        run_chain(&c, 1);
    } else {
        run_chain(&c, 0);
    }
    free(c.xt);
    free(c.buf[0]);
    free(c.buf[1]);
    return rc;
}
