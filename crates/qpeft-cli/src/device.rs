//! `--device cpu|cuda[:N][:f16|:bf16|:f32]`: runs a command body with the chosen backend. The body is written once, generic over
//! `Backend`, and instantiated per backend by `on_device!`.

/// `on_device!(device, be => body)`: evaluates `body` with `be` bound to the backend of `device`.
macro_rules! on_device {
    ($device:expr, $be:ident => $body:expr) => {
        match $device {
            qpeft::backend::Device::Cpu => {
                let $be = qpeft::backend::cpu::Cpu::new();
                $body
            }
            qpeft::backend::Device::CpuBf16 => {
                if qpeft::backend::cpu::bf16::Kernel::detect().is_none() {
                    eprintln!(
                        "note: this CPU has neither AMX-BF16 nor AVX512-BF16, so cpu:bf16 runs its bf16 numerics \
                         in emulation (slower than cpu:f32)"
                    );
                }
                let $be = qpeft::backend::cpu::Cpu::bf16_native();
                $body
            }
            #[cfg(feature = "cuda")]
            qpeft::backend::Device::Cuda(n, precision) => {
                let $be = qpeft::backend::cuda::Cuda::new(n, precision)?;
                $body
            }
            #[cfg(not(feature = "cuda"))]
            qpeft::backend::Device::Cuda(..) => {
                anyhow::bail!(
                    "this qpeft was built without CUDA support: rebuild with `cargo build --release --features cuda`"
                )
            }
        }
    };
}

pub(crate) use on_device;
