//! [`TensorSource`] implementations: a GGUF file and a directory of safetensors files.

use crate::config::{Family, ModelConfig};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::quant::GgmlType;
use crate::weights::{TensorSource, check_finite};
use half::{bf16, f16};
use memmap2::Mmap;
use rrt_kernels::qmatmul::QFormat;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Translates a Hugging Face tensor name to its GGUF name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{idx}.{g}.{kind}"))
}

/// Tensors of a GGUF file, with llama.cpp's q/k row permutation undone for the `llama`
/// architecture (llama.cpp rotates interleaved pairs there; this crate rotates halves).
pub struct GgufSource<'a> {
    pub file: &'a GgufFile,
    n_heads: usize,
    n_kv_heads: usize,
    unpermute_qk: bool,
}

impl<'a> GgufSource<'a> {
    pub fn new(file: &'a GgufFile, cfg: &ModelConfig) -> Self {
        let unpermute_qk = matches!(cfg.family, Family::Llama | Family::Mistral);
        Self {
            file,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            unpermute_qk,
        }
    }
}

/// Undoes llama.cpp's permutation of q/k rows: within each head of `head_dim` rows, GGUF row
/// `2 i + j` holds Hugging Face row `j * head_dim / 2 + i`.
fn unpermute_rows<T: Copy + Default>(data: &[T], n_heads: usize, row_len: usize) -> Vec<T> {
    let rows = data.len() / row_len;
    let hd = rows / n_heads;
    let half = hd / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * half + i;
                out[dst * row_len..(dst + 1) * row_len].copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

impl GgufSource<'_> {
    /// Heads of the q/k projection this GGUF tensor is, if its rows must be unpermuted.
    fn qk_heads(&self, gname: &str) -> Option<usize> {
        if !self.unpermute_qk {
            None
        } else if gname.contains(".attn_q.") {
            Some(self.n_heads)
        } else if gname.contains(".attn_k.") {
            Some(self.n_kv_heads)
        } else {
            None
        }
    }
}

impl TensorSource for GgufSource<'_> {
    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.tensor_info(&g).is_some())
    }

    fn load_blocks(&self, name: &str) -> Result<Option<(QFormat, Vec<u8>)>> {
        let gname = gguf_name(name).unwrap_or_else(|| name.to_string());
        let Some(info) = self.file.tensor_info(&gname) else {
            return Ok(None);
        };
        let (ty, bytes) = self.file.tensor_bytes(info)?;
        let fmt = match ty {
            GgmlType::Q4_1 => QFormat::Q4_1,
            GgmlType::Q8_0 => QFormat::Q8_0,
            _ => return Ok(None),
        };
        if info.dims.len() != 2 {
            return Ok(None);
        }
        let row_bytes = fmt.row_bytes(info.dims[0]);
        let blocks = match self.qk_heads(&gname) {
            Some(nh) => unpermute_rows(bytes, nh, row_bytes),
            None => bytes.to_vec(),
        };
        Ok(Some((fmt, blocks)))
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let path = self.file.path();
        let gname = gguf_name(name).unwrap_or_else(|| name.to_string());
        let info = self.file.tensor_info(&gname).ok_or_else(|| ModelError::MissingTensor {
            path: path.to_path_buf(),
            tensor: gname.clone(),
        })?;
        let got = info.shape();
        if got != shape {
            return Err(ModelError::Shape {
                path: path.to_path_buf(),
                tensor: gname,
                got,
                expected: shape.to_vec(),
            });
        }
        let mut data = self.file.tensor_f32(info)?;
        check_finite(path, &gname, &data)?;
        if let Some(nh) = self.qk_heads(&gname) {
            let row_len = if shape.len() == 2 { shape[1] } else { 1 };
            data = unpermute_rows(&data, nh, row_len);
        }
        Ok(data)
    }
}

struct StEntry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// All `*.safetensors` files of a Hugging Face model directory, memory-mapped.
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, StEntry>,
}

impl SafetensorsSource {
    /// Opens the shards named by `model.safetensors.index.json`, or every `*.safetensors` file
    /// of the directory when there is no index.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut names: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::format(&index_path, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::format(&index_path, "missing `weight_map` object"))?;
            let mut shards: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|s| dir.join(s)).collect();
            shards.sort();
            shards.dedup();
            shards
        } else {
            let rd = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
            let mut v: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if names.is_empty() {
            return Err(ModelError::format(dir, "no *.safetensors files"));
        }
        names.dedup();
        let mut files = Vec::with_capacity(names.len());
        let mut index = HashMap::new();
        for (fi, p) in names.into_iter().enumerate() {
            let f = File::open(&p).map_err(|e| ModelError::io(&p, e))?;
            // SAFETY: read-only private mapping of a model file that is not modified while loaded.
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| ModelError::io(&p, e))?;
            let (header, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| ModelError::format(&p, format!("invalid safetensors header: {e}")))?;
            let base = 8 + header;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let (start, end) = (base + s, base + e);
                if end > mmap.len() || start > end {
                    return Err(ModelError::Truncated {
                        path: p.clone(),
                        what: format!("tensor `{name}` data ends past the file"),
                    });
                }
                if index.contains_key(&name) {
                    return Err(ModelError::format(&p, format!("tensor `{name}` appears in two shards")));
                }
                index.insert(
                    name,
                    StEntry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
            files.push((p, mmap));
        }
        Ok(Self { files, index })
    }

    /// Names of all tensors in all shards.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    fn path_of(&self, e: &StEntry) -> &Path {
        &self.files[e.file].0
    }

    /// The first shard's path (for errors about tensors that are missing everywhere).
    fn any_path(&self) -> &Path {
        &self.files[0].0
    }

    /// The stored element type of a tensor, `None` if there is no such tensor.
    pub fn dtype(&self, name: &str) -> Option<safetensors::Dtype> {
        self.index.get(name).map(|e| e.dtype)
    }

    /// The file holding a tensor (the first shard when there is no such tensor), for errors.
    pub fn path_for(&self, name: &str) -> &Path {
        self.index
            .get(name)
            .map_or_else(|| self.any_path(), |e| self.path_of(e))
    }

    /// The raw bytes of a `U8` tensor (e.g. quantized blocks, `[rows, row_bytes]`), borrowed
    /// from the mapping after checking its presence, type, shape and length.
    pub fn load_u8(&self, name: &str, shape: &[usize]) -> Result<&[u8]> {
        let e = self.index.get(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.any_path().to_path_buf(),
            tensor: name.to_string(),
        })?;
        let path = self.path_of(e);
        if e.dtype != safetensors::Dtype::U8 {
            return Err(ModelError::format(
                path,
                format!("tensor `{name}`: stored as {:?}, expected U8 bytes", e.dtype),
            ));
        }
        if e.shape != shape {
            return Err(ModelError::Shape {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                got: e.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        let bytes = &self.files[e.file].1[e.start..e.end];
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(bytes.len()) {
            return Err(ModelError::format(
                path,
                format!("tensor `{name}`: {} bytes for shape {shape:?}", bytes.len()),
            ));
        }
        Ok(bytes)
    }
}

impl TensorSource for SafetensorsSource {
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.index.get(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.any_path().to_path_buf(),
            tensor: name.to_string(),
        })?;
        let path = self.path_of(e);
        if e.shape != shape {
            return Err(ModelError::Shape {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                got: e.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        let bytes = &self.files[e.file].1[e.start..e.end];
        let n: usize = shape.iter().product();
        let width = match e.dtype {
            safetensors::Dtype::F32 => 4,
            safetensors::Dtype::F16 | safetensors::Dtype::BF16 => 2,
            other => {
                return Err(ModelError::UnknownTensorType {
                    path: path.to_path_buf(),
                    tensor: name.to_string(),
                    ty: format!("{other:?}"),
                });
            }
        };
        if bytes.len() != n * width {
            return Err(ModelError::format(
                path,
                format!(
                    "tensor `{name}`: {} bytes for {n} elements of {:?}",
                    bytes.len(),
                    e.dtype
                ),
            ));
        }
        let data: Vec<f32> = match e.dtype {
            safetensors::Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        check_finite(path, name, &data)?;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways_for_every_module() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.weight").unwrap(),
            "blk.12.attn_q.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.k_proj.bias").unwrap(),
            "blk.0.attn_k.bias"
        );
        assert_eq!(
            gguf_name("model.layers.3.mlp.down_proj.weight").unwrap(),
            "blk.3.ffn_down.weight"
        );
        assert_eq!(
            gguf_name("model.layers.3.post_attention_layernorm.weight").unwrap(),
            "blk.3.ffn_norm.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert_eq!(gguf_name("model.layers.x"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp's permute: reshape(n_head, 2, hd/2, in).swapaxes(1, 2); rows here are 1 wide.
        let (n_heads, hd) = (2, 4);
        let hf: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; 8];
        for h in 0..n_heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    gguf[h * hd + 2 * i + j] = hf[h * hd + j * hd / 2 + i];
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, n_heads, 1), hf);
    }
}
