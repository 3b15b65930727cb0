//! The `rrt` binary end to end on the default model: output formats and values, and clear
//! errors for bad input.

use std::process::{Command, Output};

fn rrt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rrt"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "rrt failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn fixture(rel: &str) -> serde_json::Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(rel);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn tokenize_prints_llama_cpp_ids() {
    let f = fixture("llamacpp/tokenize.json");
    let case = &f["cases"][12];
    let text = case["text"].as_str().unwrap();
    let plain: serde_json::Value = serde_json::from_str(&stdout(&rrt(&["tokenize", "--text", text]))).unwrap();
    assert_eq!(plain, case["ids"]);
    let special: serde_json::Value =
        serde_json::from_str(&stdout(&rrt(&["tokenize", "--text", text, "--special"]))).unwrap();
    assert_eq!(special, case["ids_special"]);
    assert_ne!(plain, special);
}

#[test]
fn generate_json_and_stream_agree_with_reference() {
    let g = fixture("llamacpp/greedy.json");
    let case = &g["cases"][1];
    let prompt = case["prompt"].as_str().unwrap();
    let out: serde_json::Value = serde_json::from_str(&stdout(&rrt(&[
        "generate",
        "--prompt",
        prompt,
        "--max-tokens",
        "20",
        "--json",
    ])))
    .unwrap();
    assert_eq!(out["prompt_ids"], case["prompt_ids"]);
    // Greedy ids equal llama.cpp's on the exact (F32) weights.
    let want: Vec<u64> = case["ids_f32"].as_array().unwrap()[..20]
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let got: Vec<u64> = out["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(got, want);
    assert_eq!(out["finish_reason"], "length");
    let text = out["text"].as_str().unwrap();
    assert!(text.starts_with(" there was a"), "{text:?}");
    // Streaming mode prints the same text (plus a final newline).
    let streamed = stdout(&rrt(&["generate", "--prompt", prompt, "--max-tokens", "20"]));
    assert_eq!(streamed, format!("{text}\n"));
}

#[test]
fn chat_applies_the_template_and_stops_at_end_of_turn() {
    let out: serde_json::Value = serde_json::from_str(&stdout(&rrt(&[
        "generate",
        "--chat",
        "What is the capital of France?",
        "--json",
    ])))
    .unwrap();
    let prompt: Vec<u64> = out["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    // <|im_start|>system ... <|im_start|>user ... <|im_start|>assistant\n
    assert_eq!(prompt.iter().filter(|&&t| t == 1).count(), 3);
    assert_eq!(out["finish_reason"], "eos");
    assert!(out["text"].as_str().unwrap().contains("Paris"), "{}", out["text"]);
}

#[test]
fn eval_json_reports_perplexity() {
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/tinyshakespeare.txt");
    let out: serde_json::Value = serde_json::from_str(&stdout(&rrt(&[
        "eval",
        "--text",
        text.to_str().unwrap(),
        "--window",
        "128",
        "--windows",
        "2",
        "--json",
    ])))
    .unwrap();
    assert_eq!(out["scored_tokens"], 254);
    let ppl = out["ppl"].as_f64().unwrap();
    assert!(ppl > 5.0 && ppl < 500.0, "{ppl}");
}

#[test]
fn bad_input_gives_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
        (&["generate", "--prompt", "x", "--top-p", "0"], "top_p"),
        (&["generate", "--prompt", "x", "--top-p", "1.5"], "top_p"),
        (
            &["generate", "--prompt", "x", "--model", "/nonexistent/model.gguf"],
            "/nonexistent/model.gguf",
        ),
        (
            &["generate", "--prompt", "x", "--max-tokens", "100000"],
            "context length",
        ),
        (&["generate", "--prompt", "", "--max-tokens", "3"], "prompt"),
        (&["eval", "--text", "/nonexistent.txt"], "/nonexistent.txt"),
        (&["eval", "--text", "Cargo.toml", "--window", "1"], "window"),
        (&["generate"], "--prompt"),
    ];
    for (args, needle) in cases {
        let o = rrt(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn convert_refuses_bad_specifications() {
    let out = std::env::temp_dir().join(format!("rrt-cli-convert-{}", std::process::id()));
    let o = out.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["convert", "--out", o, "--loops", "4"], "divisible"),
        (
            &["convert", "--out", o, "--loops", "2", "--lora-rank", "600"],
            "exceeds min(in, out)",
        ),
        (
            &["convert", "--out", o, "--loops", "2", "--lora-ranks", "q=8,x=3"],
            "unknown module `x`",
        ),
        (
            &["convert", "--out", o, "--loops", "2", "--lora-ranks", "q=eight"],
            "not a rank",
        ),
        (
            &["convert", "--out", o, "--loops", "2", "--svd", "activation"],
            "--calibration",
        ),
        (
            &[
                "convert",
                "--out",
                o,
                "--loops",
                "2",
                "--svd",
                "activation",
                "--calibration",
                "/nonexistent.txt",
            ],
            "/nonexistent.txt",
        ),
    ];
    for (args, needle) in cases {
        let r = rrt(args);
        assert!(!r.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!out.exists(), "a refused conversion must not write anything");
}

#[test]
fn convert_and_quantize_write_quantized_checkpoints() {
    let base = std::env::temp_dir().join(format!("rrt-cli-quant-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (q4, q8, empty) = (base.join("q4"), base.join("q8"), base.join("empty"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    // Rank 0 (no SVD) keeps the conversion fast; the format is what is tested.
    let o = rrt(&["convert", "--out", &s(&q4), "--loops", "2", "--quant", "q4_1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("rrt_checkpoint.json")).unwrap()).unwrap()
    };
    assert_eq!(cfg(&q4)["weights"], "q4_1");
    let o = rrt(&["quantize", "--model", &s(&q4), "--out", &s(&q8), "--quant", "q8_0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("q8_0"));
    let c8 = cfg(&q8);
    assert_eq!(c8["weights"], "q8_0");
    assert_eq!(c8["provenance"]["extra"]["quantize"]["from_weights"], "q4_1");
    assert_eq!(c8["recursion"], cfg(&q4)["recursion"]);
    let size = |d: &std::path::Path| std::fs::metadata(d.join("model.safetensors")).unwrap().len();
    // SmolLM2 at B = 2, rank 0: 15 shared layers of 3.54 M weights plus 28.3 M embeddings
    // (326 MB as f32): about 63 MB as q4_1 (Q8_0 embeddings), 86 MB as q8_0.
    assert!(
        size(&q4) < 70_000_000 && size(&q8) < 90_000_000,
        "{} {}",
        size(&q4),
        size(&q8)
    );
    assert!(size(&q4) < size(&q8));
    // Both serve: perplexity through the quantized products is finite and not absurd.
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/tinyshakespeare.txt");
    for d in [&q4, &q8] {
        let out: serde_json::Value = serde_json::from_str(&stdout(&rrt(&[
            "eval",
            "--model",
            &s(d),
            "--text",
            text.to_str().unwrap(),
            "--window",
            "64",
            "--windows",
            "1",
            "--json",
        ])))
        .unwrap();
        let ppl = out["ppl"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{}: {ppl}", d.display());
    }

    std::fs::create_dir_all(&empty).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "quantize".into(),
                "--model".into(),
                s(&q8),
                "--out".into(),
                s(&q8),
                "--quant".into(),
                "q4_1".into(),
            ],
            "input checkpoint",
        ),
        (
            vec![
                "quantize".into(),
                "--model".into(),
                s(&empty),
                "--out".into(),
                s(&base.join("x")),
                "--quant".into(),
                "q8_0".into(),
            ],
            "not an rrt recursive checkpoint",
        ),
        (
            vec![
                "quantize".into(),
                "--model".into(),
                s(&q8),
                "--out".into(),
                s(&base.join("x")),
                "--quant".into(),
                "q5_0".into(),
            ],
            "q4_1",
        ),
        (
            vec![
                "convert".into(),
                "--out".into(),
                s(&base.join("x")),
                "--loops".into(),
                "2".into(),
                "--quant".into(),
                "int4".into(),
            ],
            "invalid value 'int4'",
        ),
    ];
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = rrt(&args);
        assert!(!r.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!base.join("x").exists(), "a refused command must not write anything");
    assert_eq!(cfg(&q8)["weights"], "q8_0", "the refused rewrite left its input alone");
    std::fs::remove_dir_all(&base).unwrap();
}

/// `rrt calibrate --fit-gate` on a converted checkpoint trained without a gate: it fits a
/// gate, writes it and the gate criterion's thresholds, and the written checkpoint reproduces
/// the fit-time calibration exactly when calibrated again on its own gate (the scores the
/// fit calibrated on are the ones the gate criterion computes). Conflicting or bad flags are
/// refused without touching the checkpoint.
#[test]
fn calibrate_fit_gate_writes_a_gate_that_reproduces_its_calibration() {
    let base = std::env::temp_dir().join(format!("rrt-cli-fitgate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let ck = base.join("b2");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let o = rrt(&["convert", "--out", &s(&ck), "--loops", "2", "--quant", "q4_1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/tinyshakespeare.txt");
    let text = s(&text);
    let cfg = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(ck.join("rrt_checkpoint.json")).unwrap()).unwrap()
    };
    assert!(cfg().get("exit_gate").is_none());
    let refused: [(&[&str], &str); 2] = [
        (&["--criterion", "max-prob"], "--fit-gate fits the gate criterion"),
        (&["--gate-l2=-1"], "ridge"),
    ];
    for (extra, needle) in refused {
        let mut args = vec![
            "calibrate",
            "--model",
            &ck.to_str().unwrap(),
            "--text",
            &text,
            "--fit-gate",
        ];
        args.extend_from_slice(extra);
        let r = rrt(&args);
        assert!(!r.status.success(), "{extra:?} succeeded");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(needle) && !err.contains("panicked"), "{extra:?}: {err}");
        assert!(cfg().get("exit_gate").is_none(), "{extra:?} wrote a gate");
    }
    let common = [
        "--model",
        ck.to_str().unwrap(),
        "--text",
        &text,
        "--tokens",
        "768",
        "--agreement",
        "0.9",
        "--json",
    ];
    let mut args = vec!["calibrate", "--fit-gate"];
    args.extend_from_slice(&common);
    let fitted: serde_json::Value = serde_json::from_str(stdout(&rrt(&args)).trim()).unwrap();
    let c = cfg();
    assert_eq!(c["exit_gate"], true);
    assert_eq!(c["exit"]["criterion"], "gate");
    assert_eq!(c["exit"]["thresholds"], fitted["thresholds"]);
    let fit = &c["exit"]["calibration"]["fitted_gate"];
    assert_eq!(fit["samples"], 768);
    let acc = fit["accuracy"].as_f64().unwrap();
    assert!(acc > 0.5 && acc <= 1.0, "{fit}");
    let mut args = vec!["calibrate", "--criterion", "gate", "--dry-run"];
    args.extend_from_slice(&common);
    let again: serde_json::Value = serde_json::from_str(stdout(&rrt(&args)).trim()).unwrap();
    assert_eq!(again, fitted, "the written gate reproduces the fit-time calibration");
    // With the checkpoint's own continuations appended: 2 prompts of 16 tokens, each
    // continued for at most 8; the fit and the calibration see text and continuations.
    let mut args = vec![
        "calibrate",
        "--fit-gate",
        "--self-generated",
        "2",
        "--self-generated-prompt",
        "16",
        "--self-generated-tokens",
        "8",
    ];
    args.extend_from_slice(&common);
    let own: serde_json::Value = serde_json::from_str(stdout(&rrt(&args)).trim()).unwrap();
    let c = cfg();
    let sg = &c["exit"]["calibration"]["self_generated"];
    let appended = sg["tokens"].as_u64().unwrap();
    assert!((34..=48).contains(&appended), "{sg}");
    assert_eq!(sg["prompts"], 2);
    assert_eq!(c["exit"]["calibration"]["fitted_gate"]["samples"], 768 + appended);
    assert_eq!(own["tokens"], 768 + appended);
    let mut args = vec!["calibrate", "--self-generated", "2", "--self-generated-prompt", "0"];
    args.extend_from_slice(&common);
    let r = rrt(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("self-generated") && !err.contains("panicked"),
        "{err}"
    );
    // To a loop budget: the written thresholds keep within it on the calibration tokens.
    let budget = [
        "calibrate",
        "--model",
        ck.to_str().unwrap(),
        "--text",
        &text,
        "--tokens",
        "768",
        "--criterion",
        "gate",
        "--json",
        "--mean-loops",
    ];
    let mut args = budget.to_vec();
    args.push("1.3");
    let within: serde_json::Value = serde_json::from_str(stdout(&rrt(&args)).trim()).unwrap();
    let c = cfg();
    let loops = within["mean_loops"].as_f64().unwrap();
    assert!((1.0..=1.3).contains(&loops), "{within}");
    assert_eq!(c["exit"]["thresholds"], within["thresholds"]);
    assert_eq!(c["exit"]["calibration"]["mean_loops_budget"], 1.3);
    assert_eq!(c["exit"]["calibration"]["expected_mean_loops"], within["mean_loops"]);
    let t = c["exit"]["target_agreement"].as_f64().unwrap();
    assert!(t > 0.0 && t <= 1.0, "{c}");
    let mut args = budget.to_vec();
    args.push("0.5");
    let r = rrt(&args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("--mean-loops") && !err.contains("panicked"),
        "{err}"
    );
    std::fs::remove_dir_all(&base).unwrap();
}
