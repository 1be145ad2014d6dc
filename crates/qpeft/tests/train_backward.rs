//! The whole decoder's training pass: f64 finite differences of the loss against the adapter gradients for
//! every method (and several families), activation checkpointing giving identical gradients, and LoRA parity
//! with PEFT on the tiny llama (fixture from scripts/reference/make_peft_lora_fixture.py).

mod common;

use common::{batch, fixtures, methods, read_expected, rel_err, uniform};
use qpeft::adapters::lora::LoraMethod;
use qpeft::adapters::set::AdapterSet;
use qpeft::adapters::{AdapterConfig, Method};
use qpeft::backend::cpu::Cpu;
use qpeft::backend::Backend;
use qpeft::linalg::Real;
use qpeft::model::train::{Batch, Checkpointing, StepOptions, IGNORE};
use qpeft::model::{Checkpoint, Decoder, Input};

fn model<T: Real>(family: &str, be: Cpu<T>) -> Decoder<Cpu<T>> {
    Decoder::load(&Checkpoint::open(&fixtures().join(family)).unwrap(), be).unwrap()
}

fn adapters<T: Real>(m: &Decoder<Cpu<T>>, cfg: &AdapterConfig) -> AdapterSet<Cpu<T>> {
    let mut set = AdapterSet::build(&m.backend, &m.spec, 5, |_, _| Some(cfg.clone())).unwrap();
    // Non-zero B and β so every parameter has a gradient.
    for (i, p) in set.params_mut().into_iter().enumerate() {
        let v = uniform(p.value.len(), 1000 + i as u64);
        p.value = m.backend.upload(&v.iter().map(|x| (x * 0.2) as f32).collect::<Vec<_>>()).unwrap();
    }
    set
}

const TRAIN: StepOptions = StepOptions {
    checkpointing: Checkpointing::None,
    dropout: true,
    seed: 11,
    grad_scale: 1.0,
    loss_chunk: 5,
    mlp_chunk: Some(3),
};

#[test]
fn decoder_gradients_match_finite_differences_for_every_method() {
    let cases: Vec<(&str, AdapterConfig)> = methods()
        .into_iter()
        .map(|c| ("tiny-llama", c))
        // GeGLU, (1 + w) norms, scaled embeddings, one KV head; llama3 rope, biases, tied head; sliding window.
        .chain(["tiny-gemma", "tiny-llama3", "tiny-mistral"].map(|f| (f, methods()[0].clone())))
        .collect();
    for (family, cfg) in cases {
        let m = model(family, Cpu::f64());
        let b = batch(m.spec.vocab_size);
        let mut set = adapters(&m, &cfg);
        let base = m.loss(&b, Some(&set), &TRAIN).unwrap();
        let got = m.loss_and_backward(&b, &mut set, &TRAIN).unwrap();
        assert_eq!(base, got, "the training pass reports the same loss");
        // Position t is scored on labels[t + 1]: row 0 keeps labels 3..=6, row 1 labels 1..=4 (5, 6 are padding).
        assert_eq!(got.tokens, 8);
        let names: Vec<String> = set.named_params().into_iter().map(|(n, _)| n).collect();
        // A sample of tensors: both layers, attention and MLP, every parameter kind.
        let picked: Vec<usize> = (0..names.len()).filter(|i| i % 3 == 0 || names[*i].contains("scale")).collect();
        for i in picked {
            let (value, grad) = {
                let p = &set.named_params()[i].1;
                (p.value.clone(), p.grad.clone())
            };
            let scale = grad.iter().fold(1e-6f64, |a, g| a.max(g.abs()));
            let h = 1e-5;
            let step = (value.len() / 6).max(1);
            for j in (0..value.len()).step_by(step) {
                let mut eval = |v: f64| {
                    set.named_params_mut()[i].1.value[j] = v;
                    m.loss(&b, Some(&set), &TRAIN).unwrap().loss
                };
                let fd = (eval(value[j] + h) - eval(value[j] - h)) / (2.0 * h);
                set.named_params_mut()[i].1.value[j] = value[j];
                let err = (fd - grad[j]).abs() / scale;
                assert!(
                    err < 1e-6,
                    "{family} {}: {}[{j}] fd {fd:e} vs {:e} (err {err:e})",
                    cfg.method.name(),
                    names[i],
                    grad[j]
                );
            }
        }
    }
}

/// Every checkpointing policy (none, selective, full, offload) gives the same loss and gradients bit for bit in f32:
/// the recompute repeats the forward's ops on the same values, and the kept attention output of `selective` is the
/// forward's own.
#[test]
fn checkpointing_gives_identical_gradients() {
    for cfg in methods() {
        let m = model("tiny-llama", Cpu::new());
        let b = batch(m.spec.vocab_size);
        let run = |checkpointing: Checkpointing| {
            let mut set = adapters(&m, &cfg);
            let r =
                m.loss_and_backward(&b, &mut set, &StepOptions { checkpointing, mlp_chunk: None, ..TRAIN }).unwrap();
            let grads: Vec<Vec<f32>> = set.named_params().iter().map(|(_, p)| p.grad.clone()).collect();
            (r, grads)
        };
        let (r0, g0) = run(Checkpointing::None);
        assert!(g0.iter().all(|g| g.iter().any(|&v| v != 0.0)), "{}: a parameter got no gradient", cfg.method.name());
        for policy in [Checkpointing::Selective, Checkpointing::Full, Checkpointing::Offload] {
            let (r1, g1) = run(policy);
            assert_eq!(r0, r1, "{} {}", cfg.method.name(), policy.name());
            assert!(g0 == g1, "{}: gradients differ with checkpointing {}", cfg.method.name(), policy.name());
        }
    }
}

/// With checkpointing the MLP runs a few rows at a time (here 3 of 14, the last chunk short), each chunk drawing its
/// rows' part of the dropout masks: the same loss, and the same gradients up to the order of their sums over rows.
/// Two accumulated micro-batches: the second forward also runs in chunks (the adapters then hold gradients).
#[test]
fn mlp_row_chunks_change_only_the_summation_order() {
    for cfg in methods() {
        let m = model("tiny-llama", Cpu::f64());
        let b = batch(m.spec.vocab_size);
        let run = |opts: StepOptions| {
            let mut set = adapters(&m, &cfg);
            assert!(!set.holds_gradients(&m.backend));
            m.loss_and_backward(&b, &mut set, &opts).unwrap();
            assert!(set.holds_gradients(&m.backend));
            let r = m.loss_and_backward(&b, &mut set, &StepOptions { seed: opts.seed + 1, ..opts }).unwrap();
            (r, set.named_params().iter().map(|(n, p)| (n.clone(), p.grad.clone())).collect::<Vec<_>>())
        };
        let (r0, g0) = run(TRAIN);
        let (r1, g1) = run(StepOptions { checkpointing: Checkpointing::Full, ..TRAIN });
        assert!((r0.loss - r1.loss).abs() <= 1e-14 * r0.loss, "{}: loss {} vs {}", cfg.method.name(), r0.loss, r1.loss);
        for ((name, a), (_, c)) in g0.iter().zip(&g1) {
            let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
            let e = a.iter().zip(c).fold(0f64, |m, (a, c)| m.max((a - c).abs())) / scale;
            assert!(e < 1e-12, "{} {name}: chunked gradient differs by {e:e}", cfg.method.name());
        }
    }
}

#[test]
fn lora_matches_peft() {
    let dir = fixtures().join("peft-lora");
    let want = read_expected(&dir.join("expected.safetensors"));
    let m = model("tiny-llama", Cpu::new());
    // PEFT's own adapter directory, through qpeft's adapter reader.
    let (mut set, modules) = qpeft::adapters::peft::read_adapter(&dir.join("adapter"), &m.backend, &m.spec).unwrap();
    let lora = AdapterConfig { method: Method::Lora(LoraMethod), rank: 8, alpha: 16.0, dropout: 0.0 };
    assert!(modules.iter().flatten().all(|c| c.as_ref() == Some(&lora)), "r 8, α 16 on every linear");
    let ints = |k: &str| want[k].data.iter().map(|&v| v as i64).collect::<Vec<_>>();
    let (tokens, mask, labels) = (ints("input_ids"), ints("attention_mask"), ints("labels"));
    let input = Input {
        batch: 2,
        seq: 12,
        tokens: tokens.iter().map(|&t| t as u32).collect(),
        mask: mask.iter().map(|&t| t as u32).collect(),
    };
    let b = Batch { input, labels: labels.iter().map(|&l| if l < 0 { IGNORE } else { l as u32 }).collect() };

    // The adapter alone on layer 0's q_proj input.
    let x = &want["layer0_q_input"].data;
    let mut delta = vec![0f32; 24 * 64];
    let pass = qpeft::adapters::Pass { training: false, seed: 0, first_row: 0 };
    let x = m.backend.operand(x).unwrap();
    set.get(0, qpeft::arch::Proj::Q).unwrap().forward(&m.backend, &x, 24, pass, &mut delta, true).unwrap();
    let e = rel_err(&delta, &want["layer0_q_lora_delta"].data, |_| true);
    assert!(e < 1e-5, "layer 0 q_proj LoRA output: {e:e}");

    // Logits through the adapted forward.
    let mut cache = m.new_cache(2, 12).unwrap();
    let h = m.forward_with(&b.input, &mut cache, Some(&set), &mut |_, _, _| Ok(())).unwrap();
    let logits = m.logits(&h, 24).unwrap();
    let vocab = m.spec.vocab_size;
    let e = rel_err(&logits, &want["logits"].data, |i| b.input.mask[i / vocab] == 1);
    assert!(e < 1e-5, "logits: {e:e}");

    let r = m.loss_and_backward(&b, &mut set, &StepOptions::default()).unwrap();
    let peft_loss = want["loss"].data[0] as f64;
    assert!((r.loss - peft_loss).abs() / peft_loss < 1e-5, "loss {} vs PEFT {peft_loss}", r.loss);
    for (name, p) in set.named_params() {
        let g = &want[&format!("base_model.model.{name}.grad")].data;
        let e = rel_err(&p.grad, g, |_| true);
        assert!(e < 1e-5, "{name}: gradient error {e:e}");
    }
}

#[test]
fn an_out_of_vocabulary_label_is_refused_before_any_kernel() {
    let m = model("tiny-llama", Cpu::new());
    let mut b = batch(m.spec.vocab_size);
    b.labels[5] = m.spec.vocab_size as u32;
    let e = m.loss(&b, None, &TRAIN).map(|_| ()).expect_err("a label past the vocabulary").to_string();
    assert!(
        e.contains(&format!("label id {} is outside the vocabulary (size {})", m.spec.vocab_size, m.spec.vocab_size)),
        "{e}"
    );
    // IGNORE is not a token id.
    b.labels[5] = IGNORE;
    m.loss(&b, None, &TRAIN).unwrap();
}

/// Padding-free packing (`data.packing`): three examples of different lengths packed into one row give the loss and
/// the adapter gradients of the three run one at a time, each weighted by its share of the target tokens — in f64,
/// for every method, with and without checkpointing, on a llama and on a sliding-window mistral. So positions restart
/// per example and no attention crosses examples.
#[test]
fn a_packed_row_trains_as_its_examples_one_at_a_time() {
    use qpeft::data::collate::{pack, Tokenized};
    for family in ["tiny-llama", "tiny-mistral"] {
        let m = model(family, Cpu::f64());
        let vocab = m.spec.vocab_size;
        // 70 + 150 + 45 tokens: the CPU's query blocks of 128 start inside the second and third examples, whose
        // earlier keys it skips.
        let items: Vec<Tokenized> = [(70usize, 12usize), (150, 30), (45, 0)]
            .iter()
            .enumerate()
            .map(|(e, &(len, prompt))| {
                let ids: Vec<u32> = uniform(len, 300 + e as u64)
                    .iter()
                    .map(|v| 3 + ((v + 1.0) * 0.5 * (vocab - 4) as f64) as u32)
                    .collect();
                let labels = ids.iter().enumerate().map(|(i, &t)| if i < prompt { IGNORE } else { t }).collect();
                Tokenized { ids, labels }
            })
            .collect();
        // Targets of an example: labels after its first token (position t predicts label t + 1).
        let targets = |t: &Tokenized| t.labels[1..].iter().filter(|&&l| l != IGNORE).count();
        let total: usize = items.iter().map(targets).sum();
        let packed = pack(&items.iter().collect::<Vec<_>>());
        assert_eq!((packed.input.batch, packed.input.seq), (1, 265));
        for cfg in methods() {
            for checkpointing in Checkpointing::ALL {
                let opts = StepOptions { checkpointing, dropout: false, ..TRAIN };
                let mut set = adapters(&m, &cfg);
                let got = m.loss_and_backward(&packed, &mut set, &opts).unwrap();
                let got_grads: Vec<Vec<f64>> = set.named_params().iter().map(|(_, p)| p.grad.clone()).collect();
                // Each example alone on fresh adapters; its gradients weighted by its share of the targets, in f64.
                let mut want_loss = 0.0;
                let mut want_grads: Vec<Vec<f64>> = got_grads.iter().map(|g| vec![0.0; g.len()]).collect();
                for t in &items {
                    let share = targets(t) as f64 / total as f64;
                    let n = t.ids.len();
                    let b = Batch {
                        input: Input { batch: 1, seq: n, tokens: t.ids.clone(), mask: vec![1; n] },
                        labels: t.labels.clone(),
                    };
                    let mut alone = adapters(&m, &cfg);
                    want_loss += share * m.loss_and_backward(&b, &mut alone, &opts).unwrap().loss;
                    for (w, (_, p)) in want_grads.iter_mut().zip(alone.named_params()) {
                        w.iter_mut().zip(&p.grad).for_each(|(w, g)| *w += share * g);
                    }
                }
                let what = format!("{family} {} ckpt={}", cfg.method.name(), checkpointing.name());
                assert_eq!(got.tokens, total, "{what}");
                assert!((got.loss - want_loss).abs() <= 1e-12 * want_loss, "{what}: loss {} vs {want_loss}", got.loss);
                for (((name, _), w), g) in set.named_params().iter().zip(&want_grads).zip(&got_grads) {
                    let scale = w.iter().fold(0f64, |a, v| a.max(v.abs()));
                    assert!(scale > 0.0, "{what} {name}: no gradient");
                    let e = w.iter().zip(g).fold(0f64, |a, (x, y)| a.max((x - y).abs())) / scale;
                    // The loss scale 1/targets reaches the backward as an f32 (6e-8 apart for the two layouts); a
                    // single-value gradient (IR-QLoRA's β, a sum that cancels) magnifies it.
                    let tol = if w.len() == 1 { 1e-4 } else { 1e-6 };
                    assert!(e < tol, "{what} {name}: packed gradient differs by {e:e}");
                }
            }
        }
    }
}
