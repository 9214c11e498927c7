// NF4 / FP4 decode GEMV in bitsandbytes' packed format: out[m, n] = sum_k x[m, k] * dequant(W)[n, k] (+ bias[n]).
//
// Built on demand by csrc/nf4.py (torch.utils.cpp_extension.load); the Triton kernels in
// kernels/nf4_matmul.py are the fallback. Inputs (checked in the binding):
//   x        [M, K]  fp16 / bf16, contiguous, M <= 8, K % 32 == 0, 16-byte aligned
//   qweight  uint8, N*K/2 bytes, two codes a byte, element 2i in the HIGH nibble of byte i (bnb's order)
//   absmax   fp32 [N*K/blocksize], or uint8 codes with nested_absmax / nested_code / offset (double quant:
//            scale = nested_code[absmax[b]] * nested_absmax[b / nested_blocksize] + offset)
//   code     fp32 [16]  the NF4 (or FP4) codebook
// Design: one warp per output row n (4 warps = 4 rows per block). Lane l reads 16 packed bytes (= 32 weights of
// row n) with one 16-byte load, and the matching 32 activations of each of the M rows with four 16-byte loads,
// then strides by 32 lanes * 32 weights. K % 32 == 0 and blocksize >= 32 (a power of two) mean a 32-weight
// chunk never straddles a quantization block, so each chunk takes ONE scale: the lane sums code[nibble] * x in
// fp32 and multiplies the chunk sum by the scale once. The 16-entry codebook lives in shared memory. Partial
// sums are reduced with warp shuffles; lane 0 adds the bias and writes M outputs. The weight is read once for
// all M rows, so M <= 8 rows cost about as much as one: this is a memory-bound kernel (0.5 byte/weight).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <torch/extension.h>

namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kChunk = 32;  // weights per lane per step: 16 packed bytes

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int MAX_M, bool NESTED>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) nf4_gemv_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ qweight, const void* __restrict__ absmax_raw,
    const float* __restrict__ code, const float* __restrict__ nested_absmax, const float* __restrict__ nested_code,
    const float* __restrict__ offset_ptr, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
    int log2_blocksize, int nested_blocksize
) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = code[threadIdx.x];
    __syncthreads();

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * kWarpsPerBlock + warp;
    if (n >= N) return;  // warp-uniform: the whole warp leaves together

    const float offset = NESTED ? *offset_ptr : 0.0f;
    const int64_t row_start = static_cast<int64_t>(n) * K;  // flat index of W[n, 0]
    float acc[MAX_M];
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) acc[m] = 0.0f;

    for (int k0 = lane * kChunk; k0 < K; k0 += 32 * kChunk) {
        const int64_t e = row_start + k0;
        const uint4 packed = *reinterpret_cast<const uint4*>(qweight + e / 2);
        const int64_t blk = e >> log2_blocksize;
        float scale;
        if constexpr (NESTED) {
            const uint8_t qa = static_cast<const uint8_t*>(absmax_raw)[blk];
            scale = nested_code[qa] * nested_absmax[blk / nested_blocksize] + offset;
        } else {
            scale = static_cast<const float*>(absmax_raw)[blk];
        }
        const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&packed);
        float w[kChunk];
#pragma unroll
        for (int i = 0; i < kChunk / 2; ++i) {
            w[2 * i] = lut[bytes[i] >> 4];
            w[2 * i + 1] = lut[bytes[i] & 0xF];
        }
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m < M) {
                const uint4* xv = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K + k0);
                float s = 0.0f;
#pragma unroll
                for (int v = 0; v < kChunk * static_cast<int>(sizeof(T)) / 16; ++v) {
                    const uint4 raw = xv[v];
                    const T* xs = reinterpret_cast<const T*>(&raw);
#pragma unroll
                    for (int j = 0; j < 8; ++j) s += w[v * 8 + j] * to_float(xs[j]);
                }
                acc[m] += s * scale;
            }
        }
    }

#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
#pragma unroll
        for (int delta = 16; delta > 0; delta /= 2) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], delta);
    }
    if (lane == 0) {
        const float b = bias != nullptr ? to_float(bias[n]) : 0.0f;
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m < M) out[static_cast<int64_t>(m) * N + n] = from_float<T>(acc[m] + b);
        }
    }
}

template <typename T, int MAX_M>
void launch(
    const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& absmax, const torch::Tensor& code,
    const float* nested_absmax, const float* nested_code, const float* offset, const torch::Tensor* bias,
    torch::Tensor& out, int N, int log2_blocksize, int nested_blocksize, cudaStream_t stream
) {
    const int M = static_cast<int>(x.size(0));
    const int K = static_cast<int>(x.size(1));
    const dim3 grid((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
    const dim3 block(kWarpsPerBlock * 32);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    const T* bp = bias != nullptr ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
    T* op = reinterpret_cast<T*>(out.data_ptr());
    const uint8_t* qp = qweight.data_ptr<uint8_t>();
    const float* cp = code.data_ptr<float>();
    if (nested_absmax != nullptr) {
        nf4_gemv_kernel<T, MAX_M, true><<<grid, block, 0, stream>>>(
            xp, qp, absmax.data_ptr(), cp, nested_absmax, nested_code, offset, bp, op, M, N, K, log2_blocksize,
            nested_blocksize
        );
    } else {
        nf4_gemv_kernel<T, MAX_M, false><<<grid, block, 0, stream>>>(
            xp, qp, absmax.data_ptr(), cp, nullptr, nullptr, nullptr, bp, op, M, N, K, log2_blocksize, nested_blocksize
        );
    }
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "nf4_gemv launch failed: ", cudaGetErrorString(err));
}

template <typename T>
void dispatch_rows(
    const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& absmax, const torch::Tensor& code,
    const float* nabs, const float* ncode, const float* offset, const torch::Tensor* bias, torch::Tensor& out, int N,
    int log2_bs, int nbs, cudaStream_t stream
) {
    const int64_t M = x.size(0);
    if (M <= 1) {
        launch<T, 1>(x, qweight, absmax, code, nabs, ncode, offset, bias, out, N, log2_bs, nbs, stream);
    } else if (M <= 2) {
        launch<T, 2>(x, qweight, absmax, code, nabs, ncode, offset, bias, out, N, log2_bs, nbs, stream);
    } else if (M <= 4) {
        launch<T, 4>(x, qweight, absmax, code, nabs, ncode, offset, bias, out, N, log2_bs, nbs, stream);
    } else {
        launch<T, 8>(x, qweight, absmax, code, nabs, ncode, offset, bias, out, N, log2_bs, nbs, stream);
    }
}

}  // namespace

torch::Tensor nf4_gemv(
    torch::Tensor x, torch::Tensor qweight, torch::Tensor absmax, torch::Tensor code, int64_t n, int64_t blocksize,
    std::optional<torch::Tensor> bias, std::optional<torch::Tensor> nested_absmax,
    std::optional<torch::Tensor> nested_code, std::optional<torch::Tensor> offset, int64_t nested_blocksize,
    int64_t stream_handle
) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] CUDA tensor");
    TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be fp16 or bf16");
    const int64_t M = x.size(0), K = x.size(1);
    TORCH_CHECK(M >= 1 && M <= 8, "nf4_gemv takes 1..8 rows, got ", M);
    TORCH_CHECK(K % kChunk == 0, "K must be a multiple of 32, got ", K);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
    TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kByte && qweight.is_contiguous(),
                "qweight must be contiguous uint8 on the GPU");
    TORCH_CHECK(qweight.numel() * 2 == n * K, "qweight holds ", qweight.numel(), " bytes, expected ", n * K / 2);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0, "qweight must be 16-byte aligned");
    TORCH_CHECK(blocksize >= kChunk && (blocksize & (blocksize - 1)) == 0, "blocksize must be a power of two >= 32");
    TORCH_CHECK(absmax.is_contiguous() && absmax.numel() * blocksize == n * K, "absmax size does not match");
    TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16 && code.is_cuda(), "code must be fp32 [16]");
    const bool nested = nested_absmax.has_value();
    if (nested) {
        TORCH_CHECK(absmax.scalar_type() == at::kByte, "double-quantized absmax must be uint8");
        TORCH_CHECK(nested_code.has_value() && offset.has_value(), "nested absmax needs nested_code and offset");
        TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat && nested_code->scalar_type() == at::kFloat &&
                        offset->scalar_type() == at::kFloat,
                    "nested absmax, code and offset must be fp32");
        TORCH_CHECK(nested_blocksize > 0, "nested_blocksize must be positive");
    } else {
        TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be fp32");
    }
    if (bias.has_value()) {
        TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == n && bias->is_contiguous(),
                    "bias must be contiguous [N] in x's dtype");
    }
    auto out = torch::empty({M, n}, x.options());
    int log2_bs = 0;
    while ((int64_t{1} << log2_bs) < blocksize) ++log2_bs;
    const float* nabs = nested ? nested_absmax->data_ptr<float>() : nullptr;
    const float* ncode = nested ? nested_code->data_ptr<float>() : nullptr;
    const float* off = nested ? offset->data_ptr<float>() : nullptr;
    const torch::Tensor* bp = bias.has_value() ? &bias.value() : nullptr;
    const int N = static_cast<int>(n);
    const int nbs = static_cast<int>(nested_blocksize);
    // the caller passes torch.cuda.current_stream(x.device).cuda_stream and runs with x's device current (this
    // keeps the file free of c10/cuda headers, which CPU builds of torch do not ship, so nvcc can check it anywhere)
    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
    if (x.scalar_type() == at::kHalf) {
        dispatch_rows<__half>(x, qweight, absmax, code, nabs, ncode, off, bp, out, N, log2_bs, nbs, stream);
    } else {
        dispatch_rows<__nv_bfloat16>(x, qweight, absmax, code, nabs, ncode, off, bp, out, N, log2_bs, nbs, stream);
    }
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("nf4_gemv", &nf4_gemv, "NF4/FP4 (bitsandbytes format) GEMV for 1..8 rows, fp16/bf16, fp32 accumulate",
          py::arg("x"), py::arg("qweight"), py::arg("absmax"), py::arg("code"), py::arg("n"), py::arg("blocksize"),
          py::arg("bias") = py::none(), py::arg("nested_absmax") = py::none(), py::arg("nested_code") = py::none(),
          py::arg("offset") = py::none(), py::arg("nested_blocksize") = 256, py::arg("stream") = 0);
}
