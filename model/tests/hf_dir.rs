//! Hugging Face directories: the default model exported to safetensors (sharded, with an
//! index) loads into the same weights, tokenizer and chat template as its GGUF, and bad
//! directories give errors naming the file and the tensor.

mod common;

use common::{read_json, smollm2};
use rrt_model::ModelError;
use rrt_model::gguf::GgufFile;
use rrt_model::sources::gguf_name;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rrt-hf-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct T {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &T {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_t(shape: Vec<usize>, v: &[f32]) -> T {
    T {
        dtype: Dtype::F32,
        shape,
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Writes `tensors` into `shards` safetensors files plus `model.safetensors.index.json`.
fn write_shards(dir: &Path, tensors: &[(String, T)], shards: usize) {
    let mut map = serde_json::Map::new();
    let per = tensors.len().div_ceil(shards);
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        let items: Vec<(String, &T)> = chunk.iter().map(|(n, t)| (n.clone(), t)).collect();
        safetensors::serialize_to_file(items, None, &dir.join(&file)).unwrap();
        for (n, _) in chunk {
            map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// llama.cpp's converter permutes q/k rows for its interleaved RoPE:
/// `w.reshape(heads, 2, hd/2, in).swapaxes(1, 2)`. Undo it: GGUF row (h, i, j) with
/// index h*hd + 2i + j came from HF row h*hd + j*hd/2 + i.
fn unpermute(w: &[f32], heads: usize, row_len: usize) -> Vec<f32> {
    let hd = w.len() / row_len / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let g = (h * hd + 2 * i + j) * row_len;
                let f = (h * hd + j * hd / 2 + i) * row_len;
                out[f..f + row_len].copy_from_slice(&w[g..g + row_len]);
            }
        }
    }
    out
}

fn write_tokenizer_files(dir: &Path, config: serde_json::Value) {
    let lm = smollm2();
    std::fs::write(dir.join("tokenizer.json"), lm.tokenizer.to_json().unwrap()).unwrap();
    let tc = serde_json::json!({
        "chat_template": lm.chat_template.as_ref().unwrap().source,
        "bos_token": null,
        "eos_token": "<|im_end|>",
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn llama_config(
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    vocab: usize,
) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
    })
}

#[test]
fn sharded_export_of_default_model_is_identical_to_its_gguf() {
    let lm = smollm2();
    let c = &lm.model.config;
    let g = GgufFile::open(&lm.path).unwrap();
    let mut names = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
    for l in 0..c.n_layers {
        for m in ["input_layernorm", "post_attention_layernorm"] {
            names.push(format!("model.layers.{l}.{m}.weight"));
        }
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            names.push(format!("model.layers.{l}.{m}.weight"));
        }
    }
    let tensors: Vec<(String, T)> = names
        .iter()
        .map(|n| {
            let info = g.tensor_info(&gguf_name(n).unwrap()).unwrap();
            let shape = info.shape();
            let mut v = g.tensor_f32(info).unwrap();
            if n.contains("q_proj") {
                v = unpermute(&v, c.n_heads, shape[1]);
            } else if n.contains("k_proj") {
                v = unpermute(&v, c.n_kv_heads, shape[1]);
            }
            (n.clone(), f32_t(shape, &v))
        })
        .collect();
    let dir = tmpdir("smollm2");
    write_shards(&dir, &tensors, 3);
    drop(tensors);
    write_tokenizer_files(
        &dir,
        llama_config(c.hidden, c.intermediate, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab),
    );

    let hf = rrt_model::load(&dir).unwrap();
    assert_eq!(hf.model.config, lm.model.config);
    // Weights identical, hence logits identical to the bit.
    let prompt = lm.tokenizer.encode("The capital of France is", false, false).unwrap();
    let a = rrt_model::generate::generate(lm, &prompt, 12, Default::default(), |_| Ok(())).unwrap();
    let b = rrt_model::generate::generate(&hf, &prompt, 12, Default::default(), |_| Ok(())).unwrap();
    assert_eq!(a, b);
    // The GGUF keeps Q4_1 blocks, the export holds their exact f32 values.
    assert!(matches!(
        lm.model.weights.layers[7].qkv.w,
        rrt_model::weights::Weight::Quant(..)
    ));
    let (gw, hw) = (
        lm.model.weights.layers[7].qkv.w_f32(),
        hf.model.weights.layers[7].qkv.w_f32(),
    );
    assert!(gw.iter().zip(hw.iter()).all(|(x, y)| x.to_bits() == y.to_bits()));
    // Tokenizer from tokenizer.json equals the GGUF one on the llama.cpp fixture strings.
    for case in read_json("llamacpp/tokenize.json")["cases"].as_array().unwrap() {
        let t = case["text"].as_str().unwrap();
        assert_eq!(
            hf.tokenizer.encode(t, false, false).unwrap(),
            lm.tokenizer.encode(t, false, false).unwrap(),
            "{t:?}"
        );
        assert_eq!(
            hf.tokenizer.encode(t, false, true).unwrap(),
            lm.tokenizer.encode(t, false, true).unwrap(),
            "{t:?}"
        );
    }
    let msgs = [rrt_model::chat::Message::new("user", "Hi")];
    assert_eq!(hf.chat_prompt(&msgs).unwrap(), lm.chat_prompt(&msgs).unwrap());
    assert!(hf.tokenizer.is_eog(2) && !hf.tokenizer.add_bos);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A tiny random model (SmolLM2's tokenizer, hidden 16) as a single safetensors file.
fn tiny(dir: &Path, change: impl FnOnce(&mut HashMap<String, T>)) {
    let (h, inter, vocab) = (16usize, 32usize, 49152usize);
    let mut m: HashMap<String, T> = HashMap::new();
    let mut seed = 1u32;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    m.insert(
        "model.embed_tokens.weight".into(),
        f32_t(vec![vocab, h], &rnd(vocab * h)),
    );
    m.insert("model.norm.weight".into(), f32_t(vec![h], &rnd(h)));
    for (name, shape) in [
        ("input_layernorm", vec![h]),
        ("post_attention_layernorm", vec![h]),
        ("self_attn.q_proj", vec![h, h]),
        ("self_attn.k_proj", vec![8, h]),
        ("self_attn.v_proj", vec![8, h]),
        ("self_attn.o_proj", vec![h, h]),
        ("mlp.gate_proj", vec![inter, h]),
        ("mlp.up_proj", vec![inter, h]),
        ("mlp.down_proj", vec![h, inter]),
    ] {
        let n: usize = shape.iter().product();
        m.insert(format!("model.layers.0.{name}.weight"), f32_t(shape, &rnd(n)));
    }
    change(&mut m);
    let items: Vec<(String, &T)> = m.iter().map(|(n, t)| (n.clone(), t)).collect();
    safetensors::serialize_to_file(items, None, &dir.join("model.safetensors")).unwrap();
    write_tokenizer_files(dir, llama_config(h, inter, 1, 2, 1, vocab));
}

fn tiny_err(name: &str, change: impl FnOnce(&mut HashMap<String, T>)) -> (PathBuf, ModelError) {
    let dir = tmpdir(name);
    tiny(&dir, change);
    match rrt_model::load(&dir) {
        Ok(_) => panic!("{name}: loaded"),
        Err(e) => (dir.join("model.safetensors"), e),
    }
}

#[test]
fn tiny_directory_loads_with_f16_and_bf16_tensors() {
    let dir = tmpdir("tiny-ok");
    tiny(&dir, |m| {
        // Same values stored as f16 and bf16 (exactly representable: multiples of 1/8).
        let v: Vec<f32> = (0..16).map(|i| i as f32 / 8.0).collect();
        m.insert(
            "model.norm.weight".into(),
            T {
                dtype: Dtype::F16,
                shape: vec![16],
                data: v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            },
        );
        m.insert(
            "model.layers.0.input_layernorm.weight".into(),
            T {
                dtype: Dtype::BF16,
                shape: vec![16],
                data: v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            },
        );
    });
    let lm = rrt_model::load(&dir).unwrap();
    let want: Vec<f32> = (0..16).map(|i| i as f32 / 8.0).collect();
    assert_eq!(lm.model.weights.norm, want);
    assert_eq!(lm.model.weights.layers[0].attn_norm, want);
    assert_eq!(lm.kind, rrt_model::loader::SourceKind::HuggingFace);
}

#[test]
fn missing_tensor_in_directory() {
    let (p, e) = tiny_err("missing", |m| {
        m.remove("model.layers.0.mlp.up_proj.weight");
    });
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e}");
    assert!(
        e.to_string().contains("model.layers.0.mlp.up_proj.weight") && e.to_string().contains(&p.display().to_string()),
        "{e}"
    );
}

#[test]
fn wrong_shape_in_directory() {
    let (p, e) = tiny_err("shape", |m| {
        m.insert(
            "model.layers.0.self_attn.k_proj.weight".into(),
            f32_t(vec![16, 16], &[0.0; 256]),
        );
    });
    assert!(matches!(e, ModelError::Shape { .. }), "{e}");
    assert!(
        e.to_string().contains("k_proj") && e.to_string().contains(&p.display().to_string()),
        "{e}"
    );
}

#[test]
fn nan_in_directory() {
    let (_, e) = tiny_err("nan", |m| {
        let mut v = vec![0.5f32; 16];
        v[3] = f32::NAN;
        m.insert(
            "model.layers.0.post_attention_layernorm.weight".into(),
            f32_t(vec![16], &v),
        );
    });
    assert!(matches!(e, ModelError::NonFinite { index: 3, .. }), "{e}");
    assert!(e.to_string().contains("post_attention_layernorm"), "{e}");
}

#[test]
fn unsupported_dtype_in_directory() {
    let (_, e) = tiny_err("dtype", |m| {
        m.insert(
            "model.norm.weight".into(),
            T {
                dtype: Dtype::I32,
                shape: vec![16],
                data: vec![0; 64],
            },
        );
    });
    assert!(matches!(e, ModelError::UnknownTensorType { .. }), "{e}");
    assert!(e.to_string().contains("model.norm.weight"), "{e}");
}

#[test]
fn truncated_safetensors_and_bad_config() {
    let dir = tmpdir("trunc");
    tiny(&dir, |_| {});
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = rrt_model::load(&dir).err().unwrap();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    let dir = tmpdir("badcfg");
    tiny(&dir, |_| {});
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "num_hidden_layers": 1}"#,
    )
    .unwrap();
    let e = rrt_model::load(&dir).err().unwrap();
    assert!(
        e.to_string().contains("hidden_size") && e.to_string().contains("config.json"),
        "{e}"
    );
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    assert!(matches!(
        rrt_model::load(&dir).err().unwrap(),
        ModelError::Unsupported { .. }
    ));
    std::fs::write(dir.join("config.json"), "not json").unwrap();
    assert!(
        rrt_model::load(&dir)
            .err()
            .unwrap()
            .to_string()
            .contains("invalid JSON")
    );
}

/// Dense float64 forward pass of a one-layer model, written independently of rrt (Hugging
/// Face's modeling_qwen2/mistral semantics: biases on q/k/v, rotate-half RoPE, causal
/// attention over the last `window` positions).
fn reference_logits(
    m: &HashMap<String, T>,
    ids: &[usize],
    heads: usize,
    kv: usize,
    theta: f64,
    window: Option<usize>,
) -> Vec<Vec<f64>> {
    let get = |n: &str| -> Vec<f64> {
        let t = &m[n];
        t.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect()
    };
    let shape = |n: &str| m[n].shape.clone();
    let h = shape("model.norm.weight")[0];
    let hd = h / heads;
    let emb = get("model.embed_tokens.weight");
    let rms = |x: &[f64], w: &[f64]| -> Vec<f64> {
        let s = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + 1e-5).sqrt();
        x.iter().zip(w).map(|(a, b)| a / s * b).collect()
    };
    let lin = |name: &str, x: &[f64]| -> Vec<f64> {
        let w = get(&format!("{name}.weight"));
        let out = shape(&format!("{name}.weight"))[0];
        let b = m
            .contains_key(&format!("{name}.bias"))
            .then(|| get(&format!("{name}.bias")));
        (0..out)
            .map(|j| (0..x.len()).map(|i| w[j * x.len() + i] * x[i]).sum::<f64>() + b.as_ref().map_or(0.0, |b| b[j]))
            .collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for head in v.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let a = pos as f64 * theta.powf(-((2 * i) as f64) / hd as f64);
                let (x0, x1) = (head[i], head[i + hd / 2]);
                head[i] = x0 * a.cos() - x1 * a.sin();
                head[i + hd / 2] = x1 * a.cos() + x0 * a.sin();
            }
        }
    };
    let p = "model.layers.0";
    let mut xs: Vec<Vec<f64>> = ids.iter().map(|&t| emb[t * h..(t + 1) * h].to_vec()).collect();
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    let mut out = Vec::new();
    for (pos, x) in xs.iter_mut().enumerate() {
        let a = rms(x, &get(&format!("{p}.input_layernorm.weight")));
        let mut q = lin(&format!("{p}.self_attn.q_proj"), &a);
        let mut k = lin(&format!("{p}.self_attn.k_proj"), &a);
        rope(&mut q, pos);
        rope(&mut k, pos);
        ks.push(k);
        vs.push(lin(&format!("{p}.self_attn.v_proj"), &a));
        let start = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let mut attn = vec![0f64; h];
        for hh in 0..heads {
            let g = hh / (heads / kv);
            let s: Vec<f64> = (start..=pos)
                .map(|j| (0..hd).map(|i| q[hh * hd + i] * ks[j][g * hd + i]).sum::<f64>() / (hd as f64).sqrt())
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
            for (jj, j) in (start..=pos).enumerate() {
                for i in 0..hd {
                    attn[hh * hd + i] += (s[jj] - mx).exp() / z * vs[j][g * hd + i];
                }
            }
        }
        let o = lin(&format!("{p}.self_attn.o_proj"), &attn);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let f = rms(x, &get(&format!("{p}.post_attention_layernorm.weight")));
        let gate = lin(&format!("{p}.mlp.gate_proj"), &f);
        let up = lin(&format!("{p}.mlp.up_proj"), &f);
        let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        let d = lin(&format!("{p}.mlp.down_proj"), &act);
        x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        let n = rms(x, &get("model.norm.weight"));
        out.push(
            (0..emb.len() / h)
                .map(|t| (0..h).map(|i| emb[t * h + i] * n[i]).sum::<f64>())
                .collect(),
        );
    }
    out
}

/// Qwen2 (q/k/v biases) and Mistral (sliding window) directories: rrt's logits at every
/// position equal the independent float64 reference.
#[test]
fn qwen2_biases_and_mistral_window_match_reference() {
    for (family, window) in [("qwen2", None), ("mistral", Some(3usize))] {
        let dir = tmpdir(family);
        let mut saved = HashMap::new();
        tiny(&dir, |m| {
            if family == "qwen2" {
                for (name, n) in [("q_proj", 16usize), ("k_proj", 8), ("v_proj", 8)] {
                    let b: Vec<f32> = (0..n).map(|i| (i as f32 - 4.0) * 0.05).collect();
                    m.insert(format!("model.layers.0.self_attn.{name}.bias"), f32_t(vec![n], &b));
                }
            }
            for (k, t) in m.iter() {
                saved.insert(
                    k.clone(),
                    T {
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        data: t.data.clone(),
                    },
                );
            }
        });
        let mut cfg = llama_config(16, 32, 1, 2, 1, 49152);
        cfg["model_type"] = family.into();
        cfg["rope_theta"] = 10000.0.into();
        if let Some(w) = window {
            cfg["sliding_window"] = w.into();
        }
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let lm = rrt_model::load(&dir).unwrap();
        assert_eq!(lm.model.config.qkv_bias, family == "qwen2");
        assert_eq!(lm.model.config.sliding_window, window);
        let ids = [5usize, 900, 77, 12000, 3, 45000, 8];
        let want = reference_logits(&saved, &ids, 2, 1, 10000.0, window);
        let mut pool = rrt_model::kv::KvPool::new(lm.model.kv_layout(4), 2);
        let mut seq = rrt_model::kv::SeqKv::default();
        pool.reserve(&mut seq, ids.len()).unwrap();
        let rows: Vec<rrt_model::Row<'_>> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| rrt_model::Row {
                token: t as u32,
                pos: i,
                blocks: &seq.blocks,
            })
            .collect();
        let select: Vec<usize> = (0..ids.len()).collect();
        let got = lm.model.forward(&rows, &mut pool, &select).unwrap();
        for (p, w) in want.iter().enumerate() {
            let g = &got[p * 49152..(p + 1) * 49152];
            let err = g.iter().zip(w).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
            assert!(err < 1e-4, "{family} position {p}: max abs error {err}");
        }
    }
}
