//! The seven zero-shot tasks' data (methods.md §9.2), read from the copies in ../shared/datasets (see each
//! folder's SOURCE.md) and turned into lm-eval's (context, continuation) pairs. Every item error names the file
//! and the line.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    HellaSwag,
    Piqa,
    WinoGrande,
    ArcEasy,
    ArcChallenge,
    BoolQ,
    OpenBookQa,
}

pub const ALL: [Task; 7] =
    [Task::HellaSwag, Task::Piqa, Task::WinoGrande, Task::ArcEasy, Task::ArcChallenge, Task::BoolQ, Task::OpenBookQa];

/// One multiple-choice item: a (context, continuation) pair per choice.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub pairs: Vec<(String, String)>,
    pub gold: usize,
    /// Characters of each choice string, the acc_norm divisor (None where the task has no acc_norm).
    pub lens: Option<Vec<usize>>,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::HellaSwag => "hellaswag",
            Task::Piqa => "piqa",
            Task::WinoGrande => "winogrande",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::BoolQ => "boolq",
            Task::OpenBookQa => "openbookqa",
        }
    }

    pub fn parse(name: &str) -> Option<Task> {
        ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the task reports acc_norm (length-normalised log-likelihood).
    pub fn has_norm(self) -> bool {
        !matches!(self, Task::WinoGrande | Task::BoolQ)
    }

    /// Reads the task's items from `data_dir` (the datasets folder).
    pub fn load(self, data_dir: &Path) -> Result<Vec<Item>> {
        let d = data_dir.join(self.name());
        match self {
            Task::HellaSwag => hellaswag(&d.join("hellaswag_val_full.txt")),
            Task::Piqa => piqa(&d.join("valid.jsonl"), &d.join("valid-labels.lst")),
            Task::WinoGrande => winogrande(&d.join("dev.reconstructed.jsonl"), &d.join("dev-labels.lst")),
            Task::ArcEasy => arc(&d.join("ARC-Easy-Test.jsonl"), "Question: ", "\nAnswer:"),
            Task::ArcChallenge => arc(&d.join("ARC-Challenge-Test.jsonl"), "Question: ", "\nAnswer:"),
            Task::BoolQ => boolq(&d.join("val.jsonl")),
            Task::OpenBookQa => arc(&d.join("test.jsonl"), "", ""),
        }
    }
}

/// Choices scored as " " + choice after a shared context.
fn choices_item(context: String, choices: Vec<String>, gold: usize, norm: bool) -> Item {
    let lens = norm.then(|| choices.iter().map(|c| c.chars().count()).collect());
    Item { pairs: choices.into_iter().map(|c| (context.clone(), format!(" {c}"))).collect(), gold, lens }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Non-empty lines as (1-based line number, parsed JSON).
fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>> {
    read(path)?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map(|v| (i + 1, v)).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

fn read_labels(path: &Path) -> Result<Vec<(usize, String)>> {
    Ok(read(path)?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .collect())
}

/// The string at `field` (dot-separated) of the record on `line`.
fn text(v: &Value, field: &str, path: &Path, line: usize) -> Result<String> {
    let mut at = v;
    for key in field.split('.') {
        at = at.get(key).ok_or_else(|| Error::format(path, format!("line {line}: missing field `{field}`")))?;
    }
    at.as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::format(path, format!("line {line}: field `{field}` is not a string")))
}

/// (line, record) and (line, label).
type Record = (usize, Value);
type Label = (usize, String);

fn paired<'a>(
    rows: &'a [Record],
    labels: &'a [Label],
    path: &Path,
    labels_path: &Path,
) -> Result<impl Iterator<Item = (&'a Record, &'a Label)>> {
    if rows.len() != labels.len() {
        return Err(Error::format(
            labels_path,
            format!("{} labels for the {} items of {}", labels.len(), rows.len(), path.display()),
        ));
    }
    Ok(rows.iter().zip(labels))
}

/// lm-eval's HellaSwag `preprocess`.
pub fn hellaswag_pre(text: &str) -> String {
    let mut s = text.trim().replace(" [title]", ". ");
    // Delete every "[...]", shortest match first (the regex \[.*?\]).
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']') else { break };
        out.push_str(&rest[..open]);
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    s = out;
    s.replace("  ", " ")
}

/// Python's str.capitalize: the first character upper-cased, the rest lower-cased.
fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c.flat_map(char::to_lowercase)).collect(),
        None => String::new(),
    }
}

/// WikiHow activity labels of HellaSwag val: their items have an empty ctx_b. Every other item comes from
/// ActivityNet, whose ctx_b is the incomplete phrase after the context's last ". ".
const WIKIHOW_LABELS: [&str; 21] = [
    "Personal Care and Style",
    "Family Life",
    "Food and Entertaining",
    "Computers and Electronics",
    "Health",
    "Home and Garden",
    "Finance and Business",
    "Pets and Animals",
    "Education and Communications",
    "Youth",
    "Sports and Fitness",
    "Relationships",
    "Work World",
    "Cars & Other Vehicles",
    "Travel",
    "Holidays and Traditions",
    "Philosophy and Religion",
    "Home,Categories",
    "Uncategorized",
    "Arts and Entertainment",
    "Hobbies and Crafts",
];

/// The llama.cpp text form: per item "label: ctx", the gold index, four endings. lm-eval's query
/// pre(label + ": " + ctx_a + " " + cap(ctx_b)) is rebuilt by recovering ctx_b (see WIKIHOW_LABELS).
fn hellaswag(path: &Path) -> Result<Vec<Item>> {
    let body = read(path)?;
    let lines: Vec<&str> = body.strip_suffix('\n').unwrap_or(&body).split('\n').collect();
    if !lines.len().is_multiple_of(6) {
        return Err(Error::format(path, format!("{} lines, not 6 per item (truncated?)", lines.len())));
    }
    lines
        .chunks(6)
        .enumerate()
        .map(|(i, c)| {
            let line = 6 * i + 1;
            let (label, ctx) = c[0]
                .split_once(": ")
                .ok_or_else(|| Error::format(path, format!("line {line}: no \"label: context\"")))?;
            let gold: usize = c[1]
                .trim()
                .parse()
                .ok()
                .filter(|&g| g < 4)
                .ok_or_else(|| Error::format(path, format!("line {}: gold `{}` is not 0..3", line + 1, c[1])))?;
            let (a, b) = if WIKIHOW_LABELS.contains(&label) {
                (ctx, "")
            } else {
                ctx.rfind(". ").map_or(("", ctx), |k| (&ctx[..k + 1], &ctx[k + 2..]))
            };
            let context = hellaswag_pre(&format!("{label}: {a} {}", capitalize(b)));
            Ok(choices_item(context, c[2..].iter().map(|e| hellaswag_pre(e)).collect(), gold, true))
        })
        .collect()
}

/// The index of `label` among a two-choice task's label spellings.
fn gold_of(label: &str, spellings: [&str; 2], labels_path: &Path, line: usize) -> Result<usize> {
    spellings.iter().position(|s| *s == label).ok_or_else(|| {
        Error::format(labels_path, format!("line {line}: label `{label}` is not {} or {}", spellings[0], spellings[1]))
    })
}

fn piqa(path: &Path, labels_path: &Path) -> Result<Vec<Item>> {
    let (rows, labels) = (read_jsonl(path)?, read_labels(labels_path)?);
    let items = paired(&rows, &labels, path, labels_path)?
        .map(|((line, v), (label_line, label))| {
            let gold = gold_of(label, ["0", "1"], labels_path, *label_line)?;
            let goal = text(v, "goal", path, *line)?;
            Ok(choices_item(
                format!("Question: {goal}\nAnswer:"),
                vec![text(v, "sol1", path, *line)?, text(v, "sol2", path, *line)?],
                gold,
                true,
            ))
        })
        .collect();
    items
}

/// Partial scoring: the sentence up to the blank with each option is the context, the rest the shared continuation.
fn winogrande(path: &Path, labels_path: &Path) -> Result<Vec<Item>> {
    let (rows, labels) = (read_jsonl(path)?, read_labels(labels_path)?);
    let items = paired(&rows, &labels, path, labels_path)?
        .map(|((line, v), (label_line, label))| {
            let gold = gold_of(label, ["1", "2"], labels_path, *label_line)?;
            let sentence = text(v, "sentence", path, *line)?;
            let blank = sentence
                .find('_')
                .ok_or_else(|| Error::format(path, format!("line {line}: the sentence has no `_`")))?;
            let rest = format!(" {}", sentence[blank + 1..].trim());
            let pairs = ["option1", "option2"]
                .iter()
                .map(|o| Ok((format!("{}{}", &sentence[..blank], text(v, o, path, *line)?), rest.clone())))
                .collect::<Result<_>>()?;
            Ok(Item { pairs, gold, lens: None })
        })
        .collect();
    items
}

/// ARC and OpenBookQA: {question: {stem, choices: [{text, label}]}, answerKey}.
fn arc(path: &Path, before: &str, after: &str) -> Result<Vec<Item>> {
    read_jsonl(path)?
        .iter()
        .map(|(line, v)| {
            let stem = text(v, "question.stem", path, *line)?;
            let choices = v
                .pointer("/question/choices")
                .and_then(Value::as_array)
                .ok_or_else(|| Error::format(path, format!("line {line}: missing array `question.choices`")))?;
            let mut texts = Vec::with_capacity(choices.len());
            let mut labels = Vec::with_capacity(choices.len());
            for c in choices {
                texts.push(text(c, "text", path, *line)?);
                labels.push(text(c, "label", path, *line)?);
            }
            let key = text(v, "answerKey", path, *line)?;
            let gold = labels.iter().position(|l| l == key.trim_start()).ok_or_else(|| {
                Error::format(path, format!("line {line}: answerKey `{key}` is not one of the labels {labels:?}"))
            })?;
            Ok(choices_item(format!("{before}{stem}{after}"), texts, gold, true))
        })
        .collect()
}

fn boolq(path: &Path) -> Result<Vec<Item>> {
    read_jsonl(path)?
        .iter()
        .map(|(line, v)| {
            let gold = match v.get("label") {
                Some(Value::Bool(b)) => *b as usize,
                Some(Value::String(s)) if s == "true" || s == "false" => (s == "true") as usize,
                other => return Err(Error::format(path, format!("line {line}: label {other:?} is not true or false"))),
            };
            let context = format!(
                "{}\nQuestion: {}?\nAnswer:",
                text(v, "passage", path, *line)?,
                text(v, "question", path, *line)?
            );
            Ok(choices_item(context, vec!["no".into(), "yes".into()], gold, false))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellaswag_preprocessing_matches_lm_eval() {
        assert_eq!(hellaswag_pre(" How to x [title] Do it [step] now.  Then  go "), "How to x. Do it now. Then go");
        assert_eq!(hellaswag_pre("a [b [c] d] e"), "a d] e");
        assert_eq!(hellaswag_pre("open [ only"), "open [ only");
        assert_eq!(capitalize("the MAN is"), "The man is");
    }
}
