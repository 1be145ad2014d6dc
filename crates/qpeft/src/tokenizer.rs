//! Tokenizers: `tokenizer.json` of an HF directory, or one rebuilt from GGUF metadata the way
//! transformers rebuilds it (byte-level BPE for `gpt2`, score-ordered BPE with byte fallback for
//! `llama` SentencePiece vocabularies), plus chat templates rendered with minijinja.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::formats::gguf::{GgufFile, MetaValue};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
    /// Where the tokenizer came from, for error messages.
    source: std::path::PathBuf,
}

/// One chat message for `apply_chat_template`.
#[derive(Clone, Debug)]
pub struct Message {
    pub role: String,
    pub content: String,
}

// Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre`, as transformers maps them.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

/// GPT-2's reversible byte → printable-character map.
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    map
}

fn strings(g: &GgufFile, key: &str) -> Result<Option<Vec<String>>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let arr = v.as_array().ok_or_else(|| Error::config(&g.path, key, "expected an array"))?;
    arr.iter()
        .map(|x| {
            x.as_str().map(str::to_owned).ok_or_else(|| Error::config(&g.path, key, "expected an array of strings"))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn numbers(g: &GgufFile, key: &str) -> Result<Option<Vec<f64>>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let arr = v.as_array().ok_or_else(|| Error::config(&g.path, key, "expected an array"))?;
    arr.iter()
        .map(|x| x.as_f64().ok_or_else(|| Error::config(&g.path, key, "expected an array of numbers")))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Merges implied by a SentencePiece vocabulary: every split of a token into two tokens, ordered by
/// the merged token's score (then the lengths of the parts), best first — the rule transformers
/// uses (`generate_merges`), including its tie order.
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut first_score: HashMap<&str, f64> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (t, &s) in tokens.iter().zip(scores) {
        if first_score.insert(t, s).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for t in order {
        let score = first_score[t];
        let mut local: Vec<(&str, &str, f64)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| t.split_at(i))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| key(b).partial_cmp(&key(a)).unwrap_or(std::cmp::Ordering::Equal));
    merges.into_iter().map(|(l, r, _)| (l.to_string(), r.to_string())).collect()
}

fn added(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

fn bos_template(bos: Option<(&str, u32)>) -> Value {
    let Some((tok, id)) = bos else { return Value::Null };
    json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {tok: {"id": tok, "ids": [id], "tokens": [tok]}}
    })
}

/// Runs a call into the tokenizers crate, turning its failures and its panics into errors naming the tokenizer file
/// `source`: a malformed tokenizer.json can make it index out of bounds while loading or encoding (found by
/// scripts/fuzz.sh).
fn guarded<T, E: std::fmt::Display>(
    source: &Path,
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::format(source, format!("{what} failed: {e}"))),
        Err(_) => Err(Error::format(
            source,
            format!("{what} failed inside the tokenizers library: the tokenizer's definition is inconsistent"),
        )),
    }
}

impl Tokenizer {
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let file = dir.join("tokenizer.json");
        if !file.exists() {
            return Err(Error::format(dir, "no tokenizer.json in this model directory"));
        }
        // The document is parsed as JSON first: the tokenizers crate panics on some malformed JSON (inside its
        // decoder list) instead of returning an error.
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| Error::format(&file, format!("invalid JSON: {e}")))?;
        let inner = guarded(&file, "loading the tokenizer", || serde_json::from_value::<tokenizers::Tokenizer>(doc))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?,
            Err(_) => Value::Null,
        };
        let token = |k: &str| match cfg.get(k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        let chat_template = match cfg.get("chat_template").and_then(Value::as_str) {
            Some(t) => Some(t.to_owned()),
            None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(Tokenizer {
            inner,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            chat_template,
            source: file,
        })
    }

    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let path = g.path.as_path();
        let kind = g.get("tokenizer.ggml.model").and_then(MetaValue::as_str).ok_or_else(|| {
            Error::config(path, "tokenizer.ggml.model", "missing: this GGUF file carries no tokenizer")
        })?;
        let tokens = strings(g, "tokenizer.ggml.tokens")?
            .ok_or_else(|| Error::config(path, "tokenizer.ggml.tokens", "missing"))?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(MetaValue::as_array) {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let id_of = |k: &str| g.get(k).and_then(MetaValue::as_u64).map(|v| v as usize).filter(|&i| i < tokens.len());
        let bos = id_of("tokenizer.ggml.bos_token_id");
        let eos = id_of("tokenizer.ggml.eos_token_id");
        let flag = |k: &str| g.get(k).and_then(MetaValue::as_bool);
        let (model, normalizer, pre_tokenizer, decoder, add_bos, spelled): (
            Value,
            Value,
            Value,
            Value,
            bool,
            Option<Vec<char>>,
        ) = match kind {
            "gpt2" => {
                let alphabet = bytes_to_unicode();
                let spelled: Vec<char> = alphabet.to_vec();
                // Tokens outside the byte alphabet (llama.cpp mislabels) are respelled byte by byte.
                let vocab: serde_json::Map<String, Value> = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let t = if t.chars().all(|c| spelled.contains(&c)) {
                            t.clone()
                        } else {
                            t.bytes().map(|b| alphabet[b as usize]).collect()
                        };
                        (t, json!(i))
                    })
                    .collect();
                let merges: Vec<Value> = strings(g, "tokenizer.ggml.merges")?
                    .ok_or_else(|| {
                        Error::config(path, "tokenizer.ggml.merges", "missing (required for a gpt2 tokenizer)")
                    })?
                    .iter()
                    .map(|m| {
                        let (l, r) = m.split_once(' ').unwrap_or((m, ""));
                        json!([l, r])
                    })
                    .collect();
                let model = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                    "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab, "merges": merges});
                let byte_level =
                    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
                let pre = g.get("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
                let pre_tokenizer = match split_regex(pre) {
                    Some(re) => json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
                    None => byte_level,
                };
                let decoder =
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
                (
                    model,
                    Value::Null,
                    pre_tokenizer,
                    decoder,
                    flag("tokenizer.ggml.add_bos_token").unwrap_or(false),
                    Some(spelled),
                )
            }
            "llama" => {
                let scores = numbers(g, "tokenizer.ggml.scores")?.ok_or_else(|| {
                    Error::config(path, "tokenizer.ggml.scores", "missing (required for a llama tokenizer)")
                })?;
                if scores.len() != tokens.len() {
                    return Err(Error::config(
                        path,
                        "tokenizer.ggml.scores",
                        format!("{} scores for {} tokens", scores.len(), tokens.len()),
                    ));
                }
                let merges: Vec<Value> = match strings(g, "tokenizer.ggml.merges")? {
                    Some(m) => {
                        m.iter().map(|m| json!(m.split_once(' ').map(|(l, r)| [l, r]).unwrap_or([m, ""]))).collect()
                    }
                    None => merges_from_scores(&tokens, &scores).into_iter().map(|(l, r)| json!([l, r])).collect(),
                };
                let vocab: serde_json::Map<String, Value> =
                    tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
                // As transformers builds it: no unk token in the model, byte fallback covers unknown text.
                let model = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab, "merges": merges});
                let prepend = if flag("tokenizer.ggml.add_space_prefix").unwrap_or(true) { "first" } else { "never" };
                let pre_tokenizer =
                    json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": prepend, "split": false});
                let decoder = json!({"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
                (model, Value::Null, pre_tokenizer, decoder, flag("tokenizer.ggml.add_bos_token").unwrap_or(true), None)
            }
            other => {
                return Err(Error::unsupported(path, format!("tokenizer model `{other}` (supported: gpt2, llama)")))
            }
        };
        // Control tokens (type 3) and the named bos/eos/unk/pad tokens are special; user-defined ones
        // (type 4) are matched whole but not special.
        let named: Vec<usize> = ["bos", "eos", "unknown", "padding"]
            .iter()
            .filter_map(|k| id_of(&format!("tokenizer.ggml.{k}_token_id")))
            .collect();
        let mut added_tokens = Vec::new();
        for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
            let ok_spelling = spelled.as_ref().is_none_or(|s| t.chars().all(|c| s.contains(&c)));
            if (ty == 3 && ok_spelling) || named.contains(&i) {
                added_tokens.push(added(i, t, true));
            } else if ty == 4 {
                added_tokens.push(added(i, t, false));
            }
        }
        let bos_pair = if add_bos { bos.map(|i| (tokens[i].as_str(), i as u32)) } else { None };
        let doc = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added_tokens,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": bos_template(bos_pair),
            "decoder": decoder, "model": model});
        let inner = guarded(path, "building the tokenizer from GGUF metadata", || {
            serde_json::from_value::<tokenizers::Tokenizer>(doc)
        })?;
        let chat_template = g.get("tokenizer.chat_template").and_then(MetaValue::as_str).map(str::to_owned);
        Ok(Tokenizer {
            inner,
            bos_token: bos.map(|i| tokens[i].clone()),
            eos_token: eos.map(|i| tokens[i].clone()),
            chat_template,
            source: path.to_path_buf(),
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's defaults (e.g. BOS for llama).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        guarded(&self.source, "tokenizing", || self.inner.encode(text, add_special_tokens))
            .map(|enc| enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        guarded(&self.source, "decoding", || self.inner.decode(ids, skip_special_tokens))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders the model's chat template (Jinja) for `messages`.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::format(&self.source, "this model has no chat template; drop --chat or give a raw prompt")
        })?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let tmpl = env
            .template_from_str(template)
            .map_err(|e| Error::format(&self.source, format!("chat template does not parse: {e}")))?;
        let messages_value: minijinja::Value = messages
            .iter()
            .map(|m| minijinja::Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
            .collect();
        tmpl.render(minijinja::context! {
            messages => messages_value,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::format(&self.source, format!("chat template failed: {e}")))
    }
}

impl Tokenizer {
    /// `tokenizer.json` and `tokenizer_config.json` documents that transformers and qpeft load back (for
    /// writing a model directory, e.g. from a GGUF source).
    pub fn hf_files(&self) -> Result<(String, Value)> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::Invalid(format!("cannot serialize the tokenizer of {}: {e}", self.source.display())))?;
        let config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": false,
        });
        Ok((json, config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection_onto_printables() {
        let m = bytes_to_unicode();
        let mut seen: Vec<char> = m.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn merges_follow_score_order() {
        // "ab" (score -1) beats "bc" (-2); "abc" splits as ab+c and a+bc, ordered by ids.
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"].iter().map(|s| s.to_string()).collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
        let m = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = m.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        assert_eq!(pairs, vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}
