//! Evaluation mechanics that need no reference run: shared-prefix scoring equals scoring every sequence on its
//! own, and missing or malformed task files give errors naming the file and the line or row.

mod common;

use std::path::Path;

use common::fixtures;
use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;
use qpeft::eval::prefix::{self, Group};
use qpeft::eval::tasks::Task;
use qpeft::model::{Checkpoint, Decoder, Input};

#[test]
fn shared_prefix_scoring_equals_one_pass_per_sequence() {
    let ckpt = Checkpoint::open(&fixtures().join("tiny-llama")).unwrap();
    let model = Decoder::load(&ckpt, Cpu::new()).unwrap();
    let h = model.spec.hidden_size;
    // Groups of different prefix lengths (one empty) and suffix counts, batched across groups. With batch 3 the
    // empty prefix shares a pass with a non-empty one; with batch 2 it runs alone (a KV cache of capacity 0).
    let groups = vec![
        Group { prefix: vec![5, 9, 2, 7, 1], suffixes: vec![vec![3, 4], vec![8], vec![6, 6, 6, 2]] },
        Group { prefix: vec![11, 3], suffixes: vec![vec![1, 2, 3]] },
        Group { prefix: vec![], suffixes: vec![vec![4, 5, 6], vec![7]] },
        Group { prefix: vec![2; 9], suffixes: vec![vec![9, 8, 7, 6, 5]] },
    ];
    for batch in [3, 2] {
        let mut seen = 0;
        prefix::run(&model, None, &groups, batch, |g, s, hidden| {
            let (p, x) = (&groups[g].prefix, &groups[g].suffixes[s]);
            let whole: Vec<u32> = p.iter().chain(x).copied().collect();
            let mut cache = model.new_cache(1, whole.len()).unwrap();
            let want = model.backend.download(&model.forward(&Input::single(&whole), &mut cache).unwrap()).unwrap();
            let want = &want[p.len() * h..];
            assert_eq!(hidden.len(), want.len());
            let diff = hidden.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff < 1e-4, "batch {batch}, group {g} suffix {s}: hidden states differ by {diff}");
            seen += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, 7);
    }
}

fn task_error(task: Task, files: &[(&str, &str)]) -> String {
    let d = tempfile::tempdir().unwrap();
    let folder = d.path().join(task.name());
    std::fs::create_dir_all(&folder).unwrap();
    for (name, body) in files {
        std::fs::write(folder.join(name), body).unwrap();
    }
    task.load(d.path()).unwrap_err().to_string()
}

fn expect(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "error `{e}` lacks `{p}`");
    }
}

#[test]
fn malformed_task_files_name_the_file_and_line() {
    // Missing file.
    expect(&task_error(Task::Piqa, &[]), &["valid.jsonl"]);
    // Broken JSON on line 2.
    let good = r#"{"goal": "g", "sol1": "a", "sol2": "b"}"#;
    expect(
        &task_error(Task::Piqa, &[("valid.jsonl", &format!("{good}\n{{\"goal\": \n")), ("valid-labels.lst", "0\n1\n")]),
        &["valid.jsonl", "line 2"],
    );
    // Missing field, label count mismatch, bad label.
    expect(
        &task_error(
            Task::Piqa,
            &[("valid.jsonl", "{\"goal\": \"g\", \"sol1\": \"a\"}\n"), ("valid-labels.lst", "0\n")],
        ),
        &["valid.jsonl", "line 1", "sol2"],
    );
    expect(
        &task_error(Task::Piqa, &[("valid.jsonl", &format!("{good}\n{good}\n")), ("valid-labels.lst", "0\n")]),
        &["valid-labels.lst", "1 labels for the 2 items"],
    );
    expect(
        &task_error(Task::Piqa, &[("valid.jsonl", &format!("{good}\n{good}\n")), ("valid-labels.lst", "0\n7\n")]),
        &["valid-labels.lst", "line 2", "`7`"],
    );
    // HellaSwag: truncated (not 6 lines per item), gold out of range.
    expect(
        &task_error(Task::HellaSwag, &[("hellaswag_val_full.txt", "Label: ctx\n1\na\nb\n")]),
        &["hellaswag_val_full.txt", "4 lines"],
    );
    expect(
        &task_error(
            Task::HellaSwag,
            &[("hellaswag_val_full.txt", "Label: ctx\n1\na\nb\nc\nd\nLabel: ctx\n9\na\nb\nc\nd\n")],
        ),
        &["hellaswag_val_full.txt", "line 8", "`9`"],
    );
    // WinoGrande: no blank.
    let wg = r#"{"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}"#;
    expect(
        &task_error(Task::WinoGrande, &[("dev.reconstructed.jsonl", wg), ("dev-labels.lst", "1\n")]),
        &["dev.reconstructed.jsonl", "line 1", "`_`"],
    );
    // ARC: answer key not among the labels; choices missing.
    let arc = r#"{"question": {"stem": "s", "choices": [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}]}, "answerKey": "E"}"#;
    expect(
        &task_error(Task::ArcEasy, &[("ARC-Easy-Test.jsonl", &format!("{arc}\n"))]),
        &["ARC-Easy-Test.jsonl", "line 1", "answerKey `E`"],
    );
    expect(
        &task_error(
            Task::ArcChallenge,
            &[("ARC-Challenge-Test.jsonl", "{\"question\": {\"stem\": \"s\"}, \"answerKey\": \"A\"}\n")],
        ),
        &["line 1", "question.choices"],
    );
    // BoolQ: label neither true nor false.
    expect(
        &task_error(Task::BoolQ, &[("val.jsonl", "{\"passage\": \"p\", \"question\": \"q\", \"label\": \"maybe\"}\n")]),
        &["val.jsonl", "line 1", "maybe"],
    );
}

#[test]
fn mmlu_files_missing_or_malformed_name_the_file_and_row() {
    use qpeft::eval::mmlu::load_split;
    let d = tempfile::tempdir().unwrap();
    let e = load_split(d.path(), "test").unwrap_err().to_string();
    expect(&e, &["test"]);
    std::fs::create_dir_all(d.path().join("test")).unwrap();
    std::fs::write(d.path().join("test/anatomy_test.csv"), "Q,a,b,c,d,A\nQ2,a,b,c,d\n").unwrap();
    expect(&load_split(d.path(), "test").unwrap_err().to_string(), &["anatomy_test.csv", "row 2", "5 columns"]);
}

#[test]
fn the_shared_datasets_load_with_their_documented_sizes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets");
    let sizes = [
        (Task::HellaSwag, 10042),
        (Task::Piqa, 1838),
        (Task::WinoGrande, 1267),
        (Task::ArcEasy, 2376),
        (Task::ArcChallenge, 1172),
        (Task::BoolQ, 3270),
        (Task::OpenBookQa, 500),
    ];
    for (task, n) in sizes {
        let items = task.load(&dir).unwrap();
        assert_eq!(items.len(), n, "{}", task.name());
        assert!(items.iter().all(|it| it.gold < it.pairs.len()));
    }
    let test = qpeft::eval::mmlu::load_split(&dir.join("mmlu"), "test").unwrap();
    assert_eq!((test.len(), test.values().map(Vec::len).sum::<usize>()), (57, 14042));
}
