/* The census's per-tile pass (attnstore.kernels): one loop over a tile of logits that writes the
 * attention weights and every reduction the scores and the sparsity table read.
 *
 * A tile is N = documents x heads slices of R query rows (q = q0 + r) by K keys (k = k0 + c), float32,
 * contiguous. On entry z[n, r, c] = s, the logit, and lse[i] its row's log-sum-exp; on return it
 * holds the weight p = e^max(s - lse, -87) for visible keys (k <= q, q < length of the slice's document)
 * and 0 elsewhere. The tiles of a block of rows come from the diagonal down to key 0; the caller
 * keeps the block's row state (flat row index i = n*R + r) and this adds the tile's part:
 *
 *   l[i]   += sum p                  pk[i]   += sum p*k       pz[i] += sum p*max(s - lse, -87)
 *   zmax[i] = max(zmax[i], max s - lse)    mass[i] += sum p (see below)
 *   loc[i] += sum p over q - k < 64  rec[i]  += sum p over q - k < 256
 *   prev[i], self[i], sink[i] += p at keys q - 1, q and 0 (where the tile holds them)
 *   sink4[i] += sum p over k < 4     early[i] += sum p over k < min(128, max(q - 255, 0))
 *
 * (each tile's part summed in float32, as the torch path sums). Rows with q >= q_min (the sparsity
 * table's queries) also give col[n, c] = their sum of p (column masses) and diag[n, R - 1 - r + c]
 * (column j of diag holds offset d = q0 + R - 1 - k0 - j), both float32, overwritten per tile and
 * then added to the layer's float64 columns[n, k] and diagonals[n, d] (each [N, T]) when T > 0, and
 * search their span: for each level j not found yet (span[j, i] < 0) and within this tile's
 * reach, the row's float64 sum from its last visible key down finds the largest key k at which
 * mass[i] plus that sum reaches levels[j]: span[j, i] = q - k. Where a row was searched its
 * float64 sum goes to mass[i] (so the running mass stays exact near a level); elsewhere the
 * float32 sum does. loc, rec, sink4 and early only count those rows too.
 *
 * Exactness: e^x by a degree-6 polynomial after range reduction (Cephes' expf, within 2 ulp of
 * the float32 exponential).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define EXP_FLOOR (-87.0f)
#define STREAM_SINK 128
#define MAX_LEVELS 8
#define SCAN 16

static inline float exp_poly(float x) {
    /* x in [-87, 88]: 2^n * e^r with |r| <= ln(2)/2 */
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } s;
    s.i = ((int32_t)n + 127) << 23;
    return p * s.f;
}

/* key c of row zr: its weight e (written back), the row's sums and largest logit */
#define WEIGHT(c)                                                                   \
    float v = zr[c] - shift;                                                        \
    zm = v > zm ? v : zm;                                                           \
    float x = v < EXP_FLOOR ? EXP_FLOOR : (v > 88.0f ? 88.0f : v);                  \
    float e = exp_poly(x);                                                          \
    zr[c] = e;                                                                      \
    sl += e;                                                                        \
    spk += e * (float)(k0 + c);                                                     \
    spz += e * x;

void census_tile(
    float *restrict z, const float *restrict lse, int64_t N, int64_t R, int64_t K, int64_t heads,
    const int64_t *restrict lengths, int64_t q0, int64_t k0, int64_t q_min,
    double *restrict l, double *restrict pk, double *restrict pz, float *restrict zmax,
    double *restrict loc, double *restrict rec, double *restrict mass,
    double *restrict prev, double *restrict self, double *restrict sink,
    double *restrict sink4, double *restrict early,
    float *restrict col, float *restrict diag,
    int64_t n_levels, const double *restrict levels, int64_t *restrict span,
    int64_t T, double *restrict columns, double *restrict diagonals)
{
    const int64_t W = R + K - 1;
    memset(col, 0, (size_t)(N * K) * sizeof(float));
    memset(diag, 0, (size_t)(N * W) * sizeof(float));
    for (int64_t i = 0; i < N * R; i++) {
        const int64_t n = i / R, r = i % R, q = q0 + r;
        float *restrict zr = z + i * K;
        int64_t visible = q - k0 + 1; /* keys k0 .. q */
        if (visible > K) visible = K;
        if (q >= lengths[n / heads] || visible <= 0) visible = 0;
        float sl = 0.0f, spk = 0.0f, spz = 0.0f, sloc = 0.0f, srec = 0.0f;
        float zm = zmax[i];
        const float shift = lse[i];
        double row_mass = -1.0;
        const int64_t d0 = q - k0; /* offset q - k of key c is d0 - c */
        if (q >= q_min && visible > 0) {
            float *restrict cr = col + n * K;
            float *restrict dr = diag + n * W + (R - 1 - r);
            if (d0 - (visible - 1) < 256) { /* some key within the windows: near the diagonal */
#pragma omp simd reduction(+ : sl, spk, spz, sloc, srec) reduction(max : zm)
                for (int64_t c = 0; c < visible; c++) {
                    WEIGHT(c)
                    int32_t d = (int32_t)(d0 - c);
                    sloc += d < 64 ? e : 0.0f;
                    srec += d < 256 ? e : 0.0f;
                    cr[c] += e;
                    dr[c] += e;
                }
            } else {
#pragma omp simd reduction(+ : sl, spk, spz) reduction(max : zm)
                for (int64_t c = 0; c < visible; c++) {
                    WEIGHT(c)
                    cr[c] += e;
                    dr[c] += e;
                }
            }
            if (k0 < STREAM_SINK) { /* the first keys: StreamingLLM's sinks, the stream budget's */
                const int64_t m = q - 255 < 0 ? 0 : (q - 255 > STREAM_SINK ? STREAM_SINK : q - 255);
                double s4 = 0.0, se = 0.0;
                for (int64_t c = 0; c < visible && k0 + c < 4; c++) s4 += zr[c];
                for (int64_t c = 0; c < visible && k0 + c < m; c++) se += zr[c];
                sink4[i] += s4;
                early[i] += se;
            }
            /* span: the levels not found yet (in a tile nearer the diagonal) and within this
             * tile's reach get one scan of the row's float64 sum from its last visible key down;
             * that whole sum goes to mass (the running mass then stays exact near a level) */
            double want[MAX_LEVELS];
            int todo = 0;
            for (int64_t j = 0; j < n_levels && j < MAX_LEVELS; j++) {
                double t = levels[j] - mass[i];
                want[j] = (span[j * N * R + i] < 0 && t <= (double)sl + 1e-5) ? t : INFINITY;
                todo |= want[j] != INFINITY;
            }
            if (todo > 0) {
                /* by chunks of SCAN keys from the row's end: a chunk's float64 sum, and a
                 * key-by-key float64 scan only in the chunk where some level is reached */
                double s = 0.0;
                int64_t c = visible;
                while (c > 0) {
                    const int64_t lo = c > SCAN ? c - SCAN : 0;
                    double chunk = 0.0;
#pragma omp simd reduction(+ : chunk)
                    for (int64_t x = lo; x < c; x++) chunk += zr[x];
                    int reach = 0;
                    for (int64_t j = 0; j < n_levels && j < MAX_LEVELS; j++)
                        reach |= s + chunk >= want[j];
                    if (!reach) {
                        s += chunk;
                    } else { /* this chunk's float64 sums from its end, key by key (each one
                              * is s plus the keys x .. c - 1: non-decreasing as x goes down) */
                        double run[SCAN];
                        const int64_t len = c - lo;
                        for (int64_t x = len - 1; x >= 0; x--) {
                            s += zr[lo + x];
                            run[x] = s;
                        }
                        for (int64_t j = 0; j < n_levels && j < MAX_LEVELS; j++) {
                            if (run[0] < want[j]) continue; /* not reached in this chunk */
                            int64_t at = 0; /* the keys whose sum reaches: x = 0 .. at - 1 */
                            for (int64_t x = 0; x < len; x++) at += run[x] >= want[j];
                            span[j * N * R + i] = q - (k0 + lo + at - 1);
                            want[j] = INFINITY;
                        }
                    }
                    c = lo;
                }
                row_mass = s;
            }
        } else if (visible > 0) {
#pragma omp simd reduction(+ : sl, spk, spz) reduction(max : zm)
            for (int64_t c = 0; c < visible; c++) {
                WEIGHT(c)
            }
        }
        for (int64_t c = visible; c < K; c++) zr[c] = 0.0f;
        if (visible > 0) { /* the weights at keys q - 1, q and 0 */
            if (q - 1 >= k0 && q - 1 < k0 + visible) prev[i] += zr[q - 1 - k0];
            if (q < k0 + visible) self[i] += zr[q - k0];
            if (k0 == 0) sink[i] += zr[0];
        }
        l[i] += sl; pk[i] += spk; pz[i] += spz; zmax[i] = zm; loc[i] += sloc; rec[i] += srec;
        mass[i] += row_mass >= 0.0 ? row_mass : (double)sl;
    }
    if (T <= 0) return;
    for (int64_t n = 0; n < N; n++) { /* the layer's masses, float64 [N, T] */
        const float *restrict cn = col + n * K;
        const float *restrict dn = diag + n * W;
        double *restrict cl = columns + n * T + k0;
        double *restrict dl = diagonals + n * T;
        int64_t kk = K < T - k0 ? K : T - k0;
        for (int64_t c = 0; c < kk; c++) cl[c] += cn[c];
        const int64_t top = q0 + R - 1 - k0; /* column j of diag: offset top - j */
        for (int64_t j = 0; j < W; j++) {
            int64_t d = top - j;
            if (d >= 0 && d < T) dl[d] += dn[j];
        }
    }
}

/* The weights of a tile at (document, row, key) pairs, for every head: sets[(b * R + r) * heads + x]
 * += z[((b * heads + x) * R + r) * K + key - k0] for pairs lo .. hi - 1 (the duplicate or the
 * induction key set of a block's rows; each tile's run of the key-sorted pairs). sets is float32
 * [B, R, heads]. A pair outside the tile or past B documents is not read: returns how many. */
int64_t census_pairs(
    const float *restrict z, int64_t B, int64_t R, int64_t K, int64_t heads, int64_t k0,
    const int64_t *restrict doc, const int64_t *restrict row, const int64_t *restrict key,
    int64_t lo, int64_t hi, float *restrict sets)
{
    int64_t bad = 0;
    for (int64_t i = lo; i < hi; i++) {
        const int64_t b = doc[i], r = row[i], c = key[i] - k0;
        if (b < 0 || b >= B || r < 0 || r >= R || c < 0 || c >= K) {
            bad++;
            continue;
        }
        const float *restrict zp = z + ((b * heads) * R + r) * K + c;
        float *restrict sp = sets + (b * R + r) * heads;
        for (int64_t x = 0; x < heads; x++) sp[x] += zp[x * R * K];
    }
    return bad;
}
