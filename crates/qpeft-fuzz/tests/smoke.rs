//! The CI smoke of the fuzzer: a thousand seeded inputs per target (scripts/fuzz.sh runs a hundred thousand) with no
//! panic and no input holding more memory than its size justifies.

use std::path::Path;
use std::time::Duration;

use qpeft_fuzz::{run_target, targets, Env, Options};

#[test]
fn a_thousand_inputs_per_target_never_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let datasets = root.join("../shared/datasets");
    assert!(datasets.join("mmlu").is_dir(), "the benchmark datasets are expected in {}", datasets.display());
    let work = tempfile::tempdir().unwrap();
    let env = Env::new(&root, &datasets, work.path()).unwrap();
    let opts = Options { seed: 1, timeout: Duration::from_secs(60), first: 0, count: 1000, keep: None };
    let mut failures = Vec::new();
    for t in targets::ALL {
        let tally = run_target(&env, t, work.path(), &opts, &mut |_| {}).unwrap();
        assert_eq!(tally.inputs, 1000);
        // Both outcomes occur: the mutations reach past the first check, and most inputs are refused.
        assert!(tally.loads > 0 && tally.errors > 0, "{}: {} loads, {} errors", t.name, tally.loads, tally.errors);
        if tally.panics + tally.over_memory > 0 || tally.unnamed > 0 {
            failures.push(format!("{tally:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
