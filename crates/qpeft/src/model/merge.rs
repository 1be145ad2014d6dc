//! Folding trained adapters into the base weights: W ← Ŵ + ΔW for every adapted linear (exact in f32; the
//! merged layer becomes dense). Writing the merged model as a 16-bit HF directory, and QA-LoRA's exact merge
//! into GPTQ zero points (`GptqInt4::merge_into_zeros`), build on this.

use super::decoder::{Decoder, Proj};
use crate::adapters::set::AdapterSet;
use crate::backend::Backend;
use crate::error::Result;
use crate::quant::base::BaseWeight;

impl<B: Backend> Decoder<B> {
    /// Adds every adapter's ΔW to its linear's weight; the merged decoder needs no adapters.
    pub fn merge_adapters(&mut self, set: &AdapterSet<B>) -> Result<()> {
        for l in 0..self.blocks.len() {
            for p in Proj::ALL {
                let Some(a) = set.get(l, p) else { continue };
                let delta = a.delta_weight(&self.backend)?;
                let lin = self.blocks[l].proj_mut(p);
                let mut w = self.backend.download(&lin.weight)?;
                w.iter_mut().zip(&delta).for_each(|(w, d)| *w += d);
                lin.weight = self.backend.upload(&w)?;
                lin.base = BaseWeight::Dense;
            }
        }
        Ok(())
    }
}
