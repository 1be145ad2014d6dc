//! The vocabulary of a block's linear layers: which seven there are (`Proj`), where their inputs come from
//! (`InputSite`), their kind (attention or MLP), their depth half, their shapes and their HF module names.
//!
//! Depth halves: with L layers, the first half is layers 0..⌊L/2⌋ (nearest the input) and the second half the
//! rest — the papers' depth groups 1 and 2.

use super::spec::ModelSpec;

/// The seven linear layers of a block, by their HF module names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// Where a linear layer's input comes from: linears with the same site see the same input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputSite {
    /// The attention norm's output (q, k, v).
    Attention,
    /// The attention's output (o).
    AttentionOutput,
    /// The MLP norm's output (gate, up).
    Mlp,
    /// The gated activation (down).
    MlpOutput,
}

/// The papers' layer types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// q, k, v, o.
    Attention,
    /// gate, up, down.
    Mlp,
}

/// The papers' depth groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Depth {
    FirstHalf,
    SecondHalf,
}

impl Depth {
    /// The half layer `layer` of `layers` belongs to.
    pub fn of(layer: usize, layers: usize) -> Depth {
        if layer < layers / 2 {
            Depth::FirstHalf
        } else {
            Depth::SecondHalf
        }
    }
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The module path inside a layer, e.g. `self_attn.q_proj`.
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// `q_proj`, …, `down_proj`: the names PEFT's `target_modules` and qpeft's rules use.
    pub fn short_name(self) -> &'static str {
        self.module().rsplit('.').next().unwrap_or_default()
    }

    /// The projection called `name` (`q_proj`, …).
    pub fn from_short_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.short_name() == name)
    }

    /// The full module path in layer `layer`, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.module())
    }

    pub fn kind(self) -> Kind {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => Kind::Attention,
            Proj::Gate | Proj::Up | Proj::Down => Kind::Mlp,
        }
    }

    pub fn site(self) -> InputSite {
        match self {
            Proj::Q | Proj::K | Proj::V => InputSite::Attention,
            Proj::O => InputSite::AttentionOutput,
            Proj::Gate | Proj::Up => InputSite::Mlp,
            Proj::Down => InputSite::MlpOutput,
        }
    }

    /// Whether this linear has a bias in the given architecture.
    pub fn has_bias(self, s: &ModelSpec) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => s.qkv_bias,
            Proj::O => s.o_bias,
            Proj::Gate | Proj::Up | Proj::Down => s.mlp_bias,
        }
    }

    /// (out_dim, in_dim) of this linear.
    pub fn dims(self, s: &ModelSpec) -> (usize, usize) {
        let (h, q, kv, ff) = (s.hidden_size, s.q_dim(), s.kv_dim(), s.intermediate_size);
        match self {
            Proj::Q => (q, h),
            Proj::K | Proj::V => (kv, h),
            Proj::O => (h, q),
            Proj::Gate | Proj::Up => (ff, h),
            Proj::Down => (h, ff),
        }
    }
}
