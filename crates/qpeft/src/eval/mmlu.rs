//! MMLU 5-shot (methods.md §9.1): the hendrycks prompt — header "The following are multiple choice questions
//! (with answers) about  {subject}.\n\n" (two spaces), the first k dev rows as shots each ending
//! "Answer: {letter}\n\n", then the question ending "Answer:" — with k reduced from 5 while the prompt exceeds
//! the length limit. The prediction is the argmax of the next-token logits over the four answer-letter tokens,
//! the tokens of " A" … " D" as they follow "Answer:" (checked per tokenizer). Accuracy per subject, per
//! subcategory and category (hendrycks' categories), micro (over questions) and macro (over subjects).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::prefix::{self, Group};
use crate::adapters::set::AdapterSet;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Decoder;
use crate::tokenizer::Tokenizer;

pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub question: String,
    pub choices: [String; 4],
    /// 0..4
    pub answer: usize,
}

/// Subject → hendrycks' subcategory (the 17 of categories.py).
pub fn subcategory(subject: &str) -> Option<&'static str> {
    Some(match subject {
        "abstract_algebra"
        | "college_mathematics"
        | "elementary_mathematics"
        | "high_school_mathematics"
        | "high_school_statistics" => "math",
        "anatomy"
        | "clinical_knowledge"
        | "college_medicine"
        | "human_aging"
        | "medical_genetics"
        | "nutrition"
        | "professional_medicine"
        | "virology" => "health",
        "astronomy" | "college_physics" | "conceptual_physics" | "high_school_physics" => "physics",
        "business_ethics" | "management" | "marketing" => "business",
        "college_biology" | "high_school_biology" => "biology",
        "college_chemistry" | "high_school_chemistry" => "chemistry",
        "college_computer_science" | "computer_security" | "high_school_computer_science" | "machine_learning" => {
            "computer science"
        }
        "econometrics" | "high_school_macroeconomics" | "high_school_microeconomics" => "economics",
        "electrical_engineering" => "engineering",
        "formal_logic" | "logical_fallacies" | "moral_disputes" | "moral_scenarios" | "philosophy"
        | "world_religions" => "philosophy",
        "global_facts" | "miscellaneous" | "professional_accounting" => "other",
        "high_school_european_history" | "high_school_us_history" | "high_school_world_history" | "prehistory" => {
            "history"
        }
        "high_school_geography" => "geography",
        "high_school_government_and_politics" | "public_relations" | "security_studies" | "us_foreign_policy" => {
            "politics"
        }
        "high_school_psychology" | "professional_psychology" => "psychology",
        "human_sexuality" | "sociology" => "culture",
        "international_law" | "jurisprudence" | "professional_law" => "law",
        _ => return None,
    })
}

/// Subcategory → one of the four categories.
pub fn category(subcategory: &str) -> &'static str {
    match subcategory {
        "physics" | "chemistry" | "biology" | "computer science" | "math" | "engineering" => "STEM",
        "history" | "philosophy" | "law" => "humanities",
        "politics" | "culture" | "economics" | "geography" | "psychology" => "social sciences",
        _ => "other (business, health, misc.)",
    }
}

/// Reads `{dir}/{split}/{subject}_{split}.csv` (no header; question, A, B, C, D, answer) for every subject.
pub fn load_split(dir: &Path, split: &str) -> Result<BTreeMap<String, Vec<Question>>> {
    let folder = dir.join(split);
    let entries = std::fs::read_dir(&folder).map_err(|e| Error::io(&folder, e))?;
    let mut out = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(&folder, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Some(subject) = name.strip_suffix(&format!("_{split}.csv")) else { continue };
        out.insert(subject.to_string(), read_csv(&path)?);
    }
    if out.is_empty() {
        return Err(Error::format(&folder, format!("no *_{split}.csv files")));
    }
    Ok(out)
}

fn read_csv(path: &Path) -> Result<Vec<Question>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .map_err(|e| Error::format(path, e.to_string()))?;
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let row = i + 1;
        let r = record.map_err(|e| Error::format(path, format!("row {row}: {e}")))?;
        if r.len() != 6 {
            return Err(Error::format(
                path,
                format!("row {row}: {} columns, expected 6 (question, A, B, C, D, answer)", r.len()),
            ));
        }
        let answer = LETTERS
            .iter()
            .position(|&l| l == r[5].trim())
            .ok_or_else(|| Error::format(path, format!("row {row}: answer `{}` is not A, B, C or D", &r[5])))?;
        out.push(Question { question: r[0].to_string(), choices: [1, 2, 3, 4].map(|c| r[c].to_string()), answer });
    }
    if out.is_empty() {
        return Err(Error::format(path, "no rows"));
    }
    Ok(out)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn format_question(q: &Question) -> String {
    let mut s = q.question.clone();
    for (l, c) in LETTERS.iter().zip(&q.choices) {
        s += &format!("\n{l}. {c}");
    }
    s + "\nAnswer:"
}

/// The k-shot prompt for `q` of `subject`.
pub fn prompt(subject: &str, shots: &[Question], q: &Question) -> String {
    // S = " " + subject with spaces: two spaces after "about", as the original code builds it.
    let mut s =
        format!("The following are multiple choice questions (with answers) about  {}.\n\n", subject.replace('_', " "));
    for shot in shots {
        s += &format!("{} {}\n\n", format_question(shot), LETTERS[shot.answer]);
    }
    s + &format_question(q)
}

/// The ids of the answer letters as they follow "Answer:" — the last token of "Answer: L", which must be one
/// token more than "Answer:" alone.
pub fn answer_tokens(tok: &Tokenizer) -> Result<[u32; 4]> {
    let base = tok.encode("Answer:", false)?;
    let mut ids = [0u32; 4];
    for (i, l) in LETTERS.iter().enumerate() {
        let with = tok.encode(&format!("Answer: {l}"), false)?;
        if with.len() != base.len() + 1 || with[..base.len()] != base[..] {
            return Err(Error::Invalid(format!(
                "this tokenizer does not encode \" {l}\" after \"Answer:\" as one token ({with:?} vs {base:?})"
            )));
        }
        ids[i] = with[base.len()];
    }
    Ok(ids)
}

/// One scored question.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Item {
    pub subject: String,
    pub index: usize,
    pub shots: usize,
    pub gold: usize,
    pub pred: usize,
    pub logits: [f32; 4],
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
}

impl Accuracy {
    pub fn value(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub split: String,
    pub subjects: BTreeMap<String, Accuracy>,
    pub subcategories: BTreeMap<String, Accuracy>,
    pub categories: BTreeMap<String, Accuracy>,
    /// Mean over questions.
    pub micro: f64,
    /// Mean over subjects.
    pub macro_avg: f64,
    pub items: Vec<Item>,
}

pub struct Options {
    pub split: String,
    /// First `limit` questions of each subject (None: all).
    pub limit: Option<usize>,
    /// Only these subjects (empty: all 57).
    pub subjects: Vec<String>,
    pub shots: usize,
    /// Longest prompt in tokens; shots are dropped until the prompt fits, then it is left-truncated.
    pub max_len: usize,
    pub batch: usize,
}

/// Runs MMLU on `model` (with `adapters`) from the CSVs in `dir`.
pub fn evaluate<B: Backend>(
    model: &Decoder<B>,
    adapters: Option<&AdapterSet<B>>,
    tok: &Tokenizer,
    dir: &Path,
    opts: &Options,
    mut progress: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Report> {
    let dev = load_split(dir, "dev")?;
    let test = load_split(dir, &opts.split)?;
    let letters = answer_tokens(tok)?;
    if let Some(s) = opts.subjects.iter().find(|s| !test.contains_key(*s)) {
        return Err(Error::Invalid(format!("MMLU has no subject `{s}` in {}", dir.display())));
    }
    // (subject, index, k, tokens)
    let mut prompts: Vec<(String, usize, usize, Vec<u32>)> = Vec::new();
    for (subject, questions) in test.iter().filter(|(s, _)| opts.subjects.is_empty() || opts.subjects.contains(s)) {
        let shots = dev
            .get(subject)
            .ok_or_else(|| Error::format(&dir.join("dev"), format!("no dev file for subject `{subject}`")))?;
        for (i, q) in questions.iter().enumerate().take(opts.limit.unwrap_or(usize::MAX)) {
            let mut k = opts.shots.min(shots.len());
            let mut ids = tok.encode(&prompt(subject, &shots[..k], q), true)?;
            while ids.len() > opts.max_len && k > 0 {
                k -= 1;
                ids = tok.encode(&prompt(subject, &shots[..k], q), true)?;
            }
            let cut = ids.len().saturating_sub(opts.max_len);
            prompts.push((subject.clone(), i, k, ids[cut..].to_vec()));
        }
    }
    let total = prompts.len();
    // The questions of a subject (with the same number of shots) share the header and shots: their common token
    // prefix runs once, each question's remaining tokens (at least its last one) after it.
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let same = members.last().is_some_and(|m| (&prompts[m[0]].0, prompts[m[0]].2) == (&p.0, p.2));
        if !same {
            members.push(Vec::new());
        }
        members.last_mut().expect("a group exists").push(i);
    }
    for m in &mut members {
        m.sort_by_key(|&i| prompts[i].3.len());
    }
    let groups: Vec<Group> = members
        .iter()
        .map(|m| {
            let first = &prompts[m[0]].3;
            let common =
                m.iter().map(|&i| common_prefix(first, &prompts[i].3).min(prompts[i].3.len() - 1)).min().unwrap_or(0);
            Group {
                prefix: first[..common].to_vec(),
                suffixes: m.iter().map(|&i| prompts[i].3[common..].to_vec()).collect(),
            }
        })
        .collect();
    let be = &model.backend;
    let h = model.spec.hidden_size;
    let mut letter_logits = vec![[0f32; 4]; total];
    let mut done = 0;
    prefix::run(model, adapters, &groups, opts.batch, |g, s, hidden| {
        let last = be.upload(&hidden[hidden.len() - h..])?;
        let logits = be.download(&model.logits(&last, 1)?)?;
        letter_logits[members[g][s]] = letters.map(|t| logits[t as usize]);
        done += 1;
        progress(done, total)
    })?;
    let mut items = Vec::with_capacity(total);
    let mut subjects: BTreeMap<String, Accuracy> = BTreeMap::new();
    let mut subcategories: BTreeMap<String, Accuracy> = BTreeMap::new();
    let mut categories: BTreeMap<String, Accuracy> = BTreeMap::new();
    for (i, (subject, index, k, _)) in prompts.into_iter().enumerate() {
        let l = letter_logits[i];
        // First maximum, as argmax does.
        let pred = (0..4).fold(0, |best, j| if l[j] > l[best] { j } else { best });
        let gold = test[&subject][index].answer;
        let ok = (pred == gold) as usize;
        let sub = subcategory(&subject).unwrap_or("other");
        for (map, key) in [
            (&mut subjects, subject.clone()),
            (&mut subcategories, sub.to_string()),
            (&mut categories, category(sub).to_string()),
        ] {
            let a = map.entry(key).or_default();
            a.correct += ok;
            a.total += 1;
        }
        items.push(Item { subject, index, shots: k, gold, pred, logits: l });
    }
    let micro = items.iter().filter(|it| it.pred == it.gold).count() as f64 / items.len().max(1) as f64;
    let macro_avg = subjects.values().map(Accuracy::value).sum::<f64>() / subjects.len().max(1) as f64;
    Ok(Report { split: opts.split.clone(), subjects, subcategories, categories, micro, macro_avg, items })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_follows_hendrycks() {
        let q = |t: &str, a| Question {
            question: t.into(),
            choices: ["w".into(), "x".into(), "y".into(), "z".into()],
            answer: a,
        };
        let p = prompt("abstract_algebra", &[q("S1?", 1)], &q("Q?", 0));
        assert_eq!(
            p,
            "The following are multiple choice questions (with answers) about  abstract algebra.\n\n\
             S1?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n\
             Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
        );
    }

    #[test]
    fn every_subject_has_a_category() {
        let subs: std::collections::BTreeSet<&str> = [
            "abstract_algebra",
            "anatomy",
            "astronomy",
            "business_ethics",
            "clinical_knowledge",
            "college_biology",
            "college_chemistry",
            "college_computer_science",
            "college_mathematics",
            "college_medicine",
            "college_physics",
            "computer_security",
            "conceptual_physics",
            "econometrics",
            "electrical_engineering",
            "elementary_mathematics",
            "formal_logic",
            "global_facts",
            "high_school_biology",
            "high_school_chemistry",
            "high_school_computer_science",
            "high_school_european_history",
            "high_school_geography",
            "high_school_government_and_politics",
            "high_school_macroeconomics",
            "high_school_mathematics",
            "high_school_microeconomics",
            "high_school_physics",
            "high_school_psychology",
            "high_school_statistics",
            "high_school_us_history",
            "high_school_world_history",
            "human_aging",
            "human_sexuality",
            "international_law",
            "jurisprudence",
            "logical_fallacies",
            "machine_learning",
            "management",
            "marketing",
            "medical_genetics",
            "miscellaneous",
            "moral_disputes",
            "moral_scenarios",
            "nutrition",
            "philosophy",
            "prehistory",
            "professional_accounting",
            "professional_law",
            "professional_medicine",
            "professional_psychology",
            "public_relations",
            "security_studies",
            "sociology",
            "us_foreign_policy",
            "virology",
            "world_religions",
        ]
        .into_iter()
        .map(|s| subcategory(s).unwrap_or_else(|| panic!("{s}")))
        .collect();
        assert_eq!(subs.len(), 17);
        let cats: std::collections::BTreeSet<&str> = subs.iter().map(|s| category(s)).collect();
        assert_eq!(cats.len(), 4);
    }

    #[test]
    fn csv_rows_parse_with_quotes_and_newlines_and_bad_rows_name_file_and_row() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x_test.csv");
        std::fs::write(&p, "\"Line one\nline two, with comma\",1,2,3,4,C\r\nQ2,a,b,c,d,A").unwrap();
        let q = read_csv(&p).unwrap();
        assert_eq!(q[0].question, "Line one\nline two, with comma");
        assert_eq!((q[0].answer, q[1].answer, q[1].choices[3].as_str()), (2, 0, "d"));
        std::fs::write(&p, "Q,a,b,c,d,A\nQ,a,b,c,d,E\n").unwrap();
        let e = read_csv(&p).unwrap_err().to_string();
        assert!(e.contains("x_test.csv") && e.contains("row 2") && e.contains("`E`"), "{e}");
        std::fs::write(&p, "Q,a,b,c,A\n").unwrap();
        let e = read_csv(&p).unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("5 columns"), "{e}");
    }
}
