//! Writes the vocabularies of OpenAI's encodings, read from tiktoken-rs, in
//! the compact form `src/limits/bpe.rs` embeds (`$OUT_DIR/<name>.bpe`):
//! `u32` LE token count, then each token's length as `u16` LE (0 for a
//! special token's rank), then all tokens' bytes in rank order. The node
//! then never builds tiktoken-rs's tables (~50 MiB for o200k, most of it
//! kept by the allocator after they are dropped).

use std::error::Error;
use std::path::PathBuf;
use tiktoken_rs::CoreBPE;

/// One of tiktoken-rs's encodings, built.
type Load = fn() -> anyhow::Result<CoreBPE>;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo::rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let encodings: [(&str, Load); 4] = [
        ("o200k", tiktoken_rs::o200k_base),
        ("cl100k", tiktoken_rs::cl100k_base),
        ("p50k", tiktoken_rs::p50k_base),
        ("r50k", tiktoken_rs::r50k_base),
    ];
    for (name, load) in encodings {
        let core = load().map_err(|e| format!("{name}: {e}"))?;
        let specials = core.special_tokens();
        // Ranks run from 0 without a gap up to the last ordinary token in
        // every OpenAI encoding; a special token among them (p50k's
        // `<|endoftext|>`) keeps its rank, empty, so it is never looked up.
        let mut tokens = Vec::new();
        for rank in 0u32.. {
            match core.decode_bytes(&[rank]) {
                Ok(b) if std::str::from_utf8(&b).is_ok_and(|s| specials.contains(s)) => {
                    tokens.push(Vec::new());
                }
                Ok(b) => tokens.push(b),
                Err(_) => break,
            }
        }
        let mut file = Vec::new();
        file.extend_from_slice(&u32::try_from(tokens.len())?.to_le_bytes());
        for t in &tokens {
            file.extend_from_slice(&u16::try_from(t.len())?.to_le_bytes());
        }
        for t in &tokens {
            file.extend_from_slice(t);
        }
        std::fs::write(out.join(format!("{name}.bpe")), file)?;
    }
    Ok(())
}
