//! Int4 round-to-nearest and GPTQ against AutoGPTQ 0.7.1 (fixtures from scripts/reference/make_gptq_fixtures.py).

mod common;

use qpeft::formats::safetensors::SafetensorsStore;
use qpeft::quant::gptq::{self, Factor, GptqConfig, Hessian};
use qpeft::quant::int4::{quantize_rtn, GptqInt4, GroupParams};
use serde_json::Value;

fn load(name: &str) -> (std::collections::HashMap<String, qpeft::tensor::HostTensor>, Value) {
    let dir = common::fixtures().join("gptq");
    let t = common::read_expected(&dir.join(format!("{name}.safetensors")));
    let j = serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    (t, j)
}

#[test]
fn rtn_matches_autogptq_quantizer() {
    let (t, j) = load("rtn");
    let cases = j["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for case in cases {
        let key = case["key"].as_str().unwrap();
        let (out_dim, in_dim) = (case["out"].as_u64().unwrap() as usize, case["in"].as_u64().unwrap() as usize);
        let group = case["group_size"].as_u64().unwrap() as usize;
        let sym = case["sym"].as_bool().unwrap();
        let w = &t[&format!("{key}.W")].data;
        let (codes, params) = quantize_rtn(w, out_dim, in_dim, group, sym);
        let q = &t[&format!("{key}.q")].data;
        let bad = codes.iter().zip(q).filter(|(a, b)| **a as f32 != **b).count();
        assert_eq!(bad, 0, "{key}: {bad} codes differ");
        let scales: Vec<f32> = params.iter().map(|p| p.scale).collect();
        let zeros: Vec<f32> = params.iter().map(|p| p.zero).collect();
        assert_eq!(&scales, &t[&format!("{key}.scale")].data, "{key} scales");
        assert_eq!(&zeros, &t[&format!("{key}.zero")].data, "{key} zeros");
        let groups = in_dim / group;
        let w_hat: Vec<f32> = (0..out_dim * in_dim)
            .map(|k| params[k / in_dim * groups + k % in_dim / group].dequantize(codes[k]))
            .collect();
        assert_eq!(&w_hat, &t[&format!("{key}.W_hat")].data, "{key} dequantized");
        println!("{key}: {out_dim}x{in_dim} group {group} sym {sym}: codes, scales, zeros, W_hat identical");
    }
}

#[test]
fn gptq_matches_autogptq_and_beats_rtn() {
    let (t, j) = load("gptq");
    let (out_dim, in_dim) = (64, 256);
    let w = &t["W"].data;
    let mut h = Hessian::new(in_dim);
    h.add(&t["X"].data);
    for case in j["cases"].as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let sym = key == "sym";
        let factor = Factor::new(&h, 0.01).unwrap();
        let (codes, params) =
            gptq::quantize(w, out_dim, &factor, GptqConfig::new(32, sym), |r| GroupParams::find(r, sym, 1.0)).unwrap();
        let at = |k: usize| k / in_dim * 8 + k % in_dim / 32;
        let w_hat: Vec<f32> = (0..out_dim * in_dim).map(|k| params[at(k)].dequantize(codes[k])).collect();
        // AutoGPTQ's codes, recovered from its W_hat = scale · (q − zero).
        let (ref_hat, ref_scale, ref_zero) =
            (&t[&format!("{key}.W_hat")].data, &t[&format!("{key}.scale")].data, &t[&format!("{key}.zero")].data);
        let ref_codes: Vec<u8> =
            (0..out_dim * in_dim).map(|k| ((ref_hat[k] / ref_scale[at(k)]).round() + ref_zero[at(k)]) as u8).collect();
        let same = codes.iter().zip(&ref_codes).filter(|(a, b)| a == b).count();
        let zeros_same = params.iter().zip(ref_zero).filter(|(p, z)| p.zero == **z).count();
        let scale_err = params.iter().zip(ref_scale).map(|(p, s)| ((p.scale - s) / s).abs()).fold(0.0f32, f32::max);
        let diff: Vec<f32> = w.iter().zip(&w_hat).map(|(a, b)| a - b).collect();
        let loss = h.quadratic(&diff);
        let (ref_loss, rtn_loss) = (case["loss_gptq"].as_f64().unwrap(), case["loss_rtn"].as_f64().unwrap());
        println!(
            "{key}: {same}/{} codes and {zeros_same}/{} zeros identical to AutoGPTQ, scales within {scale_err:.1e}; \
             loss {loss:.4} vs AutoGPTQ {ref_loss:.4}, RTN {rtn_loss:.4}",
            codes.len(),
            params.len()
        );
        // f64 vs f32 linear algebra moves a few codes that sit on a rounding boundary; nothing else may differ.
        assert!(same as f64 >= 0.999 * codes.len() as f64, "{key}: only {same} codes identical");
        assert!(scale_err < 1e-4);
        assert!((loss / ref_loss - 1.0).abs() < 0.02, "{key}: loss {loss} vs {ref_loss}");
        assert!(loss < 0.25 * rtn_loss);
    }
}

#[test]
fn autogptq_packed_layout() {
    let (t, _) = load("gptq");
    let path = common::fixtures().join("gptq/gptq.safetensors");
    let store = SafetensorsStore::open_files(&[path]).unwrap();
    let raw = |k: &str| store.read_raw(k).unwrap();
    let reference = GptqInt4 {
        in_dim: 256,
        out_dim: 64,
        group: 32,
        sym: false,
        qweight: raw("asym.packed.qweight").to_i32("qweight").unwrap(),
        qzeros: raw("asym.packed.qzeros").to_i32("qzeros").unwrap(),
        scales: raw("asym.packed.scales").to_f16("scales").unwrap(),
        g_idx: raw("asym.packed.g_idx").to_i32("g_idx").unwrap(),
        float_zeros: None,
    };
    reference.validate().unwrap();
    // Packing AutoGPTQ's own codes and parameters must give AutoGPTQ's bytes.
    let (scale, zero) = (&t["asym.scale"].data, &t["asym.zero"].data);
    let params: Vec<GroupParams> = scale.iter().zip(zero).map(|(&s, &z)| GroupParams { scale: s, zero: z }).collect();
    let w_hat = &t["asym.W_hat"].data;
    let at = |k: usize| k / 256 * 8 + k % 256 / 32;
    let codes: Vec<u8> =
        (0..64 * 256).map(|k| ((w_hat[k] / params[at(k)].scale).round() + params[at(k)].zero) as u8).collect();
    let packed = GptqInt4::pack(&codes, &params, 64, 256, 32, false).unwrap();
    assert_eq!(packed.qzeros, reference.qzeros);
    assert_eq!(packed.scales, reference.scales);
    assert_eq!(packed.g_idx, reference.g_idx);
    let differing = packed.qweight.iter().zip(&reference.qweight).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{differing} qweight words differ");
    // And reading it back dequantizes to AutoGPTQ's fp16 weights: f16(scale) · (q − zero).
    let deq = reference.dequantize();
    // Two fp16 roundings (the scale, then the product) are at most ~2·2⁻¹¹ relative.
    for (a, b) in deq.iter().zip(w_hat) {
        assert!((a - b).abs() <= 1e-3 * b.abs() + 1e-7, "{a} vs {b}");
    }
}
