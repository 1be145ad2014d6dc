//! Merging adapters: every method's ΔW folded into the weights gives the unmerged logits, and QA-LoRA's merge
//! into GPTQ zero points on an int4 base is exact up to the fp16 rounding of the new zeros.

mod common;

use common::{fixtures, rel_err, uniform};
use qpeft::adapters::hierarchical::HierarchicalMethod;
use qpeft::adapters::ir_qlora::IrQloraMethod;
use qpeft::adapters::lora::LoraMethod;
use qpeft::adapters::q_bara::QBaraMethod;
use qpeft::adapters::qa_hira::QaHiraMethod;
use qpeft::adapters::qa_lora::QaLoraMethod;
use qpeft::adapters::set::AdapterSet;
use qpeft::adapters::{AdapterConfig, Method};
use qpeft::arch::Proj;
use qpeft::backend::cpu::{Cpu, CpuWeight};
use qpeft::backend::Backend;
use qpeft::model::{Checkpoint, Decoder, Input};
use qpeft::quant::base::BaseWeight;
use qpeft::quant::recipe::{Format, QuantizeOptions, WeightDtype};
use qpeft::quantize::{quantize_model, write_model_dir};

const TOKENS: [u32; 9] = [1, 17, 42, 99, 5, 250, 7, 3, 300];

fn logits(m: &Decoder<Cpu>, set: Option<&AdapterSet<Cpu>>) -> Vec<f32> {
    let mut cache = m.new_cache(1, TOKENS.len()).unwrap();
    let h = m.forward_with(&Input::single(&TOKENS), &mut cache, set, &mut |_, _, _| Ok(())).unwrap();
    m.logits(&h, TOKENS.len()).unwrap()
}

fn trained(m: &Decoder<Cpu>, cfg: &AdapterConfig) -> AdapterSet<Cpu> {
    let mut set = AdapterSet::build(&m.backend, &m.spec, 3, |_, _| Some(cfg.clone())).unwrap();
    // Stand-in for training: every parameter non-zero.
    for (i, p) in set.params_mut().into_iter().enumerate() {
        p.value = uniform(p.value.len(), 500 + i as u64).iter().map(|v| (v * 0.3) as f32).collect();
    }
    set
}

#[test]
fn merged_weights_give_the_adapted_logits_for_every_method() {
    let c = |method, rank| AdapterConfig { method, rank, alpha: 16.0, dropout: 0.1 };
    let methods = [
        c(Method::Lora(LoraMethod), 8),
        c(Method::IrQlora(IrQloraMethod), 6),
        c(Method::QaLora(QaLoraMethod { group: 16 }), 4),
        c(Method::QBara(QBaraMethod { lambda: 2 }), 4),
        c(Method::QaHira(QaHiraMethod { l1: 4, l2: 8, zero_init: false }), 8),
        c(
            Method::Hierarchical(HierarchicalMethod {
                ranks: vec![4, 2, 2],
                alphas: vec![16.0; 3],
                lr_scales: vec![1.0; 3],
            }),
            8,
        ),
    ];
    let ckpt = Checkpoint::open(&fixtures().join("tiny-llama")).unwrap();
    for cfg in methods {
        let mut m = Decoder::load(&ckpt, Cpu::new()).unwrap();
        let set = trained(&m, &cfg);
        let base = logits(&m, None);
        let adapted = logits(&m, Some(&set));
        m.merge_adapters(&set).unwrap();
        let merged = logits(&m, None);
        let e = rel_err(&merged, &adapted, |_| true);
        let moved = rel_err(&base, &adapted, |_| true);
        println!("{}: merged vs adapted {e:.2e} (adapter moved the logits by {moved:.2e})", cfg.method.name());
        assert!(e < 1e-5, "{}: {e:e}", cfg.method.name());
        assert!(moved > 1e-2, "{}: the adapter must matter for the test to mean anything", cfg.method.name());
    }
}

#[test]
fn qa_lora_folds_into_int4_zero_points() {
    let src = Checkpoint::open(&fixtures().join("tiny-llama")).unwrap();
    let o = QuantizeOptions {
        format: Format::Int4,
        double_quant: false,
        block: 64,
        group: 16,
        sym: false,
        icq: false,
        calibration: None,
        dtype: WeightDtype::F32,
    };
    let q = quantize_model(&src, &o, &mut |_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(&src, &q, o.dtype, &dir.path().join("q")).unwrap();
    let ckpt = Checkpoint::open(&dir.path().join("q")).unwrap();
    let mut m = Decoder::load(&ckpt, Cpu::new()).unwrap();
    let set = trained(
        &m,
        &AdapterConfig { method: Method::QaLora(QaLoraMethod { group: 16 }), rank: 4, alpha: 16.0, dropout: 0.0 },
    );
    let adapted = logits(&m, Some(&set));
    let mut worst = 0f64;
    for l in 0..m.blocks.len() {
        for p in Proj::ALL {
            let delta = set.get(l, p).unwrap().delta_weight(&m.backend).unwrap();
            let lin = m.blocks[l].proj_mut(p);
            let BaseWeight::Int4(int4) = &lin.base else { panic!("int4 base expected") };
            let zeros = int4.merge_into_zeros(&delta).unwrap();
            let merged = int4.dequantize_with_zeros(&zeros);
            let before = int4.dequantize();
            // Bound per weight: half an fp16 ulp of the zero times the scale, plus the fp16 rounding of the
            // dequantized products (AutoGPTQ's fp16 forward), before and after.
            let ulp = |v: f32| 2f64.powi(-11) * (v.abs() as f64).max(6.1e-5);
            for j in 0..int4.out_dim {
                for i in 0..int4.in_dim {
                    let g = int4.g_idx[i] as usize;
                    let s = int4.scales[g * int4.out_dim + j].to_f32();
                    let z = zeros[g * int4.out_dim + j].to_f32();
                    let k = j * int4.in_dim + i;
                    let want = before[k] as f64 + delta[k] as f64;
                    let bound = (s * z.abs()) as f64 * 2f64.powi(-11) + ulp(merged[k]) + ulp(before[k]) + 1e-7;
                    let err = (merged[k] as f64 - want).abs();
                    assert!(err <= bound, "layer {l} {p:?} ({j}, {i}): {err:e} > {bound:e}");
                    worst = worst.max(err / bound);
                }
            }
            // A ΔW that varies inside a group is refused.
            let mut bad = delta.clone();
            bad[1] += 1.0;
            assert!(int4.merge_into_zeros(&bad).is_err());
            assert!(zeros.iter().any(|z| z.to_f32().fract() != 0.0), "the zeros became fractional");
            lin.weight = CpuWeight::Values(m.backend.upload(&merged).unwrap());
        }
    }
    let merged = logits(&m, None);
    let e = rel_err(&merged, &adapted, |_| true);
    println!("int4 zero-point merge: worst weight error {worst:.2} of its fp16 bound; logits rel err {e:.2e}");
    assert!(e < 5e-3, "{e:e}");
}
