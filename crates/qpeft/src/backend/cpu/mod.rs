//! The CPU backend: f32 compute, rayon over rows, the `gemm` crate for matrix products. It is the
//! reference every other backend is checked against.

mod attention;
pub mod gemm;

use rayon::prelude::*;

use self::gemm::{gemm_strided, Strided};
use super::{AttentionShape, Backend, GluKind, MatMul, RowWrite};
use crate::error::{Error, Result};

/// Rows per rayon task for the row-wise ops: enough work to amortise scheduling.
const ROW_CHUNK: usize = 16;

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

fn check(cond: bool, op: &str, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Invalid(format!("{op}: {}", what())))
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Ints = Vec<u32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn upload_ints(&self, data: &[u32]) -> Result<Vec<u32>> {
        Ok(data.to_vec())
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn embedding(&self, table: &Vec<f32>, ids: &Vec<u32>, dim: usize, scale: f32, out: &mut Vec<f32>) -> Result<()> {
        let vocab = table.len() / dim;
        check(out.len() == ids.len() * dim, "embedding", || format!("output holds {} values, need {}", out.len(), ids.len() * dim))?;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Invalid(format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(o, &t)| {
            let row = &table[t as usize * dim..(t as usize + 1) * dim];
            for (o, &x) in o.iter_mut().zip(row) {
                *o = x * scale;
            }
        });
        Ok(())
    }

    fn matmul(&self, a: &Vec<f32>, b: &Vec<f32>, out: &mut Vec<f32>, s: MatMul) -> Result<()> {
        check(a.len() == s.m * s.k && b.len() == s.k * s.n && out.len() == s.m * s.n, "matmul", || {
            format!("sizes {}, {}, {} do not fit {s:?}", a.len(), b.len(), out.len())
        })?;
        let rhs = if s.b_transposed { Strided::rows(s.k).t() } else { Strided::rows(s.n) };
        gemm_strided((s.m, s.n, s.k), out, Strided::rows(s.n), a, Strided::rows(s.k), b, rhs, 1.0, s.accumulate, true);
        Ok(())
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>) -> Result<()> {
        check(!bias.is_empty() && x.len().is_multiple_of(bias.len()), "add_bias", || format!("{} values, bias of {}", x.len(), bias.len()))?;
        x.par_chunks_mut(bias.len()).for_each(|r| r.iter_mut().zip(bias).for_each(|(x, b)| *x += b));
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        check(x.len() == y.len(), "add", || format!("{} vs {} values", x.len(), y.len()))?;
        x.par_chunks_mut(4096).zip(y.par_chunks(4096)).for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += y));
        Ok(())
    }

    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, dim: usize, eps: f32, plus_one: bool, out: &mut Vec<f32>) -> Result<()> {
        check(w.len() == dim && x.len().is_multiple_of(dim) && out.len() == x.len(), "rmsnorm", || format!("x {}, w {}, dim {dim}", x.len(), w.len()))?;
        out.par_chunks_mut(dim * ROW_CHUNK).zip(x.par_chunks(dim * ROW_CHUNK)).for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
                let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dim as f64;
                let r = 1.0 / ((ms as f32) + eps).sqrt();
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    // Gemma scales by (1 + w) in f32 after normalising; llama by w.
                    *o = if plus_one { (x * r) * (1.0 + w) } else { w * (x * r) };
                }
            }
        });
        Ok(())
    }

    fn rope(&self, x: &mut Vec<f32>, positions: &Vec<u32>, inv_freq: &Vec<f32>, heads: usize, head_dim: usize) -> Result<()> {
        let half = head_dim / 2;
        let row = heads * head_dim;
        check(inv_freq.len() == half && x.len() == positions.len() * row, "rope", || {
            format!("x {} values for {} positions × {heads} heads × {head_dim}", x.len(), positions.len())
        })?;
        x.par_chunks_mut(row).zip(positions.par_iter()).for_each(|(r, &p)| {
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq.iter().map(|&f| {
                let a = p as f32 * f;
                (a.cos(), a.sin())
            }).unzip();
            for h in r.chunks_exact_mut(head_dim) {
                let (x1, x2) = h.split_at_mut(half);
                for j in 0..half {
                    let (a, b) = (x1[j], x2[j]);
                    x1[j] = a * cos[j] - b * sin[j];
                    x2[j] = b * cos[j] + a * sin[j];
                }
            }
        });
        Ok(())
    }

    fn glu(&self, gate: &Vec<f32>, up: &Vec<f32>, kind: GluKind, out: &mut Vec<f32>) -> Result<()> {
        check(gate.len() == up.len() && out.len() == up.len(), "glu", || format!("gate {}, up {}, out {}", gate.len(), up.len(), out.len()))?;
        let act = match kind {
            GluKind::Silu => silu,
            GluKind::GeluTanh => gelu_tanh,
        };
        out.par_chunks_mut(4096).zip(gate.par_chunks(4096).zip(up.par_chunks(4096))).for_each(|(o, (g, u))| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = act(g) * u;
            }
        });
        Ok(())
    }

    fn write_rows(&self, src: &Vec<f32>, dst: &mut Vec<f32>, at: RowWrite) -> Result<()> {
        let RowWrite { batch, rows, capacity, start, width } = at;
        check(src.len() == batch * rows * width && dst.len() == batch * capacity * width && start + rows <= capacity, "write_rows", || {
            format!("{rows} rows at {start} into capacity {capacity}")
        })?;
        for b in 0..batch {
            let d = (b * capacity + start) * width;
            dst[d..d + rows * width].copy_from_slice(&src[b * rows * width..(b + 1) * rows * width]);
        }
        Ok(())
    }

    fn attention(&self, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, key_mask: &Vec<u32>, s: AttentionShape, out: &mut Vec<f32>) -> Result<()> {
        let q_size = s.batch * s.q_len * s.heads * s.head_dim;
        let kv_size = s.batch * s.kv_capacity * s.kv_heads * s.head_dim;
        check(
            q.len() == q_size
                && out.len() == q_size
                && k.len() == kv_size
                && v.len() == kv_size
                && key_mask.len() == s.batch * s.kv_capacity
                && s.q_len <= s.kv_len
                && s.kv_len <= s.kv_capacity
                && s.kv_heads > 0
                && s.heads.is_multiple_of(s.kv_heads),
            "attention",
            || format!("buffer sizes do not fit {s:?}"),
        )?;
        attention::attention(q, k, v, key_mask, s, out);
        Ok(())
    }

    fn cross_entropy(&self, logits: &Vec<f32>, targets: &Vec<u32>, vocab: usize, ignore: u32, out: &mut Vec<f32>) -> Result<()> {
        check(logits.len() == targets.len() * vocab && out.len() == targets.len(), "cross_entropy", || {
            format!("{} logits for {} targets × vocab {vocab}", logits.len(), targets.len())
        })?;
        if let Some(&bad) = targets.iter().find(|&&t| t != ignore && t as usize >= vocab) {
            return Err(Error::Invalid(format!("target id {bad} is outside the vocabulary (size {vocab})")));
        }
        out.par_iter_mut().zip(logits.par_chunks(vocab).zip(targets.par_iter())).for_each(|(o, (row, &t))| {
            *o = if t == ignore {
                0.0
            } else {
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
                (max as f64 + sum.ln() - row[t as usize] as f64) as f32
            };
        });
        Ok(())
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}
