//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use qpeft::adapters::hierarchical::HierarchicalMethod;
use qpeft::adapters::ir_qlora::IrQloraMethod;
use qpeft::adapters::lora::LoraMethod;
use qpeft::adapters::q_bara::QBaraMethod;
use qpeft::adapters::qa_hira::QaHiraMethod;
use qpeft::adapters::qa_lora::QaLoraMethod;
use qpeft::adapters::set::AdapterSet;
use qpeft::adapters::{AdapterConfig, Method};
use qpeft::backend::Backend;
use qpeft::formats::safetensors::SafetensorsStore;
use qpeft::model::train::{Batch, Checkpointing, StepOptions, IGNORE};
use qpeft::model::Input;
use qpeft::quant::recipe::{Format, QuantizeOptions, WeightDtype};
use qpeft::tensor::HostTensor;

/// The repository's `tests/fixtures` directory.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The real default model, fetched by scripts/fetch-smollm2.sh.
pub fn smollm2_gguf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn read_expected(path: &std::path::Path) -> std::collections::HashMap<String, HostTensor> {
    let store = SafetensorsStore::open_files(&[path.to_path_buf()]).expect("fixture opens");
    store
        .list()
        .into_iter()
        .map(|(n, shape, dtype)| {
            let t = if dtype == qpeft::formats::StoredDtype::I32 {
                let ints = store.read_raw(&n).unwrap().to_i32(&n).unwrap();
                HostTensor::new(shape, ints.into_iter().map(|v| v as f32).collect())
            } else {
                store.read_f32(&n).unwrap().unwrap()
            };
            (n, t)
        })
        .collect()
}

/// max |a − b| / max |b| over the entries selected by `keep`.
pub fn rel_err(a: &[f32], b: &[f32], keep: impl Fn(usize) -> bool) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut diff = 0f32;
    let mut scale = 0f32;
    for i in (0..a.len()).filter(|&i| keep(i)) {
        diff = diff.max((a[i] - b[i]).abs());
        scale = scale.max(b[i].abs());
    }
    diff / scale
}

/// Deterministic uniform values in [−1, 1) (SplitMix64), for finite-difference tests.
pub fn uniform(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

pub fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compares an analytic gradient of the scalar `loss` at `x` with central differences (step 1e-5), at up to
/// `samples` evenly spread entries; returns max |fd − analytic| / max(1e-3, max |analytic|). In f64 a correct
/// gradient gives ~1e-9; a wrong one is off by O(1).
pub fn fd_error(x: &[f64], analytic: &[f64], samples: usize, mut loss: impl FnMut(&[f64]) -> f64) -> f64 {
    assert_eq!(x.len(), analytic.len());
    let h = 1e-5;
    let scale = analytic.iter().fold(1e-3f64, |m, g| m.max(g.abs()));
    let step = (x.len() / samples.max(1)).max(1);
    let mut worst = 0f64;
    let mut xp = x.to_vec();
    for i in (0..x.len()).step_by(step) {
        xp[i] = x[i] + h;
        let up = loss(&xp);
        xp[i] = x[i] - h;
        let down = loss(&xp);
        xp[i] = x[i];
        let fd = (up - down) / (2.0 * h);
        worst = worst.max((fd - analytic[i]).abs() / scale);
    }
    worst
}

/// One configuration of every adapter method (IR-QLoRA's r 6 divides none of the tiny widths: IEC's uneven
/// groups).
pub fn methods() -> Vec<AdapterConfig> {
    let c = |method, rank| AdapterConfig { method, rank, alpha: 8.0, dropout: 0.25 };
    vec![
        c(Method::Lora(LoraMethod), 4),
        // r 6 divides none of 64, 32, 160: IEC's uneven groups.
        c(Method::IrQlora(IrQloraMethod), 6),
        c(Method::QaLora(QaLoraMethod { group: 16 }), 4),
        c(Method::QBara(QBaraMethod { lambda: 2 }), 2),
        c(Method::QaHira(QaHiraMethod { l1: 4, l2: 8, zero_init: false }), 4),
        c(
            Method::Hierarchical(HierarchicalMethod {
                ranks: vec![4, 2, 2],
                alphas: vec![8.0, 4.0, 4.0],
                lr_scales: vec![1.0; 3],
            }),
            8,
        ),
    ]
}

/// Two rows of 7 tokens: the second right-padded by 2, the first with its 3-token prompt excluded.
pub fn batch(vocab: usize) -> Batch {
    let tokens: Vec<u32> = uniform(14, 77).iter().map(|v| 3 + ((v + 1.0) * 0.5 * (vocab - 4) as f64) as u32).collect();
    let mut mask = vec![1u32; 14];
    mask[12] = 0;
    mask[13] = 0;
    let mut labels = tokens.clone();
    for i in [0, 1, 2, 12, 13] {
        labels[i] = IGNORE;
    }
    Batch { input: Input { batch: 2, seq: 7, tokens, mask }, labels }
}

/// QLoRA's base: NF4 with double-quantized scales, blocks of 64.
pub fn qlora_nf4() -> QuantizeOptions {
    QuantizeOptions {
        format: Format::Nf4,
        double_quant: true,
        block: 64,
        group: 32,
        sym: false,
        icq: false,
        calibration: None,
        dtype: WeightDtype::F32,
    }
}

/// Every adapter parameter uniform in ±scale (seeded by its position), so that every path carries weight.
pub fn randomize_adapters<B: Backend>(be: &B, set: &mut AdapterSet<B>, scale: f32) {
    for (i, p) in set.params_mut().into_iter().enumerate() {
        let values: Vec<f32> = uniform(be.len(&p.value), 1000 + i as u64).iter().map(|&x| x as f32 * scale).collect();
        p.value = be.upload(&values).unwrap();
    }
}

/// The training step the model-level parity checks take on `batch`: dropout on, loss and MLP in small chunks.
pub fn parity_step(checkpointing: Checkpointing) -> StepOptions {
    StepOptions { checkpointing, dropout: true, seed: 11, grad_scale: 1.0, loss_chunk: 5, mlp_chunk: Some(3) }
}

/// ‖a − b‖₂ / ‖b‖₂: the usual measure for bf16 results, where single elements carry rounding noise.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let sq = |it: &mut dyn Iterator<Item = f64>| it.map(|x| x * x).sum::<f64>();
    let err = sq(&mut a.iter().zip(b).map(|(x, y)| (x - y) as f64));
    (err / sq(&mut b.iter().map(|&y| y as f64)).max(1e-40)).sqrt() as f32
}
