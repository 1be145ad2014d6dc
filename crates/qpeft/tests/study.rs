//! Studies: presets resolve to the papers' parameter counts (by hand: LLaMA-7B has 32 layers of q, k, v, o 4096 → 4096
//! and gate, up 4096 → 11008, down 11008 → 4096, so LoRA r on attention is 32 · 4 · r · 8192 and on the MLP
//! 32 · 3 · r · 15104); bad study files fail before anything runs, naming the variant and the key; the statistics agree
//! with hand-derived values.

use std::path::{Path, PathBuf};

use qpeft::arch::ModelSpec;
use qpeft::study::run::claim;
use qpeft::study::stats::{paired_bootstrap, paired_t, t_cdf, t_interval, t_quantile, PairedItems};
use qpeft::study::Study;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn totals(study: &Study, arch: &str) -> Vec<(String, usize)> {
    let counts = study.plan(&ModelSpec::builtin(arch).unwrap()).unwrap();
    let mut out: Vec<(String, usize)> = Vec::new();
    for (c, n) in study.cells.iter().zip(counts) {
        if !out.iter().any(|o| o.0 == c.group()) {
            out.push((c.group(), n.total()));
        }
    }
    out
}

#[test]
fn presets_give_the_papers_parameter_counts() {
    let attn = |r: usize| 32 * 4 * r * (4096 + 4096);
    let mlp = |r: usize| 32 * 3 * r * (4096 + 11008);
    assert_eq!(attn(64) + mlp(64), 159_907_840);
    let exp1 = Study::read(&root().join("studies/exp1-rank-by-type.toml"), &[]).unwrap();
    assert_eq!(exp1.cells.len(), 15);
    assert_eq!(
        totals(&exp1, "llama-7b"),
        [
            ("r 64".to_string(), attn(64) + mlp(64)),
            ("attention r/2".to_string(), attn(32) + mlp(64)),
            ("attention r/4".to_string(), attn(16) + mlp(64)),
            ("MLP r/2".to_string(), attn(64) + mlp(32)),
            ("MLP r/4".to_string(), attn(64) + mlp(16)),
        ]
    );
    for preset in ["h-qlora-alpaca.toml", "h-qlora-oasst1.toml"] {
        let s = Study::read(&root().join("studies").join(preset), &[]).unwrap();
        let t = totals(&s, "llama-7b");
        assert_eq!(t.len(), 4);
        assert!(t.iter().all(|(_, n)| *n == 159_907_840), "{preset}: {t:?}");
    }
    // QA-HiRA (4, 8) everywhere: in·out/32 per linear; (8, 8) on the MLP halves its share: the paper's −33.42%.
    let exp4 = Study::read(&root().join("studies/exp4-qa-hira-by-type.toml"), &[]).unwrap();
    let hira = |attn_l1: usize, mlp_l1: usize| 32 * (4 * 4096 * 4096 / (attn_l1 * 8) + 3 * 4096 * 11008 / (mlp_l1 * 8));
    let t = totals(&exp4, "llama-7b");
    assert_eq!(t[0].1, hira(4, 4));
    assert_eq!(t[0].1, 202_375_168);
    assert_eq!(t[2].1, hira(4, 8));
    assert_eq!(format!("{:.2}", 100.0 * (t[2].1 as f64 / t[0].1 as f64 - 1.0)), "-33.42");
    // Every preset resolves, and its CPU companion inherits everything but scale.
    for f in std::fs::read_dir(root().join("studies")).unwrap() {
        let path = f.unwrap().path();
        Study::read(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let cpu = Study::read(&root().join("studies/exp1-rank-by-type-cpu.toml"), &[]).unwrap();
    assert_eq!(cpu.variants, exp1.variants);
    assert_eq!(cpu.findings, exp1.findings);
    let (paper, small) = (&exp1.cells[0].config, &cpu.cells[0].config);
    assert_eq!((paper.train.lr, small.train.lr), (2e-5, 2e-5));
    assert_eq!((paper.train.steps, small.train.steps), (10_000, 20));
    assert_eq!(small.eval.tasks, paper.eval.tasks);
    assert!(!small.eval.tasks_before_training);
}

/// Writes `text` as a study file next to a copy of a fragment, and returns the error of reading it.
fn study_error(dir: &Path, text: &str, arch: Option<&str>) -> String {
    let file = dir.join("s.toml");
    std::fs::write(&file, text).unwrap();
    match Study::read(&file, &[]) {
        Err(e) => e.to_string(),
        Ok(s) => s.plan(&s.model_spec(arch).unwrap()).map(|_| ()).unwrap_err().to_string(),
    }
}

#[test]
fn bad_study_files_fail_before_anything_runs() {
    let d = tempfile::tempdir().unwrap();
    let base = root().join("configs/qlora.toml");
    let head = format!("[study]\nname = \"t\"\nbase = {base:?}\nbaseline = \"a\"\n");
    // An unknown key, in the study file and in a variant's edits.
    let e = study_error(d.path(), &format!("{head}sedes = [1]\n[[variant]]\nname = \"a\"\n"), None);
    assert!(e.contains("s.toml") && e.contains("sedes"), "{e}");
    let e = study_error(d.path(), &format!("{head}[[variant]]\nname = \"a\"\nset = {{ \"train.stepz\" = 3 }}\n"), None);
    assert!(e.contains("variant `a`") && e.contains("train.stepz"), "{e}");
    // A duplicate variant; a baseline that is not a variant.
    let e = study_error(d.path(), &format!("{head}[[variant]]\nname = \"a\"\n[[variant]]\nname = \"a\"\n"), None);
    assert!(e.contains("variant `a`") && e.contains("two variants"), "{e}");
    let e = study_error(d.path(), &format!("{head}[[variant]]\nname = \"b\"\n"), None);
    assert!(e.contains("study.baseline") && e.contains("`a`"), "{e}");
    // A missing fragment.
    let e = study_error(d.path(), &format!("{head}[[variant]]\nname = \"a\"\nfragments = [\"nope.toml\"]\n"), None);
    assert!(e.contains("variant `a`") && e.contains("nope.toml"), "{e}");
    // A variant that does not fit the model: rank 200 above SmolLM2's 192-wide k/v projections, λ 5 not dividing.
    let e = study_error(
        d.path(),
        &format!("{head}[[variant]]\nname = \"a\"\nset = {{ \"adapter.rank\" = 200 }}\n"),
        Some("smollm2-135m"),
    );
    assert!(e.contains("variant `a`") && e.contains("rank = 200") && e.contains("k_proj"), "{e}");
    let e = study_error(
        d.path(),
        &format!(
            "{head}[[variant]]\nname = \"a\"\nset = {{ \"adapter.method\" = \"q-bara\", \"adapter.lambda\" = 5, \"adapter.rank\" = 4 }}\n"
        ),
        Some("smollm2-135m"),
    );
    assert!(e.contains("variant `a`") && e.contains("lambda = 5"), "{e}");
    // A finding about a variant that does not exist.
    let e = study_error(
        d.path(),
        &format!("{head}[[variant]]\nname = \"a\"\n[[finding]]\ntext = \"x\"\nbetter = \"a\"\nworse = \"c\"\nmetric = \"mmlu_acc\"\n"),
        None,
    );
    assert!(e.contains("finding") && e.contains("`c`"), "{e}");
}

#[test]
fn t_intervals_and_tests_agree_with_tables() {
    // Student's t: P(T ≤ 2) with 1 degree of freedom is ½ + atan(2)/π; the 97.5% quantiles from the tables.
    assert!((t_cdf(2.0, 1.0) - (0.5 + 2f64.atan() / std::f64::consts::PI)).abs() < 1e-12);
    for (df, q) in [(1.0, 12.706_204_736), (2.0, 4.302_652_730), (4.0, 2.776_445_105), (9.0, 2.262_157_163)] {
        assert!((t_quantile(0.975, df) - q).abs() < 1e-6, "df {df}: {}", t_quantile(0.975, df));
    }
    // 1, 2, 3: mean 2, sd 1, half-width 4.302653 / √3.
    let e = t_interval(&[1.0, 2.0, 3.0]);
    let half = 4.302_652_730 / 3f64.sqrt();
    assert!((e.mean - 2.0).abs() < 1e-12 && (e.lo.unwrap() - (2.0 - half)).abs() < 1e-6);
    assert!((e.hi.unwrap() - (2.0 + half)).abs() < 1e-6 && e.n == 3);
    // Paired: differences 1, 2, 3 give t = 2 / (1/√3) = 2√3 on 2 df; on 2 df P(T ≤ −t) = ½(1 − t/√(2 + t²)), so
    // p = 1 − 2√3/√14 ≈ 0.074: not significant, and the interval [−0.48, 4.48] includes 0.
    let p = paired_t(&[2.0, 4.0, 6.0], &[1.0, 2.0, 3.0]);
    let t = 2.0 * 3f64.sqrt();
    assert!((p.p.unwrap() - (1.0 - t / (2.0 + t * t).sqrt())).abs() < 1e-9, "{:?}", p.p);
    assert!(!p.significant() && p.lo.unwrap() < 0.0);
}

#[test]
fn the_paired_bootstrap_gives_the_known_answers() {
    // Every item right with the variant and wrong with the baseline: difference 1 in every resample.
    let ones = vec![vec![1.0; 5]; 3];
    let zeros = vec![vec![0.0; 5]; 3];
    let e = paired_bootstrap(&PairedItems { variant: &ones, baseline: &zeros }, 500, 1);
    assert_eq!((e.mean, e.lo, e.hi, e.p), (1.0, Some(1.0), Some(1.0), Some(0.0)));
    // The same predictions: no difference, p = 1.
    let e = paired_bootstrap(&PairedItems { variant: &ones, baseline: &ones }, 500, 1);
    assert_eq!((e.mean, e.lo, e.hi, e.p), (0.0, Some(0.0), Some(0.0), Some(1.0)));
    // One seed, two items with differences 1 and 0: a resample's mean is 1, ½ or 0 with probabilities ¼, ½, ¼, so
    // P(d ≤ 0) = ¼ and the two-sided p-value is ½; the interval is [0, 1].
    let (v, b) = (vec![vec![1.0, 1.0]], vec![vec![0.0, 1.0]]);
    let e = paired_bootstrap(&PairedItems { variant: &v, baseline: &b }, 20_000, 7);
    assert_eq!((e.mean, e.lo, e.hi), (0.5, Some(0.0), Some(1.0)));
    assert!((e.p.unwrap() - 0.5).abs() < 0.02, "{:?}", e.p);
    // Seeded: the same resamples each time.
    let again = paired_bootstrap(&PairedItems { variant: &v, baseline: &b }, 20_000, 7);
    assert_eq!(e, again);
}

/// Workers of one process racing for a cell whose lock a dead process left: exactly one takes it over, and none
/// fails (before the fix, a second worker removed the lock the first had just taken, or failed on a missing file).
#[test]
fn one_of_many_racing_workers_takes_a_stale_lock_over() {
    let study = Study::read(&root().join("studies/exp1-rank-by-type-cpu.toml"), &[]).unwrap();
    let cell = &study.cells[0];
    let dead_pid = u32::MAX - 1; // no such process: /proc/<pid> cannot exist
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    for round in 0..40 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cells")).unwrap();
        std::fs::write(dir.path().join(format!("cells/{}.lock", cell.id)), format!("{host} {dead_pid}")).unwrap();
        let barrier = std::sync::Barrier::new(8);
        let taken: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let lock = claim(dir.path(), cell).unwrap();
                        // Hold it until every worker has tried.
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        lock.is_some()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(taken.iter().filter(|&&t| t).count(), 1, "round {round}: {taken:?}");
    }
}
