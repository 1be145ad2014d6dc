//! Which examples go where and in what order: a seeded held-out split, and per-epoch orders — a random
//! permutation, or transformers' length-grouped order (`get_length_grouped_indices`, methods.md §7) with qpeft's
//! own seeded RNG instead of PyTorch's. Everything is a pure function of (seed, epoch), so a resumed run only
//! needs the epoch and its position in it.

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A uniform permutation of 0..n (Fisher–Yates).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        // Multiply-shift maps 64 random bits onto 0..=i without a modulo bias worth noticing.
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        v.swap(i, j);
    }
    v
}

/// Splits 0..n into (train, eval) with `eval` examples held out at random (QLoRA: `train_test_split`).
pub fn split(n: usize, eval: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let p = permutation(n, seed);
    let eval = eval.min(n.saturating_sub(1));
    let (e, t) = p.split_at(eval);
    let mut e = e.to_vec();
    e.sort_unstable();
    (t.to_vec(), e)
}

/// The order of `lengths`' indices in `epoch`: random, or with `group` = Some(batch size) length-grouped —
/// mega-batches of min(n / (4·bs), 50)·bs consecutive indices of a random permutation, each sorted by length
/// descending, with the longest example of all moved to the front (so an out-of-memory shows at once).
pub fn epoch_order(lengths: &[usize], seed: u64, epoch: u64, group: Option<usize>) -> Vec<usize> {
    let mut order = permutation(lengths.len(), seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let Some(bs) = group.filter(|&b| b > 0) else { return order };
    let mega = (lengths.len() / (4 * bs)).clamp(1, 50) * bs;
    for chunk in order.chunks_mut(mega) {
        chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    }
    let first_of = |c: usize| c * mega;
    let chunks = order.len().div_ceil(mega);
    if let Some(longest) = (0..chunks).max_by_key(|&c| (lengths[order[first_of(c)]], std::cmp::Reverse(c))) {
        order.swap(0, first_of(longest));
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_seeded_and_complete() {
        let a = permutation(100, 7);
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(a, permutation(100, 7));
        assert_ne!(a, permutation(100, 8));
    }

    #[test]
    fn split_holds_out_disjoint_examples() {
        let (t, e) = split(50, 10, 42);
        assert_eq!((t.len(), e.len()), (40, 10));
        assert!(e.iter().all(|i| !t.contains(i)));
        // Never everything: at least one training example stays.
        assert_eq!(split(3, 10, 1).0.len(), 1);
    }

    #[test]
    fn length_grouping_sorts_megabatches_and_leads_with_the_longest() {
        let lengths: Vec<usize> = (0..64).map(|i| (i * 37) % 101).collect();
        let o = epoch_order(&lengths, 3, 0, Some(2));
        // 64 / (4·2) = 8 → mega-batches of 16.
        let mut s = o.clone();
        s.sort_unstable();
        assert_eq!(s, (0..64).collect::<Vec<_>>());
        assert_eq!(lengths[o[0]], *lengths.iter().max().unwrap());
        // Every mega-batch is sorted after its first slot (the swap of the longest to the front touches only
        // first slots).
        for (c, chunk) in o.chunks(16).enumerate() {
            assert!(chunk[1..].windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]), "mega-batch {c} not sorted");
        }
        assert_ne!(epoch_order(&lengths, 3, 1, Some(2)), o, "each epoch draws a new permutation");
    }
}
