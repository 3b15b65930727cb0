//! The weights' fingerprint: keys/values move only between nodes serving the same weights.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// SHA-256 (hex) over a model file, or over a directory's regular files in name order (each
/// name, then its bytes): a GGUF file, a Hugging Face folder or a recursive checkpoint.
pub fn of_path(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            let e = e?;
            if e.file_type()?.is_file() {
                files.push(e.path());
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        let mut r = std::fs::File::open(&f)?;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
