//! `Cpu::bf16_amx()` (`--device cpu:bf16`) against the bf16 emulation it accelerates (`Cpu::bf16()`): the same
//! operands on the AMX tiles, so logits and every method's adapter gradients differ only through the order of f32
//! additions — which bf16 rounding of later products' inputs can amplify to bf16 noise (a one-ulp change moves the
//! emulation's gradients by ≈ 1e-2, half_emulation.rs), never to the distance between bf16 and f32.

mod common;

use common::{batch, fixtures, methods, parity_step, qlora_nf4, randomize_adapters, rel_l2};
use qpeft::adapters::set::AdapterSet;
use qpeft::backend::cpu::{amx, Cpu};
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
fn amx_products_agree_with_the_bf16_emulation_for_every_method() {
    if !amx::available() {
        eprintln!("skipped: this CPU or kernel offers no AMX-BF16");
        return;
    }
    assert!(Cpu::bf16_amx().name().contains("AMX"), "{}", Cpu::bf16_amx().name());
    for method in 0..methods().len() {
        let (l_emu, g_emu) = logits_and_gradients(Cpu::bf16(), method);
        let (l_amx, g_amx) = logits_and_gradients(Cpu::bf16_amx(), method);
        let (l_f32, g_f32) = logits_and_gradients(Cpu::new(), method);
        let (dl, dg) = (rel_l2(&l_amx, &l_emu), rel_l2(&g_amx, &g_emu));
        let (dl32, dg32) = (rel_l2(&l_emu, &l_f32), rel_l2(&g_emu, &g_f32));
        eprintln!(
            "{:?}: AMX vs emulation logits {dl:.1e}, gradients {dg:.1e}; emulation vs f32 {dl32:.1e}, {dg32:.1e}",
            methods()[method].method
        );
        assert!(dl < 1e-6 && dl < dl32, "logits: {dl:e} (emulation vs f32 {dl32:e})");
        assert!(dg < 1e-2 && dg < dg32, "gradients: {dg:e} (emulation vs f32 {dg32:e})");
    }
}
