//! An f32 sum in the exact order PyTorch's CPU kernel uses, so that bitsandbytes' double-quantization offset
//! (`absmax.mean()`, computed by torch on CPU as sum / n) is reproduced bit for bit.
//!
//! torch (aten/native/cpu/SumKernel.cpp, "cascade sum") reduces a contiguous f32 row as follows: with vector width
//! `L` (8 f32 lanes), whole vectors are summed lane-wise by `row_sum` (4 interleaved
//! accumulators over groups of 4 vectors, each a 4-level cascade that flushes every 16 groups), the leftover
//! scalars are added one by one, then the L lanes are added in order. Rows shorter than L use the same
//! `row_sum` over scalars. Serial only: torch splits rows of 32768 elements or more across threads, where the
//! order depends on the thread count and cannot be reproduced; such rows are summed the same way here, which
//! may differ from torch in the last bit.

/// The f32 vector width of torch's CPU sum kernel. Measured against torch 2.15 on an AVX-512 machine for every
/// length 1..300 and several up to 13824: 8 lanes (256-bit vectors) reproduce torch.sum exactly, 16 do not.
pub const TORCH_F32_LANES: usize = 8;

/// torch.sum of a contiguous f32 slice, for a torch build dispatching to vectors of `lanes` f32.
pub fn torch_sum_f32(x: &[f32], lanes: usize) -> f32 {
    if x.len() < lanes {
        return row_sum(x, 1)[0];
    }
    let whole = x.len() / lanes * lanes;
    let vector_acc = row_sum(&x[..whole], lanes);
    let mut total = 0.0f32;
    for &v in &x[whole..] {
        total += v;
    }
    for lane in vector_acc {
        total += lane;
    }
    total
}

/// torch's `row_sum` over `x.len() / width` chunks of `width` lanes: returns the lane-wise sum.
fn row_sum(x: &[f32], width: usize) -> Vec<f32> {
    const ILP: usize = 4;
    let chunks = x.len() / width;
    let groups = chunks / ILP;
    let mut partial = multi_row_sum(&x[..groups * ILP * width], ILP * width, groups);
    // `partial` holds ILP accumulators of `width` lanes each; the leftover chunks go into the first one.
    for c in groups * ILP..chunks {
        add_into(&mut partial[..width], &x[c * width..(c + 1) * width]);
    }
    let (first, rest) = partial.split_at_mut(width);
    for k in 1..ILP {
        add_into(first, &rest[(k - 1) * width..k * width]);
    }
    first.to_vec()
}

/// torch's `multi_row_sum`: sums `rows` rows of `row_len` lanes with a 4-level cascade.
fn multi_row_sum(x: &[f32], row_len: usize, rows: usize) -> Vec<f32> {
    const LEVELS: usize = 4;
    let level_power = 4usize.max(ceil_log2(rows) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = vec![vec![0.0f32; row_len]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= rows {
        for _ in 0..level_step {
            add_into(&mut acc[0], &x[i * row_len..(i + 1) * row_len]);
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            add_into(&mut upper[0], &lower[j - 1]);
            lower[j - 1].fill(0.0);
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        add_into(&mut acc[0], &x[i * row_len..(i + 1) * row_len]);
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        add_into(&mut first[0], level);
    }
    acc.swap_remove(0)
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

/// c10's CeilLog2: 1 for x <= 2, else ceil(log2 x).
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_on_integers_and_order_sensitive_on_floats() {
        // Small integers are summed exactly in any order.
        let ints: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        let expected: f32 = (0..1000).map(|i| (i % 7) as f32).sum();
        assert_eq!(torch_sum_f32(&ints, 16), expected);
        assert_eq!(torch_sum_f32(&ints[..5], 16), 0.0 + 1.0 + 2.0 + 3.0 + 4.0);
        // 2^24 + 1 + 1 + ...: every +1 on 2^24 is a tie that rounds back to 2^24 (even), so a sequential sum
        // loses all of them. torch's order adds the 3 ones of lane 0 to 2^24 (lost) but sums the other 15 lanes
        // to 4 each before adding them: 2^24 + 60, exact.
        let mut x = vec![1.0f32; 64];
        x[0] = 16_777_216.0;
        let sequential = x.iter().fold(0.0f32, |a, v| a + v);
        assert_eq!(sequential, 16_777_216.0);
        assert_eq!(torch_sum_f32(&x, 16), 16_777_216.0 + 60.0);
    }
}
