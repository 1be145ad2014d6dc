//! Many continuations of shared prefixes: each prefix runs through the model once, then its continuations
//! ("suffixes") run in right-padded batches against copies of the prefix's KV cache. MMLU's questions share their
//! subject's header and shots; a zero-shot item's choices share its context. The result equals running every
//! prefix ++ suffix on its own (same positions, same visible keys), up to floating-point summation order.

use crate::adapters::set::AdapterSet;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Decoder, Input};

/// One prefix and the suffixes that follow it.
#[derive(Clone, Debug, Default)]
pub struct Group {
    pub prefix: Vec<u32>,
    pub suffixes: Vec<Vec<u32>>,
}

/// Prefixes run together, up to `batch` of them, when their suffixes fill at most this many passes: a zero-shot
/// item's 2–5 choices would otherwise leave the prefix pass at one or two sequences, and small passes stream every
/// weight for few rows.
const SUFFIX_PASSES: usize = 4;

/// A prefix joins a pass when padding it to the pass's longest (the first: groups run longest first) adds at most a
/// quarter of that length or at most `PAD_TOKENS`: long prefixes of different lengths get passes of their own, short
/// ones share passes (a split pass streams every weight again for few rows). The pass's suffixes also attend over
/// its longest prefix.
const PAD_TOKENS: usize = 128;

/// Runs every group; `visit(g, s, hidden)` receives suffix `s` of group `g` as its final-normed hidden states
/// [suffix length, hidden]. `batch` bounds the sequences of one forward pass; groups with few suffixes share
/// passes. Groups run longest prefix first and a pass takes prefixes of similar lengths (`PAD_TOKENS`): every pass
/// pads its rows to its longest, and MMLU 5-shot's prefixes range from ≈ 200 to ≈ 2,000 tokens (in subject order
/// the padding more than doubled its prefix tokens). Suffixes keep their groups' order: sorting a pass's suffixes
/// by length saved MMLU another 8% but moved zero-shot scores enough to flip an ARC-Easy prediction of the
/// evaluation fixture.
pub fn run<B: Backend>(
    model: &Decoder<B>,
    adapters: Option<&AdapterSet<B>>,
    groups: &[Group],
    batch: usize,
    mut visit: impl FnMut(usize, usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let (be, h) = (&model.backend, model.spec.hidden_size);
    let batch = batch.max(1);
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&g| std::cmp::Reverse((groups[g].prefix.len(), groups[g].suffixes.iter().map(Vec::len).max())));
    let mut g0 = 0;
    while g0 < order.len() {
        let mut g1 = g0 + 1;
        let (first, mut n) = (&groups[order[g0]], groups[order[g0]].suffixes.len());
        while let Some(next) = order.get(g1).map(|&g| &groups[g]) {
            let similar = first.prefix.len() - next.prefix.len() <= (first.prefix.len() / 4).max(PAD_TOKENS);
            if g1 - g0 == batch || n + next.suffixes.len() > batch * SUFFIX_PASSES || !similar {
                break;
            }
            n += next.suffixes.len();
            g1 += 1;
        }
        let ids = &order[g0..g1];
        let unit: Vec<&Group> = ids.iter().map(|&g| &groups[g]).collect();
        let prefixes: Vec<&[u32]> = unit.iter().map(|g| &g.prefix[..]).collect();
        let prefix_len = prefixes.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut cache = model.new_cache(unit.len(), prefix_len)?;
        if prefix_len > 0 {
            model.forward_with(&Input::right_padded(&prefixes, 0), &mut cache, adapters, &mut |_, _, _| Ok(()))?;
        }
        let rows: Vec<(usize, usize)> =
            unit.iter().enumerate().flat_map(|(i, g)| (0..g.suffixes.len()).map(move |s| (i, s))).collect();
        for chunk in rows.chunks(batch) {
            let suffixes: Vec<&[u32]> = chunk.iter().map(|&(i, s)| &unit[i].suffixes[s][..]).collect();
            if let Some(&(i, s)) = chunk.iter().find(|&&(i, s)| unit[i].suffixes[s].is_empty()) {
                return Err(Error::Invalid(format!("suffix {s} of group {} is empty", ids[i])));
            }
            let input = Input::right_padded(&suffixes, 0);
            let owners: Vec<usize> = chunk.iter().map(|&(i, _)| i).collect();
            let mut rows_cache = cache.gather(be, &owners, input.seq)?;
            let hidden = be.download(&model.forward_with(&input, &mut rows_cache, adapters, &mut |_, _, _| Ok(()))?)?;
            for (b, (&(i, s), suffix)) in chunk.iter().zip(&suffixes).enumerate() {
                let first = b * input.seq;
                visit(ids[i], s, &hidden[first * h..(first + suffix.len()) * h])?;
            }
        }
        g0 = g1;
    }
    Ok(())
}
