//! NF4/FP4 quantization against bitsandbytes 0.50.2 (fixtures from scripts/reference/make_bnb_fixtures.py).

mod common;

use half::bf16;
use qpeft::quant::nf4::{Absmax, Bnb4, FourBit};
use serde_json::Value;

#[test]
fn bit_exact_with_bitsandbytes() {
    let dir = common::fixtures().join("bnb");
    let t = common::read_expected(&dir.join("quant4.safetensors"));
    let cases: Vec<Value> = serde_json::from_slice(&std::fs::read(dir.join("quant4.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 10);
    for case in &cases {
        let i = case["case"].as_u64().unwrap();
        let get = |k: &str| &t[&format!("case{i}.{k}")].data;
        let shape: Vec<usize> =
            case["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let kind = if case["quant_type"] == "nf4" { FourBit::Nf4 } else { FourBit::Fp4 };
        let block = case["block"].as_u64().unwrap() as usize;
        let double = case["double_quant"].as_bool().unwrap();
        let q = Bnb4::quantize(get("input"), &shape, kind, block, double).unwrap();

        let packed: Vec<u8> = get("packed").iter().map(|&v| v as u8).collect();
        let mismatched = q.packed.iter().zip(&packed).filter(|(a, b)| a != b).count();
        assert_eq!(q.packed.len(), packed.len(), "case {i}");
        assert_eq!(mismatched, 0, "case {i}: {mismatched} packed bytes differ");
        match (&q.absmax, double) {
            (Absmax::Plain(a), false) => assert_eq!(a, get("absmax"), "case {i} absmax"),
            (Absmax::Double { nested, offset }, true) => {
                let codes: Vec<f32> = nested.codes.iter().map(|&c| c as f32).collect();
                assert_eq!(&codes, get("absmax"), "case {i} nested codes");
                assert_eq!(&nested.absmax, get("nested_absmax"), "case {i} nested absmax");
                assert_eq!(*offset, get("offset")[0], "case {i} offset");
            }
            _ => unreachable!(),
        }
        // bitsandbytes' AVX-512 CPU dequantize_4bit reads the absmax per row, which is wrong when blocks straddle
        // rows (case 5: 96 columns, block 64); its pure-torch backend is the reference there, and equals the
        // CPU kernel everywhere else.
        let expected = get("dequant_default");
        let straddles = !shape[1].is_multiple_of(block) && shape[1].is_multiple_of(16);
        assert_eq!(get("dequant") == expected, !straddles, "case {i}: which bitsandbytes paths agree");
        let got: Vec<f32> = if case["dtype"] == "bfloat16" {
            q.dequantize_bf16().into_iter().map(bf16::to_f32).collect()
        } else {
            q.dequantize()
        };
        if let Some(k) = (0..got.len()).find(|&k| got[k].to_bits() != expected[k].to_bits()) {
            panic!("case {i}: dequantized element {k}: {} vs bitsandbytes {}", got[k], expected[k]);
        }
        println!("case {i}: {shape:?} {kind:?} block {block} double {double}: bit-exact");
    }
}
