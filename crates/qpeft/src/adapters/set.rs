//! The adapters of a whole decoder: at most one per (layer, linear), built from per-module configurations.

use super::{build, Adapter, AdapterConfig, Param};
use crate::arch::ModelSpec;
use crate::arch::Proj;
use crate::backend::Backend;
use crate::error::Result;

pub struct AdapterSet<B: Backend> {
    /// [layer][Proj index in `Proj::ALL`].
    slots: Vec<Vec<Option<Box<dyn Adapter<B>>>>>,
}

/// A stable per-module seed: the run seed mixed with the layer and the projection.
pub fn module_seed(seed: u64, layer: usize, proj: Proj) -> u64 {
    let idx = Proj::ALL.iter().position(|&p| p == proj).unwrap_or(0) as u64;
    let mut z = seed ^ ((layer as u64) << 8 | idx).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 29)
}

impl<B: Backend + 'static> AdapterSet<B> {
    /// Builds the adapter `resolve(layer, proj)` asks for on each linear (None leaves it frozen).
    pub fn build(
        be: &B,
        spec: &ModelSpec,
        seed: u64,
        resolve: impl Fn(usize, Proj) -> Option<AdapterConfig>,
    ) -> Result<Self> {
        let mut slots = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            let mut row = Vec::with_capacity(Proj::ALL.len());
            for p in Proj::ALL {
                let (out_dim, in_dim) = p.dims(spec);
                row.push(match resolve(l, p) {
                    Some(cfg) => Some(
                        build(be, &cfg, in_dim, out_dim, module_seed(seed, l, p))
                            .map_err(|e| crate::Error::Invalid(format!("model.layers.{l}.{}: {e}", p.module())))?,
                    ),
                    None => None,
                });
            }
            slots.push(row);
        }
        Ok(AdapterSet { slots })
    }
}

impl<B: Backend> AdapterSet<B> {
    pub fn get(&self, layer: usize, proj: Proj) -> Option<&dyn Adapter<B>> {
        self.slots.get(layer)?[proj as usize].as_deref()
    }
    pub fn get_mut(&mut self, layer: usize, proj: Proj) -> Option<&mut (dyn Adapter<B> + 'static)> {
        self.slots.get_mut(layer)?[proj as usize].as_deref_mut()
    }

    /// Every parameter with its full PEFT-style name (`model.layers.{l}.self_attn.q_proj.lora_A.weight`).
    pub fn named_params(&self) -> Vec<(String, &Param<B>)> {
        let mut out = Vec::new();
        for (l, row) in self.slots.iter().enumerate() {
            for (p, slot) in Proj::ALL.iter().zip(row) {
                if let Some(a) = slot {
                    out.extend(
                        a.params().into_iter().map(|q| (format!("model.layers.{l}.{}.{}", p.module(), q.name), q)),
                    );
                }
            }
        }
        out
    }

    pub fn named_params_mut(&mut self) -> Vec<(String, &mut Param<B>)> {
        let mut out = Vec::new();
        for (l, row) in self.slots.iter_mut().enumerate() {
            for (p, slot) in Proj::ALL.iter().zip(row) {
                if let Some(a) = slot {
                    out.extend(
                        a.params_mut().into_iter().map(|q| (format!("model.layers.{l}.{}.{}", p.module(), q.name), q)),
                    );
                }
            }
        }
        out
    }

    /// The parameters of layer `layer`'s adapters.
    pub fn layer_params_mut(&mut self, layer: usize) -> Vec<&mut Param<B>> {
        self.slots.get_mut(layer).into_iter().flatten().flatten().flat_map(|a| a.params_mut()).collect()
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        self.slots.iter_mut().flatten().flatten().flat_map(|a| a.params_mut()).collect()
    }

    pub fn trainable(&self) -> usize {
        self.slots.iter().flatten().flatten().map(|a| a.trainable()).sum()
    }

    /// Whether any parameter holds a gradient (allocated since the last `zero_grads`).
    pub fn holds_gradients(&self, be: &B) -> bool {
        self.slots.iter().flatten().flatten().flat_map(|a| a.params()).any(|p| be.len(&p.grad) > 0)
    }

    /// Frees every gradient: the next backward allocates each as it reaches it.
    pub fn zero_grads(&mut self, be: &B) -> Result<()> {
        for p in self.params_mut() {
            p.grad = be.zeros(0)?;
        }
        Ok(())
    }
}
