//! CUDA ↔ CPU parity (feature `cuda`): every backend op on random inputs, the packed 4-bit bases' dequantization
//! (bit-exact), then whole tiny models — logits, and the loss and adapter gradients of every method with and without
//! activation checkpointing, on dense and NF4 bases, for a padded batch and a packed row (`data.packing`). In `Precision::F32` (true FP32 products) results agree with the
//! CPU to summation-order noise (≤ 1e-4 relative); in `Precision::F16` (scaled fp16 base products and attention, TF32
//! elsewhere) with the CPU's f16 emulation (`Cpu::f16()`) within 1e-2, and in `Precision::Bf16` with `Cpu::bf16()`
//! within bf16's own noise (see `models_match_the_cpu`). Without a GPU (CI) only the missing-driver error is checked; on the GPU machine
//! scripts/gpu/test.sh sets QPEFT_REQUIRE_GPU=1 so that a missing GPU fails instead of skipping.
#![cfg(feature = "cuda")]

mod common;

use std::path::{Path, PathBuf};

use common::{batch, fixtures, methods, parity_step, qlora_nf4, randomize_adapters, rel_l2, uniform};
use qpeft::adapters::set::AdapterSet;
use qpeft::adapters::AdapterConfig;
use qpeft::backend::cpu::Cpu;
use qpeft::backend::cuda::Cuda;
use qpeft::backend::{AdamStep, AttentionShape, Backend, GluKind, Groups, MatMul, Precision, RowWrite, Tail};
use qpeft::error::{DeviceFailure, Error};
use qpeft::model::train::{Checkpointing, StepOptions};
use qpeft::model::{Checkpoint, Decoder};
use qpeft::quant::base::BaseWeight;
use qpeft::quant::icq::{self, TauSearch};
use qpeft::quant::int4::{quantize_rtn, GptqInt4};
use qpeft::quant::nf4::{Bnb4, FourBit};

fn gpu(precision: Precision) -> Option<Cuda> {
    match Cuda::new(0, precision) {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(std::env::var_os("QPEFT_REQUIRE_GPU").is_none(), "no GPU: {e}");
            let msg = e.to_string();
            assert!(msg.starts_with("CUDA: "), "{msg}");
            assert!(matches!(e, Error::Device { kind: DeviceFailure::Unavailable, .. }), "{e:?}");
            eprintln!("skipped (no GPU): {msg}");
            None
        }
    }
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    uniform(n, seed).iter().map(|&x| x as f32).collect()
}

/// max |a − b| / max(|b|, tiny); infinite where one side is NaN and the other not (f32::max would skip a NaN).
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    if a.iter().zip(b).any(|(x, y)| x.is_nan() != y.is_nan()) {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(1e-20f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Runs every op once on `be` and returns (name, output) pairs.
fn ops<B: Backend>(be: &B) -> Vec<(String, Vec<f32>)> {
    let up = |v: &[f32]| be.upload(v).unwrap();
    let ints = |v: &[u32]| be.upload_ints(v).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = Vec::new();
    let mut push = |name: &str, buf: &B::Buf| out.push((name.to_string(), be.download(buf).unwrap()));

    // Matrix products in all four layouts, scaled and accumulating.
    let (m, n, k) = (37, 53, 29);
    for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = up(&rand(m * k, 1));
        let b = up(&rand(k * n, 2));
        let mut c = up(&rand(m * n, 3));
        let mut s = MatMul::new(m, n, k).scaled(0.7).acc(true);
        s.a_transposed = at;
        s.b_transposed = bt;
        be.matmul(&a, &b, &mut c, s).unwrap();
        push(&format!("matmul at={at} bt={bt}"), &c);
        // The same on a's operand (an adapter's product on its linear's 16-bit input), with factors far outside fp16's
        // range either way (each under its own scale in the f16 mode).
        let (a, b) = (rand(m * k, 1).iter().map(|x| x * 1e-9).collect::<Vec<_>>(), rand(k * n, 2));
        let (a, b) = (up(&a), up(&b.iter().map(|x| x * 1e6).collect::<Vec<_>>()));
        let mut c = up(&rand(m * n, 3));
        be.matmul_from(&be.operand(&a).unwrap(), &b, &mut c, s).unwrap();
        push(&format!("matmul_from at={at} bt={bt}"), &c);
    }
    let (rows, dim) = (6, 40);
    let x = up(&rand(rows * dim, 4));
    let w = up(&rand(dim, 5));
    let mut e = be.zeros(rows * dim).unwrap();
    let table = be.upload_weight(&BaseWeight::Dense, Some(&rand(11 * dim, 6)), 11, dim).unwrap();
    be.embedding(&table, &ints(&[3, 0, 10, 3, 7, 1]), dim, 1.5, &mut e).unwrap();
    push("embedding", &e);
    let mut y = up(&rand(rows * dim, 7));
    be.add_bias(&mut y, &w).unwrap();
    be.add(&mut y, &x).unwrap();
    be.scale(&mut y, -0.3).unwrap();
    be.add_scaled_by(&mut y, &x, &up(&[0.25]), 2.0).unwrap();
    push("add_bias/add/scale/add_scaled_by", &y);
    for plus_one in [false, true] {
        let mut o = be.zeros(rows * dim).unwrap();
        be.rmsnorm(&x, &w, dim, 1e-5, plus_one, &mut o).unwrap();
        push(&format!("rmsnorm plus_one={plus_one}"), &o);
        let mut dx = up(&rand(rows * dim, 8));
        be.rmsnorm_backward(&x, &w, &y, dim, 1e-5, plus_one, &mut dx, true).unwrap();
        push(&format!("rmsnorm_backward plus_one={plus_one}"), &dx);
    }
    // Rows the GPU's norms do not keep in registers (RowQuads): not a multiple of 4, and wider than 4,096.
    for d in [42, 4104] {
        let (x, w, dy) = (up(&rand(3 * d, 60)), up(&rand(d, 61)), up(&rand(3 * d, 62)));
        let mut o = be.zeros(3 * d).unwrap();
        be.rmsnorm(&x, &w, d, 1e-5, false, &mut o).unwrap();
        push(&format!("rmsnorm dim {d}"), &o);
        let mut dx = up(&rand(3 * d, 63));
        be.rmsnorm_backward(&x, &w, &dy, d, 1e-5, true, &mut dx, true).unwrap();
        push(&format!("rmsnorm_backward dim {d}"), &dx);
    }
    let (heads, hd) = (4, 10);
    let pos = ints(&[0, 5, 17, 2, 900, 3]);
    let inv_freq = up(&(0..hd / 2).map(|j| 10000f32.powf(-(2.0 * j as f32) / hd as f32)).collect::<Vec<_>>());
    let mut r = x.clone_buf(be);
    be.rope(&mut r, &pos, &inv_freq, heads, hd).unwrap();
    push("rope", &r);
    be.rope_backward(&mut r, &pos, &inv_freq, heads, hd).unwrap();
    push("rope then rope_backward", &r);
    for kind in [GluKind::Silu, GluKind::GeluTanh] {
        let mut o = be.zeros(rows * dim).unwrap();
        be.glu(&x, &y, kind, &mut o).unwrap();
        push(&format!("glu {kind:?}"), &o);
        let (mut dg, mut du) = (be.zeros(rows * dim).unwrap(), be.zeros(rows * dim).unwrap());
        be.glu_backward(&x, &y, &e, kind, &mut dg, &mut du).unwrap();
        push(&format!("glu_backward dgate {kind:?}"), &dg);
        push(&format!("glu_backward dup {kind:?}"), &du);
    }
    // Operands made by the kernels that write their values (rmsnorm_operand, glu_operand, glu_backward_operands),
    // with and without room for a tail, on values beyond fp16's range: the same values, and a product on each gives
    // to the bit what it gives on the operand made afterwards from those values.
    let big = |b: &B::Buf, f: f32| up(&be.download(b).unwrap().iter().map(|v| v * f).collect::<Vec<_>>());
    let (wb, yb) = (big(&w, 1e6), big(&y, 1e5));
    let b = up(&rand(dim * 3, 11));
    let product = |op: &B::Operand<'_>| {
        let mut c = be.zeros(rows * 3).unwrap();
        be.matmul_from(op, &b, &mut c, MatMul::new(rows, 3, dim)).unwrap();
        be.download(&c).unwrap()
    };
    let check_made = |name: &str, made: &B::Operand<'_>, values: &B::Buf, room: usize| {
        let after = be.operand_with_room(values, rows, room).unwrap();
        assert_eq!(be.download(be.operand_values(made)).unwrap(), be.download(values).unwrap(), "{name}: values");
        let got = product(made);
        assert_eq!(got, product(&after), "{name}: a product on the operand made with the values");
        got
    };
    for room in [0, 5] {
        let mut o = be.uninit(rows * dim).unwrap();
        let op = be.rmsnorm_operand(&x, &wb, dim, 1e-5, false, &mut o, room).unwrap();
        let mut plain = be.zeros(rows * dim).unwrap();
        be.rmsnorm(&x, &wb, dim, 1e-5, false, &mut plain).unwrap();
        push(&format!("rmsnorm_operand room={room}"), &up(&check_made("rmsnorm_operand", &op, &plain, room)));
        let mut o = be.uninit(rows * dim).unwrap();
        let op = be.glu_operand(&x, &yb, GluKind::Silu, &mut o, rows, room).unwrap();
        let mut plain = be.zeros(rows * dim).unwrap();
        be.glu(&x, &yb, GluKind::Silu, &mut plain).unwrap();
        push(&format!("glu_operand room={room}"), &up(&check_made("glu_operand", &op, &plain, room)));
        let (mut dg, mut du) = (be.uninit(rows * dim).unwrap(), be.uninit(rows * dim).unwrap());
        let rooms = [room, 7 - room];
        let (og, ou) = be.glu_backward_operands(&x, &yb, &e, GluKind::Silu, &mut dg, &mut du, rows, rooms).unwrap();
        let (mut pg, mut pu) = (be.zeros(rows * dim).unwrap(), be.zeros(rows * dim).unwrap());
        be.glu_backward(&x, &yb, &e, GluKind::Silu, &mut pg, &mut pu).unwrap();
        push(&format!("glu_backward_operands dgate room={room}"), &up(&check_made("dgate", &og, &pg, rooms[0])));
        push(&format!("glu_backward_operands dup room={room}"), &up(&check_made("dup", &ou, &pu, rooms[1])));
    }
    let mut cache = up(&rand(2 * 9 * 5, 9));
    be.write_rows(
        &up(&rand(2 * 3 * 5, 10)),
        &mut cache,
        RowWrite { batch: 2, rows: 3, capacity: 9, start: 4, width: 5 },
    )
    .unwrap();
    push("write_rows", &cache);
    let mut c2 = up(&rand(30, 11));
    be.copy(&x, 7, &mut c2, 3, 20).unwrap();
    push("copy", &c2);
    let mut d = up(&[0.5]);
    be.dot(&x, &y, 0.5, &mut d, true).unwrap();
    push("dot", &d);
    // Vocabulary rows with an ignored target.
    let vocab = 300;
    let logits = up(&rand(4 * vocab, 12).iter().map(|v| v * 8.0).collect::<Vec<_>>());
    let targets = ints(&[5, 299, u32::MAX, 0]);
    let mut ce = be.zeros(4).unwrap();
    be.cross_entropy(&logits, &targets, vocab, u32::MAX, &mut ce).unwrap();
    push("cross_entropy", &ce);
    let mut dl = be.zeros(4 * vocab).unwrap();
    be.cross_entropy_backward(&logits, &targets, vocab, u32::MAX, 0.25, &mut dl).unwrap();
    push("cross_entropy_backward", &dl);
    // Uneven groups (IEC when r does not divide the width).
    let g = Groups { width: dim, groups: 6 };
    let mut red = up(&rand(rows * 6, 13));
    be.group_reduce(&x, rows, g, true, 0.5, &mut red, true).unwrap();
    push("group_reduce", &red);
    let mut exp = up(&rand(rows * dim, 14));
    be.group_expand(&red, rows, g, true, 2.0, &mut exp, true).unwrap();
    push("group_expand", &exp);
    let mut dr = be.zeros(rows * dim).unwrap();
    be.dropout(&x, 0.3, 1234, 77, &mut dr).unwrap();
    push("dropout", &dr);

    // A checkpointed activation, saved and restored (bf16 in the GPU's bf16 mode).
    push("save/restore", &be.restore(&be.save(&y).unwrap()).unwrap());

    // Optimizer: the squared norm, and an AdamW step with decay and a clip coefficient.
    let sq = be.sum_squares(&x).unwrap();
    push("sum_squares", &up(&[sq as f32]));
    let n = 3000;
    let (mut p, mut m1, mut m2) =
        (up(&rand(n, 21)), up(&rand(n, 22)), up(&rand(n, 23).iter().map(|x| x * x).collect::<Vec<_>>()));
    let step = AdamStep {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        lr: 2e-4,
        c1: 0.271,
        c2: 0.0632,
        grad_coef: 0.7,
    };
    be.adamw(&mut p, &up(&rand(n, 24)), &mut m1, &mut m2, step).unwrap();
    for (name, buf) in [("adamw p", &p), ("adamw m", &m1), ("adamw v", &m2)] {
        push(name, buf);
    }
    // 8-bit AdamW from random codes and absmax (a short last block, non-finite gradients), two steps.
    let bytes = |seed: u64| rand(n, seed).iter().map(|x| ((x + 1.0) * 127.5) as u8).collect::<Vec<u8>>();
    let (mut mc, mut vc) = (be.upload_bytes(&bytes(25)).unwrap(), be.upload_bytes(&bytes(26)).unwrap());
    let blocks = n.div_ceil(256);
    let (mut ma, mut va) = (
        up(&rand(blocks, 27).iter().map(|x| x.abs() * 0.1).collect::<Vec<_>>()),
        up(&rand(blocks, 28).iter().map(|x| x * x * 0.01).collect::<Vec<_>>()),
    );
    let mut g = rand(n, 29);
    g[7] = f32::NAN;
    g[300] = f32::INFINITY;
    let (mut p8, g) = (up(&rand(n, 30)), up(&g));
    for t in 1..=2 {
        be.adamw_8bit(
            &mut p8,
            &g,
            &mut mc,
            &mut ma,
            &mut vc,
            &mut va,
            AdamStep { c1: 1.0 - 0.9f32.powi(t), c2: (1.0 - 0.999f32.powi(t)).sqrt(), ..step },
        )
        .unwrap();
    }
    let codes = |b: &B::Bytes| up(&be.download_bytes(b).unwrap().iter().map(|&c| c as f32).collect::<Vec<_>>());
    for (name, buf) in [
        ("adamw_8bit p", &p8),
        ("adamw_8bit m absmax", &ma),
        ("adamw_8bit v absmax", &va),
        ("adamw_8bit m codes", &codes(&mc)),
        ("adamw_8bit v codes", &codes(&vc)),
    ] {
        push(name, buf);
    }

    // Frozen linears on every base form: x·Ŵᵀ accumulated, dy·Ŵ.
    let (out_dim, in_dim, rows) = (24, 64, 9);
    for (name, dense, base) in bases(out_dim, in_dim, 30) {
        let w = be.upload_weight(&base, Some(&dense), out_dim, in_dim).unwrap();
        let mut y = up(&rand(rows * out_dim, 31));
        be.linear(&up(&rand(rows * in_dim, 32)), &w, rows, &mut y, true).unwrap();
        push(&format!("linear {name}"), &y);
        let mut dx = be.zeros(rows * in_dim).unwrap();
        be.linear_backward(&up(&rand(rows * out_dim, 33)), &w, rows, &mut dx, false).unwrap();
        push(&format!("linear_backward {name}"), &dx);
    }
    // One operand for several products, written then accumulated (a linear whose adapter wrote its output first).
    let x = up(&rand(rows * in_dim, 38));
    let x = be.operand(&x).unwrap();
    let ws: Vec<_> = bases(out_dim, in_dim, 39)
        .into_iter()
        .take(2)
        .map(|(_, dense, base)| be.upload_weight(&base, Some(&dense), out_dim, in_dim).unwrap())
        .collect();
    let mut y = be.uninit(rows * out_dim).unwrap();
    be.linear_from(&x, &ws[0], None, rows, &mut y, false).unwrap();
    be.linear_from(&x, &ws[1], None, rows, &mut y, true).unwrap();
    push("linear_from shared operand", &y);
    // Adapter tails (`Tail`) on every base form, folded into the GEMM where the GPU can (packed bases, an operand with
    // room) and a product of their own elsewhere: two tails of ranks 5 and 8 on one operand with room for 8 (padded to
    // the row stride), then an operand without room; forward (F [out, r]) and backward (F [r, in]). x·10⁶ with h·10⁻³
    // and F·10⁻⁵ (in the f16 mode F·2^(u−t) lands among fp16's subnormals), the reverse (x·10⁻⁶, h·10⁻²: F·2^(u−t)
    // near 2^13; the tail must stay within fp16's reach, |h|·|F| below the order of 2^16·max|x|, or both sides give NaN),
    // and h = 0 under x·10⁷ (u − t beyond the shifts' clamp).
    let tail = |r: usize, n: usize, seed: u64, k: f32| up(&rand(n * r, seed).iter().map(|v| v * k).collect::<Vec<_>>());
    for (name, dense, base) in bases(out_dim, in_dim, 50) {
        let w = be.upload_weight(&base, Some(&dense), out_dim, in_dim).unwrap();
        for (kx, kh, kf) in [(1.0, 1.0, 1.0), (1e6, 1e-3, 1e-5), (1e-6, 1e-2, 1.0), (1e7, 0.0, 1.0)] {
            let x = up(&rand(rows * in_dim, 51).iter().map(|v| v * kx).collect::<Vec<_>>());
            let (h5, b5, h8, b8) =
                (tail(5, rows, 52, kh), tail(5, out_dim, 53, kf), tail(8, rows, 54, kh), tail(8, out_dim, 55, kf));
            let t5 = Tail { h: &h5, factor: &b5, rank: 5, scale: 0.75 };
            let t8 = Tail { h: &h8, factor: &b8, rank: 8, scale: 2.0 };
            let op = be.operand_with_room(&x, rows, 8).unwrap();
            let dy = up(&rand(rows * out_dim, 57).iter().map(|v| v * kx).collect::<Vec<_>>());
            let a5 = tail(5, in_dim, 58, kf);
            let t = Tail { h: &h5, factor: &a5, rank: 5, scale: 1.0 };
            let products = || {
                let mut y = up(&rand(rows * out_dim, 56));
                be.linear_from(&op, &w, Some(t5), rows, &mut y, true).unwrap();
                let mut got = vec![be.download(&y).unwrap()];
                be.linear_from(&op, &w, Some(t8), rows, &mut y, false).unwrap();
                got.push(be.download(&y).unwrap());
                be.linear_from(&be.operand(&x).unwrap(), &w, Some(t5), rows, &mut y, true).unwrap();
                got.push(be.download(&y).unwrap());
                let mut dx = up(&rand(rows * in_dim, 59));
                let dy = be.operand_with_room(&dy, rows, 5).unwrap();
                be.linear_backward_from(&dy, &w, Some(t), rows, &mut dx, true).unwrap();
                got.push(be.download(&dx).unwrap());
                got
            };
            let bits = |v: &Vec<Vec<f32>>| {
                v.iter().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()).collect::<Vec<_>>()
            };
            let got = products();
            for (what, v) in
                ["linear_from tail r5", "linear_from tail r8", "linear_from tail, no room,"].iter().zip(&got)
            {
                push(&format!("{what} {name} x·{kx:e}"), &up(v));
            }
            push(&format!("linear_backward_from tail r5 {name} dy·{kx:e}"), &up(&got[3]));
            // The same products with the weight held (`hold_weights`: dequantized once, its rows padded for tails of
            // `room`), equal to the bit; with room 0 the folded tails do not fit the held layout and are multiplied as
            // if the weight were not held (the product without room still reads the held weight). Then the last
            // forward and backward tails again, into tail regions holding them.
            for room in [8, 0] {
                be.hold_weights(&[&w], room).unwrap();
                let mut held = products();
                // The last factors again.
                let mut y = up(&rand(rows * out_dim, 56));
                be.linear_from(&op, &w, Some(t8), rows, &mut y, false).unwrap();
                let mut dx = up(&rand(rows * in_dim, 59));
                let dy = be.operand_with_room(&dy, rows, 5).unwrap();
                be.linear_backward_from(&dy, &w, Some(t), rows, &mut dx, true).unwrap();
                be.release_weights();
                held.extend([be.download(&y).unwrap(), be.download(&dx).unwrap()]);
                let want: Vec<_> = got.iter().chain([&got[1], &got[3]]).cloned().collect();
                assert!(
                    bits(&held) == bits(&want),
                    "{name} x·{kx:e}: products of the weight held with room {room} differ"
                );
            }
        }
    }
    // Inputs far outside fp16's range either way (the f16 mode scales them): x·10⁶ and dy·10⁻⁹.
    let (_, dense, base) = bases(out_dim, in_dim, 30).swap_remove(1);
    let w = be.upload_weight(&base, Some(&dense), out_dim, in_dim).unwrap();
    let mut y = be.zeros(rows * out_dim).unwrap();
    be.linear(&up(&rand(rows * in_dim, 36).iter().map(|x| x * 1e6).collect::<Vec<_>>()), &w, rows, &mut y, false)
        .unwrap();
    push("linear nf4+dq x·1e6", &y);
    let mut dx = be.zeros(rows * in_dim).unwrap();
    be.linear_backward(
        &up(&rand(rows * out_dim, 37).iter().map(|x| x * 1e-9).collect::<Vec<_>>()),
        &w,
        rows,
        &mut dx,
        false,
    )
    .unwrap();
    push("linear_backward nf4+dq dy·1e-9", &dx);
    // Odd sizes: the vectorised bf16 conversion's tail.
    let w = be.upload_weight(&BaseWeight::Dense, Some(&rand(5 * 13, 34)), 5, 13).unwrap();
    let mut y = be.zeros(3 * 5).unwrap();
    be.linear(&up(&rand(3 * 13, 35)), &w, 3, &mut y, false).unwrap();
    push("linear dense 13 → 5", &y);

    // Attention: GQA (4 heads on 2 KV heads), a cache with 3 earlier positions, padding, with and without window.
    for window in [None, Some(3)] {
        let s = AttentionShape {
            batch: 2,
            q_len: 5,
            kv_len: 8,
            kv_capacity: 10,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            scale: 0.35,
            window,
        };
        let mut mask = vec![1u32; 20];
        mask[1] = 0; // padding inside the first sequence
        mask[10] = 0;
        mask[11] = 0; // left padding of the second
        attention_case(be, &format!("window={window:?}"), s, &mask, 15, [1.0; 4], &mut push);
    }
    // More queries than one block of the GPU's causal blocking (512), after 3 cached positions.
    let s = AttentionShape {
        batch: 1,
        q_len: 600,
        kv_len: 603,
        kv_capacity: 605,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        scale: 0.35,
        window: None,
    };
    attention_case(be, "600 queries", s, &[1u32; 605], 25, [1.0; 4], &mut push);
    // Training shapes of the fused kernels' head sizes (72 is padded inside them; 256 takes the GEMM path), over
    // several 64-row tiles, with GQA, right padding, and left padding whose queries see no key.
    for (hd, heads, kv_heads, len, window) in
        [(64, 6, 2, 150, None), (128, 4, 1, 97, Some(40)), (72, 2, 2, 70, None), (256, 2, 1, 20, None)]
    {
        let s = AttentionShape {
            batch: 2,
            q_len: len,
            kv_len: len,
            kv_capacity: len,
            heads,
            kv_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window,
        };
        let mut mask = vec![1u32; 2 * len];
        mask[len - 7..len].fill(0);
        mask[len..len + 3].fill(0);
        attention_case(
            be,
            &format!("head_dim={hd} len={len} window={window:?}"),
            s,
            &mask,
            30 + hd as u64,
            [1.0; 4],
            &mut push,
        );
    }
    // Magnitudes fp16 cannot hold unscaled (the f16 mode scales q, k, v, dO and dS): v·10³ with dO·10⁻⁹, and q, k of
    // 10⁻³ (tiny scores).
    let s = AttentionShape {
        batch: 1,
        q_len: 80,
        kv_len: 80,
        kv_capacity: 80,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        scale: 0.125,
        window: None,
    };
    attention_case(be, "head_dim=64 scaled magnitudes", s, &[1u32; 80], 90, [1e-3, 1e-3, 1e3, 1e-9], &mut push);
    out
}

/// The forward output and the three input gradients of attention of shape `s` on random inputs (q, k, v and dO times
/// `mags`).
fn attention_case<B: Backend>(
    be: &B,
    name: &str,
    s: AttentionShape,
    mask: &[u32],
    seed: u64,
    mags: [f32; 4],
    push: &mut impl FnMut(&str, &B::Buf),
) {
    let up = |v: &[f32]| be.upload(v).unwrap();
    let (nq, nkv) = (s.batch * s.q_len * s.heads * s.head_dim, s.batch * s.kv_capacity * s.kv_heads * s.head_dim);
    let r = |n: usize, i: usize| up(&rand(n, seed + i as u64).iter().map(|x| x * mags[i]).collect::<Vec<_>>());
    let (q, k, v, dout) = (r(nq, 0), r(nkv, 1), r(nkv, 2), r(nq, 3));
    let mask = be.upload_ints(mask).unwrap();
    let mut o = be.zeros(nq).unwrap();
    be.attention(&q, &k, &v, &mask, s, &mut o).unwrap();
    push(&format!("attention {name}"), &o);
    // The forward that keeps what its backward reuses gives the same output, and the backward the same gradients to
    // the bit with what was kept (the fused kernels' log-sum-exp from the forward) as without.
    let mut o_kept = be.uninit(nq).unwrap();
    let kept = be.attention_keeping(&q, &k, &v, &mask, s, &mut o_kept).unwrap();
    assert_eq!(be.download(&o_kept).unwrap(), be.download(&o).unwrap(), "{name}: attention_keeping's output");
    let backward = |kept| {
        // dk and dv start dirty: the op overwrites them.
        let (mut dq, mut dk, mut dv) = (be.zeros(nq).unwrap(), up(&rand(nkv, seed + 4)), up(&rand(nkv, seed + 5)));
        be.attention_backward(&q, &k, &v, &mask, s, &o, &dout, &mut dq, &mut dk, &mut dv, kept).unwrap();
        [dq, dk, dv]
    };
    let (grads, grads_kept) = (backward(None), backward(kept));
    for ((g, buf), with_kept) in ["dq", "dk", "dv"].into_iter().zip(&grads).zip(&grads_kept) {
        push(&format!("attention_backward {name} {g}"), buf);
        assert_eq!(be.download(with_kept).unwrap(), be.download(buf).unwrap(), "{name} {g}: with what was kept");
    }
}

/// A random [out, in] weight in every base form the backends take: (name, dequantized f32 values, base).
fn bases(out_dim: usize, in_dim: usize, seed: u64) -> Vec<(String, Vec<f32>, BaseWeight)> {
    let w: Vec<f32> = rand(out_dim * in_dim, seed).iter().map(|x| x * 0.1).collect();
    let shape = [out_dim, in_dim];
    let nf4 = Bnb4::quantize(&w, &shape, FourBit::Nf4, 64, true).unwrap();
    let fp4 = Bnb4::quantize(&w, &shape, FourBit::Fp4, 128, false).unwrap();
    let (icq, _) = icq::quantize_nf4(&w, &shape, true, TauSearch::default()).unwrap();
    let (codes, params) = quantize_rtn(&w, out_dim, in_dim, 32, false);
    let int4 = GptqInt4::pack(&codes, &params, out_dim, in_dim, 32, false).unwrap();
    // An act-order-like group map and merged fp16 zero points exercise the general int4 path.
    let mut merged = int4.clone();
    merged.g_idx = (0..in_dim).map(|i| ((i * 7) % merged.groups()) as i32).collect();
    merged.float_zeros =
        Some((0..merged.groups() * out_dim).map(|i| half::f16::from_f32(7.25 + 0.01 * i as f32)).collect());
    merged.qzeros.clear();
    int4.validate().unwrap();
    let mut out = vec![("dense".to_string(), w.clone(), BaseWeight::Dense)];
    for (name, base) in [
        ("nf4+dq", BaseWeight::Bnb4(nf4)),
        ("fp4", BaseWeight::Bnb4(fp4)),
        ("nf4+icq", BaseWeight::IcqNf4(icq)),
        ("int4", BaseWeight::Int4(int4)),
        ("int4 merged", BaseWeight::Int4(merged)),
    ] {
        out.push((name.to_string(), base.dequantize().unwrap(), base));
    }
    out
}

#[test]
fn packed_bases_dequantize_bit_exactly() {
    for precision in [Precision::F32, Precision::F16, Precision::Bf16] {
        let Some(cuda) = gpu(precision) else { return };
        // 320 × 256: 1,280 blocks of 64, so the double-quantized scales span five nested blocks of 256.
        // And an odd-length NF4 tensor: the vectorised kernel's tail.
        let odd: Vec<f32> = rand(3 * 337, 41);
        let odd = BaseWeight::Bnb4(Bnb4::quantize(&odd, &[3, 337], FourBit::Nf4, 64, true).unwrap());
        let cases = bases(320, 256, 40).into_iter().chain([("nf4 odd".to_string(), odd.dequantize().unwrap(), odd)]);
        for (name, want, base) in cases {
            let (out_dim, in_dim) = if name == "nf4 odd" { (3, 337) } else { (320, 256) };
            let w = cuda.upload_weight(&base, Some(&want), out_dim, in_dim).unwrap();
            let got = cuda.download(&cuda.weight_values(&w).unwrap()).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            if name == "dense" && precision != Precision::F32 {
                // A dense weight is stored in the GEMM dtype: its values come back rounded to fp16 or bf16.
                let round = |x: f32| {
                    if precision == Precision::F16 {
                        half::f16::from_f32(x).to_f32()
                    } else {
                        half::bf16::from_f32(x).to_f32()
                    }
                };
                let rounded: Vec<f32> = want.iter().map(|&x| round(x)).collect();
                assert_eq!(bits(&got), bits(&rounded), "{name} ({precision:?})");
            } else {
                assert_eq!(bits(&got), bits(&want), "{name} ({precision:?})");
            }
        }
    }
}

/// A copy of a buffer through the backend's own ops.
trait CloneBuf<B: Backend> {
    fn clone_buf(&self, be: &B) -> B::Buf;
}

impl<B: Backend> CloneBuf<B> for B::Buf {
    fn clone_buf(&self, be: &B) -> B::Buf {
        let n = be.len(self);
        let mut out = be.zeros(n).unwrap();
        be.copy(self, 0, &mut out, 0, n).unwrap();
        out
    }
}

/// Each precision against the CPU computing at the same precision: F32 against f32, F16 and Bf16 against `Cpu::f16()`
/// and `Cpu::bf16()`, the f32 kernels with the same 16-bit (and scales) and TF32 roundings, which leaves f32 summation
/// order (and rounding ties it moves).
#[test]
fn every_op_matches_the_cpu() {
    for (precision, reference, tol) in
        [(Precision::F32, Cpu::new(), 1e-5), (Precision::F16, Cpu::f16(), 1e-3), (Precision::Bf16, Cpu::bf16(), 1e-3)]
    {
        let Some(cuda) = gpu(precision) else { return };
        let want = ops(&reference);
        let got = ops(&cuda);
        let mut worst = 0f32;
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            let e = rel(a, b);
            eprintln!("{precision:?} {name:<40} rel err {e:.2e}");
            worst = worst.max(e);
            // The fused attention kernels round the probabilities before normalising them (by the running row
            // maximum), the emulation after: one 16-bit rounding (bf16 2⁻⁹, fp16 2⁻¹² relative) apart.
            let tol = match precision {
                _ if name.starts_with("dropout") || name.starts_with("adamw") => 0.0,
                Precision::Bf16 if name.starts_with("attention") => 1e-2,
                Precision::F16 if name.starts_with("attention") => 2e-3,
                _ => tol,
            };
            assert!(e <= tol, "{precision:?} {name}: relative error {e} > {tol}");
        }
        eprintln!("{precision:?}: worst op error {worst:.2e}");
    }
}

/// Logits of a padded forward pass, then for `cfg`: the loss and every adapter gradient, with and without
/// checkpointing.
fn model_outputs<B: Backend + 'static>(
    model: &Path,
    be: B,
    cfg: &AdapterConfig,
    nf4: bool,
    init: f32,
) -> Vec<(String, Vec<f32>)> {
    let ckpt = Checkpoint::open(model).unwrap();
    let m = Decoder::load_quantized(&ckpt, be, nf4.then_some(&qlora_nf4()), &mut |_, _| ()).unwrap();
    let b = batch(m.spec.vocab_size);
    let mut out = Vec::new();
    let mut cache = m.new_cache(2, 7).unwrap();
    let hidden = m.forward(&b.input, &mut cache).unwrap();
    out.push(("logits".to_string(), m.backend.download(&m.logits(&hidden, 14).unwrap()).unwrap()));
    let mut set = AdapterSet::build(&m.backend, &m.spec, 5, |_, _| Some(cfg.clone())).unwrap();
    randomize_adapters(&m.backend, &mut set, init);
    // The padded batch, then a packed row (segments in the key mask: positions restart, attention stays inside each
    // example; data.packing).
    for (tag, b) in [("", b), ("packed ", packed_batch(m.spec.vocab_size))] {
        for checkpointing in Checkpointing::ALL {
            set.zero_grads(&m.backend).unwrap();
            let r = m.loss_and_backward(&b, &mut set, &parity_step(checkpointing)).unwrap();
            let ckpt = checkpointing.name();
            out.push((format!("{tag}loss ckpt={ckpt}"), vec![r.loss as f32]));
            for (name, p) in set.named_params() {
                out.push((format!("{tag}{name} grad ckpt={ckpt}"), m.backend.download(&p.grad).unwrap()));
            }
        }
    }
    out
}

/// Three examples of 70, 150 and 45 tokens packed into one row (`data::collate::pack`): they cross the fused kernels'
/// 64-key tiles and 128-row blocks, so the tiles of earlier examples are skipped on both sides.
fn packed_batch(vocab: usize) -> qpeft::model::train::Batch {
    use qpeft::data::collate::{pack, Tokenized};
    let items: Vec<Tokenized> = [70usize, 150, 45]
        .iter()
        .enumerate()
        .map(|(e, &len)| {
            let ids: Vec<u32> =
                rand(len, 500 + e as u64).iter().map(|v| 3 + ((v + 1.0) * 0.5 * (vocab - 4) as f32) as u32).collect();
            Tokenized { labels: ids.clone(), ids }
        })
        .collect();
    pack(&items.iter().collect::<Vec<_>>())
}

#[test]
fn tiny_models_match_the_cpu_for_every_method() {
    let cases: Vec<(PathBuf, AdapterConfig, bool)> = methods()
        .into_iter()
        .flat_map(|c| [(fixtures().join("tiny-llama"), c.clone(), false), (fixtures().join("tiny-llama"), c, true)])
        .chain(
            ["tiny-gemma", "tiny-llama3", "tiny-mistral", "tiny-qwen2"]
                .map(|f| (fixtures().join(f), methods()[0].clone(), true)),
        )
        .collect();
    models_match_the_cpu(&cases, 0.2);
}

/// SmolLM2-135M-Instruct's first blocks (scripts/gpu/truncate_gguf.py; the whole GGUF does not fit the GPU machine's
/// carry), NF4 like QLoRA, every method. The file is named by QPEFT_SMOLLM2; the GPU script sets it.
#[test]
fn smollm2_matches_the_cpu_for_every_method() {
    let Some(path) = std::env::var_os("QPEFT_SMOLLM2") else {
        assert!(std::env::var_os("QPEFT_REQUIRE_GPU").is_none(), "QPEFT_SMOLLM2 is not set");
        eprintln!("skipped: QPEFT_SMOLLM2 names no model");
        return;
    };
    let cases: Vec<(PathBuf, AdapterConfig, bool)> =
        methods().into_iter().map(|c| (PathBuf::from(&path), c, true)).collect();
    models_match_the_cpu(&cases, 0.02);
}

/// Every case on the CPU and on CUDA in every precision, each against the CPU at its own precision (F32: f32; F16 and
/// Bf16: `Cpu::f16()` and `Cpu::bf16()`, the same roundings), errors as ‖Δ‖₂/‖ref‖₂.
/// - F32, with every adapter parameter uniform in ±`f32_init`: every tensor ≤ 1e-4, except single-value gradients
///   (IR-QLoRA's IEC β), long sums whose terms cancel, where f32 summation-order noise alone reaches ~5e-3 on SmolLM2:
///   ≤ 1e-2. The tiny models use ±0.2 (adapters that dominate the base, so every path carries weight); SmolLM2 uses
///   ±0.02, as at ±0.2 its 30 adapted blocks are chaotic enough to lift f32 summation noise to 1–8e-4.
/// - Bf16, with adapter parameters uniform in ±0.02 (the scale of trained adapters): logits and loss ≤ 1e-2; each
///   pass's adapter gradients, as one vector, ≤ `BF16_VECTOR`; every gradient tensor ≤ `BF16_TENSOR` or, if larger,
///   `BF16_TENSOR_NOISE` × bf16's own effect on it, the emulation's distance from f32 (a wrong
///   gradient is off by ~1). Two bf16 computations cannot agree more closely than bf16 itself resolves: rounding to
///   bf16 turns a difference δ (f32 summation order, TF32 details) into about √(δ·2⁻⁸) at every rounding point, so
///   through the depth of a model any two of them drift toward the precision's own noise (on the CPU, changing the
///   emulated SmolLM2's norm weights by one f32 ulp moves its gradients by 8.7e-3 as one vector: tests/half_emulation.rs). Measured on an H100
///   with the fused attention: 0.8–2.3e-2 on the tiny models and SmolLM2's first 6 blocks, 1.9–2.7e-2 on all 30.
///   Single-value gradients (sums that cancel) are checked in F32 only.
/// - F16, as Bf16 but with 1e-2 for the gradients as one vector (`F16_VECTOR`) and `F16_TENSOR` per tensor: fp16's 11
///   significant bits put its own noise 8× below bf16's (the one-ulp change moves the f16 emulation's gradients by
///   2.4e-3), so the bf16 argument leaves room for the bound the issue asks for.
///
/// The emulation's own distance from f32 is printed beside the 16-bit results: the precision itself (tests/
/// half_emulation.rs checks the emulations' roundings in CI); so is the GPU's distance from f32.
fn models_match_the_cpu(cases: &[(PathBuf, AdapterConfig, bool)], f32_init: f32) {
    let mut failures = Vec::new();
    for precision in [Precision::F32, Precision::F16, Precision::Bf16] {
        if gpu(precision).is_none() {
            return;
        }
        for (model, cfg, nf4) in cases {
            let family = model.file_name().unwrap().to_string_lossy();
            let case = format!("{precision:?} {family} {} {:?}", if *nf4 { "nf4" } else { "dense" }, cfg.method);
            let init = if precision == Precision::F32 { f32_init } else { 0.02 };
            let reference = match precision {
                Precision::F32 => Cpu::new(),
                Precision::F16 => Cpu::f16(),
                Precision::Bf16 => Cpu::bf16(),
            };
            let want = model_outputs(model, reference, cfg, *nf4, init);
            let got = model_outputs(model, Cuda::new(0, precision).unwrap(), cfg, *nf4, init);
            let c = Comparison::of(&got, &want);
            // The precision's own effect on each output: the emulation against f32; and the GPU against f32.
            let exact = (precision != Precision::F32).then(|| model_outputs(model, Cpu::new(), cfg, *nf4, init));
            let noise = exact.as_ref().map(|f| Comparison::of(&want, f));
            let mut fail = |what: String| failures.push(format!("{case}: {what}"));
            match precision {
                Precision::F32 => {
                    for (name, e, single) in &c.tensors {
                        let tol = if *single { 1e-2 } else { 1e-4 };
                        if *e > tol {
                            fail(format!("{name}: relative error {e:.3e} > {tol:.0e}"));
                        }
                    }
                }
                Precision::F16 | Precision::Bf16 => {
                    let noise = noise.as_ref().expect("computed for 16-bit precisions");
                    let (vector, tensor) =
                        if precision == Precision::F16 { (F16_VECTOR, F16_TENSOR) } else { (BF16_VECTOR, BF16_TENSOR) };
                    for ((name, e, single), (_, own, _)) in c.tensors.iter().zip(&noise.tensors) {
                        let output = name.starts_with("logits") || name.starts_with("loss");
                        let tol = if output { 1e-2 } else { tensor.max(TENSOR_NOISE * own) };
                        if !single && *e > tol {
                            fail(format!(
                                "{name}: relative error {e:.3e} > {tol:.3e} (the precision alone moves it {own:.3e})"
                            ));
                        }
                    }
                    if c.vector > vector {
                        fail(format!("gradients as one vector: relative error {:.3e} > {vector:.0e}", c.vector));
                    }
                }
            }
            eprintln!("{case:<60.60} {}", c.summary());
            if let (Some(noise), Some(exact)) = (&noise, &exact) {
                eprintln!("{:<60} {}", "     ... the emulation against f32", noise.summary());
                eprintln!("{:<60} {}", "     ... the GPU against f32", Comparison::of(&got, exact).summary());
            }
        }
    }
    assert!(failures.is_empty(), "{} tensors out of tolerance:\n{}", failures.len(), failures.join("\n"));
}

/// Bf16 gradient tolerances (see `models_match_the_cpu`): all of a pass's gradients as one vector; any one tensor
/// within `BF16_TENSOR`, or within `TENSOR_NOISE` times bf16's own effect on it (the emulation against f32) where
/// that is larger. Single tensors are noisy samples: over the 2,520 gradient tensors of the full SmolLM2 with a
/// hierarchical adapter the largest is 0.18 from the emulation (the emulation's own largest distance from f32 is
/// 0.15), and one at 0.10 is 4× the emulation's distance from f32 for that tensor. A wrong gradient is off by ~1; the
/// kernels' logic is checked op by op and in F32 at 1e-4.
const BF16_VECTOR: f32 = 3e-2;
const BF16_TENSOR: f32 = 0.2;
const TENSOR_NOISE: f32 = 3.0;
/// F16 gradient tolerances, likewise.
const F16_VECTOR: f32 = 1e-2;
const F16_TENSOR: f32 = 0.05;

/// One case's errors: (name, ‖Δ‖₂/‖ref‖₂, single value) per output, and the larger of the two passes' gradient
/// errors with all of a pass's gradient tensors as one vector.
struct Comparison {
    tensors: Vec<(String, f32, bool)>,
    vector: f32,
}

impl Comparison {
    fn of(got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)]) -> Self {
        let tensors = got
            .iter()
            .zip(want)
            .map(|((name, a), (_, b))| (name.clone(), rel_l2(a, b), a.len() == 1 && name.contains("grad")))
            .collect();
        let pass = |v: &[(String, Vec<f32>)], ckpt: bool| {
            let tag = format!("grad ckpt={ckpt}");
            v.iter()
                .filter(|(n, g)| n.ends_with(&tag) && g.len() > 1)
                .flat_map(|(_, g)| g.iter().copied())
                .collect::<Vec<f32>>()
        };
        let vector =
            [false, true].map(|ckpt| rel_l2(&pass(got, ckpt), &pass(want, ckpt))).into_iter().fold(0f32, f32::max);
        Comparison { tensors, vector }
    }

    fn summary(&self) -> String {
        let outputs = self.tensors.iter().filter(|(n, ..)| !n.contains("grad")).fold(0f32, |m, t| m.max(t.1));
        let mut grads: Vec<f32> =
            self.tensors.iter().filter(|(n, _, single)| n.contains("grad") && !single).map(|t| t.1).collect();
        grads.sort_by(f32::total_cmp);
        let median = grads.get(grads.len() / 2).copied().unwrap_or(0.0);
        format!(
            "logits/loss {outputs:.2e}; {} gradients: median {median:.2e}, max {:.2e}, as one vector {:.2e}",
            grads.len(),
            grads.last().copied().unwrap_or(0.0),
            self.vector
        )
    }
}

#[test]
fn an_out_of_vocabulary_label_is_an_error() {
    let Some(cuda) = gpu(Precision::Bf16) else { return };
    let m = Decoder::load(&Checkpoint::open(&fixtures().join("tiny-llama")).unwrap(), cuda).unwrap();
    let mut b = batch(m.spec.vocab_size);
    b.labels[5] = m.spec.vocab_size as u32;
    let e = m.loss(&b, None, &StepOptions::default()).map(|_| ()).expect_err("a label past the vocabulary").to_string();
    assert!(e.contains(&format!("label id {} is outside the vocabulary", m.spec.vocab_size)), "{e}");
}

#[test]
fn an_allocation_beyond_the_device_is_an_error() {
    let Some(cuda) = gpu(Precision::Bf16) else { return };
    let total = cuda.device_memory().unwrap().expect("the GPU reports its memory").total;
    let e = cuda.zeros(total / 2).map(|_| ()).expect_err("twice the device's memory cannot be allocated");
    assert!(matches!(e, Error::Device { kind: DeviceFailure::OutOfMemory, .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("allocating") && e.contains("MiB") && e.contains("free"), "{e}");
    // The device stays usable.
    assert_eq!(cuda.download(&cuda.upload(&[1.5, 2.5]).unwrap()).unwrap(), vec![1.5, 2.5]);
}

/// Issue 25: data-parallel training through NCCL with a group of one rank leaves every bit as the plain path does
/// (three optimizer steps of a LoRA with dropout on an NF4 tiny model, f32 and f16). Needs libnccl (scripts/gpu/test.sh
/// finds the one PyTorch's wheel ships); QPEFT_REQUIRE_GPU makes its absence a failure.
#[test]
fn one_rank_through_nccl_trains_bit_for_bit_as_the_plain_path() {
    use qpeft::backend::collective::{Collective, Solo};
    use qpeft::backend::cuda::nccl::Nccl;
    use qpeft::train::config::CheckpointSetting;
    use qpeft::train::optimizer::{AdamW, OptimizerState, StateBits};
    use qpeft::train::schedule::Schedule;
    use qpeft::train::step::StepRecipe;
    if gpu(Precision::F32).is_none() {
        return;
    }
    if let Err(e) = Nccl::id() {
        assert!(std::env::var_os("QPEFT_REQUIRE_GPU").is_none(), "{e}");
        eprintln!("skipped: {e}");
        return;
    }
    let recipe = StepRecipe {
        adamw: AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bits: StateBits::B32,
            min_8bit_size: 4096,
        },
        lr: 1e-3,
        schedule: Schedule::Constant,
        warmup: 0,
        steps: 3,
        max_grad_norm: 0.3,
        grad_accum: 2,
        seed: 7,
        checkpointing: CheckpointSetting::Fixed(Checkpointing::Full),
        memory_budget: None,
        loss_chunk: 256,
        mlp_chunk: None,
    };
    for precision in [Precision::F32, Precision::F16] {
        let train = |through_nccl: bool| -> Vec<Vec<f32>> {
            let ckpt = Checkpoint::open(&fixtures().join("tiny-llama")).unwrap();
            let be = Cuda::new(0, precision).unwrap();
            let m = Decoder::load_quantized(&ckpt, be, Some(&qlora_nf4()), &mut |_, _| ()).unwrap();
            let comm: Box<dyn Collective<Cuda>> = if through_nccl {
                let host = Box::new(qpeft::backend::collective::Threads::group(1).pop().unwrap());
                Box::new(Nccl::join(&m.backend, host, Nccl::id().unwrap()).unwrap())
            } else {
                Box::new(Solo)
            };
            let mut set = AdapterSet::build(&m.backend, &m.spec, 5, |_, _| Some(methods()[0].clone())).unwrap();
            let mut state = OptimizerState::new();
            let b = batch(m.spec.vocab_size);
            for step in 0..recipe.steps {
                recipe.step(&m, &mut set, &mut state, step, comm.as_ref(), &mut || Ok(b.clone())).unwrap();
            }
            set.named_params().iter().map(|(_, p)| m.backend.download(&p.value).unwrap()).collect()
        };
        let (plain, nccl) = (train(false), train(true));
        assert!(plain.iter().flatten().any(|&v| v != 0.0));
        assert!(plain == nccl, "{precision:?}: one NCCL rank changed the trained adapter");
    }
}
