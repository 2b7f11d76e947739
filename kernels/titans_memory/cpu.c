/* The Titans memory's chunk loop on CPU (see update.inc and cpu.py), for float and double. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define REAL float
#define SUF f32
#define EXP expf
#define SQRT sqrtf
#include "update.inc"
#undef REAL
#undef SUF
#undef EXP
#undef SQRT

#define REAL double
#define SUF f64
#define EXP exp
#define SQRT sqrt
#include "update.inc"
