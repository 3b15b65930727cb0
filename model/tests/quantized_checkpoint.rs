//! Quantized recursive checkpoints (`weights: q8_0 | q4_1`) on tiny random recursive models:
//! save / load round trips keep the matrices as blocks (exactly ggml's quantization of the f32
//! weights), logits stay close to the f32 model's, blocks already in the format are written as
//! they are, `checkpoint::quantize` rewrites a checkpoint keeping its config, old checkpoints
//! without the `weights` field still load, and corrupt or inconsistent blocks are refused
//! naming the tensor; and on the default model, requantizing its own Q4_1 / Q8_0 blocks gives
//! them back byte for byte.

mod common;

use common::{load, tiny, tokenizer};

use rrt_kernels::qmatmul::QFormat;
use rrt_model::ModelError;
use rrt_model::checkpoint::{self, Provenance, WeightFormat, read_config, save, write_config};
use rrt_model::forward::Model;
use rrt_model::quant::quantize;
use rrt_model::weights::{Layer, Linear, Weight, Weights};
use std::path::{Path, PathBuf};

fn prov() -> Provenance {
    Provenance {
        source: "tiny".into(),
        source_sha256: "00".into(),
        tool: "test".into(),
        extra: serde_json::json!({"svd": "plain"}),
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rrt-qckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn write(dir: &Path, m: &Model, fmt: WeightFormat) {
    save(dir, m, tokenizer(), None, prov(), fmt).unwrap();
}

const IDS: [u32; 12] = [1, 504, 3458, 28, 253, 2032, 9, 42, 17, 40000, 7, 2];

fn logits(m: &Model) -> Vec<f32> {
    let select: Vec<usize> = (0..IDS.len()).collect();
    m.sequence_logits(&IDS, &select).unwrap()
}

/// Root mean square of `a - b` relative to that of `b`.
fn rms_rel(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    (d / b.iter().map(|y| y * y).sum::<f32>()).sqrt()
}

/// Positions whose largest logit is the same token.
fn argmax_agreement(a: &[f32], b: &[f32], vocab: usize) -> usize {
    let am = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(0, |best, (i, x)| if *x > v[best] { i } else { best })
    };
    a.chunks(vocab)
        .zip(b.chunks(vocab))
        .filter(|(x, y)| am(x) == am(y))
        .count()
}

/// max |a - b| relative to the largest |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let max = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    max / b.iter().fold(0f32, |m, v| m.max(v.abs()))
}

fn blocks(l: &Linear) -> (QFormat, &[u8]) {
    match &l.w {
        Weight::Quant(f, b) => (*f, b),
        Weight::F32(_) => panic!("expected blocks, got f32 ({} x {})", l.out_dim, l.in_dim),
    }
}

/// Every matrix of the loaded model is held in the expected block format with exactly the
/// bytes ggml's quantizer makes of the f32 model's matrix; norms and LoRAs are unchanged.
fn check_blocks(orig: &Model, back: &Model, fmt: WeightFormat) {
    let (sh, emb) = (fmt.shared().unwrap(), fmt.embeddings().unwrap());
    let check = |o: &Linear, b: &Linear, want: QFormat, what: &str| {
        let (f, bytes) = blocks(b);
        assert_eq!(f, want, "{what}");
        assert_eq!(
            bytes,
            quantize(want, &o.w_f32()),
            "{what}: not ggml's blocks of the f32 matrix"
        );
        assert_eq!((b.out_dim, b.in_dim), (o.out_dim, o.in_dim), "{what}");
    };
    check(&orig.weights.embed, &back.weights.embed, emb, "embed");
    match (&orig.weights.lm_head, &back.weights.lm_head) {
        (Some(o), Some(b)) => check(o, b, emb, "lm_head"),
        (None, None) => {}
        _ => panic!("lm_head presence changed"),
    }
    for (k, (o, b)) in orig.weights.layers.iter().zip(&back.weights.layers).enumerate() {
        check(&o.qkv, &b.qkv, sh, &format!("shared.{k}.qkv"));
        check(&o.o, &b.o, sh, &format!("shared.{k}.o"));
        check(&o.gate_up, &b.gate_up, sh, &format!("shared.{k}.gate_up"));
        check(&o.down, &b.down, sh, &format!("shared.{k}.down"));
        assert_eq!((&o.attn_norm, &o.ffn_norm), (&b.attn_norm, &b.ffn_norm));
    }
    assert_eq!(orig.weights.norm, back.weights.norm);
    let (ro, rb) = (orig.recursion.as_ref().unwrap(), back.recursion.as_ref().unwrap());
    for (lo, lb) in ro.lora.iter().flatten().zip(rb.lora.iter().flatten()) {
        let (lo, lb) = (lo.as_ref().unwrap(), lb.as_ref().unwrap());
        assert_eq!((&lo.a, &lo.b), (&lb.a, &lb.b), "LoRA factors stay f32, unchanged");
    }
}

/// The model with every block matrix replaced by its exact f32 values.
fn dequantized(m: &Model) -> Model {
    let f = |l: &Linear| Linear::f32(l.out_dim, l.in_dim, l.w_f32().into_owned(), None);
    let w = &m.weights;
    let weights = Weights {
        embed: f(&w.embed),
        layers: w
            .layers
            .iter()
            .map(|l| Layer {
                qkv: f(&l.qkv),
                o: f(&l.o),
                gate_up: f(&l.gate_up),
                down: f(&l.down),
                ..l.clone()
            })
            .collect(),
        norm: w.norm.clone(),
        lm_head: w.lm_head.as_ref().map(f),
        exit_gate: None,
    };
    Model::recursive(m.config.clone(), weights, m.recursion.clone().unwrap()).unwrap()
}

#[test]
fn quantized_round_trip_keeps_blocks_and_logits_stay_close() {
    for tied in [false, true] {
        let m = tiny(64, tied, 11);
        let want = logits(&m);
        let f32_dir = tmpdir(&format!("f32-{tied}"));
        write(&f32_dir, &m, WeightFormat::F32);
        let back = load(&f32_dir);
        assert!(matches!(back.model.weights.layers[0].qkv.w, Weight::F32(_)));
        assert_eq!(read_config(&f32_dir).unwrap().weights, WeightFormat::F32);
        assert!(
            logits(&back.model)
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        let f32_size = std::fs::metadata(f32_dir.join("model.safetensors")).unwrap().len();

        let mut errs = vec![];
        for fmt in [WeightFormat::Q8_0, WeightFormat::Q4_1] {
            let dir = tmpdir(&format!("{fmt}-{tied}"));
            write(&dir, &m, fmt);
            assert_eq!(read_config(&dir).unwrap().weights, fmt);
            let back = load(&dir);
            check_blocks(&m, &back.model, fmt);
            let got = logits(&back.model);
            let err = rel_diff(&got, &want);
            let rms = rms_rel(&got, &want);
            let agree = argmax_agreement(&got, &want, m.config.vocab);
            eprintln!(
                "tied {tied}, {fmt}: max |logit difference| / max |logit| = {err:.2e}, rms {rms:.2e}, argmax agreement {agree}/{}",
                IDS.len()
            );
            // The difference is the quantization alone: the blocks multiply exactly like their
            // dequantized f32 values.
            let exact = logits(&dequantized(&back.model));
            assert!(got.iter().zip(&exact).all(|(a, b)| a.to_bits() == b.to_bits()), "{fmt}");
            assert!(err > 0.0, "{fmt}: logits identical to f32: nothing was quantized");
            errs.push((rms, err, agree));
            let size = std::fs::metadata(dir.join("model.safetensors")).unwrap().len();
            assert!(size * 2 < f32_size, "{fmt}: {size} bytes vs f32 {f32_size}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
        // Tolerances. Each Q8_0 weight is within half a step (block amax / 254) of its f32
        // value: about 0.4 % rms of these uniform weights per matrix, which this random
        // 8-layer stack amplifies to about 2 % rms of the logits (measured 2.0 %, max 3.3 %).
        // Q4_1 steps are 17x coarser (range / 15): about 25 % rms here.
        let ((r8, m8, a8), (r4, m4, _)) = (errs[0], errs[1]);
        assert!(r8 < 0.04 && m8 < 0.06, "q8_0: rms {r8}, max {m8}");
        assert!(
            a8 >= IDS.len() - 1,
            "q8_0: argmax agrees at {a8} of {} positions",
            IDS.len()
        );
        assert!(r4 < 0.5 && m4 < 0.7, "q4_1: rms {r4}, max {m4}");
        assert!(r4 > 4.0 * r8, "q4_1 ({r4}) should be much further than q8_0 ({r8})");
        std::fs::remove_dir_all(&f32_dir).unwrap();
    }
}

#[test]
fn blocks_already_in_the_format_are_written_as_they_are() {
    let m = tiny(64, false, 12);
    let a = tmpdir("asis-a");
    write(&a, &m, WeightFormat::Q4_1);
    let mut lm = load(&a);
    // Blocks that quantizing their own values would change: nibbles 5 and 6 only, so the
    // block's minimum is not its stored `m` and a requantization would rescale it.
    let Weight::Quant(QFormat::Q4_1, qkv) = &mut lm.model.weights.layers[0].qkv.w else {
        panic!("q4_1 blocks expected")
    };
    qkv[4..20].fill(0x65);
    let tampered = qkv.clone();
    let dequantized = lm.model.weights.layers[0].qkv.w_f32().into_owned();
    assert_ne!(quantize(QFormat::Q4_1, &dequantized)[..20], tampered[..20]);
    let b = tmpdir("asis-b");
    write(&b, &lm.model, WeightFormat::Q4_1);
    let again = load(&b);
    assert_eq!(blocks(&again.model.weights.layers[0].qkv).1, &tampered[..]);
    // The embedding, Q8_0 in both formats, is copied too: writing the Q4_1 model as Q8_0
    // keeps `embed` bit for bit and requantizes the shared layers.
    let c = tmpdir("asis-c");
    write(&c, &lm.model, WeightFormat::Q8_0);
    let q8 = load(&c);
    assert_eq!(blocks(&q8.model.weights.embed).1, blocks(&lm.model.weights.embed).1);
    assert_eq!(blocks(&q8.model.weights.layers[1].down).0, QFormat::Q8_0);
    // And back to f32: the exact values of the blocks.
    let d = tmpdir("asis-d");
    write(&d, &lm.model, WeightFormat::F32);
    let f = load(&d);
    assert_eq!(
        f.model.weights.layers[0].qkv.w_f32().into_owned(),
        dequantized,
        "f32 holds the dequantized blocks"
    );
    for dir in [a, b, c, d] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn quantize_rewrites_a_checkpoint_keeping_its_config() {
    let m = tiny(64, true, 13);
    let src = tmpdir("rq-src");
    write(&src, &m, WeightFormat::F32);
    let mut cfg = read_config(&src).unwrap();
    cfg.exit.criterion = Some(rrt_model::exit::Criterion::MaxProb);
    cfg.exit.thresholds = vec![Some(0.75)];
    cfg.exit.target_agreement = Some(0.95);
    cfg.chat_template = Some("{{ messages[0]['content'] }}".into());
    write_config(&src, &cfg).unwrap();

    let out = tmpdir("rq-out");
    let written = checkpoint::quantize(&src, &out, WeightFormat::Q4_1, "rrt test quantize").unwrap();
    let back = read_config(&out).unwrap();
    assert_eq!(back, written);
    assert_eq!(back.weights, WeightFormat::Q4_1);
    assert_eq!(back.exit, cfg.exit, "exit calibration is kept");
    assert_eq!(
        (
            &back.architecture,
            &back.recursion,
            &back.tokenizer,
            &back.chat_template
        ),
        (&cfg.architecture, &cfg.recursion, &cfg.tokenizer, &cfg.chat_template)
    );
    assert_eq!(
        (
            &back.provenance.source,
            &back.provenance.source_sha256,
            back.provenance.tool.as_str()
        ),
        (
            &cfg.provenance.source,
            &cfg.provenance.source_sha256,
            "rrt test quantize"
        )
    );
    let q = &back.provenance.extra["quantize"];
    assert_eq!(q["from_weights"], "f32");
    assert_eq!(q["weights"], "q4_1");
    assert_eq!(q["from_tool"], "test");
    assert_eq!(q["from"], src.display().to_string());
    assert_eq!(back.provenance.extra["svd"], "plain", "earlier provenance is kept");
    assert_eq!(
        std::fs::read(src.join("tokenizer.json")).unwrap(),
        std::fs::read(out.join("tokenizer.json")).unwrap()
    );
    // The same weights file as saving the model as q4_1 directly.
    let direct = tmpdir("rq-direct");
    write(&direct, &m, WeightFormat::Q4_1);
    assert_eq!(
        std::fs::read(direct.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap()
    );
    let lm = load(&out);
    check_blocks(&m, &lm.model, WeightFormat::Q4_1);
    // Back to q8_0 from q4_1: the embedding's Q8_0 blocks are copied, the shared layers
    // requantized from their Q4_1 values.
    let out2 = tmpdir("rq-out2");
    checkpoint::quantize(&out, &out2, WeightFormat::Q8_0, "t").unwrap();
    let lm2 = load(&out2);
    assert_eq!(blocks(&lm2.model.weights.embed).1, blocks(&lm.model.weights.embed).1);
    assert_eq!(
        blocks(&lm2.model.weights.layers[0].o).1,
        quantize(QFormat::Q8_0, &lm.model.weights.layers[0].o.w_f32())
    );
    assert_eq!(
        read_config(&out2).unwrap().provenance.extra["quantize"]["from_weights"],
        "q4_1"
    );

    // Refusals: the input itself as output (also through another spelling of the path), a
    // directory that is not a checkpoint.
    for same in [src.clone(), src.join(".")] {
        let e = checkpoint::quantize(&src, &same, WeightFormat::Q8_0, "t").unwrap_err();
        assert!(
            matches!(e, ModelError::InvalidArgument { .. }) && e.to_string().contains("input checkpoint"),
            "{e}"
        );
    }
    assert_eq!(read_config(&src).unwrap().weights, WeightFormat::F32, "input untouched");
    let not = tmpdir("rq-not");
    std::fs::create_dir_all(&not).unwrap();
    let e = checkpoint::quantize(&not, &tmpdir("rq-never"), WeightFormat::Q8_0, "t").unwrap_err();
    assert!(e.to_string().contains("rrt_checkpoint.json"), "{e}");
    assert!(!tmpdir("rq-never").exists(), "nothing written for a refused input");
    for d in [src, out, out2, direct, not] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn checkpoints_without_the_weights_field_load_as_f32() {
    let m = tiny(64, true, 14);
    let dir = tmpdir("old");
    write(&dir, &m, WeightFormat::F32);
    let cpath = dir.join("rrt_checkpoint.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cpath).unwrap()).unwrap();
    assert_eq!(json["weights"], "f32");
    json.as_object_mut().unwrap().remove("weights");
    std::fs::write(&cpath, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    assert_eq!(read_config(&dir).unwrap().weights, WeightFormat::F32);
    let back = load(&dir);
    assert!(matches!(back.model.weights.embed.w, Weight::F32(_)));
    assert!(
        logits(&back.model)
            .iter()
            .zip(&logits(&m))
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    // An unknown format is refused by name.
    json["weights"] = "q5_0".into();
    std::fs::write(&cpath, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let e = rrt_model::load(&dir).err().unwrap();
    assert!(
        e.to_string().contains("q5_0") && e.to_string().contains("rrt_checkpoint.json"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Rewrites `model.safetensors` of `dir` with `name` replaced by `(dtype, shape, bytes)`.
fn replace_tensor(dir: &Path, name: &str, dtype: safetensors::Dtype, shape: Vec<usize>, bytes: Vec<u8>) {
    let path = dir.join("model.safetensors");
    let data = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != name).collect();
    views.push((
        name.to_string(),
        safetensors::tensor::TensorView::new(dtype, shape, &bytes).unwrap(),
    ));
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&path, out).unwrap();
}

fn tensor_bytes(dir: &Path, name: &str) -> (Vec<usize>, Vec<u8>) {
    let data = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data().to_vec())
}

fn refused(dir: &Path) -> ModelError {
    match rrt_model::load(dir) {
        Ok(_) => panic!("{}: a bad checkpoint loaded", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn corrupt_or_inconsistent_blocks_are_refused_naming_the_tensor() {
    use safetensors::Dtype::{F32, U8};
    let m = tiny(64, false, 15);
    let good = tmpdir("bad-src");
    write(&good, &m, WeightFormat::Q4_1);
    let case = |name: &str| {
        let d = tmpdir(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["model.safetensors", "rrt_checkpoint.json", "tokenizer.json"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };
    let check = |d: &Path, needles: &[&str]| {
        let e = refused(d);
        let msg = e.to_string();
        assert!(msg.contains("model.safetensors"), "{msg}");
        for n in needles {
            assert!(msg.contains(n), "`{n}` not in: {msg}");
        }
        assert!(!msg.contains("panicked"));
        std::fs::remove_dir_all(d).unwrap();
        e
    };

    // A NaN f16 scale in block 5 of `shared.1.gate` (rows of 64 weights: 2 blocks per row).
    let d = case("nan");
    let (shape, mut b) = tensor_bytes(&d, "shared.1.gate");
    b[5 * 20..5 * 20 + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    replace_tensor(&d, "shared.1.gate", U8, shape, b);
    check(&d, &["`shared.1.gate`", "block 5", "row 2", "non-finite"]);
    // An infinite Q4_1 minimum.
    let d = case("inf-min");
    let (shape, mut b) = tensor_bytes(&d, "shared.0.down");
    b[2..4].copy_from_slice(&half::f16::NEG_INFINITY.to_le_bytes());
    replace_tensor(&d, "shared.0.down", U8, shape, b);
    check(&d, &["`shared.0.down`", "block 0", "non-finite"]);
    // Short rows: one byte missing from each row of `shared.0.v`.
    let d = case("short");
    let (shape, b) = tensor_bytes(&d, "shared.0.v");
    let rb = shape[1];
    let short: Vec<u8> = b.chunks(rb).flat_map(|r| r[..rb - 1].to_vec()).collect();
    replace_tensor(&d, "shared.0.v", U8, vec![shape[0], rb - 1], short);
    let e = check(&d, &["`shared.0.v`"]);
    assert!(matches!(e, ModelError::Shape { .. }), "{e}");
    // A row missing.
    let d = case("rows");
    let (shape, b) = tensor_bytes(&d, "lm_head");
    replace_tensor(
        &d,
        "lm_head",
        U8,
        vec![shape[0] - 1, shape[1]],
        b[..b.len() - shape[1]].to_vec(),
    );
    let e = check(&d, &["`lm_head`"]);
    assert!(matches!(e, ModelError::Shape { .. }), "{e}");
    // Q8_0 blocks where the config declares Q4_1 for the shared layers: wrong row length.
    let d = case("q8-for-q4");
    let w = m.weights.layers[0].o.w_f32();
    replace_tensor(&d, "shared.0.o", U8, vec![64, 2 * 34], quantize(QFormat::Q8_0, &w));
    check(&d, &["`shared.0.o`", "[64, 68]", "[64, 40]"]);
    // f32 values where blocks are declared.
    let d = case("f32-for-q4");
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    replace_tensor(&d, "shared.0.o", F32, vec![64, 64], bytes);
    check(&d, &["`shared.0.o`", "F32", "q4_1"]);
    // Blocks where the config declares f32.
    let d = case("blocks-for-f32");
    let mut cfg = read_config(&d).unwrap();
    cfg.weights = WeightFormat::F32;
    write_config(&d, &cfg).unwrap();
    check(&d, &["`shared.0.q`", "U8", "f32"]);
    // A tensor missing.
    let d = case("missing");
    let data = std::fs::read(d.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let views: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n != "shared.1.up").collect();
    std::fs::write(
        d.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let e = check(&d, &["`shared.1.up`"]);
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e}");
    std::fs::remove_dir_all(&good).unwrap();
}

#[test]
fn rows_that_are_not_whole_blocks_cannot_be_quantized() {
    // Width 48: rows of 48 weights are not whole blocks of 32.
    let m = tiny(48, true, 16);
    let dir = tmpdir("width48");
    let e = save(&dir, &m, tokenizer(), None, prov(), WeightFormat::Q8_0).unwrap_err();
    assert!(
        matches!(e, ModelError::InvalidArgument { .. }) && e.to_string().contains("whole blocks of 32"),
        "{e}"
    );
    assert!(!dir.exists(), "a refused save writes nothing");
    // f32 still works for such a model.
    save(&dir, &m, tokenizer(), None, prov(), WeightFormat::F32).unwrap();
    assert!(matches!(load(&dir).model.weights.embed.w, Weight::F32(_)));
    std::fs::remove_dir_all(&dir).unwrap();
    // A weight too large for an f16 scale (amax / 127 > 65504) is refused, not written as inf.
    let mut m = tiny(64, true, 17);
    let Weight::F32(w) = &mut m.weights.layers[1].down.w else {
        panic!("f32 expected")
    };
    w[100] = 1e10;
    let e = save(&dir, &m, tokenizer(), None, prov(), WeightFormat::Q8_0).unwrap_err();
    assert!(
        e.to_string().contains("`shared.1.down`") && e.to_string().contains("block 3"),
        "{e}"
    );
    assert!(!dir.exists(), "a refused save writes nothing");
}

/// The default GGUF was quantized by llama.cpp with the same reference quantizers: requantizing
/// its dequantized matrices gives back every block of every matrix byte for byte. (So a
/// `--loops 1` conversion written as q4_1 is the GGUF's model exactly.)
#[test]
fn requantizing_the_default_models_blocks_is_the_identity() {
    let lm = common::smollm2();
    let w = &lm.model.weights;
    let mut seen = std::collections::BTreeMap::new();
    let mut mats: Vec<(String, &Linear)> = vec![("embed".into(), &w.embed)];
    for (i, l) in w.layers.iter().enumerate() {
        for (n, m) in [("qkv", &l.qkv), ("o", &l.o), ("gate_up", &l.gate_up), ("down", &l.down)] {
            mats.push((format!("layer {i} {n}"), m));
        }
    }
    for (name, m) in mats {
        let (fmt, b) = blocks(m);
        let again = quantize(fmt, &m.w_f32());
        let bad = b
            .chunks(fmt.block_bytes())
            .zip(again.chunks(fmt.block_bytes()))
            .filter(|(x, y)| x != y)
            .count();
        assert_eq!(bad, 0, "{name} ({fmt:?}): {bad} blocks differ");
        *seen.entry(format!("{fmt:?}")).or_insert(0) += 1;
    }
    assert_eq!(seen.get("Q4_1"), Some(&120), "{seen:?}");
    assert_eq!(seen.get("Q8_0"), Some(&1), "{seen:?}");
}
