//! AdamW as bitsandbytes computes it (methods.md §8): the 32-bit update, and the 8-bit block-wise variant whose
//! two moments are stored as 8-bit codes of the dynamic maps with one absmax per 256 elements. Gradients are
//! clipped to a global L2 norm first (HF `clip_grad_norm_`). Both updates run on the backend (`Backend::adamw`,
//! `Backend::adamw_8bit`) with their moments in device buffers. Checkpoints read both.

use std::collections::BTreeMap;

use crate::adapters::Param;
use crate::backend::{AdamStep, Backend, ADAM8_BLOCK as BLOCK};
use crate::error::{Error, Result};
use crate::formats::safetensors::OwnedTensor;

/// bitsandbytes' default `min_8bit_size`: smaller tensors keep 32-bit states even in 8-bit mode.
pub const MIN_8BIT_SIZE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateBits {
    B32,
    B8,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub bits: StateBits,
    /// Tensors with fewer elements keep 32-bit states in 8-bit mode.
    pub min_8bit_size: usize,
}

/// The two moments of one parameter.
enum Moments<B: Backend> {
    F32 {
        m: B::Buf,
        v: B::Buf,
    },
    /// Codes of m (signed map) and v (unsigned map), with per-block absmax.
    Q8 {
        m: B::Bytes,
        m_absmax: B::Buf,
        v: B::Bytes,
        v_absmax: B::Buf,
    },
}

/// Optimizer state: the step count and the moments of every parameter, keyed by the parameter's name.
pub struct OptimizerState<B: Backend> {
    pub step: u64,
    moments: BTreeMap<String, Moments<B>>,
}

impl<B: Backend> OptimizerState<B> {
    pub fn new() -> Self {
        OptimizerState { step: 0, moments: BTreeMap::new() }
    }

    /// The states as named tensors (`{param}.m`, `{param}.v`; 8-bit: `.m.codes`, `.m.absmax`, …) for a checkpoint.
    pub fn tensors(&self, be: &B) -> Result<BTreeMap<String, OwnedTensor>> {
        let mut out = BTreeMap::new();
        for (name, mo) in &self.moments {
            match mo {
                Moments::F32 { m, v } => {
                    let (m, v) = (be.download(m)?, be.download(v)?);
                    out.insert(format!("{name}.m"), OwnedTensor::f32(vec![m.len()], &m));
                    out.insert(format!("{name}.v"), OwnedTensor::f32(vec![v.len()], &v));
                }
                Moments::Q8 { m, m_absmax, v, v_absmax } => {
                    for (suffix, codes, absmax) in [("m", m, m_absmax), ("v", v, v_absmax)] {
                        let (codes, absmax) = (be.download_bytes(codes)?, be.download(absmax)?);
                        out.insert(format!("{name}.{suffix}.codes"), OwnedTensor::u8(vec![codes.len()], codes));
                        out.insert(format!("{name}.{suffix}.absmax"), OwnedTensor::f32(vec![absmax.len()], &absmax));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Rebuilds the state from `tensors` (as written by `tensors`) for the parameters `names` (name, numel).
    pub fn from_tensors(
        be: &B,
        step: u64,
        names: &[(String, usize)],
        get: &dyn Fn(&str) -> Option<Tensor>,
    ) -> std::result::Result<Self, String> {
        let mut moments = BTreeMap::new();
        for (name, n) in names {
            let want = |suffix: &str, len: usize| -> std::result::Result<Tensor, String> {
                let t = get(&format!("{name}{suffix}"))
                    .ok_or_else(|| format!("missing optimizer tensor `{name}{suffix}`"))?;
                if t.len() != len {
                    return Err(format!("optimizer tensor `{name}{suffix}` has {} elements, expected {len}", t.len()));
                }
                Ok(t)
            };
            let blocks = n.div_ceil(BLOCK);
            let up = |v: Vec<f32>| be.upload(&v).map_err(|e| e.to_string());
            let up_bytes = |v: Vec<u8>| be.upload_bytes(&v).map_err(|e| e.to_string());
            let mo = match get(&format!("{name}.m")) {
                Some(_) => Moments::F32 { m: up(want(".m", *n)?.f32()?)?, v: up(want(".v", *n)?.f32()?)? },
                None => Moments::Q8 {
                    m: up_bytes(want(".m.codes", *n)?.u8()?)?,
                    m_absmax: up(want(".m.absmax", blocks)?.f32()?)?,
                    v: up_bytes(want(".v.codes", *n)?.u8()?)?,
                    v_absmax: up(want(".v.absmax", blocks)?.f32()?)?,
                },
            };
            moments.insert(name.clone(), mo);
        }
        Ok(OptimizerState { step, moments })
    }
}

impl<B: Backend> Default for OptimizerState<B> {
    fn default() -> Self {
        Self::new()
    }
}

/// A stored tensor read back for `from_tensors`.
pub enum Tensor {
    F32(Vec<f32>),
    U8(Vec<u8>),
}

impl Tensor {
    fn len(&self) -> usize {
        match self {
            Tensor::F32(v) => v.len(),
            Tensor::U8(v) => v.len(),
        }
    }
    fn f32(self) -> std::result::Result<Vec<f32>, String> {
        match self {
            Tensor::F32(v) => Ok(v),
            Tensor::U8(_) => Err("expected an F32 tensor, found U8".into()),
        }
    }
    fn u8(self) -> std::result::Result<Vec<u8>, String> {
        match self {
            Tensor::U8(v) => Ok(v),
            Tensor::F32(_) => Err("expected a U8 tensor, found F32".into()),
        }
    }
}

/// Global L2 norm of all gradients (f64 accumulation).
pub fn grad_norm<'a, B: Backend + 'a>(be: &B, params: impl IntoIterator<Item = &'a Param<B>>) -> Result<f64> {
    let mut sq = 0f64;
    for p in params {
        sq += be.sum_squares(&p.grad)?;
    }
    Ok(sq.sqrt())
}

/// HF's clip coefficient: min(1, max_norm / (norm + 1e-6)); no clipping when max_norm ≤ 0.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f32 {
    if max_norm <= 0.0 {
        1.0
    } else {
        (max_norm / (norm + 1e-6)).min(1.0) as f32
    }
}

impl AdamW {
    /// One update of every parameter with learning rate `lr` (× each parameter's `lr_scale`) on gradients
    /// multiplied by `grad_coef` (the clip coefficient). `params` pairs names with parameters.
    pub fn step<B: Backend>(
        &self,
        be: &B,
        state: &mut OptimizerState<B>,
        params: Vec<(String, &mut Param<B>)>,
        lr: f32,
        grad_coef: f32,
    ) -> Result<()> {
        state.step += 1;
        let t = state.step as i32;
        let c1 = 1.0 - self.beta1.powi(t);
        let c2 = (1.0 - self.beta2.powi(t)).sqrt();
        for (name, p) in params {
            let n = p.numel();
            let eight = self.bits == StateBits::B8 && n >= self.min_8bit_size;
            if !state.moments.contains_key(&name) {
                let mo = if eight {
                    let blocks = n.div_ceil(BLOCK);
                    Moments::Q8 {
                        m: be.upload_bytes(&vec![127; n])?,
                        m_absmax: be.zeros(blocks)?,
                        v: be.upload_bytes(&vec![0; n])?,
                        v_absmax: be.zeros(blocks)?,
                    }
                } else {
                    Moments::F32 { m: be.zeros(n)?, v: be.zeros(n)? }
                };
                state.moments.insert(name.clone(), mo);
            }
            let s = self.adam_step(lr * p.lr_scale, c1, c2, grad_coef);
            p.grad_mut(be)?;
            match state.moments.get_mut(&name).expect("inserted above") {
                Moments::F32 { m, v } => {
                    if be.len(m) != n {
                        return Err(Error::Invalid(format!(
                            "optimizer state of `{name}` has {} elements, the parameter {n}",
                            be.len(m)
                        )));
                    }
                    be.adamw(&mut p.value, &p.grad, m, v, s)?;
                }
                Moments::Q8 { m, m_absmax, v, v_absmax } => {
                    be.adamw_8bit(&mut p.value, &p.grad, m, m_absmax, v, v_absmax, s)?
                }
            }
        }
        Ok(())
    }

    fn adam_step(&self, lr: f32, c1: f32, c2: f32, grad_coef: f32) -> AdamStep {
        AdamStep {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            lr,
            c1,
            c2,
            grad_coef,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    /// Adam in its textbook form, in f64: m̂ = m/(1−β1^t), v̂ = v/(1−β2^t), p −= lr·m̂/(√v̂ + eps).
    fn textbook(p: &mut [f64], grads: &[Vec<f64>], lr: f64, b1: f64, b2: f64, eps: f64) {
        let (mut m, mut v) = (vec![0.0; p.len()], vec![0.0; p.len()]);
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            for i in 0..p.len() {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let (mh, vh) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
                p[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
    }

    #[test]
    fn the_32bit_update_is_adam_with_bias_correction() {
        let opt = AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bits: StateBits::B32,
            min_8bit_size: MIN_8BIT_SIZE,
        };
        let n = 50;
        let grads: Vec<Vec<f64>> =
            (0..5).map(|s| (0..n).map(|i| ((i * 7 + s * 13) % 17) as f64 * 0.01 - 0.08).collect()).collect();
        let init: Vec<f64> = (0..n).map(|i| i as f64 * 0.02 - 0.5).collect();
        let mut want = init.clone();
        textbook(&mut want, &grads, 1e-3, 0.9, 0.999, 1e-8);
        let mut p: Vec<f32> = init.iter().map(|&x| x as f32).collect();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            let g: Vec<f32> = g.iter().map(|&x| x as f32).collect();
            Cpu::new()
                .adamw(
                    &mut p,
                    &g,
                    &mut m,
                    &mut v,
                    opt.adam_step(1e-3, 1.0 - 0.9f32.powi(t), (1.0 - 0.999f32.powi(t)).sqrt(), 1.0),
                )
                .unwrap();
        }
        for i in 0..n {
            assert!((p[i] as f64 - want[i]).abs() < 2e-6, "{i}: {} vs {}", p[i], want[i]);
        }
    }

    #[test]
    fn weight_decay_is_applied_after_the_step() {
        let opt = AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            bits: StateBits::B32,
            min_8bit_size: MIN_8BIT_SIZE,
        };
        let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.0], vec![0.0]);
        Cpu::new().adamw(&mut p, &vec![0.5], &mut m, &mut v, opt.adam_step(0.01, 0.1, (0.001f32).sqrt(), 1.0)).unwrap();
        // Step 1: m̂/√v̂ = sign(g) = 1 (eps negligible) → 1 − 0.01 = 0.99, then × (1 − 0.01·0.1).
        assert!((p[0] - 0.99 * 0.999).abs() < 1e-6, "{}", p[0]);
    }

    #[test]
    fn the_8bit_update_tracks_the_32bit_one() {
        let n = 2 * BLOCK + 17;
        let make =
            |bits| AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, bits, min_8bit_size: MIN_8BIT_SIZE };
        let (o32, o8) = (make(StateBits::B32), make(StateBits::B8));
        let mut p32: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut p8 = p32.clone();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let blocks = n.div_ceil(BLOCK);
        let (mut mc, mut ma, mut vc, mut va) = (vec![127u8; n], vec![0.0; blocks], vec![0u8; n], vec![0.0; blocks]);
        let be = Cpu::new();
        for t in 1..=20 {
            // Gradients of ½‖p − target‖² with a per-element target.
            let g32: Vec<f32> = p32.iter().enumerate().map(|(i, &x)| x - (i as f32 * 0.11).cos()).collect();
            let g8: Vec<f32> = p8.iter().enumerate().map(|(i, &x)| x - (i as f32 * 0.11).cos()).collect();
            let (c1, c2) = (1.0 - 0.9f32.powi(t), (1.0 - 0.999f32.powi(t)).sqrt());
            Cpu::new().adamw(&mut p32, &g32, &mut m, &mut v, o32.adam_step(0.01, c1, c2, 1.0)).unwrap();
            be.adamw_8bit(&mut p8, &g8, &mut mc, &mut ma, &mut vc, &mut va, o8.adam_step(0.01, c1, c2, 1.0)).unwrap();
        }
        let moved: f32 =
            p32.iter().zip((0..n).map(|i| (i as f32 * 0.37).sin())).map(|(a, b)| (a - b).abs()).sum::<f32>() / n as f32;
        let diff: f32 = p32.iter().zip(&p8).map(|(a, b)| (a - b).abs()).sum::<f32>() / n as f32;
        assert!(moved > 0.05, "the parameters moved {moved}");
        assert!(diff < 0.05 * moved, "8-bit drifted {diff} against a movement of {moved}");
        // The stored absmax is the block maximum of |m|, so the largest code of each block is ±1.
        for b in 0..blocks {
            let codes = &mc[b * BLOCK..((b + 1) * BLOCK).min(n)];
            assert!(codes.iter().any(|&c| c == 255 || c == 0), "block {b} has no full-scale code");
        }
    }

    #[test]
    fn a_non_finite_gradient_zeroes_the_moments_and_keeps_the_parameter() {
        let o8 = AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bits: StateBits::B8,
            min_8bit_size: MIN_8BIT_SIZE,
        };
        let mut p = vec![0.5f32; 4];
        let (mut mc, mut ma, mut vc, mut va) = (vec![127u8; 4], vec![0.0; 1], vec![0u8; 4], vec![0.0; 1]);
        Cpu::new()
            .adamw_8bit(
                &mut p,
                &vec![1.0, f32::NAN, -1.0, f32::INFINITY],
                &mut mc,
                &mut ma,
                &mut vc,
                &mut va,
                o8.adam_step(0.1, 0.1, 0.0316, 1.0),
            )
            .unwrap();
        assert_eq!((p[1], p[3]), (0.5, 0.5));
        assert!(p[0] < 0.5 && p[2] > 0.5);
        assert_eq!((vc[1], vc[3]), (0, 0));
    }

    #[test]
    fn clipping_follows_hf() {
        assert_eq!(clip_coefficient(0.1, 0.3), 1.0);
        assert!((clip_coefficient(0.6, 0.3) - 0.3 / (0.6 + 1e-6)) as f64 <= 1e-7);
        assert_eq!(clip_coefficient(10.0, 0.0), 1.0);
    }
}
