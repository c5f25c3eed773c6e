/* What a built kernel library is: its instruction-set variant, the hash of the sources it was built
   from, and the OpenMP team it gets.

   Why: quant/kernel_build.py compiles every .c file here into one library per variant with
   -DKERNELS_VARIANT and -DKERNELS_SOURCE_HASH; quant/native.py reads them back to say which
   variant runs and to notice a library older than the package's sources (an edited editable
   install). `kernels_team` lets a test see that our parallel regions run in torch's OpenMP runtime
   with torch's thread count (one runtime in the process, not two pools). */

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef KERNELS_VARIANT
#define KERNELS_VARIANT "unknown"
#endif
#ifndef KERNELS_SOURCE_HASH
#define KERNELS_SOURCE_HASH ""
#endif

const char *kernels_variant(void) { return KERNELS_VARIANT; }

const char *kernels_source_hash(void) { return KERNELS_SOURCE_HASH; }

/* The size of a parallel region's team: with `threads` > 0 as our kernels ask for it
   (num_threads), with 0 as the runtime's default (what torch.set_num_threads set). */
int kernels_team(int threads) {
    int team = 1;
#ifdef _OPENMP
    if (threads > 0) {
#pragma omp parallel num_threads(threads)
#pragma omp single
        team = omp_get_num_threads();
    } else {
#pragma omp parallel
#pragma omp single
        team = omp_get_num_threads();
    }
#endif
    return team;
}
