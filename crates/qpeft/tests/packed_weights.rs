//! A 4-bit weight kept packed on the CPU (dequantized a tile of rows per use) — a GGUF block format, or bitsandbytes
//! NF4/FP4 codes — behaves as the same weight uploaded as values: the values themselves and embedding rows exactly,
//! the forward product and the input gradient up to summation order — for every block type (and scale blocks that
//! span rows), across tile boundaries, in f32, f64 and the 16-bit emulations.

mod common;

use common::{fixtures, rel_err, uniform};
use qpeft::backend::cpu::{Cpu, CpuWeight, PackedRows};
use qpeft::backend::Backend;
use qpeft::formats::gguf::GgufFile;
use qpeft::formats::SharedBytes;
use qpeft::quant::base::{BaseWeight, GgmlRows};
use qpeft::quant::nf4::{Bnb4, FourBit};

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
        .chain(
            [
                // QLoRA's NF4 with double-quantized scales over blocks of 64, and FP4 over blocks of 4096 (16 rows each).
                ("NF4", FourBit::Nf4, 64, true),
                ("FP4", FourBit::Fp4, 4096, false),
            ]
            .map(|(name, kind, block, double)| {
                let x: Vec<f32> = uniform(2 * REPEAT * 256, 9).into_iter().map(|v| v as f32 * 0.1).collect();
                let q = Bnb4::quantize(&x, &[2 * REPEAT, 256], kind, block, double).unwrap();
                (name.to_string(), BaseWeight::Bnb4(q))
            }),
        )
        .collect()
}

fn check<B: Backend>(be: &B, tol: f32) {
    let (out_dim, in_dim) = (2 * REPEAT, 256);
    let f32s = |n: usize, seed: u64| uniform(n, seed).into_iter().map(|v| v as f32).collect::<Vec<_>>();
    for (name, base) in packed_weights() {
        let dense = base.dequantize().unwrap();
        let packed = be.upload_weight(&base, None, out_dim, in_dim).unwrap();
        let plain = be.upload_weight(&BaseWeight::Dense, Some(&dense), out_dim, in_dim).unwrap();
        let values = |w: &B::Weight| be.download(&be.weight_values(w).unwrap()).unwrap();
        assert!(values(&packed) == values(&plain), "{} {name}: weight values", be.name());

        // One row (generation's products, a row of Ŵ at a time on the CPU) and more (tiles of rows).
        for rows in [1, 5] {
            let x = be.upload(&f32s(rows * in_dim, 1)).unwrap();
            let start = f32s(rows * out_dim, 2);
            for accumulate in [false, true] {
                let product = |w: &B::Weight| {
                    let mut out = be.upload(&start).unwrap();
                    be.linear(&x, w, rows, &mut out, accumulate).unwrap();
                    be.download(&out).unwrap()
                };
                let err = rel_err(&product(&packed), &product(&plain), |_| true);
                assert!(
                    err <= tol,
                    "{} {name}: {rows}-row forward (accumulate {accumulate}) differs by {err:e}",
                    be.name()
                );
            }
        }
        let rows = 5;

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
        CpuWeight::Packed(PackedRows::Ggml(_))
    ));
    assert!(matches!(
        Cpu::new().upload_weight(&packed_weights()[6].1, None, 2 * REPEAT, 256).unwrap(),
        CpuWeight::Packed(PackedRows::Bnb4 { .. })
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

/// NF4 codes of a weight with an odd row length: rows start in the middle of a byte and scale blocks cross rows.
#[test]
fn packed_nf4_rows_of_odd_length_dequantize_exactly() {
    let (out_dim, in_dim) = (70, 33);
    let x: Vec<f32> = uniform(out_dim * in_dim, 12).into_iter().map(|v| v as f32).collect();
    let base = BaseWeight::Bnb4(Bnb4::quantize(&x, &[out_dim, in_dim], FourBit::Nf4, 64, true).unwrap());
    let be = Cpu::new();
    let packed = be.upload_weight(&base, None, out_dim, in_dim).unwrap();
    assert!(matches!(packed, CpuWeight::Packed(PackedRows::Bnb4 { .. })));
    assert_eq!(be.weight_values(&packed).unwrap(), base.dequantize().unwrap());
    let ids = be.upload_ints(&[0, 1, 2, 69, 35]).unwrap();
    let mut rows = be.zeros(5 * in_dim).unwrap();
    be.embedding(&packed, &ids, in_dim, 1.0, &mut rows).unwrap();
    let dense = base.dequantize().unwrap();
    for (k, &t) in [0usize, 1, 2, 69, 35].iter().enumerate() {
        assert_eq!(&rows[k * in_dim..(k + 1) * in_dim], &dense[t * in_dim..(t + 1) * in_dim], "row {t}");
    }
}
