//! Structure-aware GGUF mutations: a walk of the header (written from the GGUF specification, independently of
//! qpeft's parser) records where each count, string length, value type, dimension, tensor type and data offset
//! lies, and a mutation overwrites one to three of those fields with values chosen for their kind.

use crate::mutate::{below, bytes, chance, interesting_u64, Rand};
use rand_chacha::rand_core::Rng;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Version,
    TensorCount,
    MetaCount,
    StrLen,
    ValueType,
    ArrayCount,
    NDims,
    Dim,
    TensorType,
    Offset,
}

struct Field {
    pos: usize,
    width: usize,
    kind: Kind,
    value: u64,
}

struct Walk<'a> {
    b: &'a [u8],
    pos: usize,
    fields: Vec<Field>,
}

impl Walk<'_> {
    fn read(&mut self, width: usize, kind: Option<Kind>) -> Option<u64> {
        let s = self.b.get(self.pos..self.pos + width)?;
        let mut v = [0u8; 8];
        v[..width].copy_from_slice(s);
        let value = u64::from_le_bytes(v);
        if let Some(kind) = kind {
            self.fields.push(Field { pos: self.pos, width, kind, value });
        }
        self.pos += width;
        Some(value)
    }
    fn string(&mut self) -> Option<()> {
        let n = self.read(8, Some(Kind::StrLen))?;
        self.pos = self.pos.checked_add(usize::try_from(n).ok()?)?;
        (self.pos <= self.b.len()).then_some(())
    }
    fn value(&mut self, ty: u64, depth: u32) -> Option<()> {
        match ty {
            0 | 1 | 7 => self.read(1, None).map(drop),
            2 | 3 => self.read(2, None).map(drop),
            4..=6 => self.read(4, None).map(drop),
            10..=12 => self.read(8, None).map(drop),
            8 => self.string(),
            9 if depth == 0 => {
                let item = self.read(4, Some(Kind::ValueType))?;
                let n = self.read(8, Some(Kind::ArrayCount))?;
                // Long arrays (a vocabulary) are walked only far enough to record their first strings.
                for _ in 0..n.min(64) {
                    self.value(item, 1)?;
                }
                (n <= 64).then_some(())
            }
            _ => None,
        }
    }
    /// Records the fields up to the first one the walk cannot follow (a long array, or corruption).
    fn header(&mut self) -> Option<()> {
        self.pos = 4;
        self.read(4, Some(Kind::Version))?;
        let n_tensors = self.read(8, Some(Kind::TensorCount))?;
        let n_kv = self.read(8, Some(Kind::MetaCount))?;
        for _ in 0..n_kv.min(10_000) {
            self.string()?;
            let ty = self.read(4, Some(Kind::ValueType))?;
            self.value(ty, 0)?;
        }
        for _ in 0..n_tensors.min(10_000) {
            self.string()?;
            let n_dims = self.read(4, Some(Kind::NDims))?;
            for _ in 0..n_dims.min(8) {
                self.read(8, Some(Kind::Dim))?;
            }
            self.read(4, Some(Kind::TensorType))?;
            self.read(8, Some(Kind::Offset))?;
        }
        Some(())
    }
}

fn value_for(kind: Kind, old: u64, file_len: u64, rng: &mut Rand) -> u64 {
    match kind {
        Kind::Version => [0, 1, 2, 3, 4, u32::MAX as u64][below(rng, 6)],
        Kind::ValueType | Kind::TensorType => {
            if chance(rng, 80) {
                below(rng, 42) as u64
            } else {
                interesting_u64(rng, old)
            }
        }
        Kind::NDims => below(rng, 10) as u64,
        Kind::Dim => [0, 1, old + 1, old.wrapping_sub(1), old * 2, old / 2, interesting_u64(rng, old)][below(rng, 7)],
        Kind::Offset => {
            [0, old + 32, old + 1, old.wrapping_sub(32), file_len, interesting_u64(rng, old)][below(rng, 6)]
        }
        Kind::StrLen => [0, old + 1, old.wrapping_sub(1), file_len, interesting_u64(rng, old)][below(rng, 5)],
        Kind::TensorCount | Kind::MetaCount | Kind::ArrayCount => {
            [0, old + 1, old.wrapping_sub(1), interesting_u64(rng, old)][below(rng, 4)]
        }
    }
}

/// One to three header fields overwritten (three times in four), else byte edits.
pub fn mutate(input: &[u8], rng: &mut Rand) -> Vec<u8> {
    let mut w = Walk { b: input, pos: 0, fields: Vec::new() };
    let _ = w.header();
    if w.fields.is_empty() || chance(rng, 25) {
        return bytes(input, rng);
    }
    let mut out = input.to_vec();
    for _ in 0..1 + below(rng, 3) {
        let f = &w.fields[below(rng, w.fields.len())];
        let v = if chance(rng, 5) { rng.next_u64() } else { value_for(f.kind, f.value, input.len() as u64, rng) };
        out[f.pos..f.pos + f.width].copy_from_slice(&v.to_le_bytes()[..f.width]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-assembled GGUF: version 3, one metadata string, one 2-D tensor of type 0 (f32) at offset 0.
    fn tiny() -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(1u64.to_le_bytes()); // metadata
        b.extend(3u64.to_le_bytes());
        b.extend(b"key");
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(b"hi");
        b.extend(1u64.to_le_bytes());
        b.extend(b"t");
        b.extend(2u32.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b
    }

    #[test]
    fn the_walk_finds_every_field_of_a_hand_made_header() {
        let b = tiny();
        let mut w = Walk { b: &b, pos: 0, fields: Vec::new() };
        assert!(w.header().is_some());
        let kinds: Vec<(Kind, u64)> = w.fields.iter().map(|f| (f.kind, f.value)).collect();
        use Kind::*;
        assert_eq!(
            kinds,
            [
                (Version, 3),
                (TensorCount, 1),
                (MetaCount, 1),
                (StrLen, 3),
                (ValueType, 8),
                (StrLen, 2),
                (StrLen, 1),
                (NDims, 2),
                (Dim, 4),
                (Dim, 2),
                (TensorType, 0),
                (Offset, 0)
            ]
        );
        assert_eq!(w.pos, b.len());
    }
}
