// Launch function of the fused positional encoding + norm kernel (pos_embed_norm.cu).
//
// y = x + bias + conv(x, weight)  (the residual depthwise conv of depthwise_conv.h, same layouts)
// z = LayerNorm over C of y per pixel (biased variance, from y in the accumulation type before y is
//     rounded to x's dtype), or z = y * norm_weight + norm_bias per channel (an eval BatchNorm the
//     caller folded). norm_weight / norm_bias are (C,) in the accumulation type.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "depthwise_conv.h"

namespace uniformer_kernels::cuda {

enum class PosEmbedNorm { kLayerNorm = 0, kAffine = 1 };

// Most channels the LayerNorm variant takes on `device` (it keeps every channel of a pixel in shared
// memory), or -1 when the device cannot be queried. The affine variant has no limit.
int64_t pos_embed_norm_max_channels(DType dtype, int device);

// mean and rstd (N*D*H*W,) in the accumulation type are written for kLayerNorm only (may be null
// for kAffine).
cudaError_t launch_pos_embed_norm(DType dtype, const void* x, const void* weight, const void* bias,
                                  const void* norm_weight, const void* norm_bias, PosEmbedNorm norm,
                                  double eps, void* y, void* z, void* mean, void* rstd,
                                  const ConvShape& shape, cudaStream_t stream);

}  // namespace uniformer_kernels::cuda
