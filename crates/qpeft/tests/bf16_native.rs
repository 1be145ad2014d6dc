//! `Cpu::bf16_native()` (`--device cpu:bf16`) against the bf16 emulation it accelerates (`Cpu::bf16()`): the same
//! operands on the CPU's bf16 instructions (AMX-BF16 tiles or AVX512-BF16), so logits and every method's adapter gradients differ only through the order of f32
//! additions — which bf16 rounding of later products' inputs can amplify to bf16 noise (a one-ulp change moves the
//! emulation's gradients by ≈ 1e-2, half_emulation.rs), never to the distance between bf16 and f32.

mod common;

use common::{batch, fixtures, methods, parity_step, qlora_nf4, randomize_adapters, rel_l2};
use qpeft::adapters::set::AdapterSet;
use qpeft::backend::cpu::{bf16, Cpu};
use qpeft::backend::Backend;
use qpeft::model::train::Checkpointing;
use qpeft::model::{Checkpoint, Decoder};

fn logits_and_gradients(be: Cpu, method: usize) -> (Vec<f32>, Vec<f32>) {
    let ckpt = Checkpoint::open(&fixtures().join("gguf/tiny-llama-spm.gguf")).unwrap();
    let m = Decoder::load_quantized(&ckpt, be, Some(&qlora_nf4()), &mut |_, _| ()).unwrap();
    let b = batch(m.spec.vocab_size);
    let mut cache = m.new_cache(2, 7).unwrap();
    let h = m.forward(&b.input, &mut cache).unwrap();
    let logits = m.backend.download(&m.logits(&h, 14).unwrap()).unwrap();
    let mut set = AdapterSet::build(&m.backend, &m.spec, 5, |_, _| Some(methods()[method].clone())).unwrap();
    randomize_adapters(&m.backend, &mut set, 0.02);
    m.loss_and_backward(&b, &mut set, &parity_step(Checkpointing::Full)).unwrap();
    let grads = set.named_params().into_iter().flat_map(|(_, p)| m.backend.download(&p.grad).unwrap()).collect();
    (logits, grads)
}

#[test]
fn native_bf16_products_agree_with_the_bf16_emulation_for_every_method() {
    let Some(kernel) = bf16::Kernel::detect() else {
        eprintln!("skipped: this CPU has neither AMX-BF16 nor AVX512-BF16");
        return;
    };
    let name = Cpu::bf16_native().name();
    assert!(name.contains(kernel.name()), "{name} for {kernel:?}");
    for method in 0..methods().len() {
        let (l_emu, g_emu) = logits_and_gradients(Cpu::bf16(), method);
        let (l_nat, g_nat) = logits_and_gradients(Cpu::bf16_native(), method);
        let (l_f32, g_f32) = logits_and_gradients(Cpu::new(), method);
        let (dl, dg) = (rel_l2(&l_nat, &l_emu), rel_l2(&g_nat, &g_emu));
        let (dl32, dg32) = (rel_l2(&l_emu, &l_f32), rel_l2(&g_emu, &g_f32));
        eprintln!(
            "{:?}: {kernel:?} vs emulation logits {dl:.1e}, gradients {dg:.1e}; emulation vs f32 {dl32:.1e}, {dg32:.1e}",
            methods()[method].method
        );
        assert!(dl < 1e-6 && dl < dl32, "logits: {dl:e} (emulation vs f32 {dl32:e})");
        assert!(dg < 1e-2 && dg < dg32, "gradients: {dg:e} (emulation vs f32 {dg32:e})");
    }
}
