//! CUDA ↔ CPU parity (feature `cuda`): every backend op on random inputs, then whole tiny models — logits, and the
//! loss and adapter gradients of every method with and without activation checkpointing. The CUDA backend is f32
//! (cuBLAS SGEMM without TF32), so results agree to f32 summation-order noise. Without a GPU (CI) only the
//! missing-driver error is checked; on the GPU machine scripts/gpu/test.sh sets QPEFT_REQUIRE_GPU=1 so that a
//! missing GPU fails instead of skipping.
#![cfg(feature = "cuda")]

mod common;

use common::{batch, fixtures, methods, uniform};
use qpeft::adapters::set::AdapterSet;
use qpeft::adapters::AdapterConfig;
use qpeft::backend::cpu::Cpu;
use qpeft::backend::cuda::Cuda;
use qpeft::backend::{AttentionShape, Backend, GluKind, Groups, MatMul, RowWrite};
use qpeft::model::train::StepOptions;
use qpeft::model::{Checkpoint, Decoder};

fn gpu() -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(std::env::var_os("QPEFT_REQUIRE_GPU").is_none(), "no GPU: {e}");
            let msg = e.to_string();
            assert!(msg.starts_with("CUDA: "), "{msg}");
            eprintln!("skipped (no GPU): {msg}");
            None
        }
    }
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    uniform(n, seed).iter().map(|&x| x as f32).collect()
}

/// max |a − b| / max(|b|, tiny).
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
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
    }
    let (rows, dim) = (6, 40);
    let x = up(&rand(rows * dim, 4));
    let w = up(&rand(dim, 5));
    let mut e = be.zeros(rows * dim).unwrap();
    be.embedding(&up(&rand(11 * dim, 6)), &ints(&[3, 0, 10, 3, 7, 1]), dim, 1.5, &mut e).unwrap();
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
    let mut cache = up(&rand(2 * 9 * 5, 9));
    be.write_rows(&up(&rand(2 * 3 * 5, 10)), &mut cache, RowWrite { batch: 2, rows: 3, capacity: 9, start: 4, width: 5 }).unwrap();
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
    be.dropout(&x, 0.3, 1234, &mut dr).unwrap();
    push("dropout", &dr);

    // Attention: GQA (4 heads on 2 KV heads), a cache with 3 earlier positions, padding, with and without window.
    for window in [None, Some(3)] {
        let s = AttentionShape { batch: 2, q_len: 5, kv_len: 8, kv_capacity: 10, heads: 4, kv_heads: 2, head_dim: 8, scale: 0.35, window };
        let q = up(&rand(2 * 5 * 4 * 8, 15));
        let kc = up(&rand(2 * 10 * 2 * 8, 16));
        let vc = up(&rand(2 * 10 * 2 * 8, 17));
        let mut mask = vec![1u32; 20];
        mask[1] = 0; // padding inside the first sequence
        mask[10] = 0;
        mask[11] = 0; // left padding of the second
        let mask = ints(&mask);
        let mut o = be.zeros(2 * 5 * 4 * 8).unwrap();
        be.attention(&q, &kc, &vc, &mask, s, &mut o).unwrap();
        push(&format!("attention window={window:?}"), &o);
        let dout = up(&rand(2 * 5 * 4 * 8, 18));
        let (mut dq, mut dk, mut dv) = (be.zeros(2 * 5 * 4 * 8).unwrap(), up(&rand(320, 19)), up(&rand(320, 20)));
        be.attention_backward(&q, &kc, &vc, &mask, s, &dout, &mut dq, &mut dk, &mut dv).unwrap();
        push(&format!("attention_backward dq window={window:?}"), &dq);
        push(&format!("attention_backward dk window={window:?}"), &dk);
        push(&format!("attention_backward dv window={window:?}"), &dv);
    }
    out
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

#[test]
fn every_op_matches_the_cpu() {
    let Some(cuda) = gpu() else { return };
    let want = ops(&Cpu::new());
    let got = ops(&cuda);
    let mut worst = 0f32;
    for ((name, a), (_, b)) in got.iter().zip(&want) {
        let e = rel(a, b);
        eprintln!("{name:<40} rel err {e:.2e}");
        worst = worst.max(e);
        let tol = if name.starts_with("dropout") { 0.0 } else { 1e-5 };
        assert!(e <= tol, "{name}: relative error {e} > {tol}");
    }
    eprintln!("worst op error {worst:.2e}");
}

/// Logits of a padded forward pass, then for `cfg`: the loss and every adapter gradient, with and without
/// checkpointing.
fn model_outputs<B: Backend + 'static>(family: &str, be: B, cfg: &AdapterConfig) -> Vec<(String, Vec<f32>)> {
    let m = Decoder::load(&Checkpoint::open(&fixtures().join(family)).unwrap(), be).unwrap();
    let b = batch(m.spec.vocab_size);
    let mut out = Vec::new();
    let mut cache = m.new_cache(2, 7).unwrap();
    let hidden = m.forward(&b.input, &mut cache).unwrap();
    out.push(("logits".to_string(), m.backend.download(&m.logits(&hidden, 14).unwrap()).unwrap()));
    let mut set = AdapterSet::build(&m.backend, &m.spec, 5, |_, _| Some(cfg.clone())).unwrap();
    for (i, p) in set.params_mut().into_iter().enumerate() {
        let n = m.backend.len(&p.value);
        p.value = m.backend.upload(&rand(n, 1000 + i as u64).iter().map(|x| x * 0.2).collect::<Vec<_>>()).unwrap();
    }
    for checkpointing in [false, true] {
        let opts = StepOptions { checkpointing, dropout: true, seed: 11, grad_scale: 1.0, loss_chunk: 5 };
        for p in set.params_mut() {
            let n = m.backend.len(&p.grad);
            p.grad = m.backend.zeros(n).unwrap();
        }
        let r = m.loss_and_backward(&b, &mut set, &opts).unwrap();
        out.push((format!("loss ckpt={checkpointing}"), vec![r.loss as f32]));
        for (name, p) in set.named_params() {
            out.push((format!("{name} grad ckpt={checkpointing}"), m.backend.download(&p.grad).unwrap()));
        }
    }
    out
}

#[test]
fn tiny_models_match_the_cpu_for_every_method() {
    let Some(cuda) = gpu() else { return };
    let cases: Vec<(&str, AdapterConfig)> = methods()
        .into_iter()
        .map(|c| ("tiny-llama", c))
        .chain(["tiny-gemma", "tiny-llama3", "tiny-mistral", "tiny-qwen2"].map(|f| (f, methods()[0].clone())))
        .collect();
    for (family, cfg) in cases {
        let want = model_outputs(family, Cpu::new(), &cfg);
        let got = model_outputs(family, Cuda::new(0).unwrap(), &cfg);
        let mut worst = (0f32, String::new());
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            let e = rel(a, b);
            if e > worst.0 {
                worst = (e, name.clone());
            }
            assert!(e <= 1e-4, "{family} {:?}: {name}: relative error {e}", cfg.method);
        }
        eprintln!("{family:<12} {:<60} {} tensors, worst {:.2e} ({})", format!("{:?}", cfg.method), got.len(), worst.0, worst.1);
    }
    drop(cuda);
}
