//! The engine's device-reduction path (`Backend::prefers_head_top`, used by the CUDA backend so
//! only token ids cross to the host) gives the same tokens, exits and log-probabilities as the
//! host-logits path, and is used only where it may be: greedy rows without penalties, top
//! logprobs or forced tokens. Checked with the CPU backend behind a wrapper that asks for it.

mod common;

use common::*;
use rrt_kernels::attention::{AttnRow, AttnShape, KvLayout};
use rrt_kernels::backend::{KvSlot, LoraColumns, RowGroup};
use rrt_kernels::matmul::MatmulMode;
use rrt_kernels::{Backend, BackendError, CpuBackend, CpuMatrix, HeadTop, MatrixData, RopeTable};
use rrt_model::exit::Criterion;
use rrt_model::sampling::SamplingParams;
use rrt_node::{Engine, EngineConfig, Event, ExitRule, GenParams, Request, ResidentModel};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The CPU backend, reporting itself as one that reduces LM-head rows (and counting them).
#[derive(Default)]
struct Reducing {
    cpu: CpuBackend,
    top_rows: Arc<AtomicUsize>,
    logit_rows: Arc<AtomicUsize>,
}

impl Backend for Reducing {
    type Buf = Vec<f32>;
    type Mat = CpuMatrix;
    type Kv = rrt_kernels::CpuKv;
    type Rows = rrt_kernels::backend::HostRows;
    fn prepare_rows(
        &self,
        sets: Vec<rrt_kernels::backend::HostRows>,
    ) -> Result<Vec<rrt_kernels::backend::HostRows>, BackendError> {
        Ok(sets)
    }
    fn name(&self) -> &'static str {
        "reducing-cpu"
    }
    fn matrix(&self, o: usize, i: usize, d: MatrixData) -> Result<CpuMatrix, BackendError> {
        self.cpu.matrix(o, i, d)
    }
    fn buffer(&self, v: Vec<f32>) -> Result<Vec<f32>, BackendError> {
        Ok(v)
    }
    fn zeros(&self, n: usize) -> Result<Vec<f32>, BackendError> {
        self.cpu.zeros(n)
    }
    fn to_host(&self, b: &Vec<f32>) -> Result<Vec<f32>, BackendError> {
        Ok(b.clone())
    }
    fn kv_pool(&self, l: KvLayout, n: usize) -> Result<rrt_kernels::CpuKv, BackendError> {
        self.cpu.kv_pool(l, n)
    }
    fn kv_value_bytes(&self) -> usize {
        self.cpu.kv_value_bytes()
    }
    fn matrix_bytes(&self, m: &CpuMatrix) -> usize {
        self.cpu.matrix_bytes(m)
    }
    fn embed(&self, t: &CpuMatrix, tokens: &[u32], out: &mut Vec<f32>) -> Result<(), BackendError> {
        self.cpu.embed(t, tokens, out)
    }
    fn copy_rows(&self, s: &Vec<f32>, r: &[u32], d: &mut Vec<f32>, r0: usize, w: usize) -> Result<(), BackendError> {
        self.cpu.copy_rows(s, r, d, r0, w)
    }
    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32, out: &mut Vec<f32>) -> Result<(), BackendError> {
        self.cpu.rmsnorm(x, w, eps, out)
    }
    #[allow(clippy::too_many_arguments)]
    fn linear_lora(
        &self,
        x: &Vec<f32>,
        n: usize,
        w: &CpuMatrix,
        bias: Option<&Vec<f32>>,
        loras: &[LoraColumns<'_, CpuMatrix>],
        groups: &[RowGroup],
        y: &mut Vec<f32>,
        mode: MatmulMode,
    ) -> Result<(), BackendError> {
        self.cpu.linear_lora(x, n, w, bias, loras, groups, y, mode)
    }
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        r: &RopeTable,
        qkv: &mut Vec<f32>,
        ld: usize,
        p: &[u32],
        q: usize,
        k0: usize,
        k: usize,
    ) -> Result<(), BackendError> {
        self.cpu.rope(r, qkv, ld, p, q, k0, k)
    }
    #[allow(clippy::too_many_arguments)]
    fn kv_write(
        &self,
        kv: &mut rrt_kernels::CpuKv,
        l: &KvLayout,
        s: &Vec<f32>,
        ld: usize,
        k0: usize,
        v0: usize,
        slots: &[KvSlot],
    ) -> Result<(), BackendError> {
        self.cpu.kv_write(kv, l, s, ld, k0, v0, slots)
    }
    fn kv_export(&self, kv: &rrt_kernels::CpuKv, l: &KvLayout, b: &[u32], p: usize) -> Result<Vec<f32>, BackendError> {
        self.cpu.kv_export(kv, l, b, p)
    }
    fn kv_import(&self, kv: &mut rrt_kernels::CpuKv, l: &KvLayout, b: &[u32], d: &[f32]) -> Result<(), BackendError> {
        self.cpu.kv_import(kv, l, b, d)
    }
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        qkv: &Vec<f32>,
        ld: usize,
        rows: &[AttnRow<'_>],
        kv: &rrt_kernels::CpuKv,
        l: &KvLayout,
        s: AttnShape,
        out: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        self.cpu.attention(qkv, ld, rows, kv, l, s, out)
    }
    fn silu_mul(&self, gu: &Vec<f32>, n: usize, inter: usize, out: &mut Vec<f32>) -> Result<(), BackendError> {
        self.cpu.silu_mul(gu, n, inter, out)
    }
    fn logits(
        &self,
        x: &Vec<f32>,
        w: usize,
        sel: &[u32],
        norm: Option<&Vec<f32>>,
        eps: f32,
        head: &CpuMatrix,
    ) -> Result<Vec<f32>, BackendError> {
        self.logit_rows.fetch_add(sel.len(), Ordering::Relaxed);
        self.cpu.logits(x, w, sel, norm, eps, head)
    }
    fn add_normed_branch(&self, t: &Vec<f32>, w: &Vec<f32>, eps: f32, x: &mut Vec<f32>) -> Result<(), BackendError> {
        self.cpu.add_normed_branch(t, w, eps, x)
    }
    fn dot_rows(&self, x: &Vec<f32>, width: usize, rows: &[u32], w: &Vec<f32>) -> Result<Vec<f32>, BackendError> {
        self.cpu.dot_rows(x, width, rows, w)
    }
    fn cosine_rows(&self, a: &Vec<f32>, b: &Vec<f32>, w: usize, rows: &[u32]) -> Result<Vec<f32>, BackendError> {
        self.cpu.cosine_rows(a, b, w, rows)
    }
    fn prefers_head_top(&self) -> bool {
        true
    }
    fn head_top(
        &self,
        x: &Vec<f32>,
        w: usize,
        sel: &[u32],
        norm: Option<&Vec<f32>>,
        eps: f32,
        head: &CpuMatrix,
    ) -> Result<Vec<HeadTop>, BackendError> {
        self.top_rows.fetch_add(sel.len(), Ordering::Relaxed);
        // The trait's default reduction, on the inner backend (so `logit_rows` counts only
        // the engine's own full-logits calls).
        self.cpu.head_top(x, w, sel, norm, eps, head)
    }
}

/// (tokens, loops per token, logprobs) of every request, run to completion.
fn run<B: Backend>(mut eng: Engine<B>, reqs: &[(Vec<u32>, GenParams)]) -> Vec<(Vec<u32>, Vec<usize>, Vec<f32>)> {
    let mut ids = Vec::new();
    for (p, g) in reqs {
        ids.push(
            eng.submit(Request {
                prompt: p.clone(),
                params: g.clone(),
            })
            .unwrap(),
        );
    }
    let mut out = vec![(Vec::new(), Vec::new(), Vec::new()); reqs.len()];
    let mut done = 0;
    while done < reqs.len() {
        for (id, e) in eng.step().unwrap() {
            let i = ids.iter().position(|x| *x == id).unwrap();
            match e {
                Event::Token(t) => {
                    out[i].0.push(t.id);
                    out[i].1.push(t.loops);
                    out[i].2.push(t.logprob);
                }
                Event::Done { .. } => done += 1,
            }
        }
    }
    out
}

#[test]
fn device_reduction_matches_host_logits_and_is_used_only_where_it_may() {
    let tok = tokenizer();
    let model = || tiny_model(6, 3, 4, 7);
    let rule = ExitRule {
        criterion: Criterion::MaxProb,
        thresholds: vec![Some(2e-5), Some(2e-5)],
    };
    let cfg = EngineConfig {
        max_step_rows: 24,
        exit: Some(rule),
        ..Default::default()
    };
    let greedy = |n| GenParams {
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    let prompt = |k: u32| -> Vec<u32> { (0..5 + k).map(|i| 100 + 37 * i + 11 * k).collect() };
    // All greedy: the reducing backend must take the device path for every head row.
    let reqs: Vec<_> = (0..6).map(|k| (prompt(k), greedy(12))).collect();
    let host = run(engine(model(), tok.clone(), cfg.clone()), &reqs);
    let red = Reducing::default();
    let (tops, logits) = (red.top_rows.clone(), red.logit_rows.clone());
    let dev = run(
        Engine::new(ResidentModel::new(red, model()).unwrap(), tok.clone(), cfg.clone()).unwrap(),
        &reqs,
    );
    let exits: usize = host.iter().flat_map(|r| &r.1).filter(|&&l| l < 3).count();
    assert!(exits > 0, "the thresholds make some tokens exit early");
    for (h, d) in host.iter().zip(&dev) {
        assert_eq!(h.0, d.0, "tokens");
        assert_eq!(h.1, d.1, "exit loops");
        for (a, b) in h.2.iter().zip(&d.2) {
            assert!((a - b).abs() < 1e-4, "logprob {a} vs {b}");
        }
    }
    assert!(tops.load(Ordering::Relaxed) > 0);
    assert_eq!(
        logits.load(Ordering::Relaxed),
        0,
        "no full logits when every row is plain greedy"
    );

    // One request with top logprobs, one sampled, one with a penalty, next to greedy ones:
    // those steps take the host path, and the outputs still equal the CPU backend's.
    let mut mixed = reqs.clone();
    mixed[1].1.top_logprobs = 3;
    mixed[2].1.sampling = SamplingParams {
        temperature: 0.8,
        seed: Some(5),
        ..Default::default()
    };
    mixed[3].1.sampling.repetition_penalty = 1.3;
    let host = run(engine(model(), tok.clone(), cfg.clone()), &mixed);
    let red = Reducing::default();
    let logits = red.logit_rows.clone();
    let dev = run(
        Engine::new(ResidentModel::new(red, model()).unwrap(), tok, cfg).unwrap(),
        &mixed,
    );
    for (h, d) in host.iter().zip(&dev) {
        assert_eq!(h.0, d.0);
        assert_eq!(h.1, d.1);
    }
    assert!(logits.load(Ordering::Relaxed) > 0);
}

#[test]
fn head_top_reduces_like_the_host_path() {
    let row = [0.5f32, 3.0, -1.0, 3.0, 2.0];
    let t = HeadTop::from_logits(&row);
    assert_eq!(
        (t.id, t.top, t.second),
        (1, 3.0, 3.0),
        "a repeated maximum is its own second"
    );
    let (p1, margin) = rrt_model::exit::prob_scores(&row);
    assert_eq!((t.max_prob(), t.margin()), (p1, margin));
    let lse = rrt_kernels::logsumexp(&row);
    assert!((t.logprob() - (3.0 - lse)).abs() < 1e-6);
}
