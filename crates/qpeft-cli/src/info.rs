//! `qpeft info`: what a checkpoint holds.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use qpeft::model::checkpoint::Source;
use qpeft::model::Checkpoint;
use serde_json::json;

pub fn run(path: &Path, list_tensors: bool, as_json: bool) -> Result<()> {
    let ckpt = Checkpoint::open(path)?;
    let s = &ckpt.spec;
    let entries = ckpt.listing();
    let numel = |shape: &[usize]| shape.iter().product::<usize>();
    let total: usize = entries.iter().map(|e| numel(&e.shape)).sum();
    let mut by_dtype: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for e in &entries {
        let slot = by_dtype.entry(e.dtype.to_string()).or_default();
        slot.0 += 1;
        slot.1 += numel(&e.shape);
    }
    let embed = s.vocab_size * s.hidden_size;
    let per_block = s.hidden_size * (s.q_dim() + 2 * s.kv_dim())
        + s.q_dim() * s.hidden_size
        + 3 * s.hidden_size * s.intermediate_size;
    if as_json {
        let doc = json!({
            "path": path, "format": ckpt.format_name(), "architecture": s.arch.name(),
            "vocab_size": s.vocab_size, "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
            "layers": s.num_layers, "heads": s.num_heads, "kv_heads": s.num_kv_heads, "head_dim": s.head_dim,
            "rope_theta": s.rope_theta, "rope_scaling": format!("{:?}", s.rope_scaling), "rms_norm_eps": s.rms_norm_eps,
            "max_position_embeddings": s.max_position_embeddings, "tied_embeddings": s.tie_word_embeddings,
            "parameters": total, "embedding_parameters": embed, "linear_parameters_per_block": per_block,
            "dtypes": by_dtype.iter().map(|(k, (n, p))| (k.clone(), json!({"tensors": n, "parameters": p}))).collect::<serde_json::Map<_, _>>(),
            "tensors": if list_tensors { json!(entries.iter().map(|e| json!({"name": e.name, "shape": e.shape, "dtype": e.dtype.to_string()})).collect::<Vec<_>>()) } else { json!(null) },
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("{} ({})", path.display(), ckpt.format_name());
    if let Source::Gguf(g) = &ckpt.source {
        if let Some(name) = g.get("general.name").and_then(|v| v.as_str()) {
            println!("  name               {name}");
        }
        println!("  gguf version       {}", g.version);
    }
    println!("  architecture       {}", s.arch.name());
    println!("  layers             {}", s.num_layers);
    println!("  hidden / ffn       {} / {}", s.hidden_size, s.intermediate_size);
    println!("  heads / kv / dim   {} / {} / {}", s.num_heads, s.num_kv_heads, s.head_dim);
    println!("  vocab              {}", s.vocab_size);
    println!("  rope               theta {} {:?}", s.rope_theta, s.rope_scaling);
    println!("  rms_norm_eps       {:e}", s.rms_norm_eps);
    println!("  context            {}", s.max_position_embeddings);
    println!("  tied embeddings    {}", s.tie_word_embeddings);
    println!("  parameters         {} ({:.1} M)", total, total as f64 / 1e6);
    println!("    embedding        {embed}");
    println!("    linear per block {per_block} × {} = {}", s.num_layers, per_block * s.num_layers);
    println!("  dtypes");
    for (d, (n, p)) in &by_dtype {
        println!("    {d:<8} {n:>5} tensors {p:>14} parameters");
    }
    if list_tensors {
        println!("  tensors");
        for e in &entries {
            println!("    {:<48} {:<8} {:?}", e.name, e.dtype.to_string(), e.shape);
        }
    }
    Ok(())
}
