/* The rational-quadratic spline of krflows.transforms.monotone.Spline, forward (z -> x, log dx/dz),
 * its backward and its inverse (x -> z), each fused into one pass over the points: the CPU kernels
 * of _SplineForward and _SplineInverse.
 *
 * Written by hand because neither torch nor nflows has a fused CPU spline: eager torch runs it as
 * ~90 small kernels each way, whose dispatch dominates at small batches, and torch.compile costs
 * a compilation per shape. Compiled at first use by krflows.transforms._native (plain C, no torch
 * headers, about a second), loaded with ctypes; without a C compiler krflows uses the torch
 * operations instead (same numbers up to rounding).
 *
 * Layout (the one MaskedMLP produces): for each of L rows (coordinates), the P parameters of R
 * points are P contiguous rows of R values, params[(l * P + j) * R + r]; z, x, log dx/dz and the
 * gradient of z are (L, R), the parameter gradient (L, P, R). P = [a, v,] widths (K), heights (K),
 * raw knot slopes (K + 1). The math is Spline._forward_ops and _SplineForward.backward's, point
 * by point; the backward recomputes the forward instead of saving it (nothing but the inputs is
 * kept between the two).
 *
 * Points are processed in chunks of CH as structure-of-arrays loops over the chunk, which the
 * compiler vectorizes (float: exp and log by the Cephes polynomials below, vectorizable, within
 * 2 ulp; double: libm), built for the machine it runs on (-march=native where the compiler takes it).
 */
#ifndef KR_REAL

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CH 64
#define KR_MAX_THREADS 64
#define KR_PARALLEL_MIN 4096


/* Threads: the OpenMP runtime torch runs its own parallel loops on (libgomp for the PyPI wheels),
 * handed over by address: a second thread pool would fight torch's, whose workers spin for a
 * while after each parallel operation (measured: a 1.3 ms call took 3.3 ms right after a torch
 * operation with its own two threads on two cores). GOMP_parallel is the entry point GCC's
 * `#pragma omp parallel` compiles to; LLVM's and Intel's runtimes export it too. */
static void (*kr_parallel)(void (*)(void *), void *, unsigned, unsigned);
static int (*kr_thread_num)(void);
static int (*kr_num_threads)(void);

void kr_set_openmp(void *parallel, void *thread_num, void *num_threads) {
    kr_thread_num = (int (*)(void))thread_num;
    kr_num_threads = (int (*)(void))num_threads;
    kr_parallel = (void (*)(void (*)(void *), void *, unsigned, unsigned))parallel;
}

/* Cephes expf, for the arguments this file meets (softmax numerators <= 0, softplus <= 20);
 * NaN in, NaN out. Branch-free so that loops calling it vectorize. */
#define KR_INLINE static inline __attribute__((always_inline))

KR_INLINE float kr_expf(float x) {
    float c = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(c * 1.44269504088896341f + 0.5f);
    float r = c - n * 0.693359375f + n * 2.12194440e-4f;
    float r2 = r * r;
    float y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
                + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    y = y * r2 + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    y = y * scale;
    return x != x ? x : y;
}

/* Cephes logf for x > 0 normal; 0 -> -inf, x < 0 -> NaN, inf -> inf, NaN -> NaN. */
KR_INLINE float kr_logf(float x) {
    int32_t ix;
    memcpy(&ix, &x, 4);
    float e = (float)(((ix >> 23) & 0xff) - 126);
    ix = (ix & 0x807fffff) | 0x3f000000;
    float m;
    memcpy(&m, &ix, 4); /* x = m 2^e, m in [0.5, 1) */
    int low = m < 0.707106781186547524f;
    e = low ? e - 1.0f : e;
    m = low ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m
                    - 1.2420140846e-1f) * m + 1.4249322787e-1f) * m - 1.6668057665e-1f) * m
                 + 2.0000714765e-1f) * m - 2.4999993993e-1f) * m + 3.3333331174e-1f) * m * z;
    y += -2.12194440e-4f * e - 0.5f * z;
    float r = m + y + 0.693359375f * e;
    r = x == INFINITY ? x : r;
    r = x == 0.0f ? -INFINITY : r;
    return (x < 0.0f || x != x) ? NAN : r;
}

/* log(1 + t) for t >= 0, accurate for small t (Goldberg: log(u) t / (u - 1), u = 1 + t rounded) */
KR_INLINE float kr_log1pf(float t) {
    float u = 1.0f + t;
    float d = u - 1.0f;
    return d == 0.0f ? t : kr_logf(u) * (t / d);
}

KR_INLINE double kr_exp(double x) { return exp(x); }
KR_INLINE double kr_log(double x) { return log(x); }
KR_INLINE double kr_log1p(double x) { return log1p(x); }

#define KR_REAL float
#define KR_NAME(f) f##_f32
#define KR_EXP kr_expf
#define KR_LOG kr_logf
#define KR_LOG1P kr_log1pf
#include __FILE__
#undef KR_REAL
#undef KR_NAME
#undef KR_EXP
#undef KR_LOG
#undef KR_LOG1P

#define KR_REAL double
#define KR_NAME(f) f##_f64
#define KR_EXP kr_exp
#define KR_LOG kr_log
#define KR_LOG1P kr_log1p
#include __FILE__

#else /* the body, once per KR_REAL */

typedef KR_REAL KR_NAME(real);
#define real KR_NAME(real)

/* Per-chunk values of the forward pass, each CH long. */
typedef struct {
    real zc[CH], idx[CH], z0[CH], w[CH], x0[CH], h[CH], cz0[CH], cz1[CH], cx0[CH], cx1[CH],
        rz[CH], rx[CH], raw0[CH], raw1[CH], d0[CH], d1[CH], s[CH], xi[CH], xm[CH], t[CH], den[CH],
        num[CH], n1[CH], above[CH], below[CH], tail[CH], dout[CH], x[CH], slope[CH], sc[CH];
} KR_NAME(chunk);
#define chunk KR_NAME(chunk)

/* softplus with torch's threshold 20, and its derivative */
KR_INLINE real KR_NAME(softplus)(real y) { return y > 20 ? y : KR_LOG1P(KR_EXP(y)); }
KR_INLINE real KR_NAME(dsoftplus)(real y) {
    real e = KR_EXP(y > 20 ? 20 : y);
    return y > 20 ? 1 : e / (e + 1);
}

/* The bins of points r0 .. r0 + n - 1 of one row: v are the points in the coordinate of knot row
 * `row` (0: z, forward; 1: x, inverse), clamped to the box into c->zc; params p; softmax
 * numerators to e (2 K CH), running sums to C and knots to kn (2 (K + 1) CH each). Every loop runs
 * over the points of the chunk without branches (the bin's values are indexed loads, which vector
 * units gather), so that it vectorizes. `grad` (a constant at every call, so the compiler drops
 * what it does not need): also what only the backward reads, C_k / S and C_{k+1} / S. */
KR_INLINE void KR_NAME(bin)(const real *restrict v, int row, const real *restrict p, long R, long r0, int n,
                            int K, real B, real minw, int aff, int grad, chunk *restrict c,
                            real *restrict e, real *restrict C, real *restrict kn) {
    const int off = aff ? 2 : 0;
    const real span = 2 * B * (1 - K * minw);
    real mx[CH];
    for (int q = 0; q < 2; q++) { /* widths, heights: knots by a softmax and a running sum */
        const real *restrict u = p + (long)(off + q * K) * R + r0;
        real *restrict eq = e + q * K * CH, *restrict Cq = C + q * (K + 1) * CH;
        real *restrict kq = kn + q * (K + 1) * CH, *restrict rq = q ? c->rx : c->rz;
        for (int i = 0; i < n; i++) mx[i] = u[i];
        for (int k = 1; k < K; k++) {
            const real *restrict uk = u + k * R;
            for (int i = 0; i < n; i++) mx[i] = uk[i] > mx[i] ? uk[i] : mx[i]; /* NaN: e is NaN below */
        }
        for (int i = 0; i < n; i++) Cq[i] = 0;
        for (int k = 0; k < K; k++) {
            const real *restrict uk = u + k * R;
            real *restrict ek = eq + k * CH, *restrict Ck = Cq + k * CH;
            for (int i = 0; i < n; i++) {
                ek[i] = KR_EXP(uk[i] - mx[i]);
                Ck[CH + i] = Ck[i] + ek[i];
            }
        }
        const real *restrict S = Cq + K * CH;
        for (int i = 0; i < n; i++) rq[i] = span / S[i];
        for (int i = 0; i < n; i++) kq[i] = -B, kq[K * CH + i] = B; /* the end knots, exactly */
        /* C_j r + off_j rounded twice, as torch computes it (Spline._table), not fused: a point
         * on a knot must fall in the same bin in both (the gradient of log dx/dz jumps there) */
        for (int j = 1; j < K; j++)
            for (int i = 0; i < n; i++) kq[j * CH + i] = Cq[j * CH + i] * rq[i];
        for (int j = 1; j < K; j++) {
            const real off_j = j * (2 * B * minw) - B;
            for (int i = 0; i < n; i++) kq[j * CH + i] += off_j;
        }
    }
    const real *restrict Cz = C, *restrict Cx = C + (K + 1) * CH, *restrict kz = kn, *restrict kx = kn + (K + 1) * CH;
    const real *restrict kv = row ? kx : kz;
    for (int i = 0; i < n; i++) {
        real vi = v[i];
        c->zc[i] = vi < -B ? -B : (vi > B ? B : vi); /* NaN stays NaN */
        c->idx[i] = 0;
    }
    for (int j = 1; j < K; j++) /* the bin: interior knots at or below the clamped point */
        for (int i = 0; i < n; i++) c->idx[i] += c->zc[i] >= kv[j * CH + i] ? 1 : 0;
    const real *restrict raw = p + (long)(off + 2 * K) * R + r0;
    for (int i = 0; i < n; i++) { /* the bin's two knots and raw slopes: gathers */
        long a = (long)c->idx[i] * CH + i, j = (long)c->idx[i] * R + i;
        c->z0[i] = kz[a], c->w[i] = kz[a + CH] - kz[a];
        c->x0[i] = kx[a], c->h[i] = kx[a + CH] - kx[a];
        c->raw0[i] = raw[j], c->raw1[i] = raw[j + R];
    }
    if (grad)
        for (int i = 0; i < n; i++) { /* C_k / S and C_{k+1} / S */
            long a = (long)c->idx[i] * CH + i;
            c->cz0[i] = Cz[a] / Cz[K * CH + i], c->cz1[i] = Cz[a + CH] / Cz[K * CH + i];
            c->cx0[i] = Cx[a] / Cx[K * CH + i], c->cx1[i] = Cx[a + CH] / Cx[K * CH + i];
        }
}

/* The forward values of points r0 .. r0 + n - 1 of one row (buffers and `grad` as for bin). */
KR_INLINE void KR_NAME(eval)(const real *restrict z, const real *restrict p, long R, long r0, int n,
                             int K, real B, real minw, real floor_, real cst, int aff, int grad,
                             chunk *restrict c, real *restrict e, real *restrict C, real *restrict kn) {
    KR_NAME(bin)(z, 0, p, R, r0, n, K, B, minw, aff, grad, c, e, C, kn);
    for (int i = 0; i < n; i++) {
        real d0 = floor_ + KR_NAME(softplus)(c->raw0[i] + cst);
        real d1 = floor_ + KR_NAME(softplus)(c->raw1[i] + cst);
        real w = c->w[i], h = c->h[i];
        real s = h / w;
        real xi_raw = (c->zc[i] - c->z0[i]) / w;
        real xi = xi_raw < 0 ? 0 : (xi_raw > 1 ? 1 : xi_raw);
        real t = xi * (1 - xi);
        real den = s + (d1 + d0 - 2 * s) * t;
        real num = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) * (1 - xi);
        real slope = s * s * num / (den * den);
        real n1 = s * xi * xi + d0 * t;
        real x = c->x0[i] + h * n1 / den;
        real zi = z[i], zc = c->zc[i];
        real above = zi > zc ? 1 : 0, below = zi < zc ? 1 : 0;
        real dout = zi > zc ? d1 : d0;
        real tail = zi - zc;
        if (grad) {
            c->d0[i] = d0, c->d1[i] = d1, c->s[i] = s, c->xi[i] = xi;
            c->xm[i] = (xi_raw >= 0 ? 1 : 0) * (xi_raw <= 1 ? 1 : 0);
            c->t[i] = t, c->den[i] = den, c->num[i] = num, c->n1[i] = n1;
            c->above[i] = above, c->below[i] = below, c->tail[i] = tail, c->dout[i] = dout;
        }
        c->slope[i] = above + below != 0 ? dout : slope;
        c->x[i] = above + below != 0 ? zc + tail * dout : x;
    }
    if (aff) {
        const real *restrict v = p + R + r0;
        for (int i = 0; i < n; i++) c->sc[i] = floor_ + KR_NAME(softplus)(v[i] + cst);
    }
}

/* A thread's work buffer: the chunk, softmax numerators e (2 K CH), running sums C and knots kn
 * (2 (K + 1) CH each) and the chunk's folded parameters pc (P CH, P <= 3 K + 3). */
static void *KR_NAME(work)(int K, real **e, real **C, real **kn, real **pc) {
    chunk *c = malloc(sizeof(chunk) + sizeof(real) * CH * (2 * K + 4 * (K + 1) + 3 * K + 3));
    if (c) {
        *e = (real *)(c + 1);
        *C = *e + 2 * K * CH;
        *kn = *C + 2 * (K + 1) * CH;
        *pc = *kn + 2 * (K + 1) * CH;
    }
    return c;
}

/* One call's arguments and the range of points [rb, re) a thread works on. */
typedef struct {
    const real *z, *params, *gX, *gL, *bias;
    real *X, *logd, *gz, *gp;
    long L, R, rb, re;
    int K, aff, status;
    real B, minw, floor_, cst, clamp;
} KR_NAME(job);
#define job KR_NAME(job)

/* The folded conditioner output (bias and soft clamp, when the call has them: bias != NULL or
 * clamp > 0): the parameters of points r0 .. r0 + n - 1 of row l, clamp tanh((p + bias) / clamp)
 * computed as krflows.nn.SoftClamp and kr_clamp do (2b / (1 + exp(-2y / b)) - b, the same
 * rounding), into pc (P rows of CH). Returns where the kernel then reads row j's values: pc + j CH,
 * or without folding the parameters themselves, p + j R + r0; *stride is CH or R. The backward
 * folds again (recomputes, as it recomputes the rest of the forward) and multiplies the parameter
 * gradient by the clamp's derivative: nothing but the conditioner's output is kept, as before its
 * clamp's output was. Saves the conditioner a pass over its whole output each way (bias and
 * clamp, by the C clamp or torch, were one or two) and the clamp's own calls. */
KR_INLINE const real *KR_NAME(fold)(const job *a, const real *p, long l, long r0, int n, int P,
                                    real *restrict pc, long *stride) {
    if (!a->bias && !(a->clamp > 0)) {
        *stride = a->R;
        return p + r0;
    }
    const real b = a->clamp, k = -2 / a->clamp;
    for (int j = 0; j < P; j++) {
        const real *restrict u = p + (long)j * a->R + r0;
        const real beta = a->bias ? a->bias[l * P + j] : 0;
        real *restrict o = pc + j * CH;
        if (b > 0)
            for (int i = 0; i < n; i++) o[i] = (2 * b) / (1 + KR_EXP(k * (u[i] + beta))) - b;
        else
            for (int i = 0; i < n; i++) o[i] = u[i] + beta;
    }
    *stride = CH;
    return pc;
}

/* z (L, R), params (L, P, R) -> X, logd (L, R) on points [rb, re). */
void KR_NAME(forward_range)(job *a) {
    const long L = a->L, R = a->R;
    const int K = a->K, aff = a->aff, P = 3 * K + 1 + 2 * aff;
    real *e, *C, *kn, *pc;
    chunk *c = KR_NAME(work)(K, &e, &C, &kn, &pc);
    if (!c) {
        a->status = -1;
        return;
    }
    for (long l = 0; l < L; l++) {
        for (long r0 = a->rb; r0 < a->re; r0 += CH) {
            int n = a->re - r0 < CH ? (int)(a->re - r0) : CH;
            long S;
            const real *p = KR_NAME(fold)(a, a->params + l * P * R, l, r0, n, P, pc, &S);
            KR_NAME(eval)(a->z + l * R + r0, p, S, 0, n, K, a->B, a->minw, a->floor_, a->cst, aff, 0, c, e, C, kn);
            real *Xo = a->X + l * R + r0, *Lo = a->logd + l * R + r0;
            if (aff) {
                const real *ap = p;
                for (int i = 0; i < n; i++) {
                    Xo[i] = ap[i] + c->sc[i] * c->x[i];
                    Lo[i] = KR_LOG(c->slope[i]) + KR_LOG(c->sc[i]);
                }
            } else {
                for (int i = 0; i < n; i++) {
                    Xo[i] = c->x[i];
                    Lo[i] = KR_LOG(c->slope[i]);
                }
            }
        }
    }
    free(c);
}

/* The gradients of z (L, R) and params (L, P, R) on points [rb, re) from those of X and logd
 * (either may be NULL: zero). */
void KR_NAME(backward_range)(job *a) {
    const long L = a->L, R = a->R;
    const int K = a->K, aff = a->aff, P = 3 * K + 1 + 2 * aff, off = aff ? 2 : 0;
    const real cst = a->cst;
    real *e, *C, *kn, *pc;
    chunk *c = KR_NAME(work)(K, &e, &C, &kn, &pc);
    if (!c) {
        a->status = -1;
        return;
    }
    real gx[CH], gl[CH], glo[2][CH], gb[2][CH], gr0[CH], gr1[CH];
    for (long l = 0; l < L; l++) {
        real *g = a->gp + l * P * R;
        for (long r0 = a->rb; r0 < a->re; r0 += CH) {
            int n = a->re - r0 < CH ? (int)(a->re - r0) : CH;
            long S;
            const real *p = KR_NAME(fold)(a, a->params + l * P * R, l, r0, n, P, pc, &S);
            KR_NAME(eval)(a->z + l * R + r0, p, S, 0, n, K, a->B, a->minw, a->floor_, cst, aff, 1, c, e, C, kn);
            for (int i = 0; i < n; i++) {
                gx[i] = a->gX ? a->gX[l * R + r0 + i] : 0;
                gl[i] = a->gL ? a->gL[l * R + r0 + i] : 0;
            }
            if (aff) {
                const real *v = p + S;
                for (int i = 0; i < n; i++) {
                    g[r0 + i] = gx[i];
                    g[R + r0 + i] = KR_NAME(dsoftplus)(v[i] + cst) * (gx[i] * c->x[i] + gl[i] / c->sc[i]);
                    gx[i] *= c->sc[i];
                }
            }
            real *gzo = a->gz + l * R + r0;
            for (int i = 0; i < n; i++) {
                real above = c->above[i], below = c->below[i], out = above + below, inside = 1 - out;
                real g_in = gx[i] * inside, gl_in = gl[i] * inside;
                real s = c->s[i], xi = c->xi[i], t = c->t[i], den = c->den[i], num = c->num[i];
                real d0 = c->d0[i], d1 = c->d1[i], w = c->w[i], h = c->h[i], n1 = c->n1[i];
                real g_n1 = g_in * h / den;
                real G = (g_n1 * n1 + 2 * gl_in) / den;
                real g_num = gl_in / num;
                real xi2 = xi * xi, omx = 1 - xi, u12 = 1 - 2 * xi;
                real g_s = g_n1 * xi2 - G * (1 - 2 * t) + 2 * (g_num * t + gl_in / s);
                real g_xi = (g_n1 * (2 * s * xi + d0 * u12) - G * (d1 + d0 - 2 * s) * u12
                             + 2 * g_num * (d1 * xi + s * u12 - d0 * omx)) * c->xm[i];
                real g_out = out != 0 ? (gx[i] * c->tail[i] + gl[i] / c->dout[i]) : 0;
                real g_d0 = (g_n1 - G) * t + g_num * omx * omx + g_out * below;
                real g_d1 = g_num * xi2 - G * t + g_out * above;
                real gxw = g_xi / w;
                gzo[i] = out != 0 ? gx[i] * c->dout[i] : gxw;
                real g_h = g_in * n1 / den + g_s / w;
                real gw_neg = (g_s * s + g_xi * xi) / w;
                glo[0][i] = -gxw, gb[0][i] = -gw_neg, glo[1][i] = g_in, gb[1][i] = g_h;
                gr0[i] = KR_NAME(dsoftplus)(c->raw0[i] + cst) * g_d0;
                gr1[i] = KR_NAME(dsoftplus)(c->raw1[i] + cst) * g_d1;
            }
            for (int q = 0; q < 2; q++) { /* through the knots, the running sums and the softmax */
                const real *c0 = q ? c->cx0 : c->cz0, *c1 = q ? c->cx1 : c->cz1, *rq = q ? c->rx : c->rz;
                const real *eq = e + q * K * CH;
                real gam[CH];
                for (int i = 0; i < n; i++)
                    gam[i] = (glo[q][i] - gb[q][i]) * c0[i] + gb[q][i] * c1[i];
                for (int k = 0; k < K; k++) {
                    real *gu = g + (long)(off + q * K + k) * R + r0;
                    for (int i = 0; i < n; i++) {
                        real coef = -gam[i] + (k < c->idx[i] ? glo[q][i] : 0) + (k == c->idx[i] ? gb[q][i] : 0);
                        gu[i] = coef * rq[i] * eq[k * CH + i];
                    }
                }
            }
            for (int j = 0; j <= K; j++) { /* the two raw knot slopes of the bin */
                real *gs = g + (long)(off + 2 * K + j) * R + r0;
                for (int i = 0; i < n; i++)
                    gs[i] = (j == c->idx[i] ? gr0[i] : 0) + (j == c->idx[i] + 1 ? gr1[i] : 0);
            }
            if (a->clamp > 0) { /* through the soft clamp: g (1 - (y / b)^2), as kr_clamp_backward */
                const real rb = 1 / a->clamp;
                for (int j = 0; j < P; j++) {
                    real *gj = g + (long)j * R + r0;
                    const real *y = p + j * S;
                    for (int i = 0; i < n; i++) {
                        real u = y[i] * rb;
                        gj[i] = gj[i] - gj[i] * (u * u);
                    }
                }
            }
        }
    }
    free(c);
}

/* The inverse on points [rb, re): x (L, R) in a->z, params -> z in a->X and log dx/dz (at z) in
 * a->logd; Spline.inverse's closed-form root of the bin's quadratic. */
void KR_NAME(inverse_range)(job *a) {
    const long L = a->L, R = a->R;
    const int K = a->K, aff = a->aff, P = 3 * K + 1 + 2 * aff;
    const real B = a->B, floor_ = a->floor_, cst = a->cst;
    real *e, *C, *kn, *pc;
    chunk *c = KR_NAME(work)(K, &e, &C, &kn, &pc);
    if (!c) {
        a->status = -1;
        return;
    }
    real v[CH];
    for (long l = 0; l < L; l++) {
        for (long r0 = a->rb; r0 < a->re; r0 += CH) {
            int n = a->re - r0 < CH ? (int)(a->re - r0) : CH;
            long S;
            const real *p = KR_NAME(fold)(a, a->params + l * P * R, l, r0, n, P, pc, &S);
            const real *x = a->z + l * R + r0;
            if (aff) { /* undo the affine part first: x' = (x - a) / s */
                const real *ap = p, *vp = p + S;
                for (int i = 0; i < n; i++) {
                    c->sc[i] = floor_ + KR_NAME(softplus)(vp[i] + cst);
                    v[i] = (x[i] - ap[i]) / c->sc[i];
                }
            } else {
                for (int i = 0; i < n; i++) v[i] = x[i];
            }
            KR_NAME(bin)(v, 1, p, S, 0, n, K, B, a->minw, aff, 0, c, e, C, kn);
            real *Zo = a->X + l * R + r0, *Lo = a->logd + l * R + r0;
            for (int i = 0; i < n; i++) {
                real d0 = floor_ + KR_NAME(softplus)(c->raw0[i] + cst);
                real d1 = floor_ + KR_NAME(softplus)(c->raw1[i] + cst);
                real w = c->w[i], h = c->h[i], xc = c->zc[i];
                real s = h / w;
                real r = xc - c->x0[i];
                real c1 = d1 + d0 - 2 * s;
                real qa = h * (s - d0) + r * c1;
                real qb = h * d0 - r * c1;
                real disc = qb * qb + 4 * qa * s * r;
                disc = disc < 0 ? 0 : disc;
                real xi = (-2 * s * r) / (-qb - sqrt(disc));
                xi = xi < 0 ? 0 : (xi > 1 ? 1 : xi);
                real t = xi * (1 - xi);
                real den = s + (d1 + d0 - 2 * s) * t;
                real num = d1 * xi * xi + 2 * s * t + d0 * (1 - xi) * (1 - xi);
                real slope = s * s * num / (den * den);
                real vi = v[i];
                int above = vi > xc, out = (vi > xc) | (vi < xc);
                slope = out ? (above ? d1 : d0) : slope;
                Zo[i] = out ? xc + (vi - xc) / slope : c->z0[i] + xi * w;
                Lo[i] = KR_LOG(slope) + (aff ? KR_LOG(c->sc[i]) : 0);
            }
        }
    }
    free(c);
}

/* The threads of one call: job t goes to thread t mod (the team's size). */
typedef struct {
    job *jobs;
    int n;
    void (*fn)(job *);
} KR_NAME(team);

static void KR_NAME(team_work)(void *arg) {
    KR_NAME(team) *tm = arg;
    int size = kr_num_threads(), t = kr_thread_num();
    for (int i = t; i < tm->n; i += size) tm->fn(&tm->jobs[i]);
}

/* Splits the points into up to nthreads ranges of whole chunks, run by the OpenMP team torch
 * itself uses (see kr_set_openmp; one range without it, or below KR_PARALLEL_MIN points: a
 * parallel region costs microseconds). Returns 0, or -1 when out of memory. */
static int KR_NAME(run)(job *a, int nthreads, void (*fn)(job *)) {
    job jobs[KR_MAX_THREADS];
    long chunks = (a->R + CH - 1) / CH;
    int nt = (a->L * a->R < KR_PARALLEL_MIN || !kr_parallel) ? 1 : nthreads;
    nt = nt < 1 ? 1 : (nt > KR_MAX_THREADS ? KR_MAX_THREADS : nt);
    nt = nt > chunks ? (int)chunks : nt;
    nt = nt < 1 ? 1 : nt;
    long per = (chunks + nt - 1) / nt * CH;
    for (int t = 0; t < nt; t++) {
        jobs[t] = *a;
        jobs[t].status = 0;
        jobs[t].rb = t * per < a->R ? t * per : a->R;
        jobs[t].re = (t + 1) * per < a->R ? (t + 1) * per : a->R;
    }
    KR_NAME(team) tm = {jobs, nt, fn};
    if (nt > 1)
        kr_parallel(KR_NAME(team_work), &tm, (unsigned)nt, 0);
    else
        fn(&jobs[0]);
    int status = 0;
    for (int t = 0; t < nt; t++) status |= jobs[t].status;
    return status;
}

/* The conditioners' soft clamp y = b tanh(x / b), as 2b sigmoid(2x / b) - b (the arithmetic of
 * krflows.nn.SoftClamp), on [rb, re) of z -> X: one pass where torch's operations take four. */
void KR_NAME(clamp_range)(job *a) {
    const real b = a->B, k = -2 / a->B;
    const real *restrict x = a->z;
    real *restrict y = a->X;
    for (long i = a->rb; i < a->re; i++) y[i] = (2 * b) / (1 + KR_EXP(k * x[i])) - b;
}

/* Its backward, from the output: gz = gX (1 - (y / b)^2), y in z. */
void KR_NAME(clamp_backward_range)(job *a) {
    const real r = 1 / a->B;
    const real *restrict y = a->z, *restrict g = a->gX;
    real *restrict out = a->gz;
    for (long i = a->rb; i < a->re; i++) {
        real u = y[i] * r;
        out[i] = g[i] - g[i] * (u * u);
    }
}

/* y = b tanh(x / b) of n values; and its backward gx from y and gy. Return 0. */
int KR_NAME(kr_clamp)(const real *x, real *y, long n, real b, int nthreads) {
    job a = {.z = x, .X = y, .L = 1, .R = n, .re = n, .B = b};
    return KR_NAME(run)(&a, nthreads, KR_NAME(clamp_range));
}

int KR_NAME(kr_clamp_backward)(const real *y, const real *gy, real *gx, long n, real b, int nthreads) {
    job a = {.z = y, .gX = gy, .gz = gx, .L = 1, .R = n, .re = n, .B = b};
    return KR_NAME(run)(&a, nthreads, KR_NAME(clamp_backward_range));
}

/* z (L, R), params (L, P, R) -> X, logd (L, R). The parameters may be a conditioner's output before
 * its bias (L, P; or NULL) and soft clamp (clamp > 0: clamp tanh(. / clamp); 0: none): see fold.
 * Returns 0, or -1 when out of memory. */
int KR_NAME(kr_spline_forward)(const real *z, const real *params, const real *bias, real clamp, real *X,
                               real *logd, long L, long R, int K, real B, real minw, real floor_, real cst,
                               int aff, int nthreads) {
    job a = {.z = z, .params = params, .bias = bias, .clamp = clamp, .X = X, .logd = logd, .L = L, .R = R,
             .re = R, .K = K, .aff = aff, .B = B, .minw = minw, .floor_ = floor_, .cst = cst};
    return KR_NAME(run)(&a, nthreads, KR_NAME(forward_range));
}

/* x (L, R), params (L, P, R) (bias and clamp as for the forward) -> z, logd (L, R) with x = f(z),
 * logd = log f'(z). Returns 0, or -1 when out of memory. */
int KR_NAME(kr_spline_inverse)(const real *x, const real *params, const real *bias, real clamp, real *Z,
                               real *logd, long L, long R, int K, real B, real minw, real floor_, real cst,
                               int aff, int nthreads) {
    job a = {.z = x, .params = params, .bias = bias, .clamp = clamp, .X = Z, .logd = logd, .L = L, .R = R,
             .re = R, .K = K, .aff = aff, .B = B, .minw = minw, .floor_ = floor_, .cst = cst};
    return KR_NAME(run)(&a, nthreads, KR_NAME(inverse_range));
}

/* The gradients of z (L, R) and params (L, P, R) from those of X and logd (either may be NULL:
 * zero); with bias and clamp as for the forward, the parameter gradient is through them, that of
 * the conditioner's output (the bias's is that summed over the points). Returns 0, or -1 when out
 * of memory. */
int KR_NAME(kr_spline_backward)(const real *z, const real *params, const real *bias, real clamp,
                                const real *gX, const real *gL, real *gz, real *gp, long L, long R, int K,
                                real B, real minw, real floor_, real cst, int aff, int nthreads) {
    job a = {.z = z, .params = params, .bias = bias, .clamp = clamp, .gX = gX, .gL = gL, .gz = gz, .gp = gp,
             .L = L, .R = R, .re = R, .K = K, .aff = aff, .B = B, .minw = minw, .floor_ = floor_, .cst = cst};
    return KR_NAME(run)(&a, nthreads, KR_NAME(backward_range));
}

#undef real
#undef chunk
#undef job
#endif
