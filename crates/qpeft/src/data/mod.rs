//! Training data as (source, target) string pairs: Alpaca JSON / JSON.gz / JSONL, OASST1-guanaco JSONL
//! (`text` already formatted as `### Human: … ### Assistant: …` turns), generic JSONL (`prompt`/`response` or
//! chat `messages` rendered with the model's chat template) and qpeft's built-in tasks. Formatting follows
//! QLoRA (methods.md §2); `collate` tokenizes, `sampler` splits and orders.

use std::io::Read;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::tokenizer::{Message, Tokenizer};

pub mod builtin;
pub mod collate;
pub mod sampler;

/// One training record: the prompt part (masked from the loss unless `train_on_source`) and the response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub source: String,
    pub target: String,
}

impl Example {
    /// Length in characters of source + target (what QLoRA's `group_by_length` sorts by).
    pub fn chars(&self) -> usize {
        self.source.chars().count() + self.target.chars().count()
    }
}

/// How a data file is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// `instruction` / `input` / `output` records: a JSON array (optionally gzipped) or JSONL.
    Alpaca,
    /// JSONL with a `text` field of `### Human: … ### Assistant: …` turns; the loss covers all of it.
    Oasst,
    /// JSONL with `prompt` + `response`, or `messages` (role/content; the last one is the assistant's reply).
    Jsonl,
}

/// QLoRA's Alpaca prompts (note the space after `### Response:`).
const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ";
const ALPACA_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlpacaRecord {
    instruction: String,
    #[serde(default)]
    input: String,
    output: String,
}

impl AlpacaRecord {
    fn example(self) -> Example {
        let source = if self.input.is_empty() {
            ALPACA_NO_INPUT.replace("{instruction}", &self.instruction)
        } else {
            ALPACA_WITH_INPUT.replace("{instruction}", &self.instruction).replace("{input}", &self.input)
        };
        Example { source, target: self.output }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OasstRecord {
    text: String,
}

/// A generic JSONL record: a prompt and its response …
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairRecord {
    prompt: String,
    response: String,
}

/// … or a conversation whose last message is the assistant's reply.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRecord {
    messages: Vec<ChatMessage>,
}

const JSONL_LAYOUTS: &str = r#"{"prompt": …, "response": …} or {"messages": [{"role": …, "content": …}, …]}"#;

/// One line of a generic JSONL file, as one of the two layouts; errors name the field at fault.
fn jsonl_example(line: &str, tok: &Tokenizer) -> std::result::Result<Example, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or_else(|| format!("a record must be an object: {JSONL_LAYOUTS}"))?;
    if obj.contains_key("messages") {
        let r: ChatRecord = serde_json::from_value(v).map_err(|e| format!("{e} (a chat record is {JSONL_LAYOUTS})"))?;
        chat_example(r.messages, tok)
    } else if obj.contains_key("prompt") || obj.contains_key("response") {
        let r: PairRecord = serde_json::from_value(v).map_err(|e| format!("{e} (a pair record is {JSONL_LAYOUTS})"))?;
        Ok(Example { source: r.prompt, target: r.response })
    } else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        Err(format!("keys [{}] match no layout: {JSONL_LAYOUTS}", keys.join(", ")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    content: String,
}

/// Reads a whole file, gunzipping it when its name ends in `.gz`.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("not a valid gzip file: {e}")))?;
        out
    } else {
        bytes
    };
    String::from_utf8(bytes)
        .map_err(|e| Error::format(path, format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to())))
}

/// Parses one JSON object per non-empty line; errors name the line.
fn jsonl<T: for<'de> Deserialize<'de>>(path: &Path, text: &str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(line).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?);
    }
    Ok(out)
}

/// Loads every record of `path` as an `Example`. `tok` renders chat `messages` with its template.
pub fn load(path: &Path, format: DataFormat, tok: &Tokenizer) -> Result<Vec<Example>> {
    let text = read_text(path)?;
    let examples = match format {
        DataFormat::Alpaca if text.trim_start().starts_with('[') => {
            // serde_json's messages carry the line and column of the offending record.
            let records: Vec<AlpacaRecord> =
                serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
            records.into_iter().map(AlpacaRecord::example).collect()
        }
        DataFormat::Alpaca => jsonl::<AlpacaRecord>(path, &text)?.into_iter().map(AlpacaRecord::example).collect(),
        DataFormat::Oasst => jsonl::<OasstRecord>(path, &text)?
            .into_iter()
            .map(|r| Example { source: String::new(), target: r.text })
            .collect(),
        DataFormat::Jsonl => {
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let at = |msg: String| Error::format(path, format!("line {}: {msg}", i + 1));
                out.push(jsonl_example(line, tok).map_err(at)?);
            }
            out
        }
    };
    if examples.is_empty() {
        return Err(Error::format(path, "no records"));
    }
    Ok(examples)
}

/// The conversation before the last (assistant) message, rendered with a generation prompt, and that reply.
fn chat_example(mut messages: Vec<ChatMessage>, tok: &Tokenizer) -> std::result::Result<Example, String> {
    let last = messages.pop().ok_or("`messages` is empty")?;
    if last.role != "assistant" {
        return Err(format!("the last message has role `{}`; it must be the assistant's reply", last.role));
    }
    let history: Vec<Message> = messages.into_iter().map(|m| Message { role: m.role, content: m.content }).collect();
    let source = tok.apply_chat_template(&history, true).map_err(|e| e.to_string())?;
    Ok(Example { source, target: last.content })
}
