//! What makes an adapter method a method: its name, its own config keys and their validation, its PEFT JSON
//! form, its parameter count, how it merges and how it is built. Each method implements `MethodKind` in its own
//! file, and one line of the `methods!` list in `adapters/mod.rs` registers it: that line declares the module,
//! adds the `Method` variant and routes every call, so nothing else in qpeft names a method.
//!
//! A method's keys travel as one JSON object: the TOML `[adapter]` keys a rule sets (converted), and the
//! `qpeft.modules` entries of adapter_config.json, which are the same keys.

use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{Adapter, AdapterConfig};
use crate::backend::Backend;
use crate::error::Result;

/// What the base weight under a module is, for methods that depend on it (QA-LoRA's group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseKind {
    /// Not known (parameter accounting from shapes alone).
    Any,
    /// GPTQ / round-to-nearest int4 with groups of `group` inputs (QA-LoRA's base).
    Int4 { group: usize },
    /// Any other storage, by a name for messages ("bitsandbytes FP4", "a GGUF block format", …).
    Other(&'static str),
}

pub trait MethodKind: Clone + std::fmt::Debug + PartialEq + Send + Sync + 'static {
    /// The name in run configs and adapter files (`lora`, `qa-lora`, …).
    const NAME: &'static str;
    /// Other names accepted in run configs.
    const ALIASES: &'static [&'static str] = &[];
    /// The method's own keys, beyond the shared `method`, `rank`, `alpha`, `dropout` and `target`.
    const KEYS: &'static [&'static str] = &[];

    /// The method from its keys (`keys` may hold other keys too; `alpha` is the module's α, for defaults).
    fn from_keys(keys: &Map<String, Value>, alpha: f32) -> std::result::Result<Self, String>;
    /// The method's own keys as `from_keys` reads them back (none by default).
    fn to_keys(&self) -> Map<String, Value> {
        Map::new()
    }
    /// Why the method cannot adapt a linear `in → out` at `rank`, if it cannot (by default: a rank between 1 and
    /// the smaller dimension).
    fn check(&self, rank: usize, in_dim: usize, out_dim: usize) -> std::result::Result<(), String> {
        check_rank(rank, in_dim, out_dim)
    }
    /// Why the method cannot sit on this base, if it cannot.
    fn check_base(&self, _base: BaseKind) -> std::result::Result<(), String> {
        Ok(())
    }
    /// Trainable parameters on a linear `in → out` at `rank` (methods.md §11), without building anything.
    fn trainable(&self, rank: usize, in_dim: usize, out_dim: usize) -> usize;
    /// The rank reported for the module (a hierarchical adapter's is the sum of its levels').
    fn reported_rank(&self, rank: usize) -> usize {
        rank
    }
    /// The PEFT LoRA adapters (rank, α) per level when the method is saved as one plain PEFT adapter per level
    /// (`level_<i>/`); None when it is saved as one adapter.
    fn peft_levels(&self) -> Option<Vec<(usize, f32)>> {
        None
    }
    /// Whether `qpeft merge` folds the adapter exactly into GPTQ int4 zero points (else into 16-bit weights).
    fn merges_into_int4_zeros(&self) -> bool {
        false
    }
    /// Builds the adapter on a linear `in → out`; `cfg` has passed `check`.
    fn build<B: Backend + 'static>(
        &self,
        be: &B,
        cfg: &AdapterConfig,
        in_dim: usize,
        out_dim: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter<B>>>;
}

/// Key `name` of `keys`, if set.
pub fn key<T: DeserializeOwned>(keys: &Map<String, Value>, name: &str) -> std::result::Result<Option<T>, String> {
    match keys.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| format!("`{name}` = {v}: {e}")),
    }
}

/// Key `name` of `keys`, which `method` needs.
pub fn required<T: DeserializeOwned>(
    keys: &Map<String, Value>,
    name: &str,
    method: &str,
) -> std::result::Result<T, String> {
    key(keys, name)?.ok_or_else(|| format!("{method} needs `{name}`"))
}

/// A rank between 1 and the smaller dimension.
pub fn check_rank(rank: usize, in_dim: usize, out_dim: usize) -> std::result::Result<(), String> {
    let min = in_dim.min(out_dim);
    if rank == 0 || rank > min {
        return Err(format!("rank = {rank} must be in 1..={min} (min(in {in_dim}, out {out_dim}))"));
    }
    Ok(())
}

/// `what` = k divides the `side` dimension `dim`.
pub fn check_divides(what: &str, k: usize, dim: usize, side: &str) -> std::result::Result<(), String> {
    if k == 0 || !dim.is_multiple_of(k) {
        return Err(format!("{what} = {k} does not divide the {side} dimension {dim}"));
    }
    Ok(())
}

/// The registry: `methods! { Variant: module::Type, … }` declares each method's module and makes `Method`, the
/// enum of every registered method, with one forwarding call per `MethodKind` function.
macro_rules! methods {
    ($($variant:ident: $module:ident::$ty:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// An adapter method with its own key variables.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Method {
            $($variant($module::$ty),)*
        }

        $(impl From<$module::$ty> for Method {
            fn from(m: $module::$ty) -> Method {
                Method::$variant(m)
            }
        })*

        impl Method {
            /// Every registered method's name.
            pub const NAMES: &'static [&'static str] = &[$(<$module::$ty as $crate::adapters::MethodKind>::NAME),*];

            /// Whether any registered method reads config key `name`.
            pub fn knows_key(name: &str) -> bool {
                false $(|| <$module::$ty as $crate::adapters::MethodKind>::KEYS.contains(&name))*
            }

            /// Every method-specific key, for error messages.
            pub fn all_keys() -> Vec<&'static str> {
                let mut keys = Vec::new();
                $(keys.extend_from_slice(<$module::$ty as $crate::adapters::MethodKind>::KEYS);)*
                keys
            }

            /// The method called `name` (or an alias of it), from its keys.
            pub fn from_keys(name: &str, keys: &::serde_json::Map<String, ::serde_json::Value>, alpha: f32) -> std::result::Result<Method, String> {
                $(if name == <$module::$ty as $crate::adapters::MethodKind>::NAME
                    || <$module::$ty as $crate::adapters::MethodKind>::ALIASES.contains(&name)
                {
                    return <$module::$ty as $crate::adapters::MethodKind>::from_keys(keys, alpha).map(Method::$variant);
                })*
                Err(format!("method = `{name}` is not one of {}", Method::NAMES.join(", ")))
            }

            pub fn name(&self) -> &'static str {
                match self {
                    $(Method::$variant(_) => <$module::$ty as $crate::adapters::MethodKind>::NAME,)*
                }
            }

            pub fn to_keys(&self) -> ::serde_json::Map<String, ::serde_json::Value> {
                match self {
                    $(Method::$variant(m) => m.to_keys(),)*
                }
            }

            pub fn check(&self, rank: usize, in_dim: usize, out_dim: usize) -> std::result::Result<(), String> {
                match self {
                    $(Method::$variant(m) => m.check(rank, in_dim, out_dim),)*
                }
            }

            pub fn check_base(&self, base: $crate::adapters::BaseKind) -> std::result::Result<(), String> {
                match self {
                    $(Method::$variant(m) => m.check_base(base),)*
                }
            }

            pub fn trainable(&self, rank: usize, in_dim: usize, out_dim: usize) -> usize {
                match self {
                    $(Method::$variant(m) => m.trainable(rank, in_dim, out_dim),)*
                }
            }

            pub fn reported_rank(&self, rank: usize) -> usize {
                match self {
                    $(Method::$variant(m) => m.reported_rank(rank),)*
                }
            }

            pub fn peft_levels(&self) -> Option<Vec<(usize, f32)>> {
                match self {
                    $(Method::$variant(m) => m.peft_levels(),)*
                }
            }

            pub fn merges_into_int4_zeros(&self) -> bool {
                match self {
                    $(Method::$variant(m) => m.merges_into_int4_zeros(),)*
                }
            }

            pub(crate) fn build<B: $crate::backend::Backend + 'static>(
                &self,
                be: &B,
                cfg: &$crate::adapters::AdapterConfig,
                in_dim: usize,
                out_dim: usize,
                rng: &mut ::rand_chacha::ChaCha8Rng,
            ) -> $crate::error::Result<Box<dyn $crate::adapters::Adapter<B>>> {
                match self {
                    $(Method::$variant(m) => m.build(be, cfg, in_dim, out_dim, rng),)*
                }
            }
        }
    };
}
pub(crate) use methods;
