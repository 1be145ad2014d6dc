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
                let $be = qpeft::backend::cpu::Cpu::bf16_amx();
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
