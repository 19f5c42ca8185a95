// The version of the C interface (capi.cpp): build.py refuses a library whose vz_abi_version()
// differs from the number below, which it reads from this file. Bump it with any change to the
// signatures or to the meaning of an argument.
#pragma once
#define VZ_ABI_VERSION 10
