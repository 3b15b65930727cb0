//! GGUF reading: exact dequantization of every supported type against the `gguf` Python
//! package, and every bad-file case giving an error that names the file and the tensor.

mod common;

use common::{fixture, read_json};
use rrt_model::ModelError;
use rrt_model::gguf::GgufFile;
use std::path::{Path, PathBuf};

#[test]
fn every_type_dequantizes_exactly_like_gguf_python() {
    let g = GgufFile::open(&fixture("gguf/quant_types.gguf")).unwrap();
    let idx = read_json("gguf/quant_types.json");
    let bytes = std::fs::read(fixture("gguf/quant_types_expected.f32")).unwrap();
    let expected: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut seen = Vec::new();
    for t in idx["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let n = (t["rows"].as_u64().unwrap() * t["cols"].as_u64().unwrap()) as usize;
        let off = t["offset"].as_u64().unwrap() as usize;
        let info = g.tensor_info(name).unwrap();
        assert_eq!(
            info.shape(),
            vec![
                t["rows"].as_u64().unwrap() as usize,
                t["cols"].as_u64().unwrap() as usize
            ]
        );
        let got = g.tensor_f32(info).unwrap();
        let want = &expected[off..off + n];
        let mismatches = got.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(
            mismatches, 0,
            "{}: {mismatches} of {n} values differ from gguf-py",
            t["type"]
        );
        seen.push(t["type"].as_str().unwrap().to_string());
    }
    assert_eq!(
        seen,
        [
            "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"
        ]
    );
}

#[test]
fn quantizers_match_gguf_python_byte_for_byte() {
    let meta = read_json("gguf/quantize.json");
    let (rows, cols) = (
        meta["rows"].as_u64().unwrap() as usize,
        meta["cols"].as_u64().unwrap() as usize,
    );
    let x: Vec<f32> = std::fs::read(fixture("gguf/quantize_input.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(x.len(), rows * cols);
    type Quantizer = fn(&[f32]) -> Vec<u8>;
    let cases: [(&str, Quantizer); 2] = [
        ("q8_0", rrt_model::quant::quantize_q8_0),
        ("q4_1", rrt_model::quant::quantize_q4_1),
    ];
    for (name, quantize) in cases {
        let want = std::fs::read(fixture(&format!("gguf/quantize_{name}.bin"))).unwrap();
        assert_eq!(want.len() as u64, meta["bytes"][name].as_u64().unwrap());
        // Row by row, as the checkpoint writer calls it, and all at once.
        let by_rows: Vec<u8> = x.chunks(cols).flat_map(quantize).collect();
        let got = quantize(&x);
        assert_eq!(by_rows, got, "{name}");
        let bad: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
        assert!(
            bad.is_empty(),
            "{name}: {} of {} bytes differ from gguf-py, first at byte {}",
            bad.len(),
            want.len(),
            bad[0]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny GGUF writer, so each bad-file case is built from a valid tiny model by one change.

enum Kv {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArr(Vec<String>),
    I32Arr(Vec<i32>),
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn write_gguf(path: &Path, version: u32, kvs: &[(&str, Kv)], tensors: &[Tensor]) {
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut out, k);
        match v {
            Kv::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::Bool(x) => {
                out.extend(7u32.to_le_bytes());
                out.push(*x as u8);
            }
            Kv::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Kv::StrArr(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for s in a {
                    put_str(&mut out, s);
                }
            }
            Kv::I32Arr(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    for t in tensors {
        out.extend(&t.data);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
    }
    std::fs::write(path, out).unwrap();
}

/// GPT-2's byte-to-unicode map: the token text of each single byte in byte-level BPE.
fn byte_token(b: u8) -> String {
    let printable = |c: u32| (33..=126).contains(&c) || (161..=172).contains(&c) || (174..=255).contains(&c);
    if printable(b as u32) {
        return char::from_u32(b as u32).unwrap().to_string();
    }
    let n = (0..b as u32).filter(|c| !printable(*c)).count() as u32;
    char::from_u32(256 + n).unwrap().to_string()
}

const HIDDEN: u64 = 64;
const FFN: u64 = 96;
const VOCAB: u64 = 257;

fn f32_tensor(name: &str, dims: &[u64], seed: u32) -> Tensor {
    let n: u64 = dims.iter().product();
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    let data = (0..n)
        .flat_map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let v = (s as f32 / u32::MAX as f32 - 0.5) * 0.2;
            v.to_le_bytes()
        })
        .collect();
    Tensor {
        name: name.into(),
        dims: dims.to_vec(),
        ty: 0,
        data,
    }
}

/// A valid tiny llama model: 2 layers, 4 heads of 16, 2 KV heads, byte-level vocabulary.
fn tiny_model() -> (Vec<(&'static str, Kv)>, Vec<Tensor>) {
    let mut tokens: Vec<String> = (0..=255u8).map(byte_token).collect();
    tokens.push("<|endoftext|>".into());
    let mut types = vec![1i32; 256];
    types.push(3);
    let kvs = vec![
        ("general.architecture", Kv::Str("llama".into())),
        ("llama.block_count", Kv::U32(2)),
        ("llama.context_length", Kv::U32(128)),
        ("llama.embedding_length", Kv::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Kv::U32(FFN as u32)),
        ("llama.attention.head_count", Kv::U32(4)),
        ("llama.attention.head_count_kv", Kv::U32(2)),
        ("llama.rope.freq_base", Kv::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Kv::F32(1e-5)),
        ("tokenizer.ggml.model", Kv::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Kv::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Kv::StrArr(tokens)),
        ("tokenizer.ggml.token_type", Kv::I32Arr(types)),
        ("tokenizer.ggml.merges", Kv::StrArr(vec![])),
        ("tokenizer.ggml.eos_token_id", Kv::U32(256)),
        ("tokenizer.ggml.add_bos_token", Kv::Bool(false)),
    ];
    let mut t = vec![
        f32_tensor("token_embd.weight", &[HIDDEN, VOCAB], 1),
        f32_tensor("output_norm.weight", &[HIDDEN], 2),
    ];
    for l in 0..2u32 {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        let s = 10 * (l + 1);
        t.push(f32_tensor(&p("attn_norm"), &[HIDDEN], s));
        t.push(f32_tensor(&p("attn_q"), &[HIDDEN, HIDDEN], s + 1));
        t.push(f32_tensor(&p("attn_k"), &[HIDDEN, 32], s + 2));
        t.push(f32_tensor(&p("attn_v"), &[HIDDEN, 32], s + 3));
        t.push(f32_tensor(&p("attn_output"), &[HIDDEN, HIDDEN], s + 4));
        t.push(f32_tensor(&p("ffn_norm"), &[HIDDEN], s + 5));
        t.push(f32_tensor(&p("ffn_gate"), &[HIDDEN, FFN], s + 6));
        t.push(f32_tensor(&p("ffn_up"), &[HIDDEN, FFN], s + 7));
        t.push(f32_tensor(&p("ffn_down"), &[FFN, HIDDEN], s + 8));
    }
    (kvs, t)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rrt-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Writes a variant of the tiny model and returns the load error (panicking if it loads).
fn load_err(name: &str, change: impl FnOnce(&mut Vec<(&'static str, Kv)>, &mut Vec<Tensor>)) -> (PathBuf, ModelError) {
    let (mut kvs, mut t) = tiny_model();
    change(&mut kvs, &mut t);
    let path = tmp(name);
    write_gguf(&path, 3, &kvs, &t);
    match rrt_model::load(&path) {
        Ok(_) => panic!("{name}: loaded"),
        Err(e) => (path, e),
    }
}

fn assert_names(e: &ModelError, path: &Path, tensor: &str) {
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "no file in: {msg}");
    assert!(msg.contains(tensor), "no tensor `{tensor}` in: {msg}");
}

#[test]
fn tiny_valid_model_loads_and_runs() {
    let (kvs, t) = tiny_model();
    let path = tmp("valid.gguf");
    write_gguf(&path, 3, &kvs, &t);
    let lm = rrt_model::load(&path).unwrap();
    assert_eq!(lm.model.config.n_layers, 2);
    assert!(lm.model.config.tie_embeddings);
    let ids = lm.tokenizer.encode("héllo 12", false, false).unwrap();
    assert_eq!(lm.tokenizer.decode(&ids, false).unwrap(), "héllo 12");
    let g = rrt_model::generate::generate(&lm, &ids, 5, Default::default(), |_| Ok(())).unwrap();
    assert!(g.ids.len() <= 5);
}

#[test]
fn bad_magic_and_version() {
    let p = tmp("magic.gguf");
    std::fs::write(&p, b"GGML\x03\x00\x00\x00rest").unwrap();
    let e = rrt_model::load(&p).err().unwrap();
    assert!(matches!(e, ModelError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("magic.gguf"));
    std::fs::write(&p, b"GG").unwrap();
    assert!(matches!(
        rrt_model::load(&p).err().unwrap(),
        ModelError::BadMagic { .. }
    ));
    let (kvs, t) = tiny_model();
    write_gguf(&p, 1, &kvs, &t);
    assert!(matches!(
        rrt_model::load(&p).err().unwrap(),
        ModelError::BadVersion { version: 1, .. }
    ));
}

#[test]
fn truncated_files_name_what_is_cut() {
    let (kvs, t) = tiny_model();
    let path = tmp("full.gguf");
    write_gguf(&path, 3, &kvs, &t);
    let full = std::fs::read(&path).unwrap();
    // Cut inside the tensor data: the last tensor is named.
    let cut = tmp("cut_data.gguf");
    std::fs::write(&cut, &full[..full.len() - 100]).unwrap();
    let e = rrt_model::load(&cut).err().unwrap();
    assert!(matches!(e, ModelError::Truncated { .. }), "{e}");
    assert_names(&e, &cut, "blk.1.ffn_down.weight");
    // Cut inside the header.
    for len in [4usize, 10, 30, 200, 3000] {
        std::fs::write(&cut, &full[..len]).unwrap();
        let e = rrt_model::load(&cut).err().unwrap();
        assert!(
            matches!(e, ModelError::Truncated { .. } | ModelError::BadMagic { .. }),
            "{len}: {e}"
        );
    }
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    for ty in [10u32, 99] {
        let (p, e) = load_err("type.gguf", |_, t| t[3].ty = ty);
        assert!(matches!(e, ModelError::UnknownTensorType { .. }), "{e}");
        assert_names(&e, &p, &t_name(3));
    }
}

fn t_name(i: usize) -> String {
    tiny_model().1[i].name.clone()
}

#[test]
fn wrong_shape_names_the_tensor() {
    let (p, e) = load_err("shape.gguf", |_, t| {
        let q = t.iter_mut().find(|t| t.name == "blk.1.attn_q.weight").unwrap();
        q.dims = vec![HIDDEN / 2, HIDDEN * 2];
    });
    assert!(matches!(e, ModelError::Shape { .. }), "{e}");
    assert_names(&e, &p, "blk.1.attn_q.weight");
}

#[test]
fn missing_tensor_names_the_tensor() {
    let (p, e) = load_err("missing.gguf", |_, t| t.retain(|t| t.name != "blk.1.ffn_up.weight"));
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e}");
    assert_names(&e, &p, "blk.1.ffn_up.weight");
}

#[test]
fn nan_and_inf_weights_name_the_tensor() {
    for (bad, file) in [
        (f32::NAN, "nan.gguf"),
        (f32::INFINITY, "inf.gguf"),
        (f32::NEG_INFINITY, "ninf.gguf"),
    ] {
        let (p, e) = load_err(file, |_, t| {
            let d = t.iter_mut().find(|t| t.name == "blk.0.ffn_down.weight").unwrap();
            d.data[40..44].copy_from_slice(&bad.to_le_bytes());
        });
        assert!(matches!(e, ModelError::NonFinite { index: 10, .. }), "{e}");
        assert_names(&e, &p, "blk.0.ffn_down.weight");
    }
}

#[test]
fn missing_metadata_is_named() {
    let (_, e) = load_err("meta.gguf", |kv, _| kv.retain(|(k, _)| *k != "llama.embedding_length"));
    assert!(e.to_string().contains("llama.embedding_length"), "{e}");
    let (_, e) = load_err("arch.gguf", |kv, _| kv[0].1 = Kv::Str("gpt-neox".into()));
    assert!(
        matches!(e, ModelError::Unsupported { .. }) && e.to_string().contains("gpt-neox"),
        "{e}"
    );
}

/// A SentencePiece-style (`llama` tokenizer model) vocabulary: tokenization identical to
/// llama.cpp's (scripts/make_spm_fixture.py), BOS added as its metadata asks, byte fallback
/// for characters outside the vocabulary, and decoding back to the text.
#[test]
fn spm_vocabulary_tokenizes_like_llama_cpp() {
    let tok = rrt_model::loader::load_tokenizer(&fixture("gguf/spm_vocab.gguf")).unwrap();
    assert!(tok.add_bos);
    let f = read_json("gguf/spm_tokenize.json");
    for c in f["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want = common::ids(&c["ids"]);
        let got = tok.encode(text, true, false).unwrap();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got, true).unwrap(), text, "{text:?}");
    }
}
