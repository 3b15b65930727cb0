//! Prints the top logits after a token sequence (debugging aid for reference comparisons).
use rrt_model::forward::Row;
use rrt_model::kv::{KvPool, SeqKv};
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let lm = rrt_model::load(&rrt_model::default_model_path()?)?;
    let ids: Vec<u32> = serde_json::from_str(&args[1])?;
    let mut pool = KvPool::new(lm.model.kv_layout(16), ids.len().div_ceil(16));
    let mut seq = SeqKv::default();
    pool.reserve(&mut seq, ids.len())?;
    let rows: Vec<Row> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| Row {
            token: t,
            pos: i,
            blocks: &seq.blocks,
        })
        .collect();
    let logits = lm.model.forward(&rows, &mut pool, &[ids.len() - 1])?;
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for &i in &idx[..8] {
        println!("{i} {:.4} {:?}", logits[i], lm.tokenizer.id_to_token(i as u32));
    }
    Ok(())
}
