//! The GPTQ algorithm (AutoGPTQ `GPTQ.fasterquant`, no act-order, no static groups; methods.md §1.4).
//!
//! Follows AutoGPTQ in the details that change codes: dead input columns (zero Hessian diagonal) get H_ii = 1
//! and a zero weight; damping is `percdamp · mean(diag H)`; columns are processed in blocks of 128 and the
//! quantization error is pushed onto the rest of the block column by column, and onto the later blocks once per
//! block; a group's scale and zero are computed when its first column is reached, from the weights as they were
//! at the start of the current block (AutoGPTQ reads the outer matrix, which is only updated between blocks).
//! Linear algebra is done in f64, the column loop in f32 like AutoGPTQ.

use rayon::prelude::*;

use super::int4::GroupParams;
use crate::error::{Error, Result};
use crate::linalg::{gemm_strided, Strided};

/// Accumulates H = Σ x xᵀ over calibration inputs of one linear layer (the 2/N factor of GPTQ cancels out).
#[derive(Clone, Debug)]
pub struct Hessian {
    pub dim: usize,
    /// [dim, dim], f32 like AutoGPTQ.
    pub h: Vec<f32>,
    pub rows: usize,
}

impl Hessian {
    pub fn new(dim: usize) -> Self {
        Hessian { dim, h: vec![0.0; dim * dim], rows: 0 }
    }

    /// Adds `x` [rows, dim] (row-major).
    pub fn add(&mut self, x: &[f32]) {
        let rows = x.len() / self.dim;
        let d = self.dim;
        // h[d×d] += xᵀ[d×rows] · x[rows×d]
        gemm_strided(
            (d, d, rows),
            &mut self.h,
            Strided::rows(d),
            x,
            Strided::rows(d).t(),
            x,
            Strided::rows(d),
            1.0,
            true,
            true,
        );
        self.rows += rows;
    }

    /// tr(D H Dᵀ) for D [out, dim]: the summed squared output error ‖X Dᵀ‖² over the calibration rows.
    pub fn quadratic(&self, d: &[f32]) -> f64 {
        let n = self.dim;
        let out = d.len() / n;
        let mut dh = vec![0.0f32; d.len()];
        gemm_strided(
            (out, n, n),
            &mut dh,
            Strided::rows(n),
            d,
            Strided::rows(n),
            &self.h,
            Strided::rows(n),
            1.0,
            false,
            true,
        );
        dh.par_iter().zip(d).map(|(&a, &b)| a as f64 * b as f64).sum()
    }
}

/// GPTQ settings; AutoGPTQ's defaults apart from the group size.
#[derive(Clone, Copy, Debug)]
pub struct GptqConfig {
    pub group: usize,
    pub sym: bool,
    pub block: usize,
}

impl GptqConfig {
    pub fn new(group: usize, sym: bool) -> Self {
        GptqConfig { group, sym, block: 128 }
    }
}

/// What GPTQ needs from a Hessian, shared by every linear that sees the same input: the dead columns and U
/// with (H + damping)⁻¹ = UᵀU.
pub struct Factor {
    pub dim: usize,
    dead: Vec<bool>,
    u: Vec<f32>,
}

impl Factor {
    /// AutoGPTQ's preparation: dead columns get H_ii = 1, then H += percdamp · mean(diag H) · I.
    pub fn new(hessian: &Hessian, percdamp: f64) -> Result<Factor> {
        let n = hessian.dim;
        let mut h: Vec<f64> = hessian.h.iter().map(|&v| v as f64).collect();
        let mut dead = vec![false; n];
        for (i, d) in dead.iter_mut().enumerate() {
            if h[i * n + i] == 0.0 {
                h[i * n + i] = 1.0;
                *d = true;
            }
        }
        let damp = percdamp * (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
        for i in 0..n {
            h[i * n + i] += damp;
        }
        let u = upper_cholesky_of_inverse(&h, n)?.into_iter().map(|v| v as f32).collect();
        Ok(Factor { dim: n, dead, u })
    }
}

/// Quantizes `w` [out, in] with GPTQ. `find` computes a group row's parameters (plain AutoGPTQ:
/// `GroupParams::find(row, sym, 1.0)`). Returns codes [out, in] and parameters [out, groups].
pub fn quantize(
    w: &[f32],
    out_dim: usize,
    factor: &Factor,
    cfg: GptqConfig,
    find: impl Fn(&[f32]) -> GroupParams + Sync,
) -> Result<(Vec<u8>, Vec<GroupParams>)> {
    let n = factor.dim;
    if cfg.group == 0 || !n.is_multiple_of(cfg.group) || w.len() != out_dim * n {
        return Err(Error::Invalid(format!(
            "GPTQ: group {} and weight of {} values do not fit in_dim {n}",
            cfg.group,
            w.len()
        )));
    }
    let (g, groups) = (cfg.group, n / cfg.group);
    let u = &factor.u;
    let mut w = w.to_vec();
    for (i, _) in factor.dead.iter().enumerate().filter(|(_, d)| **d) {
        for j in 0..out_dim {
            w[j * n + i] = 0.0;
        }
    }
    let mut codes = vec![0u8; out_dim * n];
    let mut params = vec![GroupParams { scale: 0.0, zero: 0.0 }; out_dim * groups];
    let mut start = 0;
    while start < n {
        let end = (start + cfg.block).min(n);
        let width = end - start;
        let mut errs = vec![0.0f32; out_dim * width];
        // Rows are independent inside a block: each row quantizes its columns left to right.
        w.par_chunks_mut(n)
            .zip(codes.par_chunks_mut(n))
            .zip(params.par_chunks_mut(groups))
            .zip(errs.par_chunks_mut(width))
            .for_each(|(((row, row_codes), row_params), row_errs)| {
                let outer = row.to_vec();
                for i in start..end {
                    if i % g == 0 {
                        row_params[i / g] = find(&outer[i..i + g]);
                    }
                    let p = row_params[i / g];
                    let q = p.code(row[i]);
                    row_codes[i] = q;
                    let err = (row[i] - p.dequantize(q)) / u[i * n + i];
                    for c in i + 1..end {
                        row[c] -= err * u[i * n + c];
                    }
                    row_errs[i - start] = err;
                }
            });
        if end < n {
            // w[:, end..] -= errs[out × width] · u[start..end, end..]
            let rest = n - end;
            gemm_strided(
                (out_dim, rest, width),
                &mut w,
                Strided::rows(n).at(end),
                &errs,
                Strided::rows(width),
                u,
                Strided::rows(n).at(start * n + end),
                -1.0,
                true,
                true,
            );
        }
        start = end;
    }
    Ok((codes, params))
}

/// U upper-triangular with H⁻¹ = Uᵀ U (what AutoGPTQ gets from cholesky → cholesky_inverse → cholesky(upper)).
/// With J the index reversal, J H J = L Lᵀ gives H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), so U = J L⁻¹ J: one Cholesky
/// factorization and one triangular inverse.
fn upper_cholesky_of_inverse(h: &[f64], n: usize) -> Result<Vec<f64>> {
    let rev = |i: usize| n - 1 - i;
    // Lower Cholesky factor of the reversed matrix, column by column (rows of a column in parallel).
    let mut l = vec![0.0f64; n * n];
    for j in 0..n {
        let a = h[rev(j) * n + rev(j)] - dot(&l[j * n..j * n + j], &l[j * n..j * n + j]);
        if a <= 0.0 || !a.is_finite() {
            return Err(Error::Invalid(format!(
                "GPTQ: the damped Hessian is not positive definite (pivot {a:e} at column {}); add calibration data or raise the damping",
                rev(j)
            )));
        }
        let d = a.sqrt();
        l[j * n + j] = d;
        let (done, below) = l.split_at_mut((j + 1) * n);
        let lj = &done[j * n..j * n + j];
        below.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            let i = j + 1 + r;
            row[j] = (h[rev(i) * n + rev(j)] - dot(&row[..j], lj)) / d;
        });
    }
    // L⁻¹ column by column: L x = e_c by forward substitution (contiguous rows of L), columns in parallel.
    let cols: Vec<Vec<f64>> = (0..n)
        .into_par_iter()
        .map(|c| {
            let mut x = vec![0.0f64; n];
            for i in c..n {
                let rhs = if i == c { 1.0 } else { 0.0 };
                x[i] = (rhs - dot(&l[i * n + c..i * n + i], &x[c..i])) / l[i * n + i];
            }
            x
        })
        .collect();
    // U = J L⁻¹ J: U[a][b] = L⁻¹[rev a][rev b], upper triangular.
    let mut u = vec![0.0f64; n * n];
    for a in 0..n {
        for b in a..n {
            u[a * n + b] = cols[rev(b)][rev(a)];
        }
    }
    Ok(u)
}

/// Dot product with 8 independent accumulators, so the compiler can vectorize it.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_factor_of_inverse() {
        // H = [[4, 2], [2, 3]]: H⁻¹ = [[3, -2], [-2, 4]] / 8. U = [[a, b], [0, c]] with UᵀU = [[a², ab],
        // [ab, b² + c²]] = H⁻¹: a = √(3/8), b = -(1/4)/a, c = √(1/2 - b²) = √(1/3).
        let u = upper_cholesky_of_inverse(&[4.0, 2.0, 2.0, 3.0], 2).unwrap();
        let a = (3.0f64 / 8.0).sqrt();
        let expected = [a, -0.25 / a, 0.0, (1.0f64 / 3.0).sqrt()];
        for (a, b) in u.iter().zip(expected) {
            assert!((a - b).abs() < 1e-15, "{u:?}");
        }
        assert!(upper_cholesky_of_inverse(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
    }
}
