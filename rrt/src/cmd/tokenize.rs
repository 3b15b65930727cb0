//! `rrt tokenize`: token ids of a text as a JSON array.

use super::ModelArg;
use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// The text to tokenize.
    #[arg(long)]
    pub text: String,
    /// Recognise special-token text such as `<|im_start|>` as the special tokens.
    #[arg(long)]
    pub special: bool,
    /// Do not add BOS even if the model asks for it.
    #[arg(long)]
    pub no_bos: bool,
}

pub fn run(a: Args) -> Result<()> {
    let path = a.model.path()?;
    let tok = rrt_model::loader::load_tokenizer(&path)?;
    let ids = tok.encode(&a.text, !a.no_bos, a.special)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
