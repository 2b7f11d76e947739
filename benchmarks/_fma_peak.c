/* The CPU's fp32 fused multiply-add peak at its widest vectors: independent accumulator chains, no memory
   traffic. BLAS libraries do not always reach it (MKL runs its AVX2 kernels on AMD CPUs), so
   benchmarks/topk_search.py reports the roofline against this peak too.
   Usage: fma_peak THREADS -> prints GFLOP/s summed over THREADS OpenMP threads. */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef __AVX512F__
#define W 16
#else
#define W 8
#endif
typedef float vf __attribute__((vector_size(4 * W)));
#define CHAINS 12   /* >= FMA latency x FMA units: every unit busy every cycle */

__attribute__((noinline)) static float chains(long n) {
    vf a[CHAINS], m, x;
    for (int l = 0; l < W; l++) {
        m[l] = 0.999f;
        x[l] = 1e-3f;
        for (int c = 0; c < CHAINS; c++) a[c][l] = (float)(c + l);
    }
    __asm__ volatile("" : "+x"(m), "+x"(x));   /* not constants: the loop must multiply */
    for (long i = 0; i < n; i++)
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++) a[c] = a[c] * m + x;
    float s = 0;
    for (int c = 0; c < CHAINS; c++) s += a[c][0];
    return s;
}

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 1;
    const long n = 20000000;
    double best = 0;
    float sink = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        sink += chains(n);
        double flops = 2.0 * W * CHAINS * n * threads / (omp_get_wtime() - t0);
        best = flops > best ? flops : best;
    }
    printf("%.6e %d %g\n", best, W, sink);
    return 0;
}
