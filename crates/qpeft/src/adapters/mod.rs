//! Adapters on a frozen (quantized) linear layer: y = base(x) + Δ(x). One file per method; this module holds
//! the trait, the resolved per-module configuration, and the pieces every method is built from (the adapter's
//! view of its input, a scaled rank-r product, initialisers).
//!
//! Backward never stores activations: it receives the layer input again and recomputes the rank-r side
//! (r ≪ in, so that is cheap) unless the caller kept the forward's (`Adapter::backward_term`'s `hidden`), and dropout
//! masks come from a counter-based RNG keyed by `Pass::seed`. Methods whose last product is s·h·Fᵀ hand it to their
//! linear as a term (`Term`, `backend::Tail`), which a GPU folds into the base GEMM.

mod method;
pub mod peft;
pub mod set;

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use method::{check_divides, check_rank, key, required, BaseKind, MethodKind};

use crate::backend::{Backend, Groups, MatMul, Tail};
use crate::error::Result;

// The registered methods: a new method is its file and one line here.
method::methods! {
    Lora: lora::LoraMethod,
    IrQlora: ir_qlora::IrQloraMethod,
    QaLora: qa_lora::QaLoraMethod,
    QBara: q_bara::QBaraMethod,
    QaHira: qa_hira::QaHiraMethod,
    Hierarchical: hierarchical::HierarchicalMethod,
}

/// One module's adapter, fully resolved (see `plan`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    pub method: Method,
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
}

impl AdapterConfig {
    /// LoRA scaling s = α/r.
    pub fn scaling(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Trainable parameters on a linear `in → out` (methods.md §11), without building anything.
    pub fn trainable(&self, in_dim: usize, out_dim: usize) -> usize {
        self.method.trainable(self.rank, in_dim, out_dim)
    }

    /// Why this configuration cannot adapt a linear `in → out`, if it cannot.
    pub fn check(&self, in_dim: usize, out_dim: usize) -> std::result::Result<(), String> {
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout = {} is outside [0, 1)", self.dropout));
        }
        if !self.alpha.is_finite() {
            return Err(format!("alpha = {} is not finite", self.alpha));
        }
        self.method.check(self.rank, in_dim, out_dim)
    }
}

/// A trainable tensor with its gradient (same shape, accumulated by `backward`).
pub struct Param<B: Backend> {
    /// The PEFT state-dict suffix, e.g. `lora_A.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub value: B::Buf,
    /// Empty until a backward first accumulates into it (`grad_mut`), and again after `AdapterSet::zero_grads`:
    /// as with PyTorch's `.grad = None`, the gradients of blocks that backward has not reached yet take no
    /// memory, so they never coexist with all of the checkpointed activations. Empty reads as zero.
    pub grad: B::Buf,
    /// Multiplies the learning rate (H-QLoRA per-level rates); 1 elsewhere.
    pub lr_scale: f32,
}

impl<B: Backend> Param<B> {
    pub fn new(be: &B, name: impl Into<String>, shape: Vec<usize>, init: &[f32], lr_scale: f32) -> Result<Self> {
        debug_assert_eq!(init.len(), shape.iter().product::<usize>());
        Ok(Param { name: name.into(), shape, value: be.upload(init)?, grad: be.zeros(0)?, lr_scale })
    }
    /// The gradient to accumulate into, allocated (zero) on first use.
    pub fn grad_mut(&mut self, be: &B) -> Result<&mut B::Buf> {
        if be.len(&self.grad) == 0 {
            self.grad = be.zeros(self.numel())?;
        }
        Ok(&mut self.grad)
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One forward/backward call: whether dropout is active, and the seed of its masks (unique per step, layer
/// and module, so a recomputation or the backward regenerates the same mask).
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    pub training: bool,
    pub seed: u64,
    /// The batch row the call's first row is: a range of rows run on its own draws the rows' part of the
    /// whole batch's mask.
    pub first_row: usize,
}

pub trait Adapter<B: Backend>: Send + Sync {
    /// y ([rows, out]) (+)= Δ(x) for x [rows, in], given as the operand its base product reads (`Backend::operand`):
    /// the products on x read the same 16-bit copy in the 16-bit modes.
    fn forward(
        &self,
        be: &B,
        x: &B::Operand<'_>,
        rows: usize,
        pass: Pass,
        y: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// Given the same x and dy = ∂L/∂y as the operand the base's input gradient reads: dx (+)= ∂L/∂x through Δ, and
    /// every parameter's grad += its gradient. x comes as its values: the backward of a linear does not convert its
    /// input (only dy), so the products on x run in TF32 here, and in the 16-bit modes the recomputed hidden state
    /// differs from the forward's by x's 16-bit rounding (converting x again would cost more than the products save).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        be: &B,
        x: &B::Buf,
        dy: &B::Operand<'_>,
        rows: usize,
        pass: Pass,
        dx: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// The rank of the terms `forward_term` and `backward_term` return; 0 for a method that returns none.
    fn term_rank(&self) -> usize {
        0
    }
    /// Δ(x) as a term s·h·Fᵀ for the linear's product to take in (`Backend::linear_from`'s tail), for a method whose
    /// output is one; None leaves Δ(x) to `forward`.
    fn forward_term(&self, _be: &B, _x: &B::Operand<'_>, _rows: usize, _pass: Pass) -> Result<Option<Term<'_, B>>> {
        Ok(None)
    }
    /// `backward` with dx's part left as a term h·F for the linear's input gradient to take in
    /// (`Backend::linear_backward_from`'s tail): accumulates every parameter's gradient and returns the term, for a
    /// method whose input gradient is one in this pass; None (nothing done) leaves it all to `backward`. `hidden` is
    /// the h of this pass's `forward_term` where the caller kept it (otherwise it is computed again, from x's values).
    fn backward_term(
        &mut self,
        _be: &B,
        _x: &B::Buf,
        _dy: &B::Operand<'_>,
        _rows: usize,
        _pass: Pass,
        _hidden: Option<B::Buf>,
    ) -> Result<Option<Term<'_, B>>> {
        Ok(None)
    }
    fn params(&self) -> Vec<&Param<B>>;
    fn params_mut(&mut self) -> Vec<&mut Param<B>>;
    /// ΔW [out, in] with Δ(x) = x·ΔWᵀ at inference (no dropout), for merging into 16/32-bit weights.
    fn delta_weight(&self, be: &B) -> Result<Vec<f32>>;
    fn trainable(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }
}

/// An adapter's last product, handed to its linear's product (`Tail`): s·h·Fᵀ in forward (F = B [out, r]), h·F in
/// backward (h = ∂L/∂h, F = A [r, in]).
pub struct Term<'s, B: Backend> {
    pub h: B::Buf,
    pub factor: &'s B::Buf,
    pub rank: usize,
    pub scale: f32,
}

impl<B: Backend> Term<'_, B> {
    pub fn tail(&self) -> Tail<'_, B> {
        Tail { h: &self.h, factor: self.factor, rank: self.rank, scale: self.scale }
    }
}

/// Builds the adapter `cfg` describes on a linear `in → out`, initialised from `seed`.
pub fn build<B: Backend + 'static>(
    be: &B,
    cfg: &AdapterConfig,
    in_dim: usize,
    out_dim: usize,
    seed: u64,
) -> Result<Box<dyn Adapter<B>>> {
    cfg.check(in_dim, out_dim).map_err(crate::Error::Invalid)?;
    cfg.method.build(be, cfg, in_dim, out_dim, &mut ChaCha8Rng::seed_from_u64(seed))
}

/// U(−bound, bound) samples in f32.
pub(crate) fn uniform(rng: &mut ChaCha8Rng, n: usize, bound: f64) -> Vec<f32> {
    (0..n).map(|_| (((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound) as f32).collect()
}

/// PEFT's LoRA A init, kaiming_uniform(a = √5) on [rows, fan_in]: U(±1/√fan_in).
pub(crate) fn kaiming(rng: &mut ChaCha8Rng, rows: usize, fan_in: usize) -> Vec<f32> {
    uniform(rng, rows * fan_in, 1.0 / (fan_in as f64).sqrt())
}

/// The adapter's view of its input: u = dropout(avgpool(x)), either step optional.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InputView {
    pub in_dim: usize,
    /// Average pooling of the input features in contiguous groups.
    pub pool: Option<Groups>,
    pub dropout: f32,
}

impl InputView {
    pub fn width(&self) -> usize {
        self.pool.map_or(self.in_dim, |g| g.groups)
    }

    /// Whether u = x in this pass (no pooling, no active dropout).
    pub fn is_identity(&self, pass: Pass) -> bool {
        self.pool.is_none() && !(pass.training && self.dropout > 0.0)
    }

    /// The mask element of the call's first value.
    fn mask_start(&self, pass: Pass) -> u64 {
        (pass.first_row * self.width()) as u64
    }

    /// u computed from x's values; None when the view is the identity in this pass (neither pooling nor active
    /// dropout, as for LoRA at inference).
    fn computed<B: Backend>(&self, be: &B, x: &B::Buf, rows: usize, pass: Pass) -> Result<Option<B::Buf>> {
        let dropout = pass.training && self.dropout > 0.0;
        let pooled = match self.pool {
            Some(g) => {
                let mut u = be.zeros(rows * g.groups)?;
                be.group_reduce(x, rows, g, true, 1.0, &mut u, false)?;
                Some(u)
            }
            None => None,
        };
        if !dropout {
            return Ok(pooled);
        }
        let mut d = be.zeros(rows * self.width())?;
        be.dropout(pooled.as_ref().unwrap_or(x), self.dropout, pass.seed, self.mask_start(pass), &mut d)?;
        Ok(Some(d))
    }

    /// u in forward, from the operand of x: the operand itself (no copy) for the identity view.
    pub fn of_operand<'v, 'a, B: Backend>(
        &self,
        be: &B,
        x: &'v B::Operand<'a>,
        rows: usize,
        pass: Pass,
    ) -> Result<Viewed<'v, 'a, B>> {
        Ok(match self.computed(be, be.operand_values(x), rows, pass)? {
            Some(u) => Viewed::Owned(u),
            None => Viewed::Operand(x),
        })
    }

    /// u in backward, from x's values: x itself (no copy) for the identity view.
    pub fn of_values<'v, 'a, B: Backend>(
        &self,
        be: &B,
        x: &'a B::Buf,
        rows: usize,
        pass: Pass,
    ) -> Result<Viewed<'v, 'a, B>> {
        Ok(match self.computed(be, x, rows, pass)? {
            Some(u) => Viewed::Owned(u),
            None => Viewed::Input(x),
        })
    }

    /// dx (+)= viewᵀ(dh·W) for dh [rows, k] and W [k, width]. When the view is the identity in this pass (no
    /// pooling, no active dropout, as in LoRA without dropout) the product goes straight into dx, with no [rows, in]
    /// temporary and no separate add.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_product<B: Backend>(
        &self,
        be: &B,
        dh: &B::Buf,
        w: &B::Buf,
        k: usize,
        rows: usize,
        pass: Pass,
        dx: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        let product = MatMul::new(rows, self.width(), k);
        if self.is_identity(pass) {
            return be.matmul(dh, w, dx, product.acc(accumulate));
        }
        let mut du = be.uninit(rows * self.width())?;
        be.matmul(dh, w, &mut du, product)?;
        self.backward(be, du, rows, pass, dx, accumulate)
    }

    /// dx (+)= viewᵀ(du): the same dropout mask, then the pooling's adjoint.
    fn backward<B: Backend>(
        &self,
        be: &B,
        du: B::Buf,
        rows: usize,
        pass: Pass,
        dx: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        let du = if pass.training && self.dropout > 0.0 {
            let mut d = be.zeros(rows * self.width())?;
            be.dropout(&du, self.dropout, pass.seed, self.mask_start(pass), &mut d)?;
            d
        } else {
            du
        };
        match self.pool {
            Some(g) => be.group_expand(&du, rows, g, true, 1.0, dx, accumulate),
            None if accumulate => be.add(dx, &du),
            None => {
                *dx = du;
                Ok(())
            }
        }
    }
}

/// The adapter's input view: the layer input as its base product's operand (forward) or its values (backward), or
/// computed from them.
pub(crate) enum Viewed<'v, 'a, B: Backend + 'a> {
    Operand(&'v B::Operand<'a>),
    Input(&'a B::Buf),
    Owned(B::Buf),
}

impl<B: Backend> Viewed<'_, '_, B> {
    pub fn values<'s>(&'s self, be: &B) -> &'s B::Buf {
        match self {
            Viewed::Operand(x) => be.operand_values(x),
            Viewed::Input(x) => x,
            Viewed::Owned(u) => u,
        }
    }

    /// out (+)= alpha·u·op(b) (`shape` as `MatMul`, u not transposed): on the operand's 16-bit copy where u is the
    /// base product's operand, in TF32 otherwise.
    pub fn matmul(&self, be: &B, b: &B::Buf, out: &mut B::Buf, shape: MatMul) -> Result<()> {
        match self {
            Viewed::Operand(x) => be.matmul_from(x, b, out, shape),
            _ => be.matmul(self.values(be), b, out, shape),
        }
    }
}

/// The scaled rank-r product z = s·(u·Aᵀ)·Bᵀ with A [r, n_in] and B [n_out, r], shared by every method but
/// QA-HiRA. h = u·Aᵀ is recomputed in backward.
pub(crate) struct LowRank<B: Backend> {
    pub a: Param<B>,
    pub b: Param<B>,
    pub rank: usize,
    pub n_in: usize,
    pub n_out: usize,
    pub scaling: f32,
}

impl<B: Backend> LowRank<B> {
    /// A from `a_init`, B zero (PEFT), names prefixed by `prefix`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        be: &B,
        prefix: &str,
        rank: usize,
        n_in: usize,
        n_out: usize,
        scaling: f32,
        a_init: &[f32],
        lr_scale: f32,
    ) -> Result<Self> {
        let a = Param::new(be, format!("{prefix}lora_A.weight"), vec![rank, n_in], a_init, lr_scale)?;
        let b =
            Param::new(be, format!("{prefix}lora_B.weight"), vec![n_out, rank], &vec![0.0; n_out * rank], lr_scale)?;
        Ok(LowRank { a, b, rank, n_in, n_out, scaling })
    }

    /// h = u·Aᵀ [rows, r].
    pub fn hidden(&self, be: &B, u: &Viewed<B>, rows: usize) -> Result<B::Buf> {
        let mut h = be.uninit(rows * self.rank)?;
        u.matmul(be, &self.a.value, &mut h, MatMul::new(rows, self.rank, self.n_in).bt())?;
        Ok(h)
    }

    /// z = s·(u·Aᵀ)·Bᵀ as a term for the linear's product.
    pub fn forward_term(&self, be: &B, u: &Viewed<B>, rows: usize) -> Result<Term<'_, B>> {
        Ok(Term { h: self.hidden(be, u, rows)?, factor: &self.b.value, rank: self.rank, scale: self.scaling })
    }

    /// z (+)= s·h·Bᵀ [rows, n_out].
    pub fn project(&self, be: &B, h: &B::Buf, rows: usize, z: &mut B::Buf, accumulate: bool) -> Result<()> {
        be.matmul(
            h,
            &self.b.value,
            z,
            MatMul::new(rows, self.n_out, self.rank).bt().scaled(self.scaling).acc(accumulate),
        )
    }

    /// Given dz = ∂L/∂z as an operand: dB += s·dzᵀ·h, returns dh = s·dz·B (both products on dz's 16-bit copy).
    pub fn backward_b(&mut self, be: &B, h: &B::Buf, dz: &B::Operand<'_>, rows: usize) -> Result<B::Buf> {
        let s = self.scaling;
        let db = MatMul::new(self.n_out, self.rank, rows).at().scaled(s).acc(true);
        be.matmul_from(dz, h, self.b.grad_mut(be)?, db)?;
        let mut dh = be.uninit(rows * self.rank)?;
        be.matmul_from(dz, &self.b.value, &mut dh, MatMul::new(rows, self.rank, self.n_out).scaled(s))?;
        Ok(dh)
    }

    /// Given dh: dA += dhᵀ·u, and dx (+)= viewᵀ(dh·A) for the input view u = view(x).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_a(
        &mut self,
        be: &B,
        u: &B::Buf,
        dh: &B::Buf,
        rows: usize,
        view: &InputView,
        pass: Pass,
        dx: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.accumulate_da(be, u, dh, rows)?;
        view.backward_product(be, dh, &self.a.value, self.rank, rows, pass, dx, accumulate)
    }

    /// dA += dhᵀ·u.
    fn accumulate_da(&mut self, be: &B, u: &B::Buf, dh: &B::Buf, rows: usize) -> Result<()> {
        be.matmul(dh, u, self.a.grad_mut(be)?, MatMul::new(self.rank, self.n_in, rows).at().acc(true))
    }

    /// `backward` for an identity view (u = x), given h if it was kept: dB, dA accumulate, and dx's part dh·A is
    /// returned as a term.
    pub fn backward_term(
        &mut self,
        be: &B,
        x: &B::Buf,
        h: Option<B::Buf>,
        dz: &B::Operand<'_>,
        rows: usize,
    ) -> Result<Term<'_, B>> {
        let h = match h {
            Some(h) => h,
            None => self.hidden(be, &Viewed::Input(x), rows)?,
        };
        let dh = self.backward_b(be, &h, dz, rows)?;
        drop(h);
        self.accumulate_da(be, x, &dh, rows)?;
        Ok(Term { h: dh, factor: &self.a.value, rank: self.rank, scale: 1.0 })
    }

    /// Both steps: dB, dA accumulate, dx (+)= viewᵀ(du).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &B,
        u: &B::Buf,
        h: &B::Buf,
        dz: &B::Operand<'_>,
        rows: usize,
        view: &InputView,
        pass: Pass,
        dx: &mut B::Buf,
        accumulate: bool,
    ) -> Result<()> {
        let dh = self.backward_b(be, h, dz, rows)?;
        self.backward_a(be, u, &dh, rows, view, pass, dx, accumulate)
    }

    pub fn params(&self) -> Vec<&Param<B>> {
        vec![&self.a, &self.b]
    }
    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        vec![&mut self.a, &mut self.b]
    }

    /// s·B·A [n_out, n_in] on the host, accumulated in f64.
    pub fn product(&self, be: &B) -> Result<Vec<f64>> {
        let (a, b) = (be.download(&self.a.value)?, be.download(&self.b.value)?);
        let s = self.scaling as f64;
        let mut out = vec![0f64; self.n_out * self.n_in];
        for j in 0..self.n_out {
            for k in 0..self.rank {
                let bjk = s * b[j * self.rank + k] as f64;
                if bjk != 0.0 {
                    for (o, &aki) in
                        out[j * self.n_in..(j + 1) * self.n_in].iter_mut().zip(&a[k * self.n_in..(k + 1) * self.n_in])
                    {
                        *o += bjk * aki as f64;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Expands a pooled-space ΔW [n_out, n_in] to [out, in]: entry (j, i) takes (⌊j/ko⌋, ⌊i/ki⌋) divided by ki
/// (the input pooling averages ki features; the output repeat copies ko times).
pub(crate) fn expand_delta(small: &[f64], n_out: usize, n_in: usize, ko: usize, ki: usize) -> Vec<f32> {
    let (out, inn) = (n_out * ko, n_in * ki);
    let mut w = vec![0f32; out * inn];
    for j in 0..out {
        for i in 0..inn {
            w[j * inn + i] = (small[(j / ko) * n_in + i / ki] / ki as f64) as f32;
        }
    }
    w
}
