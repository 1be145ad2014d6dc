//! Rotary position embeddings, half-split (rotate_half) convention as in transformers.

use crate::arch::{ModelSpec, RopeScaling};

/// The rotation frequencies θ_j for j = 0 … head_dim/2 − 1, after any scaling, in f32 as
/// transformers computes them: inv_freq_j = 1 / θ^(2j/d).
pub fn inv_freq(spec: &ModelSpec) -> Vec<f32> {
    let d = spec.head_dim;
    let base: Vec<f32> = (0..d / 2).map(|j| 1.0 / spec.rope_theta.powf((2 * j) as f32 / d as f32)).collect();
    match &spec.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::FreqFactors(div) => base.iter().zip(div).map(|(f, d)| f / d).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
            // Long wavelengths are slowed down by `factor`, short ones kept, the band between
            // blended linearly in 1/wavelength.
            let low_wavelen = original_max_position / low_freq_factor;
            let high_wavelen = original_max_position / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    if wavelen < high_wavelen || wavelen > low_wavelen {
                        scaled
                    } else {
                        let t =
                            (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - t) * scaled / factor + t * scaled
                    }
                })
                .collect()
        }
    }
}
