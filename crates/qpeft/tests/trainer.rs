//! The trainer's parts against hand-derived expectations: data files and their errors, QLoRA's collator, run
//! config validation, adapter files (write → read → same adapter; PEFT fields), and merged model directories.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::{fixtures, rel_err};
use qpeft::adapters::hierarchical::HierarchicalMethod;
use qpeft::adapters::ir_qlora::IrQloraMethod;
use qpeft::adapters::lora::LoraMethod;
use qpeft::adapters::peft::{read_adapter, read_base, write_adapter, BaseRecord};
use qpeft::adapters::q_bara::QBaraMethod;
use qpeft::adapters::qa_hira::QaHiraMethod;
use qpeft::adapters::set::AdapterSet;
use qpeft::adapters::{AdapterConfig, Method};
use qpeft::arch::Proj;
use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;
use qpeft::data::collate::Collator;
use qpeft::data::{load, DataFormat, Example};
use qpeft::model::merge::MergedDtype;
use qpeft::model::train::IGNORE;
use qpeft::model::{Checkpoint, Decoder, Input};
use qpeft::train::base::load_model;
use qpeft::train::config::RunConfig;
use qpeft::train::run_dir::RunDir;
use qpeft::train::trainer::Trainer;

fn tiny_gguf() -> PathBuf {
    fixtures().join("gguf/tiny-llama-spm.gguf")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(text.as_bytes()).unwrap();
    p
}

fn tokenizer() -> qpeft::tokenizer::Tokenizer {
    Checkpoint::open(&tiny_gguf()).unwrap().tokenizer().unwrap()
}

#[test]
fn data_files_load_and_malformed_records_name_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let alpaca = write(d.path(), "a.json", "[\n {\"instruction\": \"Say hi\", \"input\": \"\", \"output\": \"hi\"},\n {\"instruction\": \"Add\", \"input\": \"1 2\", \"output\": \"3\"}\n]");
    let ex = load(&alpaca, DataFormat::Alpaca, &tok).unwrap();
    assert_eq!(ex[0].source, "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi\n\n### Response: ");
    assert!(ex[1].source.contains("### Input:\n1 2\n\n### Response: ") && ex[1].target == "3");
    // The same records gzipped.
    let gz = d.path().join("a.json.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::default());
    enc.write_all(&std::fs::read(&alpaca).unwrap()).unwrap();
    enc.finish().unwrap();
    assert_eq!(load(&gz, DataFormat::Alpaca, &tok).unwrap(), ex);

    let bad = write(d.path(), "bad.json", "[\n {\"instruction\": \"x\", \"input\": \"\", \"output\": \"y\"},\n {\"instruction\": \"x\",\n  \"input\": \"\"}\n]");
    let e = load(&bad, DataFormat::Alpaca, &tok).unwrap_err().to_string();
    assert!(e.contains("bad.json") && e.contains("missing field `output`") && e.contains("line 4"), "{e}");

    let oasst = write(
        d.path(),
        "o.jsonl",
        "{\"text\": \"### Human: hi### Assistant: hello\"}\n\n{\"text\": \"### Human: a### Assistant: b\"}\n",
    );
    let ex = load(&oasst, DataFormat::Oasst, &tok).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0], Example { source: String::new(), target: "### Human: hi### Assistant: hello".into() });

    let jsonl = write(
        d.path(),
        "g.jsonl",
        "{\"prompt\": \"p\", \"response\": \"r\"}\n{\"prompt\": \"p\", \"response\": \"r\"}\n{\"prompt\": \"p\"}\n",
    );
    let e = load(&jsonl, DataFormat::Jsonl, &tok).unwrap_err().to_string();
    assert!(e.contains("g.jsonl") && e.contains("line 3") && e.contains("missing field `response`"), "{e}");
    assert!(!e.contains("untagged"), "{e}");
    let odd = write(d.path(), "k.jsonl", "{\"question\": \"q\", \"answer\": \"a\"}\n");
    let e = load(&odd, DataFormat::Jsonl, &tok).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("[answer, question]") && e.contains("\"messages\""), "{e}");
    let chat = write(d.path(), "c.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
    let e = load(&chat, DataFormat::Jsonl, &tok).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("must be the assistant's reply"), "{e}");
    let truncated = write(d.path(), "t.json", "[{\"instruction\": \"x\", \"out");
    let e = load(&truncated, DataFormat::Alpaca, &tok).unwrap_err().to_string();
    assert!(e.contains("t.json") && e.contains("line 1"), "{e}");
    let e = load(&d.path().join("missing.json"), DataFormat::Alpaca, &tok).unwrap_err().to_string();
    assert!(e.contains("missing.json"), "{e}");
}

#[test]
fn the_collator_masks_the_source_and_truncates_each_part() {
    let tok = tokenizer();
    let eos = tok.token_id(tok.eos_token.as_deref().unwrap()).unwrap();
    let bos = tok.bos_token.clone().unwrap_or_default();
    let ex = Example { source: "abc de".into(), target: "fg h".into() };
    // Source and target are tokenized separately, without special tokens (QLoRA).
    let src = tok.encode(&format!("{bos}abc de"), false).unwrap();
    let tgt = tok.encode("fg h", false).unwrap();
    let c = Collator::new(&tok, 64, 64, false).unwrap();
    let t = c.tokenize(&ex).unwrap();
    let want_ids: Vec<u32> = src.iter().chain(&tgt).copied().chain([eos]).collect();
    assert_eq!(t.ids, want_ids);
    let want_labels: Vec<u32> = src.iter().map(|_| IGNORE).chain(tgt.iter().copied()).chain([eos]).collect();
    assert_eq!(t.labels, want_labels);
    // train_on_source keeps the source labels; max lengths cut each part on its own.
    let t = Collator::new(&tok, 64, 64, true).unwrap().tokenize(&ex).unwrap();
    assert_eq!(t.labels, t.ids);
    let t = Collator::new(&tok, 2, 1, false).unwrap().tokenize(&ex).unwrap();
    assert_eq!(t.ids, vec![src[0], src[1], tgt[0]]);
    assert_eq!(t.labels, vec![IGNORE, IGNORE, tgt[0]]);
    // Batches are right-padded, padding masked from attention and loss.
    let long = c.tokenize(&Example { source: "a much longer source text".into(), target: "x".into() }).unwrap();
    let short = c.tokenize(&ex).unwrap();
    let b = c.batch(&[&short, &long]);
    let seq = long.ids.len();
    assert_eq!((b.input.batch, b.input.seq), (2, seq));
    assert_eq!(&b.input.mask[..seq], &[vec![1; short.ids.len()], vec![0; seq - short.ids.len()]].concat()[..]);
    assert!(b.labels[short.ids.len()..seq].iter().all(|&l| l == IGNORE));
}

fn tiny_config(dir: &Path, extra: &str) -> String {
    format!(
        "[model]\npath = {:?}\n[adapter]\nmethod = \"lora\"\nrank = 4\n[data]\nbuiltin = \"dates\"\nbuiltin_size = 40\neval_size = 8\n[train]\nout_dir = {:?}\nsteps = 3\nbatch_size = 2\ngrad_accum = 1\n{extra}",
        tiny_gguf(),
        dir.join("run")
    )
}

#[test]
fn run_configs_refuse_unknown_keys_and_bad_values() {
    let d = tempfile::tempdir().unwrap();
    let file = Path::new("run.toml");
    let ok = tiny_config(d.path(), "");
    let cfg = RunConfig::parse(
        file,
        &ok,
        &["train.steps=7".into(), "train.optimizer=adamw-8bit".into(), "data.eval_size = 4".into()],
    )
    .unwrap();
    assert_eq!((cfg.train.steps, cfg.data.eval_size), (7, 4));
    assert_eq!(cfg.train.optimizer.state_bits(), qpeft::train::optimizer::StateBits::B8);
    assert!(cfg.text.contains("steps = 7"), "the snapshot holds the edits");
    let err = |text: &str, sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::parse(file, text, &sets).unwrap_err().to_string()
    };
    // A bad value from the command line is blamed on the option that set it, with the key and the value.
    let e = err(&ok, &["train.stepz=3"]);
    assert!(e.starts_with("--set train.stepz=3: ") && e.contains("unknown field `stepz`"), "{e}");
    let e = err(&ok, &["train.steps=twenty"]);
    assert!(e.starts_with("--set train.steps=twenty: field `train.steps`: ") && e.contains("\"twenty\""), "{e}");
    // A bad value in the file names the file and the dotted key.
    let e = err(&ok.replace("steps = 3", "steps = \"three\""), &[]);
    assert!(e.starts_with("run.toml: field `train.steps`: ") && e.contains("three"), "{e}");
    let e = err(&ok, &["training.steps=3"]);
    assert!(e.contains("`training`") && e.contains("unknown section"), "{e}");
    let e = err(&ok, &["train.lr=-1"]);
    assert!(e.contains("--set train.lr=-1") && e.contains("`train.lr`") && e.contains("-1"), "{e}");
    let e = err(&ok, &["train.beta2=1.5"]);
    assert!(e.contains("`train.beta2`") && e.contains("1.5"), "{e}");
    let e = err(&ok, &["train.optimizer=sgd"]);
    assert!(e.contains("`train.optimizer`") && e.contains("sgd"), "{e}");
    let e = err(&ok, &["quant.format=nf3"]);
    assert!(e.contains("`quant.format`") && e.contains("nf3"), "{e}");
    let e = err(&ok, &["data.path=x.json"]);
    assert!(e.starts_with("--set data.path=x.json: ") && e.contains("only one") && e.contains("--unset"), "{e}");
    let e = err(&ok, &["data.builtin=sums"]);
    assert!(e.contains("`data.builtin`") && e.contains("sums"), "{e}");
    let e = err(&ok, &["adapter.rnk=3"]);
    assert!(e.contains("adapter.rnk"), "{e}");
    let e = err(&ok, &["train.steps=\"many\""]);
    assert!(e.contains("`train.steps`") && e.contains("many"), "{e}");
    let e = err("[model]\npath = \"x\"\n[adapter]\n", &[]);
    assert!(e.contains("`data`") && e.contains("missing"), "{e}");
    // Checkpointing: a policy by name, "auto", or the old booleans; the memory budget in MiB or with a unit.
    let parse = |sets: &[&str]| {
        let cfg = RunConfig::parse(file, &ok, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        (cfg.train.checkpointing, cfg.train.memory_budget.map(|b| b.0))
    };
    use qpeft::model::train::Checkpointing;
    use qpeft::train::config::CheckpointSetting::{Auto, Fixed};
    assert_eq!(parse(&[]), (Fixed(Checkpointing::Full), None));
    assert_eq!(parse(&["train.checkpointing=false"]).0, Fixed(Checkpointing::None));
    assert_eq!(parse(&["train.checkpointing=true"]).0, Fixed(Checkpointing::Full));
    assert_eq!(parse(&["train.checkpointing=selective"]).0, Fixed(Checkpointing::Selective));
    assert_eq!(parse(&["train.checkpointing=offload"]).0, Fixed(Checkpointing::Offload));
    assert_eq!(parse(&["train.checkpointing=auto", "train.memory_budget=512"]), (Auto, Some(512 << 20)));
    assert_eq!(parse(&["train.memory_budget=1.5GiB"]).1, Some(3 << 29));
    assert_eq!(parse(&["train.memory_budget=\"2 GB\""]).1, Some(2_000_000_000));
    let e = err(&ok, &["train.checkpointing=partial"]);
    assert!(e.contains("`train.checkpointing`") && e.contains("partial") && e.contains("selective"), "{e}");
    let e = err(&ok, &["train.memory_budget=12TB"]);
    assert!(e.contains("`train.memory_budget`") && e.contains("TB"), "{e}");
    let e = err(&ok, &["train.memory_budget=-3GiB"]);
    assert!(e.contains("`train.memory_budget`") && e.contains("-3"), "{e}");

    // Model-dependent values fail when the run starts: a rank above the module's dimensions.
    let cfg = RunConfig::parse(file, &ok, &["adapter.rank=100".into()]).unwrap();
    let (model, tok, _) = load_model(&cfg, Cpu::new(), &mut |_, _| {}).unwrap();
    let run = RunDir::create(&d.path().join("run"), false).unwrap();
    let e = Trainer::new(&cfg, &model, &tok, run, false).err().unwrap().to_string();
    assert!(e.contains("rank = 100") && e.contains("model.layers.0.self_attn.q_proj"), "{e}");
    // A base that is already quantized needs quant.format = "none".
    let cfg = RunConfig::parse(file, &ok, &["quant.icq=true".into(), "quant.format=fp4".into()]).unwrap();
    let e = load_model(&cfg, Cpu::new(), &mut |_, _| {}).err().unwrap().to_string();
    assert!(e.contains("`quant.icq`"), "{e}");
    // ICQ's NF4 has blocks of 64: another block size would be recorded but not used.
    let cfg =
        RunConfig::parse(file, &ok, &["quant.icq=true".into(), "quant.format=nf4".into(), "quant.block=128".into()])
            .unwrap();
    let e = load_model(&cfg, Cpu::new(), &mut |_, _| {}).err().unwrap().to_string();
    assert!(e.contains("`quant.block`") && e.contains("128") && e.contains("64"), "{e}");
}

/// "auto" checkpointing on the CPU takes the host's memory: with room for everything it keeps every activation; with
/// no room beyond what the process holds it offloads (on the CPU: full checkpointing); and a budget that leaves a
/// policy's estimate (`model::memory`) with a tenth to spare, beside the resident memory and the gradients and moments
/// still to come, picks that policy. (A million rows make the policies' estimates hundreds of MiB apart, far more than
/// the resident memory moves between reading it here and in `checkpointing_for`; no pass runs.)
#[test]
fn auto_checkpointing_picks_the_fastest_policy_that_fits_the_budget() {
    use qpeft::model::block::mlp_chunk;
    use qpeft::model::memory::activation_bytes;
    use qpeft::model::train::Checkpointing;
    use qpeft::train::optimizer::OptimizerState;
    use qpeft::train::step::StepRecipe;
    let d = tempfile::tempdir().unwrap();
    let cfg = RunConfig::parse(Path::new("run.toml"), &tiny_config(d.path(), ""), &["train.checkpointing=auto".into()])
        .unwrap();
    let (model, _, _) = load_model(&cfg, Cpu::new(), &mut |_, _| {}).unwrap();
    let set = AdapterSet::build(&model.backend, &model.spec, 1, |_, _| Some(common::methods()[0].clone())).unwrap();
    let state = OptimizerState::new();
    let choose = |rows: usize, budget: Option<usize>| {
        let recipe = StepRecipe { memory_budget: budget, ..StepRecipe::from_config(&cfg) };
        recipe.checkpointing_for(&model, &set, &state, rows).unwrap().0
    };
    assert_eq!(choose(1024, None), Checkpointing::None, "this machine has room for the tiny model's activations");
    assert_eq!(choose(1024, Some(1)), Checkpointing::Offload);
    let rows = 1 << 20;
    let s = &model.spec;
    let chunk = mlp_chunk(rows, s.intermediate_size, s.hidden_size, s.num_layers, None);
    let rss = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB");
        kib.trim().parse::<usize>().unwrap() << 10
    };
    // 32-bit AdamW's moments before the first step, and the gradients.
    let pending = 12 * set.trainable();
    let need = |p| activation_bytes(s, rows, chunk, 4, cfg.train.loss_chunk, p) * 11 / 10;
    for policy in Checkpointing::ALL {
        let got = choose(rows, Some(rss() + (16 << 20) + pending + need(policy)));
        // The policy itself, or an earlier one that needs no more (two layers: full keeps as much as offload's two
        // blocks in flight).
        let want = Checkpointing::ALL.into_iter().find(|&p| need(p) <= need(policy)).unwrap();
        assert_eq!(got, want, "{}: {} MiB", policy.name(), need(policy) >> 20);
    }
    assert_eq!(need(Checkpointing::Full), need(Checkpointing::Offload), "the tiny model has two layers");
}

/// A data-parallel group that sums while the backward goes on (NCCL) gets each layer's gradients in buckets, last
/// layer first, during the last micro-batch's backward; the step's result is the same, bit for bit, as summing all of
/// them after the backward. Checked on two thread ranks with a wrapper that buckets.
#[test]
fn gradients_summed_in_buckets_during_the_backward_equal_those_summed_after_it() {
    use qpeft::backend::collective::{Collective, Threads};
    use qpeft::train::optimizer::OptimizerState;
    use qpeft::train::step::StepRecipe;
    use std::sync::Mutex;

    struct Bucketed {
        inner: Threads,
        buckets: std::sync::Arc<Mutex<Vec<usize>>>,
    }
    impl Collective<Cpu> for Bucketed {
        fn rank(&self) -> usize {
            Collective::<Cpu>::rank(&self.inner)
        }
        fn world(&self) -> usize {
            Collective::<Cpu>::world(&self.inner)
        }
        fn all_reduce_host(&self, values: &mut [f64]) -> qpeft::error::Result<()> {
            Collective::<Cpu>::all_reduce_host(&self.inner, values)
        }
        fn finish(&self) {
            Collective::<Cpu>::finish(&self.inner)
        }
        fn overlaps_buckets(&self) -> bool {
            true
        }
        fn all_reduce_bucket(&self, be: &Cpu, bufs: &mut [&mut Vec<f32>]) -> qpeft::error::Result<()> {
            self.buckets.lock().unwrap().push(bufs.len());
            self.inner.all_reduce(be, bufs)
        }
    }

    let d = tempfile::tempdir().unwrap();
    let cfg =
        RunConfig::parse(Path::new("run.toml"), &tiny_config(d.path(), ""), &["train.grad_accum=2".into()]).unwrap();
    let (model, _, _) = load_model(&cfg, Cpu::new(), &mut |_, _| {}).unwrap();
    let recipe = StepRecipe::from_config(&cfg);
    let layers = model.spec.num_layers;
    let buckets = std::sync::Arc::new(Mutex::new(Vec::new()));
    let run = |bucketed: bool| -> Vec<Vec<Vec<f32>>> {
        let ranks = Threads::group(2);
        std::thread::scope(|scope| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|t| {
                    let (model, recipe, buckets) = (&model, &recipe, buckets.clone());
                    scope.spawn(move || {
                        let comm: Box<dyn Collective<Cpu>> =
                            if bucketed { Box::new(Bucketed { inner: t, buckets }) } else { Box::new(t) };
                        let mut set = AdapterSet::build(&model.backend, &model.spec, 3, |_, _| {
                            Some(common::methods()[0].clone())
                        })
                        .unwrap();
                        let mut state = OptimizerState::new();
                        let mut n = comm.rank();
                        for step in 0..2 {
                            recipe
                                .step(model, &mut set, &mut state, step, comm.as_ref(), &mut || {
                                    n += 1;
                                    let mut b = common::batch(model.spec.vocab_size);
                                    b.input.tokens.iter_mut().for_each(|t| *t = (*t + n as u32) % 50);
                                    Ok(b)
                                })
                                .unwrap();
                        }
                        comm.finish();
                        set.named_params().iter().map(|(_, p)| p.value.clone()).collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let (plain, bucketed) = (run(false), run(true));
    assert_eq!(plain[0], plain[1], "the ranks' replicas agree");
    assert!(plain == bucketed, "bucketed sums differ from one sum after the backward");
    assert!(plain[0].iter().flatten().any(|&v| v != 0.0));
    // Two ranks × two steps × one bucket per layer, each with the layer's seven adapters' two matrices.
    let buckets = buckets.lock().unwrap();
    assert_eq!(buckets.len(), 2 * 2 * layers);
    assert!(buckets.iter().all(|&n| n == 14), "{buckets:?}");
}

#[test]
fn an_existing_run_directory_is_kept_unless_overwrite_and_only_if_it_is_a_run() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("mine");
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "thesis.tex", "precious");
    let e = RunDir::create(&dir, false).err().unwrap().to_string();
    assert!(e.contains("already exists") && e.contains("--resume"), "{e}");
    let e = RunDir::create(&dir, true).err().unwrap().to_string();
    assert!(e.contains("not a qpeft run directory"), "{e}");
    assert!(dir.join("thesis.tex").exists());
    write(&dir, "config.toml", "");
    RunDir::create(&dir, true).unwrap();
    assert!(!dir.join("thesis.tex").exists() && dir.join("checkpoints").is_dir());
}

fn random_values(set: &mut AdapterSet<Cpu>, seed: u64) {
    for (i, (_, p)) in set.named_params_mut().into_iter().enumerate() {
        p.value = common::uniform(p.numel(), seed + i as u64).iter().map(|&v| v as f32 * 0.1).collect();
    }
}

#[test]
fn adapters_written_read_back_identically_for_every_method() {
    let m = Decoder::load(&Checkpoint::open(&fixtures().join("tiny-llama")).unwrap(), Cpu::new()).unwrap();
    let lora = |rank, alpha| AdapterConfig { method: Method::Lora(LoraMethod), rank, alpha, dropout: 0.0 };
    type Rule = Box<dyn Fn(usize, Proj) -> Option<AdapterConfig>>;
    let methods: Vec<Rule> = vec![
        // Per-module ranks/alphas and a module left out in one layer (rank_pattern, full target names).
        Box::new(move |l, p| match (l, p) {
            (0, Proj::K) => None,
            (1, Proj::Down) => Some(lora(2, 4.0)),
            (_, Proj::Q) => Some(lora(8, 32.0)),
            _ => Some(lora(8, 16.0)),
        }),
        Box::new(|_, _| {
            Some(AdapterConfig { method: Method::IrQlora(IrQloraMethod), rank: 4, alpha: 16.0, dropout: 0.0 })
        }),
        Box::new(|_, _| {
            Some(AdapterConfig { method: Method::QBara(QBaraMethod { lambda: 2 }), rank: 4, alpha: 16.0, dropout: 0.0 })
        }),
        Box::new(|_, _| {
            Some(AdapterConfig {
                method: Method::QaHira(QaHiraMethod { l1: 4, l2: 8, zero_init: false }),
                rank: 1,
                alpha: 16.0,
                dropout: 0.0,
            })
        }),
        Box::new(|_, p| {
            let ranks = if p == Proj::V { vec![4] } else { vec![4, 2, 2] };
            let n = ranks.len();
            Some(AdapterConfig {
                method: Method::Hierarchical(HierarchicalMethod {
                    ranks,
                    alphas: vec![16.0; n],
                    lr_scales: vec![1.0; n],
                }),
                rank: 8,
                alpha: 16.0,
                dropout: 0.0,
            })
        }),
    ];
    let tokens: Vec<u32> = (0..10).map(|i| (i * 37 % 200) as u32).collect();
    let logits = |set: &AdapterSet<Cpu>| {
        let mut cache = m.new_cache(1, tokens.len()).unwrap();
        let h = m.forward_with(&Input::single(&tokens), &mut cache, Some(set), &mut |_, _, _| Ok(())).unwrap();
        m.logits(&h, tokens.len()).unwrap()
    };
    for (k, resolve) in methods.iter().enumerate() {
        let modules: Vec<Vec<Option<AdapterConfig>>> =
            (0..m.spec.num_layers).map(|l| Proj::ALL.iter().map(|&p| resolve(l, p)).collect()).collect();
        let mut set = AdapterSet::build(&m.backend, &m.spec, 5, |l, p| modules[l][p as usize].clone()).unwrap();
        random_values(&mut set, 100 * k as u64);
        let d = tempfile::tempdir().unwrap();
        let base = BaseRecord {
            model: "tiny-llama".into(),
            fingerprint: format!("sha256:{k}"),
            quant: serde_json::json!({"format": "nf4", "block": 64}),
        };
        write_adapter(d.path(), &m.backend, &m.spec, &set, &modules, &base).unwrap();
        assert_eq!(read_base(d.path()).unwrap(), Some(base), "method {k}");
        let (back, back_modules) = read_adapter(d.path(), &m.backend, &m.spec).unwrap();
        assert_eq!(back_modules, modules, "method {k}");
        let (a, b) = (set.named_params(), back.named_params());
        assert_eq!(a.len(), b.len());
        for ((na, pa), (nb, pb)) in a.iter().zip(&b) {
            assert_eq!((na, &pa.value), (nb, &pb.value), "method {k}");
        }
        assert_eq!(logits(&set), logits(&back));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.path().join("adapter_config.json")).unwrap()).unwrap();
        match k {
            0 => {
                // A plain PEFT LoRA config: the common r/α, exceptions as patterns, modules listed one by one.
                assert_eq!(
                    (config["peft_type"].as_str(), config["r"].as_u64(), config["lora_alpha"].as_f64()),
                    (Some("LORA"), Some(8), Some(16.0))
                );
                assert_eq!(config["rank_pattern"]["model.layers.1.mlp.down_proj"], 2);
                assert_eq!(config["alpha_pattern"]["model.layers.0.self_attn.q_proj"], 32.0);
                let targets = config["target_modules"].as_array().unwrap();
                assert_eq!(targets.len(), 13);
                assert!(!targets.iter().any(|t| t == "model.layers.0.self_attn.k_proj"));
                // Without qpeft's own metadata the PEFT fields alone give the same modules.
                let mut plain = config.clone();
                plain.as_object_mut().unwrap().remove("qpeft");
                std::fs::write(d.path().join("adapter_config.json"), serde_json::to_vec(&plain).unwrap()).unwrap();
                let (_, from_peft) = read_adapter(d.path(), &m.backend, &m.spec).unwrap();
                assert_eq!(from_peft, modules);
            }
            4 => {
                // Hierarchical: one PEFT LoRA per level; level 1 only where there are three levels.
                let l1: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(d.path().join("level_1/adapter_config.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(l1["r"], 2);
                assert!(!l1["target_modules"].as_array().unwrap().iter().any(|t| t == "v_proj"));
            }
            _ => {}
        }
    }
}

#[test]
fn adapter_files_that_do_not_fit_are_refused_by_name() {
    let m = Decoder::load(&Checkpoint::open(&fixtures().join("tiny-llama")).unwrap(), Cpu::new()).unwrap();
    let src = fixtures().join("peft-lora/adapter");
    let d = tempfile::tempdir().unwrap();
    let copy = |cfg: &str| {
        std::fs::write(d.path().join("adapter_config.json"), cfg).unwrap();
        std::fs::copy(src.join("adapter_model.safetensors"), d.path().join("adapter_model.safetensors")).unwrap();
    };
    let original = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    copy(&original.replace("\"r\": 8", "\"r\": 4"));
    let e = read_adapter(d.path(), &m.backend, &m.spec).err().unwrap().to_string();
    assert!(e.contains("adapter_model.safetensors") && e.contains("has shape [8, 64]") && e.contains("[4, 64]"), "{e}");
    copy(&original.replace("\"use_dora\": false", "\"use_dora\": true"));
    let e = read_adapter(d.path(), &m.backend, &m.spec).err().unwrap().to_string();
    assert!(e.contains("adapter_config.json") && e.contains("use_dora"), "{e}");
    copy(&original.replace("\"q_proj\",", ""));
    let e = read_adapter(d.path(), &m.backend, &m.spec).err().unwrap().to_string();
    assert!(e.contains("unexpected tensor") && e.contains("q_proj"), "{e}");
    std::fs::write(d.path().join("adapter_model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    std::fs::write(d.path().join("adapter_config.json"), &original).unwrap();
    let e = read_adapter(d.path(), &m.backend, &m.spec).err().unwrap().to_string();
    assert!(e.contains("adapter_model.safetensors"), "{e}");
}

#[test]
fn a_merged_directory_reproduces_the_adapted_model() {
    let ckpt = Checkpoint::open(&fixtures().join("tiny-llama")).unwrap();
    let mut m = Decoder::load(&ckpt, Cpu::new()).unwrap();
    let (set, _) = read_adapter(&fixtures().join("peft-lora/adapter"), &m.backend, &m.spec).unwrap();
    let tokens: Vec<u32> = (0..12).map(|i| (i * 53 % 250) as u32).collect();
    let run = |m: &Decoder<Cpu>, set: Option<&AdapterSet<Cpu>>| {
        let mut cache = m.new_cache(1, tokens.len()).unwrap();
        let h = m.forward_with(&Input::single(&tokens), &mut cache, set, &mut |_, _, _| Ok(())).unwrap();
        m.backend.download(&m.logits(&h, tokens.len()).unwrap()).unwrap()
    };
    let adapted = run(&m, Some(&set));
    let base = run(&m, None);
    m.merge_adapters(&set).unwrap();
    let d = tempfile::tempdir().unwrap();
    for dtype in [MergedDtype::F32, MergedDtype::Bf16] {
        let out = d.path().join(dtype.torch_name());
        m.write_hf_dir(&ckpt, dtype, false, &out).unwrap();
        let merged = Decoder::load(&Checkpoint::open(&out).unwrap(), Cpu::new()).unwrap();
        let got = run(&merged, None);
        let e = rel_err(&got, &adapted, |_| true);
        let moved = rel_err(&base, &adapted, |_| true);
        // f32: rounding of W + ΔW only; bf16: 8-bit mantissas (2^-9 relative per weight).
        let bound = if dtype == MergedDtype::F32 { 1e-5 } else { 2e-2 };
        assert!(e < bound && moved > 10.0 * e, "{dtype:?}: error {e:e}, adapter effect {moved:e}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["torch_dtype"], dtype.torch_name());
        assert!(cfg.get("quantization_config").is_none());
        let e = m.write_hf_dir(&ckpt, dtype, false, &out).unwrap_err().to_string();
        assert!(e.contains("already contains a model"), "{e}");
    }
}

/// A signal during an evaluation abandons it (nothing recorded), checkpoints the step, and the resumed run performs
/// that evaluation first: adapter and every evaluation end as in an uninterrupted run.
#[test]
fn an_interrupted_evaluation_is_checkpointed_and_done_first_on_resume() {
    use qpeft::train::metrics::Record;
    use qpeft::train::trainer::Progress;
    use std::sync::atomic::{AtomicBool, Ordering};
    let extra = "checkpoint_every = 0\n[eval]\nevery = 2\nmax_samples = 8\nbatch_size = 2\nexact_match = 3\nmax_new_tokens = 3\n";
    let run_to_end = |dir: &Path, stop_at_eval: Option<u64>| {
        let cfg = RunConfig::parse(Path::new("run.toml"), &tiny_config(dir, extra), &["train.steps=6".into()]).unwrap();
        let (model, tok, _) = load_model(&cfg, Cpu::new(), &mut |_, _| {}).unwrap();
        let stop = AtomicBool::new(false);
        let mut progress = |p: &Progress| {
            if let Progress::Evaluating { step, done, .. } = p {
                // Mid-evaluation: after its first exact-match answer.
                if Some(*step) == stop_at_eval && *done == 1 {
                    stop.store(true, Ordering::Relaxed);
                }
            }
        };
        let run = RunDir::start(&cfg, false).unwrap();
        let summary = Trainer::new(&cfg, &model, &tok, run, false).unwrap().run(&mut progress, &stop).unwrap();
        if let Some(at) = stop_at_eval {
            assert!(summary.interrupted && summary.steps == at, "stopped after step {}", summary.steps);
            let run = dir.join("run");
            assert!(run.join(format!("checkpoints/step-{at:07}")).is_dir(), "the interrupted step is checkpointed");
            let evals: Vec<u64> = RunDir::open(&run)
                .unwrap()
                .metrics()
                .unwrap()
                .iter()
                .filter_map(|r| if let Record::Eval(e) = r { Some(e.step) } else { None })
                .collect();
            assert!(!evals.contains(&at), "the abandoned evaluation was recorded: {evals:?}");
            let (run, cfg) = RunDir::resume(&run, &Default::default()).unwrap();
            let summary =
                Trainer::new(&cfg, &model, &tok, run, true).unwrap().run(&mut |_| {}, &AtomicBool::new(false)).unwrap();
            assert!(!summary.interrupted);
        }
        let run = RunDir::open(&dir.join("run")).unwrap();
        let evals: Vec<(u64, f64, Option<f64>)> = run
            .metrics()
            .unwrap()
            .into_iter()
            .filter_map(|r| if let Record::Eval(e) = r { Some((e.step, e.eval_loss, e.exact_match)) } else { None })
            .collect();
        (std::fs::read(dir.join("run/adapter/adapter_model.safetensors")).unwrap(), evals)
    };
    let whole = tempfile::tempdir().unwrap();
    let (adapter, evals) = run_to_end(whole.path(), None);
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 2, 4, 6]);
    for stop_at in [4, 6] {
        let d = tempfile::tempdir().unwrap();
        let (a, e) = run_to_end(d.path(), Some(stop_at));
        assert!(a == adapter, "stopped in the evaluation at step {stop_at}: the adapters differ");
        assert_eq!(e, evals, "stopped in the evaluation at step {stop_at}");
    }
}

/// One writer per run directory, in one process too: a second start or resume is refused while the first holds it,
/// and a lock left by a process that is gone is taken over.
#[test]
fn a_run_directory_has_one_writer() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("run");
    let first = RunDir::create(&dir, false).unwrap();
    write(&dir, "config.toml", "");
    for e in [RunDir::create(&dir, true).err(), RunDir::resume(&dir, &Default::default()).err()] {
        let e = e.expect("refused").to_string();
        assert!(e.contains("is in use") && e.contains(&format!("process {}", std::process::id())), "{e}");
    }
    assert!(dir.join("config.toml").exists(), "nothing was deleted");
    drop(first);
    assert!(!dir.join("writer.lock").exists(), "the lock goes with its holder");
    // A lock of a process of this host that has ended.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    write(&dir, "writer.lock", &format!("{} {}", host.trim(), gone.id()));
    let _ = RunDir::resume(&dir, &Default::default());
    // (config.toml is empty, so resume fails after the lock; the stale lock was taken over and released.)
    assert!(!dir.join("writer.lock").exists());
    // A lock of another host is respected.
    write(&dir, "writer.lock", "elsewhere 1");
    let e = RunDir::create(&dir, true).err().expect("refused").to_string();
    assert!(e.contains("process 1 on host elsewhere"), "{e}");
}

/// A step that runs out of device memory says where (step, batch shape), what the device said (asked, free), which
/// settings need less memory (the same global batch in smaller micro-batches, checkpointing, shorter examples) and how
/// to go on from the intact checkpoint.
#[test]
fn out_of_memory_in_a_step_names_the_step_the_shape_and_what_would_fit() {
    let d = tempfile::tempdir().unwrap();
    let sets = ["train.batch_size=8".into(), "train.grad_accum=2".into(), "train.checkpointing=false".into()];
    let cfg = RunConfig::parse(Path::new("run.toml"), &tiny_config(d.path(), ""), &sets).unwrap();
    let device = "CUDA: allocating 2048 MiB, 1500 MiB free: CUDA_ERROR_OUT_OF_MEMORY";
    let m = qpeft::train::trainer::out_of_memory(&cfg, Path::new("runs/x"), 3000, (8, 512), device);
    assert!(m.starts_with(device), "{m}");
    assert!(m.contains("step 3000 (batch 8 × 512 tokens)"), "{m}");
    assert!(m.contains("--set train.batch_size=4 --set train.grad_accum=4 (the same 16 examples per step)"), "{m}");
    assert!(m.contains("--set train.checkpointing=full"), "{m}");
    assert!(m.contains("qpeft train --resume runs/x"), "{m}");
    // At one example with full checkpointing: the inputs in host memory, or shorter examples.
    let sets = ["train.batch_size=1".into(), "train.checkpointing=true".into()];
    let cfg = RunConfig::parse(Path::new("run.toml"), &tiny_config(d.path(), ""), &sets).unwrap();
    let m = qpeft::train::trainer::out_of_memory(&cfg, Path::new("runs/x"), 1, (1, 4096), device);
    assert!(!m.contains("batch_size=") && m.contains("checkpointing=offload"), "{m}");
    // Already offloading: only shorter examples remain.
    let sets = ["train.batch_size=1".into(), "train.checkpointing=offload".into()];
    let cfg = RunConfig::parse(Path::new("run.toml"), &tiny_config(d.path(), ""), &sets).unwrap();
    let m = qpeft::train::trainer::out_of_memory(&cfg, Path::new("runs/x"), 1, (1, 4096), device);
    assert!(!m.contains("batch_size=") && !m.contains("checkpointing=") && m.contains("data.source_max_len="), "{m}");
}
