//! SmolLM2-135M-Instruct evaluated by qpeft agrees item by item with an independent transformers implementation of
//! the same protocols: scripts/reference/eval_reference.py, condensed by make_eval_fixture.py into
//! tests/fixtures/eval/smollm2-reference.json (the first 40 items of every zero-shot task, the first question of
//! every MMLU subject, and each task's first prompt with its token ids). CI compares a slice of it (the first 10 items
//! of each zero-shot task, 12 MMLU subjects from all four categories: about a quarter of the time); the whole
//! fixture is the ignored test, run by scripts/reference/full_eval_check.sh.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{fixtures, smollm2_gguf};
use qpeft::backend::cpu::Cpu;
use qpeft::eval::tasks::{Task, ALL};
use qpeft::eval::{loglik, mmlu, zero_shot};
use qpeft::model::{Checkpoint, Decoder};
use serde_json::Value;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets")
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("eval/smollm2-reference.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// The first item of every task as the papers' harness builds it (strings from the reference's --show-prompts).
#[test]
fn prompts_are_built_and_encoded_as_the_reference_does() {
    let dir = data_dir();
    let first = |t: Task| t.load(&dir).unwrap().swap_remove(0);
    let pair = |c: &str, x: &str| (c.to_string(), x.to_string());
    // HellaSwag (ActivityNet item): ctx_b "he" capitalised after ctx_a.
    assert_eq!(
        first(Task::HellaSwag).pairs[3],
        pair("Roof shingle removal: A man is sitting on a roof. He", " starts pulling up roofing on a roof.")
    );
    assert_eq!(
        first(Task::Piqa).pairs[0].0,
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    );
    // WinoGrande partial scoring: the option ends the context, the rest of the sentence is the continuation.
    let wg = first(Task::WinoGrande);
    assert_eq!(
        wg.pairs,
        [
            pair("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
            pair("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")
        ]
    );
    assert_eq!(wg.lens, None);
    let arc = first(Task::ArcEasy);
    assert_eq!(
        arc.pairs[0],
        pair(
            "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
            " Sunlight is the source of energy for nearly all ecosystems."
        )
    );
    assert_eq!(arc.lens.as_ref().unwrap()[0], "Sunlight is the source of energy for nearly all ecosystems.".len());
    let boolq = first(Task::BoolQ);
    assert!(
        boolq.pairs[0].0.starts_with("Ethanol fuel -- All biomass goes through")
            && boolq.pairs[0].0.ends_with("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    );
    assert_eq!((boolq.pairs[0].1.as_str(), boolq.pairs[1].1.as_str()), (" no", " yes"));
    let obqa = first(Task::OpenBookQa);
    assert!(
        obqa.pairs[1].0.starts_with("A person wants to start saving money")
            && obqa.pairs[1].0.ends_with("the best way to save money is to")
    );
    assert_eq!(obqa.pairs[1].1, " quit eating lunch out");

    // Every recorded example (including HellaSwag's first WikiHow item) matches the reference's strings and tokens.
    let r = reference();
    let tok = Checkpoint::open(&smollm2_gguf()).unwrap().tokenizer().unwrap();
    for task in ALL {
        let items = task.load(&dir).unwrap();
        for p in r["prompts"][task.name()].as_array().unwrap() {
            let it = &items[p["index"].as_u64().unwrap() as usize];
            assert_eq!(it.gold as u64, p["gold"].as_u64().unwrap());
            for (k, (c, x)) in it.pairs.iter().enumerate() {
                assert_eq!(
                    [c.as_str(), x.as_str()],
                    [p["pairs"][k][0].as_str().unwrap(), p["pairs"][k][1].as_str().unwrap()],
                    "{} item {}",
                    task.name(),
                    p["index"]
                );
                let req = loglik::encode(&tok, c, x).unwrap();
                assert_eq!(
                    (req.context, req.continuation),
                    (ids(&p["ctx_ids"][k]), ids(&p["cont_ids"][k])),
                    "{} item {} choice {k}",
                    task.name(),
                    p["index"]
                );
            }
        }
    }
    // MMLU: the hendrycks 5-shot prompt of abstract_algebra's first test question, its tokens and the letter tokens.
    let m = &r["prompts"]["mmlu"][0];
    let dev = mmlu::load_split(&dir.join("mmlu"), "dev").unwrap();
    let test = mmlu::load_split(&dir.join("mmlu"), "test").unwrap();
    let prompt = mmlu::prompt("abstract_algebra", &dev["abstract_algebra"][..5], &test["abstract_algebra"][0]);
    assert!(prompt.starts_with(
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\nFind all c in Z_3"
    ));
    assert!(prompt.ends_with("\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"), "{prompt}");
    assert_eq!(prompt, m["prompt"].as_str().unwrap());
    assert_eq!(tok.encode(&prompt, true).unwrap(), ids(&m["ids"]));
    assert_eq!(mmlu::answer_tokens(&tok).unwrap().to_vec(), ids(&m["letter_ids"]));
}

/// Every fifth subject: 12 of the 57, from all four categories.
fn subject_slice(r: &Value) -> Vec<String> {
    let subjects: std::collections::BTreeSet<&str> =
        r["items"]["mmlu"].as_array().unwrap().iter().map(|v| v["subject"].as_str().unwrap()).collect();
    subjects.into_iter().step_by(5).map(str::to_string).collect()
}

#[test]
fn smollm2_scores_agree_with_the_reference_item_by_item_on_a_slice() {
    let r = reference();
    let subjects = subject_slice(&r);
    assert_eq!(subjects.len(), 12);
    compare(Cpu::new(), &r, 10, subjects, F32);
}

#[test]
#[ignore = "the whole fixture (about 3 minutes here): scripts/reference/full_eval_check.sh"]
fn smollm2_scores_agree_with_the_reference_item_by_item() {
    let r = reference();
    compare(Cpu::new(), &r, r["zs_items"].as_u64().unwrap() as usize, Vec::new(), F32);
}

/// `--device cpu:bf16` (bf16 base products on AMX tiles or AVX512-BF16) against the same f32 reference, on the slice: bf16 weights
/// move summed log-likelihoods by up to ~0.4, and predictions must stay the reference's. The whole fixture (280
/// zero-shot items, 57 MMLU questions) is the ignored test below, about 100 s on AMX.
#[test]
fn smollm2_bf16_native_predicts_as_the_reference_on_a_slice() {
    if qpeft::backend::cpu::bf16::Kernel::detect().is_none() {
        eprintln!("skipped: this CPU has neither AMX-BF16 nor AVX512-BF16");
        return;
    }
    let r = reference();
    compare(Cpu::bf16_native(), &r, 10, subject_slice(&r), BF16);
}

#[test]
#[ignore = "the whole fixture in bf16 (about 100 s here)"]
fn smollm2_bf16_native_predicts_as_the_reference_item_by_item() {
    if qpeft::backend::cpu::bf16::Kernel::detect().is_none() {
        eprintln!("skipped: this CPU has neither AMX-BF16 nor AVX512-BF16");
        return;
    }
    let r = reference();
    compare(Cpu::bf16_native(), &r, r["zs_items"].as_u64().unwrap() as usize, Vec::new(), BF16);
}

/// How close a run must come to the reference: the fraction of identical predictions, and the largest difference
/// of a log-likelihood (zero-shot) or letter logit (MMLU).
struct Tolerance {
    same: f64,
    scores: f64,
}

const F32: Tolerance = Tolerance { same: 0.99, scores: 2e-3 };
const BF16: Tolerance = Tolerance { same: 1.0, scores: 0.5 };

/// Identical predictions on at least `tol.same` of the items, accuracies within 0.5 points, scores within
/// `tol.scores`, on the first `n` items of every zero-shot task and the recorded questions of `subjects` (empty:
/// every subject).
fn compare<B: qpeft::backend::Backend>(be: B, r: &Value, n: usize, subjects: Vec<String>, tol: Tolerance) {
    let ckpt = Checkpoint::open(&smollm2_gguf()).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let model = Decoder::load(&ckpt, be).unwrap();
    let dir = data_dir();
    let mut report = Vec::new();
    let check = |task: &str, pairs: Vec<(usize, usize, usize, usize)>, max_dll: f64, report: &mut Vec<String>| {
        // (pred, ref pred, gold, ref gold)
        let same = pairs.iter().filter(|p| p.0 == p.1).count();
        let acc = |f: fn(&(usize, usize, usize, usize)) -> bool| {
            pairs.iter().filter(|p| f(p)).count() as f64 / pairs.len() as f64
        };
        let (ours, theirs) = (acc(|p| p.0 == p.2), acc(|p| p.1 == p.3));
        report.push(format!(
            "{task:<20} {same}/{} identical, acc {ours:.4} vs {theirs:.4}, max |Δ| {max_dll:.1e}",
            pairs.len()
        ));
        assert!(pairs.iter().all(|p| p.2 == p.3), "{task}: gold labels differ");
        assert!(
            same as f64 >= tol.same * pairs.len() as f64,
            "{task}: only {same}/{} identical predictions",
            pairs.len()
        );
        assert!((ours - theirs).abs() <= 0.005, "{task}: accuracy {ours} vs {theirs}");
        assert!(max_dll <= tol.scores, "{task}: scores differ by {max_dll}");
    };
    for task in ALL {
        let mut items = task.load(&dir).unwrap();
        items.truncate(n);
        let ours = zero_shot::evaluate(&model, None, &tok, task, &items, 8, |_| Ok(())).unwrap();
        let theirs: BTreeMap<usize, &Value> = r["items"][task.name()]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["index"].as_u64().unwrap() as usize, v))
            .collect();
        assert!(theirs.len() >= n);
        let mut max_dll = 0f64;
        let (mut acc, mut norm) = (Vec::new(), Vec::new());
        for s in &ours.items {
            let t = theirs[&s.index];
            for (a, b) in s.ll.iter().zip(floats(&t["ll"])) {
                max_dll = max_dll.max((a - b).abs());
            }
            let gold = t["gold"].as_u64().unwrap() as usize;
            acc.push((s.pred, t["pred"].as_u64().unwrap() as usize, s.gold, gold));
            if let Some(p) = s.pred_norm {
                norm.push((p, t["pred_norm"].as_u64().unwrap() as usize, s.gold, gold));
            }
        }
        check(task.name(), acc, max_dll, &mut report);
        if task.has_norm() {
            check(&format!("{} acc_norm", task.name()), norm, max_dll, &mut report);
        }
    }
    let rows = r["mmlu_rows"].as_u64().unwrap() as usize;
    let n_subjects = if subjects.is_empty() { 57 } else { subjects.len() };
    let opts = mmlu::Options { split: "test".into(), limit: Some(rows), subjects, shots: 5, max_len: 2048, batch: 8 };
    let ours = mmlu::evaluate(&model, None, &tok, &dir.join("mmlu"), &opts, |_, _| Ok(())).unwrap();
    let theirs: BTreeMap<(String, usize), &Value> = r["items"]["mmlu"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| ((v["subject"].as_str().unwrap().to_string(), v["row"].as_u64().unwrap() as usize), v))
        .collect();
    assert_eq!(theirs.len(), 57 * rows);
    assert_eq!(ours.items.len(), n_subjects * rows);
    let mut max_dl = 0f64;
    let mut pairs = Vec::new();
    for it in &ours.items {
        let t = theirs[&(it.subject.clone(), it.index)];
        assert_eq!(it.shots as u64, t["k"].as_u64().unwrap());
        for (a, b) in it.logits.iter().zip(floats(&t["letter_logits"])) {
            max_dl = max_dl.max((*a as f64 - b).abs());
        }
        pairs.push((it.pred, t["pred"].as_u64().unwrap() as usize, it.gold, t["gold"].as_u64().unwrap() as usize));
    }
    check("mmlu", pairs, max_dl, &mut report);
    println!("{}", report.join("\n"));
}
