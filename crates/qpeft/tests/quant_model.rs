//! Whole-model quantization: HF directories written and read back, QuantLinear, bad options, and the
//! GPTQ and ICQ reports on SmolLM2.

mod common;

use std::collections::BTreeMap;

use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;
use qpeft::formats::safetensors::{write_file, OwnedTensor};
use qpeft::model::{Checkpoint, Decoder, Input};
use qpeft::quant::base::BaseWeight;
use qpeft::quant::icq::{self, TauSearch};
use qpeft::quant::int4::{quantize_rtn, GptqInt4};
use qpeft::quant::nf4::{Bnb4, FourBit};
use qpeft::quant::recipe::{Format, QuantizeOptions, WeightDtype};
use qpeft::quantize::{quantize_model, write_model_dir};

const PROJS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn opts(format: Format) -> QuantizeOptions {
    QuantizeOptions {
        format,
        double_quant: false,
        block: 64,
        group: 32,
        sym: false,
        icq: false,
        calibration: None,
        dtype: WeightDtype::F32,
    }
}

fn tiny() -> Checkpoint {
    Checkpoint::open(&common::fixtures().join("tiny-llama")).unwrap()
}

fn logits(ckpt: &Checkpoint, tokens: &[u32]) -> Vec<f32> {
    let model = Decoder::load(ckpt, Cpu::new()).unwrap();
    let mut cache = model.new_cache(1, tokens.len()).unwrap();
    let h = model.forward(&Input::single(tokens), &mut cache).unwrap();
    Cpu::new().download(&model.logits(&h, tokens.len()).unwrap()).unwrap()
}

/// Quantizes the tiny llama, writes it, reads it back, and checks every layer against a direct quantization.
fn roundtrip(o: QuantizeOptions, expect: impl Fn(&[f32], usize, usize) -> BaseWeight) {
    let src = tiny();
    let q = quantize_model(&src, &o, &mut |_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q");
    write_model_dir(&src, &q, o.dtype, &out).unwrap();
    let back = Checkpoint::open(&out).unwrap();
    assert!(back.quant.is_some());
    for layer in 0..2 {
        for p in PROJS {
            let name = format!("model.layers.{layer}.{p}");
            let w = src.read(&format!("{name}.weight")).unwrap().unwrap();
            let (out_dim, in_dim) = (w.shape[0], w.shape[1]);
            let (deq, base) = back.linear(&name, out_dim, in_dim).unwrap();
            assert_eq!(base, expect(&w.data, out_dim, in_dim), "{name}");
            assert_eq!(deq.data, base.dequantize().unwrap(), "{name}");
        }
    }
    // The quantized directory runs, and stays near the original model (a tiny random model loses a lot
    // to 4 bits; the bound only catches a broken load).
    let tokens = [1u32, 17, 42, 99, 5, 250, 7, 3];
    let (a, b) = (logits(&src, &tokens), logits(&back, &tokens));
    let err = common::rel_err(&b, &a, |_| true);
    println!("{:?}: logits rel err vs unquantized {err:.3}", o.format);
    assert!(err < 1.0 && err > 0.0 && b.iter().all(|v| v.is_finite()));
}

#[test]
fn nf4_double_quant_roundtrip() {
    let mut o = opts(Format::Nf4);
    o.double_quant = true;
    roundtrip(o, |w, out, inp| BaseWeight::Bnb4(Bnb4::quantize(w, &[out, inp], FourBit::Nf4, 64, true).unwrap()));
}

#[test]
fn fp4_block128_roundtrip() {
    let mut o = opts(Format::Fp4);
    o.block = 128;
    roundtrip(o, |w, out, inp| BaseWeight::Bnb4(Bnb4::quantize(w, &[out, inp], FourBit::Fp4, 128, false).unwrap()));
}

#[test]
fn int4_rtn_roundtrip() {
    roundtrip(opts(Format::Int4), |w, out, inp| {
        let (codes, params) = quantize_rtn(w, out, inp, 32, false);
        BaseWeight::Int4(GptqInt4::pack(&codes, &params, out, inp, 32, false).unwrap())
    });
}

#[test]
fn nf4_icq_roundtrip() {
    let mut o = opts(Format::Nf4);
    o.icq = true;
    o.double_quant = true;
    roundtrip(o, |w, out, inp| {
        BaseWeight::IcqNf4(icq::quantize_nf4(w, &[out, inp], true, TauSearch::default()).unwrap().0)
    });
}

#[test]
fn quant_linear_input_gradient() {
    // dX = dY·Ŵ for the frozen base: compare with an f64 product and with central differences of
    // L(X) = Σ dY ⊙ (X Ŵᵀ), which is linear in X so the difference quotient is exact up to rounding.
    let ckpt = tiny();
    let mut o = opts(Format::Nf4);
    o.double_quant = true;
    let q = quantize_model(&ckpt, &o, &mut |_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(&ckpt, &q, o.dtype, &dir.path().join("q")).unwrap();
    let model = Decoder::load(&Checkpoint::open(&dir.path().join("q")).unwrap(), Cpu::new()).unwrap();
    let lin = &model.blocks[0].down; // 160 → 64
    let (rows, n_in, n_out) = (3, lin.in_dim, lin.out_dim);
    let x: Vec<f32> = (0..rows * n_in).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let dy: Vec<f32> = (0..rows * n_out).map(|i| ((i * 53 % 89) as f32 - 44.0) / 44.0).collect();
    let w = lin.base.dequantize().unwrap();
    let dyb = Cpu::new().upload(&dy).unwrap();
    let mut dx = Cpu::new().zeros(rows * n_in).unwrap();
    lin.backward_input(&Cpu::new(), &Cpu::new().operand(&dyb).unwrap(), None, rows, &mut dx, false).unwrap();
    let dx = Cpu::new().download(&dx).unwrap();
    let loss = |x: &[f64]| -> f64 {
        let mut l = 0.0;
        for r in 0..rows {
            for j in 0..n_out {
                let y: f64 = (0..n_in).map(|i| x[r * n_in + i] * w[j * n_in + i] as f64).sum();
                l += dy[r * n_out + j] as f64 * y;
            }
        }
        l
    };
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for k in [0, 7, 159, 200, 479] {
        let (mut p, mut m) = (x64.clone(), x64.clone());
        p[k] += 1e-3;
        m[k] -= 1e-3;
        let fd = (loss(&p) - loss(&m)) / 2e-3;
        assert!((fd - dx[k] as f64).abs() < 1e-4 * fd.abs().max(1.0), "dX[{k}] {} vs finite difference {fd}", dx[k]);
    }
    // And the forward through QuantLinear equals x·Ŵᵀ.
    let xb = Cpu::new().upload(&x).unwrap();
    let mut y = Cpu::new().zeros(rows * n_out).unwrap();
    lin.forward(&Cpu::new(), &Cpu::new().operand(&xb).unwrap(), None, rows, &mut y, false).unwrap();
    let y = Cpu::new().download(&y).unwrap();
    let y0: f64 = (0..n_in).map(|i| x[i] as f64 * w[i] as f64).sum();
    assert!((y[0] as f64 - y0).abs() < 1e-5);
}

#[test]
fn bad_options_and_weights_are_refused() {
    let ckpt = tiny();
    let err = |o: QuantizeOptions| quantize_model(&ckpt, &o, &mut |_| {}).err().expect("must fail").to_string();
    let mut o = opts(Format::Nf4);
    o.block = 48;
    assert!(err(o).contains("block size 48 is not a power of two"));
    let mut o = opts(Format::Int4);
    o.group = 64;
    let e = err(o);
    assert!(e.contains("mlp.down_proj") && e.contains("160"), "{e}");
    let mut o = opts(Format::Fp4);
    o.icq = true;
    assert!(err(o).contains("ICQ"));

    // A NaN weight names the layer and position.
    let dir = tempfile::tempdir().unwrap();
    let src = common::fixtures().join("tiny-llama");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let store = qpeft::formats::safetensors::SafetensorsStore::open_dir(&src).unwrap();
    let mut tensors = BTreeMap::new();
    for (name, shape, _) in store.list() {
        let mut t = store.read_f32(&name).unwrap().unwrap();
        if name == "model.layers.1.mlp.up_proj.weight" {
            t.data[64 * 2 + 5] = f32::NAN;
        }
        tensors.insert(name, OwnedTensor::f32(shape, &t.data));
    }
    write_file(&dir.path().join("model.safetensors"), &tensors).unwrap();
    let bad = Checkpoint::open(dir.path()).unwrap();
    let e = quantize_model(&bad, &opts(Format::Nf4), &mut |_| {}).err().unwrap().to_string();
    assert!(
        e.contains("model.layers.1.mlp.up_proj") && e.contains("row 2, column 5") && e.contains("not finite"),
        "{e}"
    );

    // A quantized directory with a missing or ill-shaped quantized tensor names the file and tensor.
    let qdir = tempfile::tempdir().unwrap();
    let mut o = opts(Format::Nf4);
    o.double_quant = true;
    let q = quantize_model(&ckpt, &o, &mut |_| {}).unwrap();
    write_model_dir(&ckpt, &q, WeightDtype::F32, &qdir.path().join("q")).unwrap();
    let file = qdir.path().join("q/model.safetensors");
    let store = qpeft::formats::safetensors::SafetensorsStore::open_dir(&qdir.path().join("q")).unwrap();
    let mut kept = BTreeMap::new();
    for (name, shape, _) in store.list() {
        let raw = store.read_raw(&name).unwrap();
        let mut bytes = raw.bytes.to_vec();
        let mut shape = shape;
        if name == "model.layers.1.self_attn.k_proj.weight" {
            bytes.truncate(bytes.len() - 2);
            shape = vec![bytes.len(), 1];
        }
        if name != "model.layers.0.mlp.up_proj.weight.nested_absmax" {
            kept.insert(name, OwnedTensor { dtype: raw.dtype, shape, bytes });
        }
    }
    drop(store);
    write_file(&file, &kept).unwrap();
    let broken = Checkpoint::open(&qdir.path().join("q")).unwrap();
    let e = broken.linear("model.layers.0.mlp.up_proj", 160, 64).err().unwrap().to_string();
    assert!(e.contains("model.safetensors") && e.contains("up_proj") && e.contains("nested_absmax missing"), "{e}");
    let e = broken.linear("model.layers.1.self_attn.k_proj", 32, 64).err().unwrap().to_string();
    assert!(e.contains("k_proj") && e.contains("1022 packed bytes, expected 1024"), "{e}");

    // An output directory that already holds a model is not overwritten.
    let q = quantize_model(&ckpt, &opts(Format::Nf4), &mut |_| {}).unwrap();
    let e = write_model_dir(&ckpt, &q, WeightDtype::F32, dir.path()).err().unwrap().to_string();
    assert!(e.contains("already contains a model"), "{e}");
}

fn smollm2() -> Checkpoint {
    Checkpoint::open(&common::smollm2_gguf()).expect("run scripts/fetch-smollm2.sh first")
}

#[test]
fn smollm2_gptq_beats_rtn_on_every_layer() {
    let ckpt = smollm2();
    let text = std::fs::read_to_string(common::fixtures().join("smollm2/alpaca.txt")).unwrap();
    let ids = ckpt.tokenizer().unwrap().encode(&text, true).unwrap();
    let calibration: Vec<Vec<u32>> = ids.chunks_exact(128).map(<[u32]>::to_vec).collect();
    let mut o = opts(Format::Int4);
    o.calibration = Some(calibration.clone());
    let q = quantize_model(&ckpt, &o, &mut |_| {}).unwrap();
    let mut ratios: Vec<(f64, &str)> = Vec::new();
    for r in &q.reports {
        let (g, rtn) = (r.output_error.unwrap(), r.rtn_output_error.unwrap());
        assert!(g < rtn, "{}: GPTQ output error {g:e} is not below RTN's {rtn:e}", r.name);
        ratios.push((g / rtn, &r.name));
    }
    ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mean = ratios.iter().map(|r| r.0).sum::<f64>() / ratios.len() as f64;
    println!(
        "GPTQ int4 g32 asym, {} calibration sequences of 128 tokens: output error / RTN's over {} layers: min {:.3} ({}), mean {mean:.3}, max {:.3} ({})",
        calibration.len(),
        ratios.len(),
        ratios[0].0,
        ratios[0].1,
        ratios.last().unwrap().0,
        ratios.last().unwrap().1
    );
}

#[test]
fn smollm2_icq_entropy_gain() {
    let ckpt = smollm2();
    let s = ckpt.spec.clone();
    for (layer, proj, out_dim, in_dim) in [
        (0, "self_attn.q_proj", s.hidden_size, s.hidden_size),
        (15, "mlp.up_proj", s.intermediate_size, s.hidden_size),
        (29, "mlp.down_proj", s.hidden_size, s.intermediate_size),
    ] {
        let name = format!("model.layers.{layer}.{proj}");
        let (w, _) = ckpt.linear(&name, out_dim, in_dim).unwrap();
        let (q, stats) = icq::quantize_nf4(&w.data, &[out_dim, in_dim], true, TauSearch::default()).unwrap();
        let plain = Bnb4::quantize(&w.data, &[out_dim, in_dim], FourBit::Nf4, 64, true).unwrap();
        let err = |d: &[f32]| (d.iter().zip(&w.data).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>()).sqrt();
        let tau_abs = stats.tau.iter().map(|t| t.abs() as f64).sum::<f64>() / stats.tau.len() as f64;
        println!(
            "{name}: mean block entropy NF4 {:.4} -> ICQ {:.4} bits (+{:.4}); mean |tau| {tau_abs:.2e}, first taus {:?}; \
             Frobenius error NF4 {:.4}, ICQ {:.4}",
            stats.entropy_plain,
            stats.entropy_icq,
            stats.entropy_icq - stats.entropy_plain,
            &stats.tau[..3],
            err(&plain.dequantize()),
            err(&q.dequantize())
        );
        assert!(stats.entropy_icq > stats.entropy_plain);
    }
}
