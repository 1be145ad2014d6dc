//! Base products x · Wᵀ on the CPU: the f32 path (`Cpu::new()`, the gemm crate) against bf16 on AMX tiles
//! and with AVX512-BF16 (`backend::cpu::bf16`'s two kernels), where the CPU has them, at the shapes of SmolLM2-135M
//! and Qwen2.5-1.5B linears (not a test).
//!
//!     cargo bench -p qpeft --bench products
//!
//! Medians of 5 runs after a warm-up, all threads; GFLOP/s counts 2·m·n·k.

use std::time::Instant;

use qpeft::backend::cpu::bf16::{self, Kernel};
use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;
use qpeft::quant::base::BaseWeight;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() -> qpeft::Result<()> {
    println!(
        "{} threads; AMX-BF16: {}; AVX512-BF16: {}",
        rayon::current_num_threads(),
        Kernel::Amx.available(),
        Kernel::Avx512.available()
    );
    println!("| rows × in → out | f32 (gemm) | bf16 AMX | bf16 AVX512 |");
    println!("|---|---|---|---|");
    for &(m, k, n) in
        &[(1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (512, 1536, 8960), (512, 8960, 1536), (1, 1536, 8960)]
    {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let be = Cpu::new();
        let weight = be.upload_weight(&BaseWeight::Dense, Some(&w), n, k)?;
        let xb = be.upload(&x)?;
        let mut out = be.zeros(m * n)?;
        let gflop = 2.0 * (m * n * k) as f64 / 1e9;
        let rate = |t: f64| format!("{:.0} GFLOP/s", gflop / t);
        let f32_rate = rate(time(|| be.linear(&xb, &weight, m, &mut out, false).unwrap()));
        let packed = bf16::PackedBf16::pack(&w, n, k);
        let mut out = vec![0f32; m * n];
        let [amx, avx] = [Kernel::Amx, Kernel::Avx512].map(|kernel| match kernel.available() {
            true => rate(time(|| bf16::linear(kernel, &x, &packed, m, &mut out, false))),
            false => "–".into(),
        });
        println!("| {m} × {k} → {n} | {f32_rate} | {amx} | {avx} |");
    }
    Ok(())
}
