//! Fuzzing of every input format qpeft reads (issue 24): GGUF and safetensors models, HF config and tokenizer files,
//! PEFT adapters, run and study TOML, training data and the benchmark datasets.
//!
//! Each target (`targets::ALL`) is a folder holding one valid input; case `i` of a run seeded `s` rewrites one of
//! the target's files with a mutation drawn from `(s, target, i)` alone, so any case can be replayed by its number
//! (`qpeft-fuzz TARGET --case I`). A case passes when qpeft returns (a load or an error) within the time limit
//! without panicking and without holding more memory than the input could justify; each error is also checked to
//! name a file of the input. Panics, hangs and oversized allocations are failures: the run stops at a hang (the
//! process cannot take a stuck case back) and at an allocation over `alloc::CAP`, with the case's number printed.

pub mod alloc;
mod gguf_fields;
mod mutate;
pub mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand_chacha::rand_core::SeedableRng;

use qpeft::tokenizer::Tokenizer;
use targets::Target;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

/// Where a fuzz run finds the repository's fixtures, configs and the datasets, and the shared tokenizer.
pub struct Env {
    pub root: PathBuf,
    pub fixtures: PathBuf,
    pub datasets: PathBuf,
    /// A small HF tokenizer directory (tiny-llama's, with a chat template).
    pub tokenizer_dir: PathBuf,
    tokenizer: OnceLock<Tokenizer>,
}

impl Env {
    /// `root` is the repository; `work` a scratch folder for the cases.
    pub fn new(root: &Path, datasets: &Path, work: &Path) -> qpeft::Result<Env> {
        let mut env = Env {
            root: root.to_path_buf(),
            fixtures: root.join("tests/fixtures"),
            datasets: datasets.to_path_buf(),
            tokenizer_dir: work.join("tokenizer"),
            tokenizer: OnceLock::new(),
        };
        let hf = targets::find("tokenizer-json").expect("target exists");
        (hf.setup)(&env, hf, &env.tokenizer_dir)?;
        env.tokenizer = OnceLock::from(Tokenizer::from_hf_dir(&env.tokenizer_dir)?);
        Ok(env)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer.get().expect("set by Env::new")
    }

    pub fn has_datasets(&self) -> bool {
        self.datasets.join("mmlu").is_dir()
    }
}

/// What a target's cases did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Tally {
    pub target: String,
    pub inputs: u64,
    /// Inputs qpeft accepted.
    pub loads: u64,
    /// Inputs refused with an error.
    pub errors: u64,
    /// Errors whose message names no file of the input.
    pub unnamed: u64,
    pub panics: u64,
    /// Inputs whose peak memory exceeded `memory_bound` of their size.
    pub over_memory: u64,
    /// The largest peak of live bytes during one case (above what was live before it).
    pub max_case_bytes: usize,
    pub max_case_ms: f64,
    pub seconds: f64,
    /// Up to five failing cases: (case number, what happened).
    pub failures: Vec<(u64, String)>,
    /// Up to three error messages that name no file of the input.
    pub unnamed_examples: Vec<String>,
}

/// Memory a case may use: a fixed allowance for the model and tokenizer machinery, plus 64 bytes per input byte
/// (a 4-bit weight becomes a 4-byte float, a JSON number a value, a token a vector entry).
pub fn memory_bound(input_len: usize) -> usize {
    (64 << 20) + 64 * input_len
}

/// The case's mutation stream: a function of the run's seed, the target and the case number alone.
fn case_rng(seed: u64, target: &str, case: u64) -> mutate::Rand {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target.bytes().chain(seed.to_le_bytes()).chain(case.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    mutate::Rand::seed_from_u64(h)
}

static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);
/// Milliseconds since `EPOCH` at which the running case started (0: none running).
static CASE_STARTED: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();
static WATCHED: Mutex<Option<(String, PathBuf)>> = Mutex::new(None);

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Panics are counted, not printed: the hook keeps the message for the tally.
fn install_hooks(timeout: Duration) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        std::panic::set_hook(Box::new(|info| {
            let loc = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            *PANIC_MESSAGE.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{msg}{loc}"));
        }));
        // The watchdog: a case past the limit is a hang; the process cannot take it back, so it reports and exits.
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(50));
            let started = CASE_STARTED.load(Ordering::SeqCst);
            if started != 0 && now_ms().saturating_sub(started) > timeout.as_millis() as u64 {
                let watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some((what, input)) = watched {
                    eprintln!(
                        "\nqpeft-fuzz: HANG: {what} ran past {} ms; its input is in {}",
                        timeout.as_millis(),
                        input.display()
                    );
                }
                std::process::exit(3);
            }
        });
    });
}

pub struct Options {
    pub seed: u64,
    pub timeout: Duration,
    /// Cases first..first+count.
    pub first: u64,
    pub count: u64,
    /// Where failing inputs are copied.
    pub keep: Option<PathBuf>,
}

/// Runs `opts.count` cases of `target` in `work/<target>`.
pub fn run_target(
    env: &Env,
    target: &Target,
    work: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(&Tally),
) -> qpeft::Result<Tally> {
    install_hooks(opts.timeout);
    let case_dir = work.join(target.name);
    std::fs::create_dir_all(&case_dir).map_err(|e| qpeft::Error::io(&case_dir, e))?;
    let seeds = targets::seeds(target, env, &case_dir)?;
    let originals: Vec<Vec<u8>> = (0..target.files.len())
        .map(|f| seeds.iter().find(|(i, _)| *i == f).map(|(_, s)| s.clone()).expect("every file has a seed"))
        .collect();
    // Every seed must load as it is: otherwise the target is misconfigured and its errors mean nothing.
    for (f, seed) in &seeds {
        let path = case_dir.join(target.files[*f]);
        std::fs::write(&path, seed).map_err(|e| qpeft::Error::io(&path, e))?;
        (target.run)(env, target, &case_dir).map_err(|e| {
            qpeft::Error::Invalid(format!("{}: a seed of {} does not load: {e}", target.name, target.files[*f]))
        })?;
        std::fs::write(&path, &originals[*f]).map_err(|e| qpeft::Error::io(&path, e))?;
    }
    let case_path = case_dir.to_string_lossy().into_owned();
    let mut tally = Tally { target: target.name.to_string(), ..Default::default() };
    let started = Instant::now();
    for case in opts.first..opts.first + opts.count {
        let mut rng = case_rng(opts.seed, target.name, case);
        let (file, seed) = &seeds[mutate::below(&mut rng, seeds.len())];
        let input = (target.mutate)(seed, &mut rng);
        for (f, name) in target.files.iter().enumerate() {
            let bytes = if f == *file { &input } else { &originals[f] };
            let path = case_dir.join(name);
            std::fs::write(&path, bytes).map_err(|e| qpeft::Error::io(&path, e))?;
        }
        let what = format!("{} case {case} (seed {})", target.name, opts.seed);
        *WATCHED.lock().unwrap_or_else(|e| e.into_inner()) = Some((what.clone(), case_dir.join(target.files[*file])));
        alloc::CASE.store(case as usize, Ordering::SeqCst);
        let before = alloc::reset_peak();
        let t0 = Instant::now();
        CASE_STARTED.store(now_ms(), Ordering::SeqCst);
        let outcome = catch_unwind(AssertUnwindSafe(|| (target.run)(env, target, &case_dir)));
        CASE_STARTED.store(0, Ordering::SeqCst);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let used = alloc::peak().saturating_sub(before);
        tally.inputs += 1;
        tally.max_case_ms = tally.max_case_ms.max(ms);
        tally.max_case_bytes = tally.max_case_bytes.max(used);
        let mut failure = None;
        match outcome {
            Ok(Ok(())) => tally.loads += 1,
            Ok(Err(e)) => {
                tally.errors += 1;
                let msg = e.to_string();
                if !msg.contains(&case_path) {
                    tally.unnamed += 1;
                    if tally.unnamed_examples.len() < 3 {
                        tally.unnamed_examples.push(format!("case {case}: {msg}"));
                    }
                }
            }
            Err(_) => {
                tally.panics += 1;
                let msg = PANIC_MESSAGE.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
                failure = Some(format!("panic: {msg}"));
            }
        }
        if used > memory_bound(input.len()) {
            tally.over_memory += 1;
            failure = Some(format!("{used} bytes live for a {}-byte input", input.len()));
        }
        if let Some(f) = failure {
            if let Some(keep) = &opts.keep {
                let to = keep.join(format!("{}-{case}-{}", target.name, target.files[*file].replace('/', "_")));
                let _ = std::fs::create_dir_all(keep).and_then(|_| std::fs::write(&to, &input));
            }
            if tally.failures.len() < 5 {
                tally.failures.push((case, f));
            }
        }
        if tally.inputs.is_multiple_of(1000) {
            tally.seconds = started.elapsed().as_secs_f64();
            progress(&tally);
        }
    }
    tally.seconds = started.elapsed().as_secs_f64();
    Ok(tally)
}
