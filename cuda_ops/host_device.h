// LS_HOST_DEVICE marks a function compiled for the host and, under nvcc, for the device too: the pieces the
// CPU kernels and their CUDA twins must share bit for bit (the *_common.h headers) are written once with it.
#pragma once

#ifdef __CUDACC__
#define LS_HOST_DEVICE __host__ __device__
#else
#define LS_HOST_DEVICE
#endif
