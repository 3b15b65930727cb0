//! A reader for GGUF files (versions 2 and 3): metadata, tensor table, alignment, tensor data.
//!
//! The file is memory-mapped; every offset read from it is bounds-checked, so a corrupt or
//! truncated file gives an error naming the file (and the tensor), never a panic.

use crate::error::{ModelError, Result};
use crate::quant::GgmlType;
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the fastest-varying (the row length).
    pub dims: Vec<usize>,
    /// The raw type id; resolved lazily so that a file with one unknown type still opens and
    /// the error names the tensor when it is used.
    pub type_id: u32,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Shape in row-major order (slowest first), as PyTorch / safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    pub alignment: usize,
}

const MAX_DIMS: u32 = 8;
/// Cap on any length read from the file before allocating, far above real files.
const MAX_ARRAY: u64 = 1 << 28;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(ModelError::Truncated {
                path: self.path.to_path_buf(),
                what: format!(
                    "{what} at byte {} needs {n} bytes, file has {}",
                    self.pos,
                    self.buf.len()
                ),
            }),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn len(&mut self, what: &str) -> Result<u64> {
        let n = self.u64(what)?;
        if n > MAX_ARRAY {
            return Err(ModelError::format(self.path, format!("{what}: implausible length {n}")));
        }
        Ok(n)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)? as usize;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ModelError::format(self.path, format!("{what}: string is not UTF-8")))
    }
    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(what)?),
            1 => Value::I8(self.u8(what)? as i8),
            2 => Value::U16(self.u16(what)?),
            3 => Value::I16(self.u16(what)? as i16),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => Value::Bool(self.u8(what)? != 0),
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(ModelError::format(
                        self.path,
                        format!("{what}: arrays nested too deeply"),
                    ));
                }
                let ety = self.u32(what)?;
                let n = self.len(what)?;
                // Every element takes at least one byte of the file: never reserve more
                // elements than bytes remain (a forged length must not allocate gigabytes).
                let remaining = (self.buf.len() - self.pos) as u64;
                let mut v = Vec::with_capacity(n.min(remaining).min(1 << 20) as usize);
                for _ in 0..n {
                    v.push(self.value(ety, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            other => {
                return Err(ModelError::format(
                    self.path,
                    format!("{what}: unknown metadata value type {other}"),
                ));
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses the header and tensor table of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process; the model files are not
        // expected to change while loaded (as with every mmap-based loader). A concurrent
        // truncation would be a bug outside this process' control.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path,
        };
        let magic: [u8; 4] = match c.take(4, "magic") {
            Ok(m) => m.try_into().unwrap(),
            Err(_) => {
                let mut m = [0u8; 4];
                m[..mmap.len()].copy_from_slice(&mmap);
                return Err(ModelError::BadMagic {
                    path: path.to_path_buf(),
                    magic: m,
                });
            }
        };
        if &magic != b"GGUF" {
            return Err(ModelError::BadMagic {
                path: path.to_path_buf(),
                magic,
            });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::BadVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        let n_tensors = c.len("tensor count")?;
        let n_kv = c.len("metadata count")?;
        let mut metadata = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(ModelError::format(
                        path,
                        format!("general.alignment {v:?} is not a power of two"),
                    ));
                }
            },
        };
        // A tensor entry takes at least 24 bytes (name length, dims, type, offset).
        let mut tensors = Vec::with_capacity(n_tensors.min(((c.buf.len() - c.pos) / 24) as u64) as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(ModelError::format(
                    path,
                    format!("tensor `{name}`: {n_dims} dimensions"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = c.u64(&name)?;
                dims.push(
                    usize::try_from(d)
                        .map_err(|_| ModelError::format(path, format!("tensor `{name}`: dimension {d}")))?,
                );
            }
            let type_id = c.u32(&name)?;
            let rel = c.u64(&name)? as usize;
            tensors.push(TensorInfo {
                name,
                dims,
                type_id,
                offset: rel,
            });
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut index = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter_mut().enumerate() {
            if t.offset % alignment != 0 {
                return Err(ModelError::format(
                    path,
                    format!("tensor `{}`: offset {} is not aligned to {alignment}", t.name, t.offset),
                ));
            }
            t.offset = data_start
                .checked_add(t.offset)
                .ok_or_else(|| ModelError::format(path, format!("tensor `{}`: offset overflows", t.name)))?;
            if index.insert(t.name.clone(), i).is_some() {
                return Err(ModelError::format(path, format!("tensor `{}` appears twice", t.name)));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            index,
            alignment,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's raw bytes and resolved type, bounds-checked against the file.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<(GgmlType, &[u8])> {
        let ty = GgmlType::from_id(info.type_id).map_err(|ty| ModelError::UnknownTensorType {
            path: self.path.clone(),
            tensor: info.name.clone(),
            ty,
        })?;
        let n = info
            .dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| ModelError::format(&self.path, format!("tensor `{}`: size overflows", info.name)))?;
        let bytes = ty.bytes_for(n).ok_or_else(|| {
            ModelError::format(
                &self.path,
                format!(
                    "tensor `{}`: {n} elements is not a whole number of {} blocks of {}",
                    info.name,
                    ty.name(),
                    ty.block_len()
                ),
            )
        })?;
        let end = info.offset.checked_add(bytes).filter(|&e| e <= self.mmap.len());
        match end {
            Some(end) => Ok((ty, &self.mmap[info.offset..end])),
            None => Err(ModelError::Truncated {
                path: self.path.clone(),
                what: format!(
                    "tensor `{}` ({} bytes at offset {}) extends past the end of the file ({} bytes)",
                    info.name,
                    bytes,
                    info.offset,
                    self.mmap.len()
                ),
            }),
        }
    }

    /// Dequantizes a whole tensor to `f32` (row-major, GGUF element order).
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let (ty, bytes) = self.tensor_bytes(info)?;
        let mut out = vec![0f32; info.n_elements()];
        crate::quant::dequantize(ty, bytes, &mut out);
        Ok(out)
    }

    // Typed metadata accessors with errors that name the key.

    pub fn req_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .ok_or_else(|| ModelError::format(&self.path, format!("missing metadata key `{key}`")))?
            .as_u64()
            .ok_or_else(|| ModelError::format(&self.path, format!("metadata key `{key}` is not an unsigned integer")))
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ModelError::format(&self.path, format!("metadata key `{key}` is not an unsigned integer"))
            }),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ModelError::format(&self.path, format!("metadata key `{key}` is not a number"))),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| ModelError::format(&self.path, format!("metadata key `{key}` is not a string"))),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| ModelError::format(&self.path, format!("metadata key `{key}` is not a boolean"))),
        }
    }

    /// A string array (e.g. `tokenizer.ggml.tokens`).
    pub fn str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v
            .as_array()
            .ok_or_else(|| ModelError::format(&self.path, format!("metadata key `{key}` is not an array")))?;
        arr.iter()
            .map(|e| {
                e.as_str().ok_or_else(|| {
                    ModelError::format(&self.path, format!("metadata key `{key}`: element is not a string"))
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A numeric array as f64 (e.g. `tokenizer.ggml.scores`).
    pub fn num_array(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v
            .as_array()
            .ok_or_else(|| ModelError::format(&self.path, format!("metadata key `{key}` is not an array")))?;
        arr.iter()
            .map(|e| {
                e.as_f64().ok_or_else(|| {
                    ModelError::format(&self.path, format!("metadata key `{key}`: element is not a number"))
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}
