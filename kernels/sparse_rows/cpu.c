/* The sparse table backend's row kernels (see cpu.py): the lookup's gradient summed into its rows, and
 * SparseAdam's row update, fused: one pass over the touched rows reads and writes each row of the weight
 * and both moments once (torch's form gathers and scatters each of them separately, see cpu.py).
 *
 * Every elementwise operation is torch's, in its order and in float32 (built with -ffp-contract=off so that
 * no multiply-add is fused), so the moments are bitwise torch.optim.SparseAdam's; the square root is
 * correctly rounded where torch's (MKL) is not always, so the weights agree with torch to that rounding and
 * bitwise with reference.py. */
#include <math.h>
#include <stdint.h>

/* Rows ahead to prefetch: the touched rows are scattered over a table far larger than the caches. */
#define AHEAD 8

/* rows[n]: strictly increasing row ids (checked by the caller); grad[n, d] the summed gradient of each row;
 * w, m, v [*, d]: the weight, exp_avg and exp_avg_sq (row-major, contiguous). c1 = 1 - beta1,
 * c2 = 1 - beta2, neg_step = -(lr * sqrt(1 - beta2^t) / (1 - beta1^t)), each as torch casts it to float. */
void sparse_adam_rows_f32(int64_t n, int64_t d, const int64_t *restrict rows, const float *restrict grad,
                          float *restrict w, float *restrict m, float *restrict v,
                          float c1, float c2, float eps, float neg_step, int threads)
{
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        if (i + AHEAD < n) {
            const int64_t ahead = rows[i + AHEAD] * d;
            __builtin_prefetch(w + ahead, 1);
            __builtin_prefetch(m + ahead, 1);
            __builtin_prefetch(v + ahead, 1);
        }
        const float *restrict g = grad + i * d;
        float *restrict wr = w + rows[i] * d, *restrict mr = m + rows[i] * d, *restrict vr = v + rows[i] * d;
        #pragma omp simd
        for (int64_t j = 0; j < d; j++) {
            const float gj = g[j], old_m = mr[j], old_v = vr[j];
            const float dm = (gj - old_m) * c1;              /* grad.sub(old).mul_(1 - beta1) */
            const float dv = (gj * gj - old_v) * c2;         /* grad.pow(2).sub_(old).mul_(1 - beta2) */
            mr[j] = old_m + dm;                              /* exp_avg.add_(sparse update) */
            vr[j] = old_v + dv;
            const float denom = sqrtf(dv + old_v) + eps;     /* update.add_(old).sqrt_().add_(eps) */
            wr[j] = wr[j] + ((dm + old_m) / denom) * neg_step;  /* param.add_(-step_size * numer.div_(denom)) */
        }
    }
}

/* out[index[i]] += src[i] for i = 0, 1, ... in order (torch's index_add_ order, so the sums are bitwise its;
 * serial, so they do not depend on the thread count). */
void index_add_rows_f32(int64_t n, int64_t d, const int64_t *restrict index, const float *restrict src,
                        float *restrict out)
{
    for (int64_t i = 0; i < n; i++) {
        float *restrict o = out + index[i] * d;
        const float *restrict s = src + i * d;
        #pragma omp simd
        for (int64_t j = 0; j < d; j++)
            o[j] += s[j];
    }
}
