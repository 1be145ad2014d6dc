//! The fuzz targets: every parser a user feeds, each with the files of one input (a model directory, an adapter
//! directory, a dataset folder…), the file(s) a case rewrites, the mutation that suits their format, seeds, and what
//! qpeft does with the input (load and run a model, read an adapter, compose a run or study config, load a
//! dataset).

use std::path::{Path, PathBuf};

use qpeft::backend::cpu::Cpu;
use qpeft::data::DataFormat;
use qpeft::model::{Checkpoint, Decoder, Input};
use qpeft::tokenizer::{Message, Tokenizer};

use crate::mutate::{self, Rand};
use crate::{gguf_fields, Env};

/// Fills a case folder with an unmutated input and returns the seed contents of each of `files`.
pub type Setup = fn(&Env, &Target, &Path) -> qpeft::Result<Vec<Vec<u8>>>;

pub struct Target {
    pub name: &'static str,
    /// The files (relative to a case's folder) one of which each case rewrites.
    pub files: &'static [&'static str],
    pub mutate: fn(&[u8], &mut Rand) -> Vec<u8>,
    pub setup: Setup,
    /// What qpeft does with the input in `case`.
    pub run: fn(&Env, &Target, &Path) -> qpeft::Result<()>,
    /// Seeds come from the benchmark datasets (skipped where they are absent).
    pub needs_datasets: bool,
}

pub const ALL: &[Target] = &[
    Target {
        name: "gguf",
        files: &["model.gguf"],
        mutate: gguf_fields::mutate,
        setup: gguf_setup,
        run: run_gguf,
        needs_datasets: false,
    },
    Target {
        name: "safetensors",
        files: &["model.safetensors"],
        mutate: safetensors_mutate,
        setup: hf_setup,
        run: run_model_dir,
        needs_datasets: false,
    },
    Target {
        name: "hf-config",
        files: &["config.json"],
        mutate: mutate::json_text,
        setup: hf_setup,
        run: run_model_dir,
        needs_datasets: false,
    },
    Target {
        name: "tokenizer-json",
        files: &["tokenizer.json"],
        mutate: mutate::json_text,
        setup: hf_setup,
        run: run_tokenizer,
        needs_datasets: false,
    },
    Target {
        name: "tokenizer-config",
        files: &["tokenizer_config.json"],
        mutate: mutate::json_text,
        setup: hf_setup,
        run: run_tokenizer,
        needs_datasets: false,
    },
    Target {
        name: "adapter-config",
        files: &["adapter/adapter_config.json"],
        mutate: mutate::json_text,
        setup: adapter_setup,
        run: run_adapter,
        needs_datasets: false,
    },
    Target {
        name: "adapter-safetensors",
        files: &["adapter/adapter_model.safetensors"],
        mutate: safetensors_mutate,
        setup: adapter_setup,
        run: run_adapter,
        needs_datasets: false,
    },
    Target {
        name: "run-toml",
        files: &["run.toml"],
        mutate: mutate::toml_text,
        setup: run_toml_setup,
        run: run_run_toml,
        needs_datasets: false,
    },
    Target {
        name: "study-toml",
        files: &["studies/fuzzed.toml"],
        mutate: mutate::toml_text,
        setup: study_setup,
        run: run_study,
        needs_datasets: false,
    },
    Target {
        name: "alpaca",
        files: &["alpaca.json"],
        mutate: mutate::json_text,
        setup: alpaca_setup,
        run: run_alpaca,
        needs_datasets: true,
    },
    Target {
        name: "oasst1",
        files: &["oasst1.jsonl"],
        mutate: mutate::lines,
        setup: oasst_setup,
        run: run_oasst,
        needs_datasets: true,
    },
    Target {
        name: "jsonl",
        files: &["data.jsonl"],
        mutate: mutate::lines,
        setup: jsonl_setup,
        run: run_jsonl,
        needs_datasets: false,
    },
    Target {
        name: "mmlu",
        files: &["mmlu/test/anatomy_test.csv", "mmlu/test/virology_test.csv"],
        mutate: mutate::lines,
        setup: mmlu_setup,
        run: run_mmlu,
        needs_datasets: true,
    },
    Target {
        name: "hellaswag",
        files: &["hellaswag/hellaswag_val_full.txt"],
        mutate: mutate::lines,
        setup: task_setup,
        run: run_task,
        needs_datasets: true,
    },
    Target {
        name: "piqa",
        files: &["piqa/valid.jsonl", "piqa/valid-labels.lst"],
        mutate: mutate::lines,
        setup: task_setup,
        run: run_task,
        needs_datasets: true,
    },
    Target {
        name: "winogrande",
        files: &["winogrande/dev.reconstructed.jsonl", "winogrande/dev-labels.lst"],
        mutate: mutate::lines,
        setup: task_setup,
        run: run_task,
        needs_datasets: true,
    },
    Target {
        name: "arc_easy",
        files: &["arc_easy/ARC-Easy-Test.jsonl"],
        mutate: mutate::lines,
        setup: task_setup,
        run: run_task,
        needs_datasets: true,
    },
    Target {
        name: "boolq",
        files: &["boolq/val.jsonl"],
        mutate: mutate::lines,
        setup: task_setup,
        run: run_task,
        needs_datasets: true,
    },
    Target {
        name: "openbookqa",
        files: &["openbookqa/test.jsonl"],
        mutate: mutate::lines,
        setup: task_setup,
        run: run_task,
        needs_datasets: true,
    },
];

fn io(path: &Path) -> impl Fn(std::io::Error) -> qpeft::Error + '_ {
    move |e| qpeft::Error::io(path, e)
}

fn write(path: &Path, bytes: &[u8]) -> qpeft::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::write(path, bytes).map_err(io(path))
}

fn read(path: &Path) -> qpeft::Result<Vec<u8>> {
    std::fs::read(path).map_err(io(path))
}

/// The first `n` lines of a file (datasets are large; a few records exercise every field).
fn head(path: &Path, n: usize) -> qpeft::Result<Vec<u8>> {
    let text = String::from_utf8_lossy(&read(path)?).into_owned();
    Ok(text.lines().take(n).flat_map(|l| [l, "\n"]).collect::<String>().into_bytes())
}

/// Safetensors: the 8-byte header length or the JSON header mutated as a tree (shapes, dtypes, data offsets), else
/// byte edits.
fn safetensors_mutate(input: &[u8], rng: &mut Rand) -> Vec<u8> {
    let n = input.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    let header = n.and_then(|n| input.get(8..8usize.checked_add(n)?));
    let parsed = header.and_then(|h| serde_json::from_slice::<serde_json::Value>(h).ok());
    match (mutate::below(rng, 8), parsed) {
        (0, _) => {
            let mut out = input.to_vec();
            if out.len() >= 8 {
                out[..8].copy_from_slice(&mutate::interesting_u64(rng, n.unwrap_or(0) as u64).to_le_bytes());
            }
            out
        }
        (1..=4, Some(mut v)) => {
            if mutate::chance(rng, 50) {
                // A dtype from the format's list (or not), on one tensor.
                const DTYPES: [&str; 10] = ["F32", "F16", "BF16", "I32", "U8", "F64", "I64", "BOOL", "F8_E4M3", "Q4"];
                if let Some(obj) = v.as_object_mut() {
                    let keys: Vec<String> = obj.keys().filter(|k| *k != "__metadata__").cloned().collect();
                    if !keys.is_empty() {
                        let k = &keys[mutate::below(rng, keys.len())];
                        obj[k]["dtype"] = DTYPES[mutate::below(rng, DTYPES.len())].into();
                    }
                }
            } else {
                mutate::json_tree(&mut v, rng);
            }
            let h = serde_json::to_vec(&v).expect("JSON serializes");
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend(h);
            out.extend(&input[8 + n.unwrap_or(0)..]);
            out
        }
        _ => mutate::bytes(input, rng),
    }
}

// Models: a GGUF file, and an HF directory (config, weights, tokenizer rebuilt from the GGUF's metadata).

fn gguf_setup(env: &Env, _: &Target, case: &Path) -> qpeft::Result<Vec<Vec<u8>>> {
    let seed = read(&env.fixtures.join("gguf/tiny-llama-spm.gguf"))?;
    write(&case.join("model.gguf"), &seed)?;
    Ok(vec![seed])
}

/// Opens, loads, tokenizes and runs a model: every stage a corrupt file can reach.
pub fn load_and_run(path: &Path) -> qpeft::Result<()> {
    let ckpt = Checkpoint::open(path)?;
    let model = Decoder::load(&ckpt, Cpu::new())?;
    let tok = ckpt.tokenizer()?;
    let ids = tok.encode("Hello there", true)?;
    let ids: Vec<u32> = ids.into_iter().filter(|&t| (t as usize) < ckpt.spec.vocab_size).take(4).collect();
    if !ids.is_empty() {
        let mut cache = model.new_cache(1, ids.len())?;
        model.forward(&Input::single(&ids), &mut cache)?;
    }
    Ok(())
}

fn run_gguf(_: &Env, _: &Target, case: &Path) -> qpeft::Result<()> {
    load_and_run(&case.join("model.gguf"))
}

fn hf_setup(env: &Env, _: &Target, case: &Path) -> qpeft::Result<Vec<Vec<u8>>> {
    for f in ["config.json", "model.safetensors"] {
        write(&case.join(f), &read(&env.fixtures.join("tiny-llama").join(f))?)?;
    }
    std::fs::create_dir_all(case).map_err(io(case))?;
    Checkpoint::open(&env.fixtures.join("gguf/tiny-llama-spm.gguf"))?.write_tokenizer(case)?;
    // A chat template, so that the tokenizer target reaches the template engine.
    let cfg_path = case.join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&read(&cfg_path)?).expect("qpeft writes valid JSON");
    cfg["chat_template"] = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}".into();
    write(&cfg_path, &serde_json::to_vec_pretty(&cfg).expect("JSON serializes"))?;
    Ok(vec![]) // the files as written are the seeds (`seeds`)
}

fn run_model_dir(_: &Env, _: &Target, case: &Path) -> qpeft::Result<()> {
    load_and_run(case)
}

fn run_tokenizer(_: &Env, _: &Target, case: &Path) -> qpeft::Result<()> {
    let tok = Tokenizer::from_hf_dir(case)?;
    let ids = tok.encode("Hello <s> wörld 12345 \t\n 🙂", true)?;
    tok.decode(&ids, false)?;
    let chat = [Message { role: "user".into(), content: "Hi".into() }];
    tok.apply_chat_template(&chat, true)?;
    Ok(())
}

// Adapters: the PEFT LoRA fixture (a directory PEFT 0.21 wrote for tiny-llama).

fn adapter_setup(env: &Env, target: &Target, case: &Path) -> qpeft::Result<Vec<Vec<u8>>> {
    hf_setup(env, target, case)?;
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        write(&case.join("adapter").join(f), &read(&env.fixtures.join("peft-lora/adapter").join(f))?)?;
    }
    Ok(vec![])
}

fn run_adapter(_: &Env, _: &Target, case: &Path) -> qpeft::Result<()> {
    // As `qpeft logits MODEL --adapter DIR --other-base` runs it: a mutated `qpeft.base` reaches the quant recipe.
    let a = qpeft::train::base::load_adapted(case, Some(&case.join("adapter")), true, Cpu::new())?;
    let mut cache = a.model.new_cache(1, 2)?;
    a.model.forward_with(&Input::single(&[1, 2]), &mut cache, a.set.as_ref(), &mut |_, _, _| Ok(()))?;
    Ok(())
}

// Run and study configurations: the repository's own files are the seeds.

fn toml_seeds(dir: &Path) -> qpeft::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let p = e.map_err(io(dir))?.path();
        if p.extension().is_some_and(|x| x == "toml") {
            out.push(read(&p)?);
        }
    }
    out.sort();
    Ok(out)
}

fn run_toml_setup(env: &Env, _: &Target, case: &Path) -> qpeft::Result<Vec<Vec<u8>>> {
    std::fs::create_dir_all(case).map_err(io(case))?;
    toml_seeds(&env.root.join("configs"))
}

fn run_run_toml(_: &Env, _: &Target, case: &Path) -> qpeft::Result<()> {
    let file = case.join("run.toml");
    let text = String::from_utf8(read(&file)?).map_err(|_| qpeft::Error::format(&file, "not UTF-8"))?;
    qpeft::train::config::RunConfig::parse(&file, &text, &[]).map(drop)
}

fn study_setup(env: &Env, _: &Target, case: &Path) -> qpeft::Result<Vec<Vec<u8>>> {
    // Study files name their base and fragments as ../configs/…, and companions extend a study beside them.
    let studies = case.join("studies");
    std::fs::create_dir_all(&studies).map_err(io(&studies))?;
    let link = |from: &Path, to: &Path| {
        if !to.exists() {
            std::os::unix::fs::symlink(from, to).map_err(io(to))?;
        }
        Ok::<_, qpeft::Error>(())
    };
    link(&env.root.join("configs"), &case.join("configs"))?;
    link(&env.root.join("models"), &case.join("models"))?;
    for e in std::fs::read_dir(env.root.join("studies")).map_err(io(&env.root))? {
        let p = e.map_err(io(&env.root))?.path();
        link(&p, &studies.join(p.file_name().expect("a file")))?;
    }
    toml_seeds(&env.root.join("studies"))
}

fn run_study(_: &Env, _: &Target, case: &Path) -> qpeft::Result<()> {
    qpeft::study::Study::read(&case.join("studies/fuzzed.toml"), &[]).map(drop)
}

// Training data.

fn alpaca_setup(env: &Env, _: &Target, case: &Path) -> qpeft::Result<Vec<Vec<u8>>> {
    std::fs::create_dir_all(case).map_err(io(case))?;
    let path = env.datasets.join("alpaca/alpaca_data.json.gz");
    // The first records as a JSON array, and as JSONL (both layouts are read).
    let mut text = String::new();
    let gz = read(&path)?;
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).map_err(io(&path))?;
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| qpeft::Error::format(&path, e.to_string()))?;
    let first = &all[..12.min(all.len())];
    let jsonl: String = first.iter().map(|r| format!("{r}\n")).collect();
    Ok(vec![serde_json::to_vec_pretty(first).expect("JSON serializes"), jsonl.into_bytes()])
}

fn run_alpaca(env: &Env, _: &Target, case: &Path) -> qpeft::Result<()> {
    qpeft::data::load(&case.join("alpaca.json"), DataFormat::Alpaca, env.tokenizer()).map(drop)
}

fn oasst_setup(env: &Env, _: &Target, case: &Path) -> qpeft::Result<Vec<Vec<u8>>> {
    std::fs::create_dir_all(case).map_err(io(case))?;
    Ok(vec![head(&env.datasets.join("oasst1_guanaco/openassistant_best_replies_eval.jsonl"), 12)?])
}

fn run_oasst(env: &Env, _: &Target, case: &Path) -> qpeft::Result<()> {
    qpeft::data::load(&case.join("oasst1.jsonl"), DataFormat::Oasst, env.tokenizer()).map(drop)
}

fn jsonl_setup(_: &Env, _: &Target, case: &Path) -> qpeft::Result<Vec<Vec<u8>>> {
    std::fs::create_dir_all(case).map_err(io(case))?;
    Ok(vec![
        b"{\"prompt\": \"2+2=\", \"response\": \"4\"}\n{\"prompt\": \"Capital of France?\", \"response\": \"Paris\"}\n".to_vec(),
        b"{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n".to_vec(),
    ])
}

fn run_jsonl(env: &Env, _: &Target, case: &Path) -> qpeft::Result<()> {
    qpeft::data::load(&case.join("data.jsonl"), DataFormat::Jsonl, env.tokenizer()).map(drop)
}

// Benchmarks: the first records of each file of the real datasets.

fn mmlu_setup(env: &Env, _: &Target, case: &Path) -> qpeft::Result<Vec<Vec<u8>>> {
    let mut seeds = Vec::new();
    for f in ["anatomy_test.csv", "virology_test.csv"] {
        let seed = head(&env.datasets.join("mmlu/test").join(f), 8)?;
        write(&case.join("mmlu/test").join(f), &seed)?;
        seeds.push(seed);
    }
    Ok(seeds)
}

fn run_mmlu(_: &Env, _: &Target, case: &Path) -> qpeft::Result<()> {
    qpeft::eval::mmlu::load_split(&case.join("mmlu"), "test").map(drop)
}

fn task_setup(env: &Env, target: &Target, case: &Path) -> qpeft::Result<Vec<Vec<u8>>> {
    let mut seeds = Vec::new();
    for f in target.files {
        // Label lists have one line per record, HellaSwag six lines per item: 12 lines suit both.
        let seed = head(&env.datasets.join(f), 12)?;
        write(&case.join(f), &seed)?;
        seeds.push(seed);
    }
    Ok(seeds)
}

fn run_task(_: &Env, target: &Target, case: &Path) -> qpeft::Result<()> {
    let task = qpeft::eval::tasks::Task::parse(target.name).expect("benchmark targets are named after their task");
    task.load(case).map(drop)
}

/// The seed contents of each of `target.files`, after `setup` filled `case`: what `setup` returned, or the files as
/// `setup` wrote them.
pub fn seeds(target: &Target, env: &Env, case: &Path) -> qpeft::Result<Vec<(usize, Vec<u8>)>> {
    let given = (target.setup)(env, target, case)?;
    if given.is_empty() {
        return target.files.iter().enumerate().map(|(i, f)| Ok((i, read(&case.join(f))?))).collect();
    }
    if target.files.len() == 1 {
        return Ok(given.into_iter().map(|s| (0, s)).collect());
    }
    Ok(given.into_iter().enumerate().collect())
}

pub fn find(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}

pub fn case_dir(root: &Path, target: &Target) -> PathBuf {
    root.join(target.name)
}
