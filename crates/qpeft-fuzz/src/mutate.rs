//! Seeded mutations of an input: byte-level (flips, interesting integers, truncation, chunk insert/delete/duplicate)
//! and structure-aware ones for text formats — JSON and TOML documents are parsed, one to three nodes of the tree are
//! replaced, removed, duplicated or nested deeply, and the tree is written back; line-based files (JSONL, CSV, TSV,
//! label lists) lose, repeat or swap lines and have one JSON line mutated as a tree.

use rand_chacha::rand_core::Rng;
use rand_chacha::ChaCha8Rng;

pub type Rand = ChaCha8Rng;

pub fn below(rng: &mut Rand, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

pub fn chance(rng: &mut Rand, percent: u64) -> bool {
    rng.next_u64() % 100 < percent
}

/// Integers that break size arithmetic: zero, one, sign and width boundaries, values near the input's length.
pub fn interesting_u64(rng: &mut Rand, near: u64) -> u64 {
    const FIXED: [u64; 14] = [
        0,
        1,
        2,
        0x7f,
        0xff,
        0x7fff,
        0xffff,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        0x1_0000_0000,
        1 << 40,
        i64::MAX as u64,
        u64::MAX,
    ];
    match below(rng, 4) {
        0 => near.wrapping_add(below(rng, 5) as u64).wrapping_sub(2),
        1 => near.wrapping_mul(1 + below(rng, 4) as u64),
        _ => FIXED[below(rng, FIXED.len())],
    }
}

/// One to four byte-level edits.
pub fn bytes(input: &[u8], rng: &mut Rand) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + below(rng, 4) {
        if b.is_empty() {
            b.push(rng.next_u64() as u8);
            continue;
        }
        let at = below(rng, b.len());
        match below(rng, 8) {
            0 | 1 => b[at] ^= 1 << below(rng, 8),
            2 => b[at] = rng.next_u64() as u8,
            3 => {
                let width = [1, 2, 4, 8][below(rng, 4)];
                let v = interesting_u64(rng, b.len() as u64).to_le_bytes();
                for (i, &byte) in v.iter().take(width).enumerate() {
                    if let Some(slot) = b.get_mut(at + i) {
                        *slot = byte;
                    }
                }
            }
            4 => b.truncate(at),
            5 => {
                let end = (at + 1 + below(rng, 64)).min(b.len());
                b.drain(at..end);
            }
            6 => {
                let end = (at + 1 + below(rng, 64)).min(b.len());
                let chunk = b[at..end].to_vec();
                let to = below(rng, b.len());
                b.splice(to..to, chunk);
            }
            _ => {
                let to = below(rng, b.len() + 1);
                let n = 1 + below(rng, 16);
                b.splice(to..to, (0..n).map(|_| rng.next_u64() as u8));
            }
        }
    }
    b
}

/// A string chosen to stress a parser: empty, very long, control characters, right-to-left override, a path, a
/// number in disguise.
pub fn interesting_str(rng: &mut Rand) -> String {
    match below(rng, 9) {
        0 => String::new(),
        1 => "x".repeat(1 + below(rng, 100_000)),
        2 => "\u{0}\u{1}\u{7f}".into(),
        3 => "\u{202e}é漢字🙂".into(),
        4 => "../../../../etc/passwd".into(),
        5 => "-1".into(),
        6 => "NaN".into(),
        7 => "{{ raise_exception('x') }}{% for x in y %}".into(),
        _ => " ".repeat(below(rng, 64)),
    }
}

fn interesting_json(rng: &mut Rand) -> serde_json::Value {
    use serde_json::{json, Value};
    match below(rng, 12) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(interesting_u64(rng, 16)),
        5 => json!(1e308),
        6 => json!(-0.5),
        7 => json!([]),
        8 => json!({}),
        9 => json!(i64::MIN),
        _ => json!(interesting_str(rng)),
    }
}

/// The paths (object keys and array indices) of every node of `v`, the root first.
fn json_paths(v: &serde_json::Value, here: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    out.push(here.clone());
    match v {
        serde_json::Value::Object(m) => {
            for (k, c) in m {
                here.push(PathStep::Key(k.clone()));
                json_paths(c, here, out);
                here.pop();
            }
        }
        serde_json::Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(PathStep::Index(i));
                json_paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn json_at<'a>(v: &'a mut serde_json::Value, path: &[PathStep]) -> &'a mut serde_json::Value {
    path.iter().fold(v, |node, step| match step {
        PathStep::Key(k) => &mut node[k.as_str()],
        PathStep::Index(i) => &mut node[*i],
    })
}

/// One to three tree edits of a parsed JSON value.
pub fn json_tree(v: &mut serde_json::Value, rng: &mut Rand) {
    for _ in 0..1 + below(rng, 3) {
        let mut paths = Vec::new();
        json_paths(v, &mut Vec::new(), &mut paths);
        let path = paths[below(rng, paths.len())].clone();
        match below(rng, 6) {
            0..=2 => *json_at(v, &path) = interesting_json(rng),
            3 => {
                // Remove the node from its parent.
                if let Some((last, parent)) = path.split_last() {
                    match (json_at(v, parent), last) {
                        (serde_json::Value::Object(m), PathStep::Key(k)) => {
                            m.remove(k);
                        }
                        (serde_json::Value::Array(a), PathStep::Index(i)) => {
                            a.remove(*i);
                        }
                        _ => {}
                    }
                }
            }
            4 => {
                // Repeat an array element, or nest the node deeply.
                let node = json_at(v, &path);
                if let serde_json::Value::Array(a) = node {
                    if let Some(first) = a.first().cloned() {
                        let n = 1 + below(rng, 1000);
                        a.extend(std::iter::repeat_n(first, n));
                    }
                } else {
                    let mut wrapped = node.take();
                    for _ in 0..1 + below(rng, 100) {
                        wrapped = serde_json::Value::Array(vec![wrapped]);
                    }
                    *node = wrapped;
                }
            }
            _ => {
                // A number scaled or negated (counts, sizes, ids).
                let node = json_at(v, &path);
                if let Some(n) = node.as_i64() {
                    *node = serde_json::json!(n.wrapping_mul([-1, 2, 1000, 1 << 20][below(rng, 4)]));
                } else {
                    *node = interesting_json(rng);
                }
            }
        }
    }
}

/// JSON text: most often a tree mutation written back, else byte edits of the text or a very deep nesting.
pub fn json_text(input: &[u8], rng: &mut Rand) -> Vec<u8> {
    match (below(rng, 10), serde_json::from_slice::<serde_json::Value>(input)) {
        (0..=6, Ok(mut v)) => {
            json_tree(&mut v, rng);
            if chance(rng, 50) {
                serde_json::to_vec_pretty(&v).expect("a JSON value serializes")
            } else {
                serde_json::to_vec(&v).expect("a JSON value serializes")
            }
        }
        (7, _) => {
            let depth = 1 + below(rng, 100_000);
            let mut s = "[".repeat(depth).into_bytes();
            s.extend(b"]".repeat(below(rng, depth + 1)));
            s
        }
        _ => bytes(input, rng),
    }
}

fn interesting_toml(rng: &mut Rand) -> toml::Value {
    use toml::Value;
    match below(rng, 12) {
        0 => Value::Boolean(true),
        1 => Value::Integer(-1),
        2 => Value::Integer(0),
        3 => Value::Integer(interesting_u64(rng, 16) as i64),
        4 => Value::Float(f64::NAN),
        5 => Value::Float(f64::INFINITY),
        6 => Value::Float(-0.5),
        7 => Value::Array(vec![]),
        8 => Value::Table(Default::default()),
        9 => Value::Float(1e300),
        _ => Value::String(interesting_str(rng)),
    }
}

fn toml_paths(v: &toml::Value, here: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    out.push(here.clone());
    match v {
        toml::Value::Table(t) => {
            for (k, c) in t {
                here.push(PathStep::Key(k.clone()));
                toml_paths(c, here, out);
                here.pop();
            }
        }
        toml::Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(PathStep::Index(i));
                toml_paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn toml_at<'a>(v: &'a mut toml::Value, path: &[PathStep]) -> &'a mut toml::Value {
    path.iter().fold(v, |node, step| match (node, step) {
        (toml::Value::Table(t), PathStep::Key(k)) => t.get_mut(k).expect("path from toml_paths"),
        (toml::Value::Array(a), PathStep::Index(i)) => &mut a[*i],
        _ => unreachable!("path from toml_paths"),
    })
}

/// TOML text: a tree mutation of the parsed document written back (keys added, removed, retyped, values made
/// extreme), else byte edits of the text.
pub fn toml_text(input: &[u8], rng: &mut Rand) -> Vec<u8> {
    let parsed = std::str::from_utf8(input).ok().and_then(|s| s.parse::<toml::Table>().ok());
    let (true, Some(table)) = (below(rng, 10) < 7, parsed) else { return bytes(input, rng) };
    let mut v = toml::Value::Table(table);
    for _ in 0..1 + below(rng, 3) {
        let mut paths = Vec::new();
        toml_paths(&v, &mut Vec::new(), &mut paths);
        let path = paths[below(rng, paths.len())].clone();
        let Some((last, parent)) = path.split_last() else { continue };
        match below(rng, 4) {
            0 | 1 => *toml_at(&mut v, &path) = interesting_toml(rng),
            2 => match (toml_at(&mut v, parent), last) {
                (toml::Value::Table(t), PathStep::Key(k)) => {
                    t.remove(k);
                }
                (toml::Value::Array(a), PathStep::Index(i)) => {
                    a.remove(*i);
                }
                _ => {}
            },
            _ => {
                // A sibling key that no schema expects, or a known key under another table.
                if let toml::Value::Table(t) = toml_at(&mut v, parent) {
                    let key = if chance(rng, 50) { interesting_str(rng) } else { format!("{}x", path.len()) };
                    t.insert(key, interesting_toml(rng));
                }
            }
        }
    }
    // Values TOML cannot write (NaN keys are fine; a table inside an array after a value is not) fall back to bytes.
    match toml::to_string(&v) {
        Ok(s) => s.into_bytes(),
        Err(_) => bytes(input, rng),
    }
}

/// Line-based files: lines removed, repeated, swapped or emptied, one JSON line mutated as a tree, or byte edits.
pub fn lines(input: &[u8], rng: &mut Rand) -> Vec<u8> {
    let text = String::from_utf8_lossy(input);
    let mut ls: Vec<String> = text.lines().map(str::to_string).collect();
    if ls.is_empty() || chance(rng, 25) {
        return bytes(input, rng);
    }
    let at = below(rng, ls.len());
    match below(rng, 6) {
        0 => {
            ls.remove(at);
        }
        1 => {
            let l = ls[at].clone();
            ls.insert(below(rng, ls.len() + 1), l);
        }
        2 => {
            let other = below(rng, ls.len());
            ls.swap(at, other);
        }
        3 => ls[at] = String::new(),
        4 => ls.truncate(at),
        _ => {
            let line = ls[at].as_bytes();
            ls[at] = String::from_utf8_lossy(&json_text(line, rng)).into_owned();
        }
    }
    let mut out = ls.join("\n");
    if chance(rng, 80) {
        out.push('\n');
    }
    out.into_bytes()
}
