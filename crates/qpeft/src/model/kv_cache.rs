//! Keys and values of past tokens, per layer, laid out [batch, capacity, kv_heads, head_dim].

use crate::backend::Backend;
use crate::error::{Error, Result};

pub struct KvCache<B: Backend> {
    pub batch: usize,
    pub capacity: usize,
    /// Positions filled so far (the same for every sequence of the batch; padding fills the gaps).
    pub len: usize,
    /// Values per cached token (kv_heads · head_dim); kept because an empty cache cannot tell it.
    kv_dim: usize,
    pub(crate) k: Vec<B::Buf>,
    pub(crate) v: Vec<B::Buf>,
    /// [batch, capacity]: 1 where the cached token is real, 0 for padding.
    pub(crate) key_mask: Vec<u32>,
    /// Real tokens seen so far per sequence: the next position id of each.
    pub(crate) seen: Vec<u32>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(be: &B, layers: usize, batch: usize, capacity: usize, kv_dim: usize) -> Result<Self> {
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(be.zeros(batch * capacity * kv_dim)?);
            v.push(be.zeros(batch * capacity * kv_dim)?);
        }
        Ok(KvCache { batch, capacity, len: 0, kv_dim, k, v, key_mask: vec![0; batch * capacity], seen: vec![0; batch] })
    }

    /// Records the mask of `seq` new tokens per sequence and returns their position ids:
    /// each real token continues its own sequence's count (so left padding does not shift
    /// positions, as in transformers' generate), padding gets position 0.
    pub(crate) fn append_mask(&mut self, mask: &[u32], seq: usize) -> Result<Vec<u32>> {
        if self.len + seq > self.capacity {
            return Err(Error::Invalid(format!(
                "KV cache holds {} positions; {} are used and {seq} more were requested",
                self.capacity, self.len
            )));
        }
        let mut positions = Vec::with_capacity(self.batch * seq);
        for b in 0..self.batch {
            for t in 0..seq {
                let real = mask[b * seq + t] != 0;
                self.key_mask[b * self.capacity + self.len + t] = real as u32;
                if real {
                    positions.push(self.seen[b]);
                    self.seen[b] += 1;
                } else {
                    positions.push(0);
                }
            }
        }
        Ok(positions)
    }

    /// A new cache whose row j is a copy of this cache's row `rows[j]`, with room for `extra` more positions:
    /// one shared prefix run once serves many continuations (evaluation scores a question's choices this way).
    pub fn gather(&self, be: &B, rows: &[usize], extra: usize) -> Result<Self> {
        if let Some(&r) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(Error::Invalid(format!("row {r} of a KV cache with batch {}", self.batch)));
        }
        let width = self.kv_dim;
        let capacity = self.len + extra;
        let mut out = KvCache::new(be, self.k.len(), rows.len(), capacity, width)?;
        for (j, &r) in rows.iter().enumerate() {
            for l in 0..self.k.len() {
                be.copy(&self.k[l], r * self.capacity * width, &mut out.k[l], j * capacity * width, self.len * width)?;
                be.copy(&self.v[l], r * self.capacity * width, &mut out.v[l], j * capacity * width, self.len * width)?;
            }
            out.key_mask[j * capacity..j * capacity + self.len]
                .copy_from_slice(&self.key_mask[r * self.capacity..r * self.capacity + self.len]);
            out.seen[j] = self.seen[r];
        }
        out.len = self.len;
        Ok(out)
    }
}
