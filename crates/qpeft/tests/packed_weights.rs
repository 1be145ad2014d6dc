//! A GGUF block-format weight kept packed on the CPU (dequantized a tile of rows per use) behaves as the same weight
//! uploaded as values: the values themselves and embedding rows exactly, the forward product and the input gradient
//! up to summation order — for every block type, across tile boundaries, in f32, f64 and the 16-bit emulations.

mod common;

use common::{fixtures, rel_err, uniform};
use qpeft::backend::cpu::{Cpu, CpuWeight};
use qpeft::backend::Backend;
use qpeft::formats::gguf::GgufFile;
use qpeft::formats::SharedBytes;
use qpeft::quant::base::{BaseWeight, GgmlRows};

const REPEAT: usize = 300;

/// Each block type of the gguf fixture (a 2 × 256 tensor) stacked to 600 rows: more than one tile of every size.
fn packed_weights() -> Vec<(String, BaseWeight)> {
    let g = GgufFile::open(&fixtures().join("gguf/quants.gguf")).unwrap();
    ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
        .iter()
        .map(|&name| {
            let info = g.tensor_info(name).unwrap();
            assert_eq!(info.shape, [2, 256], "{name}");
            let bytes = g.tensor_bytes(info).repeat(REPEAT);
            let rows = GgmlRows::new(info.dtype, 2 * REPEAT, 256, SharedBytes::Owned(bytes.into())).unwrap();
            (name.to_string(), BaseWeight::Ggml(rows))
        })
        .collect()
}

fn check<B: Backend>(be: &B, tol: f32) {
    let (out_dim, in_dim, rows) = (2 * REPEAT, 256, 5);
    let f32s = |n: usize, seed: u64| uniform(n, seed).into_iter().map(|v| v as f32).collect::<Vec<_>>();
    for (name, base) in packed_weights() {
        let dense = base.dequantize().unwrap();
        let packed = be.upload_weight(&base, None, out_dim, in_dim).unwrap();
        let plain = be.upload_weight(&BaseWeight::Dense, Some(&dense), out_dim, in_dim).unwrap();
        let values = |w: &B::Weight| be.download(&be.weight_values(w).unwrap()).unwrap();
        assert!(values(&packed) == values(&plain), "{} {name}: weight values", be.name());

        let x = be.upload(&f32s(rows * in_dim, 1)).unwrap();
        let start = f32s(rows * out_dim, 2);
        for accumulate in [false, true] {
            let product = |w: &B::Weight| {
                let mut out = be.upload(&start).unwrap();
                be.linear(&x, w, rows, &mut out, accumulate).unwrap();
                be.download(&out).unwrap()
            };
            let err = rel_err(&product(&packed), &product(&plain), |_| true);
            assert!(err <= tol, "{} {name}: forward (accumulate {accumulate}) differs by {err:e}", be.name());
        }

        let dy = be.upload(&f32s(rows * out_dim, 3)).unwrap();
        let dx0 = f32s(rows * in_dim, 4);
        for accumulate in [false, true] {
            let grad = |w: &B::Weight| {
                let mut dx = be.upload(&dx0).unwrap();
                be.linear_backward(&dy, w, rows, &mut dx, accumulate).unwrap();
                be.download(&dx).unwrap()
            };
            let err = rel_err(&grad(&packed), &grad(&plain), |_| true);
            assert!(err <= tol, "{} {name}: input gradient (accumulate {accumulate}) differs by {err:e}", be.name());
        }

        let ids = be.upload_ints(&[0, 599, 63, 64, 300, 1]).unwrap();
        let embed = |w: &B::Weight| {
            let mut out = be.zeros(6 * in_dim).unwrap();
            be.embedding(w, &ids, in_dim, 0.5, &mut out).unwrap();
            be.download(&out).unwrap()
        };
        assert!(embed(&packed) == embed(&plain), "{} {name}: embedding rows", be.name());
    }
}

#[test]
fn packed_gguf_weights_give_the_products_of_their_values() {
    assert!(matches!(
        Cpu::new().upload_weight(&packed_weights()[0].1, None, 2 * REPEAT, 256).unwrap(),
        CpuWeight::Ggml(_)
    ));
    check(&Cpu::new(), 1e-5);
    check(&Cpu::bf16(), 1e-5);
    check(&Cpu::f16(), 1e-5);
    check(&Cpu::f64(), 1e-12);
}

#[test]
fn a_packed_weight_of_the_wrong_shape_is_refused() {
    let (_, base) = packed_weights().remove(0);
    let e = Cpu::new().upload_weight(&base, None, 2 * REPEAT, 512).err().unwrap().to_string();
    assert!(e.contains("600 × 256") && e.contains("600 × 512"), "{e}");
}
