// aarch64 NEON (see vec.h): the 16-byte vector operators compile to NEON instructions directly; the
// few operations NEON has no single instruction for (compress / expand, gathers, masked loads,
// non-temporal stores of a register) use the portable lane loops.
#pragma once

#include <arm_neon.h>

#include "vec_scalar.h"
