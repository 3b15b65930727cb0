//! The node engine: continuous depth-wise batching with early exit over a paged per-depth KV
//! cache.
//!
//! Each [`Engine::step`] runs **one pass of the shared block** over a batch of rows at mixed
//! loop depths: prompt chunks and decode tokens entering at loop 0 next to rows carried over
//! from the previous step at loops 1..B-1. After the pass a row either continues (its hidden
//! state is carried to the next step one loop deeper), or produces a token because it finished
//! its last loop or passed the exit test; the slot it leaves is taken by waiting work in the
//! next pass. A vanilla model runs as `B = 1` (continuous sequence-wise batching), and
//! [`Batching::SequenceWise`] runs a recursive model the conventional way (all loops of a batch
//! before admitting new work) for comparison.
//!
//! Invariants (checked by the property test in `tests/`):
//! - every KV block is free or owned by exactly one live sequence; finishing, cancelling or
//!   preempting a sequence frees its blocks and drops its rows within the same call;
//! - a sequence has at most one row that will produce a token in flight; prompt chunks of one
//!   sequence may be in flight together, each at most one loop behind the previous chunk, so
//!   every row finds the keys/values it attends to already written;
//! - a token that exits at loop b < B-1 gets the keys/values of its deeper unrolled layers
//!   before any later token of its sequence reaches those layers (fill rows in the next pass,
//!   or the token keeps running its remaining loops without output under `KvFill::Recompute`);
//! - rows never exceed `max_step_rows` per pass, and rows already in flight always continue.

pub mod prefix;
pub mod request;
pub mod resident;
pub mod stop;

use rrt_kernels::KvLayout;
use rrt_kernels::backend::{Backend, BackendError};
use rrt_model::ModelError;
use rrt_model::exit::{Criterion, gate_exits, gate_hazard, prob_scores};
use rrt_model::kv::SeqKv;
use rrt_model::sampling::Sampler;
use rrt_model::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

use prefix::PromptDepth;
pub use request::{Event, ExitControl, FinishReason, GenParams, Request, TokenEvent, Usage};
pub use resident::{PassRow, ResidentModel};
use stop::TextStream;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid request field `{field}`: {msg}")]
    InvalidRequest { field: &'static str, msg: String },
    #[error(
        "request needs {needed} KV blocks ({positions} positions) but the whole cache has {capacity}; raise the KV budget or lower max_tokens"
    )]
    TooLarge {
        needed: usize,
        positions: usize,
        capacity: usize,
    },
    #[error("invalid engine configuration `{field}`: {msg}")]
    Config { field: &'static str, msg: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("compute backend fault: {0}")]
    Backend(#[from] BackendError),
}

/// How rows of different loop depths share passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Batching {
    /// One pass per step over rows at mixed depths; freed slots are refilled every pass.
    DepthWise,
    /// A batch runs all its loops before new work is admitted (the conventional way).
    SequenceWise,
}

/// How an early-exited token gets the keys/values of the loops it skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvFill {
    /// Computed from the exit hidden state (K/V projections only), batched into the next pass.
    Propagate,
    /// The token keeps running its remaining loops (without output) in the following passes.
    Recompute,
}

/// Early-exit rule of the engine (from the checkpoint's calibration).
#[derive(Clone, Debug, PartialEq)]
pub struct ExitRule {
    pub criterion: Criterion,
    /// Per loop before the last; `None` = never exit there.
    pub thresholds: Vec<Option<f32>>,
}

impl ExitRule {
    /// Whether a token under `exit` can leave before the last of `loops` loops under the
    /// gate criterion (some loop's threshold, the request's override first, below 1).
    fn gate_can_exit(&self, loops: usize, exit: &ExitControl) -> bool {
        let t_at = |d: usize| exit.threshold.or_else(|| self.thresholds.get(d).copied().flatten());
        self.criterion == Criterion::Gate && (0..loops.saturating_sub(1)).any(|d| t_at(d).is_some_and(|t| t < 1.0))
    }

    /// The rule a natively looped model ships with: its learned gate at the config's
    /// threshold on every loop (Ouro's `early_exit_threshold`; 1.0 runs every loop unless a
    /// request asks for a lower `exit_threshold`).
    pub fn from_model_config(cfg: &rrt_model::config::ModelConfig) -> Option<Self> {
        let l = cfg.looped?;
        cfg.has_exit_gate().then(|| ExitRule {
            criterion: Criterion::Gate,
            thresholds: vec![Some(l.exit_threshold); l.steps.saturating_sub(1)],
        })
    }

    /// The exit rule of a loaded model: its own (a natively looped model's gate) or, for an
    /// rrt checkpoint, the calibrated one; `None` when it has neither.
    pub fn for_model(lm: &rrt_model::LoadedModel) -> Result<Option<Self>, EngineError> {
        if let Some(r) = Self::from_model_config(&lm.model.config) {
            return Ok(Some(r));
        }
        if lm.kind == rrt_model::loader::SourceKind::Recursive {
            return Self::from_checkpoint(&lm.path);
        }
        Ok(None)
    }

    /// The checkpoint's calibrated rule, if it has one.
    pub fn from_checkpoint(dir: &std::path::Path) -> Result<Option<Self>, EngineError> {
        let cfg = rrt_model::checkpoint::read_config(dir)?;
        Ok(cfg.exit.criterion.map(|criterion| ExitRule {
            criterion,
            thresholds: cfg.exit.thresholds.clone(),
        }))
    }
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Positions per KV block.
    pub block_size: usize,
    /// Bytes of KV cache (all unrolled layers); admission is bounded by it.
    pub kv_bytes: usize,
    /// Most rows (tokens x loops) per pass: the per-step token budget of chunked prefill.
    pub max_step_rows: usize,
    /// Most sequences holding KV at once.
    pub max_running: usize,
    pub batching: Batching,
    pub kv_fill: KvFill,
    /// Early exit (`None`: off).
    pub exit: Option<ExitRule>,
    /// Bytes of host memory for the prefix cache (0: off).
    pub prefix_cache_bytes: usize,
    /// Prompt tokens may exit early too (opt-in): with the `gate` criterion and
    /// [`KvFill::Propagate`], every prompt row but the last takes the exit test a decoded
    /// token takes (its own accumulated gate hazard against the loop's threshold), and an
    /// exited row's deeper keys/values are propagated from its exit state in the next pass,
    /// as a decoded token's are. Prefill then costs the loops the gate asks for instead of
    /// every loop. A quality trade like decode exits (later tokens attend to propagated keys
    /// of the prompt), so off by default; `rrt eval-exit --prompt-exits` measures it. A
    /// request's own [`ExitControl::prompt_exits`] overrides it.
    pub prompt_exits: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_bytes: 1 << 30,
            max_step_rows: 256,
            max_running: 64,
            batching: Batching::DepthWise,
            kv_fill: KvFill::Propagate,
            exit: None,
            prefix_cache_bytes: 0,
            prompt_exits: false,
        }
    }
}

pub type RequestId = u64;

/// Counters for benchmarks and metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EngineStats {
    pub passes: u64,
    /// Rows run through the shared block (tokens x loops).
    pub rows: u64,
    /// KV-only fill rows (exited tokens x skipped loops).
    pub fill_rows: u64,
    /// Rows that went through the LM head (decoding + softmax exit tests).
    pub head_rows: u64,
    /// Rows that went through the LM head only for an exit test that did not exit.
    pub head_rows_wasted: u64,
    pub tokens: u64,
    /// Output tokens by loops run (index = loops - 1).
    pub exits: Vec<u64>,
    /// Prompt rows that left before the last loop ([`EngineConfig::prompt_exits`]).
    pub prompt_exits: u64,
    pub preemptions: u64,
    /// Positions computed from a prompt (or replayed output, or recomputed after preemption)
    /// rather than decoded: what a KV import saves.
    pub prefill_tokens: u64,
    /// Sequences taken over with their keys/values / handed off / whose import found no room.
    pub kv_imports: u64,
    pub kv_exports: u64,
    pub kv_import_fallbacks: u64,
    /// Requests whose prompt started from the prefix cache, and the positions it gave them.
    pub prefix_hits: u64,
    pub prefix_hit_tokens: u64,
    /// Wall time in passes of the shared block (all rows, all layers of one loop).
    pub pass_seconds: f64,
    /// Wall time in the final norm + LM head (decoding and softmax exit tests).
    pub head_seconds: f64,
}

impl EngineStats {
    /// Seconds per row for one loop of the shared block, and per row of the LM head: their
    /// ratio is what a softmax exit test costs, in loops.
    pub fn per_row_costs(&self) -> (f64, f64) {
        (
            self.pass_seconds / self.rows.max(1) as f64,
            self.head_seconds / self.head_rows.max(1) as f64,
        )
    }
}

/// What a node reports to the coordinator for routing and capacity planning.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LoadReport {
    /// Requests accepted but holding no KV yet (never admitted, or preempted).
    pub waiting_requests: usize,
    /// Requests holding KV.
    pub running_requests: usize,
    /// Rows in flight per loop depth (what the next pass continues).
    pub rows_per_depth: Vec<usize>,
    /// Prompt and decode tokens waiting to enter loop 0.
    pub waiting_tokens: usize,
    pub free_blocks: usize,
    pub total_blocks: usize,
    pub block_size: usize,
    /// Counters of [`EngineStats`]: prefill positions, KV imports / exports / fallbacks.
    pub prefill_tokens: u64,
    pub kv_imports: u64,
    pub kv_exports: u64,
    pub kv_import_fallbacks: u64,
    /// Prefix cache budget (0: none), hits and the positions they reused.
    pub prefix_cache_bytes: usize,
    pub prefix_hits: u64,
    pub prefix_hit_tokens: u64,
}

/// What one pass did (for the step spans and the capacity model).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PassInfo {
    /// Rows per loop depth entering the pass (index = depth).
    pub rows_per_depth: Vec<usize>,
    /// KV-only fill rows (exited tokens x skipped loops).
    pub fill_rows: usize,
    /// Rows through the LM head (decoding and softmax exit tests).
    pub head_rows: usize,
    /// Positions attended, summed over all rows (each row attends to `pos + 1` positions).
    pub ctx: usize,
    /// Tokens produced, and by exit loop (index = loops - 1).
    pub tokens: usize,
    pub exits: Vec<usize>,
    /// Requests with a row in the pass.
    pub requests: Vec<RequestId>,
    pub seconds: f64,
}

struct Seq {
    prompt: Vec<u32>,
    out: Vec<u32>,
    params: GenParams,
    sampler: Sampler,
    text: TextStream,
    kv: SeqKv,
    /// Positions whose row has entered loop 0.
    fed: usize,
    /// A row that will produce a token is in flight.
    emit_in_flight: bool,
    /// Holds KV blocks.
    running: bool,
    loops: usize,
    preemptions: usize,
    /// Positions below this are prefill (the prompt, or nothing of an imported sequence's
    /// already computed positions).
    prefill_end: usize,
    /// Tokens of `prompt` that were generated elsewhere (a moved request).
    resumed: usize,
    /// Being exported: takes no new rows; leaves once nothing of it is in flight.
    exporting: bool,
    /// Its prompt's whole blocks are still to be offered to the prefix cache (a request
    /// computed here from its prompt; not one moved with keys/values computed elsewhere).
    cache_prompt: bool,
}

impl Seq {
    /// Its next token needs only the argmax of the logits and its log-probability: greedy, no
    /// penalties, no top logprobs, no forced token.
    fn greedy_plain(&self) -> bool {
        self.sampler.is_plain_argmax()
            && self.params.top_logprobs == 0
            && self.params.forced.as_ref().is_none_or(|f| self.out.len() >= f.len())
    }
}

/// One LM-head row as the engine consumes it: host logits, or a backend's reduction of them.
#[derive(Clone, Copy)]
enum Head<'a> {
    Logits(&'a [f32]),
    Top(rrt_kernels::HeadTop),
}

/// A sequence's state as it moves between nodes: its tokens and the keys/values of every
/// unrolled layer for its first `positions` positions (position-major, see
/// [`rrt_kernels::Backend::kv_export`]).
#[derive(Clone, Debug, PartialEq)]
pub struct KvState {
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// How many of `tokens` are the original prompt.
    pub prompt_tokens: usize,
    pub positions: usize,
    pub data: Vec<f32>,
}

/// The cache geometry a [`KvState`] must match to be imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeometry {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvGeometry {
    /// Floats per position (all layers, keys and values).
    pub fn position_floats(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.head_dim
    }
}

impl Seq {
    fn total(&self) -> usize {
        self.prompt.len() + self.out.len()
    }

    fn token(&self, pos: usize) -> u32 {
        if pos < self.prompt.len() {
            self.prompt[pos]
        } else {
            self.out[pos - self.prompt.len()]
        }
    }
}

/// A row carried to the next pass.
#[derive(Clone, Copy, Debug)]
struct Flight {
    seq: RequestId,
    pos: usize,
    /// Loop it runs next.
    depth: usize,
    emit: bool,
    /// Its hidden state: row of the previous pass's output.
    row: usize,
    /// The exit gate's accumulated hazard (`-ln` of the survival) over the loops this row has
    /// run (gate criterion: a decoded token's row, or a prompt row under
    /// [`EngineConfig::prompt_exits`]; 0 otherwise).
    hazard: f64,
}

impl Flight {
    /// Row `row` of this pass (`meta`: sequence, position, depth, emit), one loop deeper.
    fn deeper((seq, pos, depth, emit): (RequestId, usize, usize, bool), row: usize, hazard: f64) -> Flight {
        Flight {
            seq,
            pos,
            depth: depth + 1,
            emit,
            row,
            hazard,
        }
    }
}

/// A token whose deeper unrolled layers need keys/values (propagated from its exit state).
#[derive(Clone, Copy, Debug)]
struct Fill {
    seq: RequestId,
    pos: usize,
    from_depth: usize,
    row: usize,
}

impl Fill {
    /// The loops after this pass's depth for row `row` (`meta`: sequence, position, depth,
    /// emit), which exited.
    fn after((seq, pos, depth, _): (RequestId, usize, usize, bool), row: usize) -> Fill {
        Fill {
            seq,
            pos,
            from_depth: depth + 1,
            row,
        }
    }
}

/// A row entering loop 0 this pass.
#[derive(Clone, Copy, Debug)]
struct NewRow {
    seq: RequestId,
    pos: usize,
    token: u32,
    emit: bool,
}

/// The engine of one node.
pub struct Engine<B: Backend> {
    model: ResidentModel<B>,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
    layout: KvLayout,
    kv: B::Kv,
    free: Vec<u32>,
    n_blocks: usize,
    seqs: BTreeMap<RequestId, Seq>,
    flights: Vec<Flight>,
    fills: Vec<Fill>,
    carry: Option<B::Buf>,
    next_id: RequestId,
    events: Vec<(RequestId, Event)>,
    stats: EngineStats,
    last_pass: Option<PassInfo>,
    prefix: Option<prefix::PrefixCache>,
}

impl<B: Backend> Engine<B> {
    pub fn new(model: ResidentModel<B>, tokenizer: Arc<Tokenizer>, cfg: EngineConfig) -> Result<Self, EngineError> {
        let cerr = |field, msg: String| Err(EngineError::Config { field, msg });
        if cfg.block_size == 0 {
            return cerr("block_size", "must be at least 1".into());
        }
        if cfg.max_step_rows == 0 {
            return cerr("max_step_rows", "must be at least 1".into());
        }
        if cfg.max_running == 0 {
            return cerr("max_running", "must be at least 1".into());
        }
        if let Some(e) = &cfg.exit
            && e.thresholds.len() + 1 != model.loops
            && model.loops > 1
        {
            return cerr(
                "exit.thresholds",
                format!(
                    "{} thresholds for a model of {} loops (expected {})",
                    e.thresholds.len(),
                    model.loops,
                    model.loops - 1
                ),
            );
        }
        if let Some(e) = &cfg.exit
            && e.criterion == Criterion::Gate
            && !model.has_gate()
        {
            return cerr(
                "exit.criterion",
                "the gate criterion needs a model with a learned exit gate (Ouro, or a checkpoint trained with --exit-gate)".into(),
            );
        }
        let layout = model.kv_layout(cfg.block_size);
        let block_bytes = layout.block_floats() * model.backend.kv_value_bytes();
        let n_blocks = cfg.kv_bytes / block_bytes;
        if n_blocks == 0 {
            return cerr(
                "kv_bytes",
                format!(
                    "{} bytes hold no KV block (one block takes {block_bytes} bytes)",
                    cfg.kv_bytes
                ),
            );
        }
        let kv = model.backend.kv_pool(layout, n_blocks)?;
        let loops = model.loops;
        Ok(Self {
            model,
            tokenizer,
            layout,
            kv,
            free: (0..n_blocks as u32).rev().collect(),
            n_blocks,
            seqs: BTreeMap::new(),
            flights: Vec::new(),
            fills: Vec::new(),
            carry: None,
            next_id: 1,
            events: Vec::new(),
            stats: EngineStats {
                exits: vec![0; loops],
                ..Default::default()
            },
            last_pass: None,
            prefix: (cfg.prefix_cache_bytes > 0)
                .then(|| prefix::PrefixCache::new(cfg.prefix_cache_bytes, cfg.block_size)),
            cfg,
        })
    }

    pub fn model(&self) -> &ResidentModel<B> {
        &self.model
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// KV blocks in the pool / free.
    pub fn kv_blocks(&self) -> (usize, usize) {
        (self.n_blocks, self.free.len())
    }

    /// The node's load: requests, rows per loop depth, free KV.
    pub fn load_report(&self) -> LoadReport {
        let mut rows_per_depth = vec![0; self.model.loops];
        for f in &self.flights {
            rows_per_depth[f.depth.min(self.model.loops - 1)] += 1;
        }
        let running = self.seqs.values().filter(|s| s.running).count();
        LoadReport {
            waiting_requests: self.seqs.len() - running,
            running_requests: running,
            rows_per_depth,
            waiting_tokens: self.seqs.values().map(|s| s.total() - s.fed).sum(),
            free_blocks: self.free.len(),
            total_blocks: self.n_blocks,
            block_size: self.cfg.block_size,
            prefill_tokens: self.stats.prefill_tokens,
            kv_imports: self.stats.kv_imports,
            kv_exports: self.stats.kv_exports,
            kv_import_fallbacks: self.stats.kv_import_fallbacks,
            prefix_cache_bytes: self.cfg.prefix_cache_bytes,
            prefix_hits: self.stats.prefix_hits,
            prefix_hit_tokens: self.stats.prefix_hit_tokens,
        }
    }

    /// Requests not finished (running or waiting).
    pub fn active(&self) -> usize {
        self.seqs.len()
    }

    /// What the last [`Engine::step`] ran, if it ran a pass (taken once).
    pub fn take_last_pass(&mut self) -> Option<PassInfo> {
        self.last_pass.take()
    }

    /// Whether request `id` is still here (running or waiting).
    pub fn is_active(&self, id: RequestId) -> bool {
        self.seqs.contains_key(&id)
    }

    /// Events queued outside a step (cancellations, exports), in order.
    pub fn take_events(&mut self) -> Vec<(RequestId, Event)> {
        std::mem::take(&mut self.events)
    }

    /// Whether a step would do anything.
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty() || !self.events.is_empty()
    }

    /// Accepts a request (validated; it must fit the KV cache alone). Its prompt starts from
    /// the prefix cache when that holds a prefix of it.
    pub fn submit(&mut self, req: Request) -> Result<RequestId, EngineError> {
        self.submit_with(req, true)
    }

    fn submit_with(&mut self, req: Request, from_cache: bool) -> Result<RequestId, EngineError> {
        let c = &self.model.config;
        req.validate(c.vocab, self.model.loops, c.max_positions)?;
        let positions = req.prompt.len() + req.params.max_tokens;
        let needed = positions.div_ceil(self.cfg.block_size);
        if needed > self.n_blocks {
            return Err(EngineError::TooLarge {
                needed,
                positions,
                capacity: self.n_blocks,
            });
        }
        let resumed = req.params.resumed.min(req.prompt.len().saturating_sub(1));
        let (prompt, output) = req.prompt.split_at(req.prompt.len() - resumed);
        let mut sampler = Sampler::new(req.params.sampling.clone())?;
        sampler.observe_prompt(prompt);
        sampler.resume(output);
        let mut text = TextStream::new(prompt, req.params.stop.clone());
        for &t in output {
            // What these tokens released was streamed by the node they come from.
            text.push(&self.tokenizer, t)?;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(
            id,
            Seq {
                prompt: req.prompt,
                out: Vec::new(),
                params: req.params,
                sampler,
                text,
                kv: SeqKv::default(),
                fed: 0,
                emit_in_flight: false,
                running: false,
                loops: 0,
                preemptions: 0,
                prefill_end: 0,
                resumed,
                exporting: false,
                cache_prompt: from_cache && resumed == 0 && self.prefix.is_some(),
            },
        );
        let s = self.seqs.get_mut(&id).expect("just inserted");
        s.prefill_end = s.prompt.len();
        if let Err(e) = self.start_from_prefix_cache(id) {
            // `adopt_kv` gave its blocks back.
            self.seqs.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Gives a new request the keys/values of its prompt's longest cached prefix (all but
    /// its last position at most), when the cache and the pool have them.
    fn start_from_prefix_cache(&mut self, id: RequestId) -> Result<(), EngineError> {
        let (Some(cache), Some(s)) = (self.prefix.as_mut(), self.seqs.get(&id)) else {
            return Ok(());
        };
        if !s.cache_prompt || s.prompt.len() < 2 {
            return Ok(());
        }
        let running = self.seqs.values().filter(|q| q.running).count();
        if running >= self.cfg.max_running {
            return Ok(());
        }
        let depth = prompt_depth(&self.cfg, self.model.loops, s);
        let prompt = &s.prompt;
        let Some((positions, data)) = cache.lookup(depth, prompt, prompt.len() - 1) else {
            return Ok(());
        };
        if self.adopt_kv(id, positions, &data)? {
            self.stats.prefix_hits += 1;
            self.stats.prefix_hit_tokens += positions as u64;
        }
        Ok(())
    }

    /// Gives sequence `id` (holding no blocks) the keys/values of its first `positions`
    /// positions: blocks from the pool, the data written into them. False when the pool is
    /// short of blocks; an error (the blocks given back) when the backend cannot write them.
    fn adopt_kv(&mut self, id: RequestId, positions: usize, data: &[f32]) -> Result<bool, EngineError> {
        let need = positions.div_ceil(self.cfg.block_size);
        if positions == 0 || need > self.free.len() {
            return Ok(false);
        }
        let s = self.seqs.get_mut(&id).expect("live sequence");
        for _ in 0..need {
            s.kv.blocks.push(self.free.pop().expect("counted above"));
        }
        if let Err(e) = self
            .model
            .backend
            .kv_import(&mut self.kv, &self.layout, &s.kv.blocks, data)
        {
            self.release(id);
            return Err(e.into());
        }
        s.kv.len = positions;
        s.fed = positions;
        s.running = true;
        Ok(true)
    }

    /// Offers the prompt blocks of sequences whose prompt is computed (every position before
    /// the last fed and out of flight) to the prefix cache.
    fn cache_prompts(&mut self) -> Result<(), EngineError> {
        let Some(cache) = self.prefix.as_mut() else {
            return Ok(());
        };
        let bs = self.cfg.block_size;
        for (id, s) in self.seqs.iter_mut() {
            if !s.cache_prompt || !s.running || s.fed < s.prompt.len() {
                continue;
            }
            let positions = (s.prompt.len() - 1) / bs * bs;
            let pending = |pos: usize| pos < positions;
            if self.flights.iter().any(|f| f.seq == *id && pending(f.pos))
                || self.fills.iter().any(|f| f.seq == *id && pending(f.pos))
            {
                continue;
            }
            s.cache_prompt = false;
            if positions == 0 {
                continue;
            }
            let depth = prompt_depth(&self.cfg, self.model.loops, s);
            let (be, kv, layout, blocks) = (&self.model.backend, &self.kv, &self.layout, &s.kv.blocks);
            cache.insert(depth, &s.prompt, positions, |b| {
                be.kv_export(kv, layout, &blocks[b..b + 1], bs)
            })?;
        }
        Ok(())
    }

    /// What the prefix cache holds (`None`: off).
    pub fn prefix_cache_usage(&self) -> Option<prefix::PrefixCacheUsage> {
        self.prefix.as_ref().map(|c| c.usage())
    }

    /// The geometry of this engine's cache, for [`KvState`]s.
    pub fn kv_geometry(&self) -> KvGeometry {
        KvGeometry {
            layers: self.layout.n_layers,
            kv_heads: self.layout.n_kv_heads,
            head_dim: self.layout.head_dim,
        }
    }

    /// Accepts a request moved from another node with its keys/values: the sequence starts
    /// with `state.positions` positions computed (no prefill) when the cache has room for
    /// them now, and is recomputed like any resumed request otherwise. `req.prompt` must be
    /// the prompt plus the generated tokens and begin with `state.tokens[..state.positions]`.
    /// Returns the id and whether the keys/values were used.
    pub fn submit_imported(&mut self, req: Request, state: &KvState) -> Result<(RequestId, bool), EngineError> {
        let bad = |msg: String| EngineError::InvalidRequest { field: "kv_state", msg };
        let geo = self.kv_geometry();
        if state.data.len() != state.positions * geo.position_floats() {
            return Err(bad(format!(
                "{} floats for {} positions of {} floats",
                state.data.len(),
                state.positions,
                geo.position_floats()
            )));
        }
        if state.positions >= req.prompt.len() || req.prompt[..state.positions] != state.tokens[..state.positions] {
            return Err(bad(format!(
                "its {} computed positions are not a proper prefix of the request's {} tokens",
                state.positions,
                req.prompt.len()
            )));
        }
        let id = self.submit_with(req, false)?;
        let need = state.positions.div_ceil(self.cfg.block_size);
        let running = self.seqs.values().filter(|q| q.running).count();
        if state.positions == 0 || need > self.free.len() || running >= self.cfg.max_running {
            if state.positions > 0 {
                self.stats.kv_import_fallbacks += 1;
            }
            return Ok((id, false));
        }
        let adopted = match self.adopt_kv(id, state.positions, &state.data) {
            Ok(adopted) => adopted,
            Err(e) => {
                // `adopt_kv` gave its blocks back.
                self.seqs.remove(&id);
                return Err(e);
            }
        };
        debug_assert!(adopted, "room counted above");
        let s = self.seqs.get_mut(&id).expect("just submitted");
        s.prefill_end = state.positions;
        s.cache_prompt = false;
        self.stats.kv_imports += 1;
        Ok((id, true))
    }

    /// Starts taking `id` off this node: it takes no new rows from now on, and once nothing
    /// of it is in flight [`Engine::take_exports`] hands out its state. False for an unknown
    /// id.
    pub fn begin_export(&mut self, id: RequestId) -> bool {
        match self.seqs.get_mut(&id) {
            Some(s) => {
                s.exporting = true;
                true
            }
            None => false,
        }
    }

    /// The state of every exporting sequence with nothing in flight; each leaves the engine
    /// (its blocks freed) with a `Done { Moved }` event after its last token.
    pub fn take_exports(&mut self) -> Vec<(RequestId, KvState)> {
        let ready: Vec<RequestId> = self
            .seqs
            .iter()
            .filter(|(id, s)| {
                s.exporting && !self.flights.iter().any(|f| f.seq == **id) && !self.fills.iter().any(|f| f.seq == **id)
            })
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::with_capacity(ready.len());
        for id in ready {
            let s = &self.seqs[&id];
            // Keys/values that cannot be read back travel as none: the receiving node
            // recomputes them (a backend fault also fails this engine's next step).
            let (positions, data) = match self
                .model
                .backend
                .kv_export(&self.kv, &self.layout, &s.kv.blocks, s.fed)
            {
                Ok(data) => (s.fed, data),
                Err(e) => {
                    tracing::warn!(error = %e, "keys/values of a moved request could not be exported");
                    (0, Vec::new())
                }
            };
            let mut tokens = s.prompt.clone();
            tokens.extend_from_slice(&s.out);
            let prompt_tokens = s.prompt.len() - s.resumed.min(s.prompt.len());
            out.push((
                id,
                KvState {
                    tokens,
                    prompt_tokens,
                    positions,
                    data,
                },
            ));
            self.stats.kv_exports += 1;
            self.finish(id, FinishReason::Moved, String::new());
        }
        out
    }

    /// Cancels a request: its rows and KV blocks are freed now; a `Done { Cancelled }` event
    /// is queued for the next step. Returns false for an unknown (or finished) id.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if !self.seqs.contains_key(&id) {
            return false;
        }
        self.finish(id, FinishReason::Cancelled, String::new());
        true
    }

    fn release(&mut self, id: RequestId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            self.free.extend(s.kv.blocks.drain(..).rev());
            s.kv.len = 0;
            s.fed = 0;
            s.emit_in_flight = false;
            s.running = false;
        }
        self.flights.retain(|f| f.seq != id);
        self.fills.retain(|f| f.seq != id);
    }

    fn finish(&mut self, id: RequestId, reason: FinishReason, mut text: String) {
        self.release(id);
        if let Some(mut s) = self.seqs.remove(&id) {
            if !matches!(
                reason,
                FinishReason::Cancelled | FinishReason::Stop | FinishReason::Moved
            ) {
                text.push_str(&s.text.finish(&self.tokenizer).unwrap_or_default());
            }
            let usage = Usage {
                prompt_tokens: s.prompt.len(),
                completion_tokens: s.out.len(),
                loops: s.loops,
                preemptions: s.preemptions,
            };
            self.events.push((
                id,
                Event::Done {
                    finish_reason: reason,
                    text,
                    usage,
                },
            ));
        }
    }

    fn preempt(&mut self, id: RequestId) {
        self.release(id);
        if let Some(s) = self.seqs.get_mut(&id) {
            s.preemptions += 1;
            self.stats.preemptions += 1;
        }
    }

    /// Reserves blocks so that `seq` holds positions `0..len`, preempting lower-priority
    /// (later) sequences when the pool is short. Returns how many positions it could reserve
    /// (`len`, or less when nothing more can be freed).
    fn reserve(&mut self, id: RequestId, len: usize, new_rows: &mut Vec<NewRow>, budget: &mut usize) -> usize {
        let bs = self.cfg.block_size;
        loop {
            let s = &self.seqs[&id];
            let need = len.div_ceil(bs).saturating_sub(s.kv.blocks.len());
            if need <= self.free.len() {
                let s = self.seqs.get_mut(&id).expect("live sequence");
                for _ in 0..need {
                    s.kv.blocks.push(self.free.pop().expect("counted above"));
                }
                return len;
            }
            let victim = self
                .seqs
                .iter()
                .rev()
                .find(|(v, q)| **v > id && q.running)
                .map(|(v, _)| *v);
            match victim {
                Some(v) => {
                    let before = new_rows.len();
                    new_rows.retain(|r| r.seq != v);
                    *budget += before - new_rows.len();
                    self.preempt(v);
                }
                None => {
                    // Nothing to preempt: take what is free if it lets the sequence progress.
                    let s = self.seqs.get_mut(&id).expect("live sequence");
                    let possible = (s.kv.blocks.len() + self.free.len()) * bs;
                    if possible <= s.fed {
                        return s.fed;
                    }
                    while let Some(b) = self.free.pop() {
                        s.kv.blocks.push(b);
                    }
                    return len.min(possible);
                }
            }
        }
    }

    /// Picks the rows entering loop 0 this pass: decode tokens first, then prompt chunks, each
    /// in arrival order, within the row budget left by the rows in flight.
    fn admit(&mut self) -> Vec<NewRow> {
        let mut budget = self.cfg.max_step_rows.saturating_sub(self.flights.len());
        let mut rows = Vec::new();
        let ready = |s: &Seq| s.fed < s.total() && !s.emit_in_flight && !s.exporting;
        let decode: Vec<RequestId> = self
            .seqs
            .iter()
            .filter(|(_, s)| ready(s) && s.running && s.fed + 1 == s.total())
            .map(|(id, _)| *id)
            .collect();
        let prefill: Vec<RequestId> = self
            .seqs
            .iter()
            .filter(|(_, s)| ready(s) && !(s.running && s.fed + 1 == s.total()))
            .map(|(id, _)| *id)
            .collect();
        let mut running = self.seqs.values().filter(|q| q.running).count();
        for id in decode.into_iter().chain(prefill) {
            if budget == 0 {
                break;
            }
            let Some(s) = self.seqs.get(&id) else { continue };
            if !ready(s) {
                continue;
            }
            if !s.running && running >= self.cfg.max_running {
                continue;
            }
            let was_running = s.running;
            let (fed, total) = (s.fed, s.total());
            let want = (total - fed).min(budget);
            let preempted = self.stats.preemptions;
            let got = self.reserve(id, fed + want, &mut rows, &mut budget);
            if self.stats.preemptions != preempted {
                running = self.seqs.values().filter(|q| q.running).count();
            }
            let s = self.seqs.get_mut(&id).expect("live sequence");
            let n = got.saturating_sub(fed).min(want);
            if !s.kv.blocks.is_empty() {
                s.running = true;
            }
            if s.running && !was_running {
                running += 1;
            }
            if n == 0 {
                // Keep whatever it holds; it will continue when blocks free up.
                continue;
            }
            s.running = true;
            for pos in fed..fed + n {
                let emit = pos + 1 == total;
                if pos + 1 < total || pos < s.prefill_end {
                    self.stats.prefill_tokens += 1;
                }
                rows.push(NewRow {
                    seq: id,
                    pos,
                    token: s.token(pos),
                    emit,
                });
                if emit {
                    s.emit_in_flight = true;
                }
            }
            s.fed += n;
            budget -= n;
        }
        rows
    }

    /// Runs one pass and returns the events it produced (tokens, finished requests).
    pub fn step(&mut self) -> Result<Vec<(RequestId, Event)>, EngineError> {
        let admit = self.cfg.batching == Batching::DepthWise || self.flights.is_empty();
        let new_rows = if admit { self.admit() } else { Vec::new() };
        if new_rows.is_empty() && self.flights.is_empty() && self.fills.is_empty() {
            return Ok(std::mem::take(&mut self.events));
        }
        // The pass runs where the backend issues work most cheaply (the CPU backend: on a
        // worker of its thread pool); the step's span goes with it.
        let span = tracing::Span::current();
        let engine = &mut *self;
        B::issue(move || span.in_scope(|| engine.run_pass(new_rows)))?;
        if let Some(f) = self.model.backend.fault() {
            return Err(EngineError::Backend(f));
        }
        self.cache_prompts()?;
        Ok(std::mem::take(&mut self.events))
    }

    fn run_pass(&mut self, new_rows: Vec<NewRow>) -> Result<(), EngineError> {
        let started = std::time::Instant::now();
        let (tokens0, head0, exits0) = (self.stats.tokens, self.stats.head_rows, self.stats.exits.clone());
        let loops = self.model.loops;
        let h = self.model.config.hidden;
        let be = &self.model.backend;
        let mut flights = std::mem::take(&mut self.flights);
        flights.sort_by_key(|f| f.depth);
        let n_new = new_rows.len();
        let n = n_new + flights.len();
        // Row metadata: (seq, pos, depth, emit), new rows first (loop 0), then by depth.
        let meta: Vec<(RequestId, usize, usize, bool)> = new_rows
            .iter()
            .map(|r| (r.seq, r.pos, 0, r.emit))
            .chain(flights.iter().map(|f| (f.seq, f.pos, f.depth, f.emit)))
            .collect();
        let mut x = be.zeros(n * h)?;
        let tokens: Vec<u32> = new_rows.iter().map(|r| r.token).collect();
        self.model.embed(&tokens, &mut x)?;
        if let Some(carry) = &self.carry {
            let src: Vec<u32> = flights.iter().map(|f| f.row as u32).collect();
            be.copy_rows(carry, &src, &mut x, n_new, h)?;
        }
        // Fill rows: one per (exited token, skipped loop), grouped by loop.
        let mut fill_meta: Vec<(usize, RequestId, usize, usize)> = Vec::new();
        for f in &self.fills {
            for d in f.from_depth..loops {
                fill_meta.push((d, f.seq, f.pos, f.row));
            }
        }
        fill_meta.sort_by_key(|m| m.0);
        let fill_x = match (&self.carry, fill_meta.is_empty()) {
            (Some(carry), false) => {
                let mut fx = be.zeros(fill_meta.len() * h)?;
                let src: Vec<u32> = fill_meta.iter().map(|m| m.3 as u32).collect();
                be.copy_rows(carry, &src, &mut fx, 0, h)?;
                Some(fx)
            }
            _ => None,
        };
        self.fills.clear();
        let saturation = self.uses_saturation();
        let x_in = if saturation {
            let mut c = be.zeros(n * h)?;
            let all: Vec<u32> = (0..n as u32).collect();
            be.copy_rows(&x, &all, &mut c, 0, h)?;
            Some(c)
        } else {
            None
        };
        {
            let seqs = &self.seqs;
            let rows: Vec<PassRow<'_>> = meta
                .iter()
                .map(|&(id, pos, depth, _)| PassRow {
                    pos,
                    depth,
                    blocks: &seqs[&id].kv.blocks,
                })
                .collect();
            let frows: Vec<PassRow<'_>> = fill_meta
                .iter()
                .map(|&(depth, id, pos, _)| PassRow {
                    pos,
                    depth,
                    blocks: &seqs[&id].kv.blocks,
                })
                .collect();
            let t = std::time::Instant::now();
            self.model
                .pass(&mut self.kv, &self.layout, &mut x, &rows, fill_x.as_ref(), &frows)?;
            self.stats.pass_seconds += t.elapsed().as_secs_f64();
        }
        self.stats.passes += 1;
        self.stats.rows += n as u64;
        self.stats.fill_rows += fill_meta.len() as u64;
        for &(id, pos, _, _) in &meta {
            if let Some(s) = self.seqs.get_mut(&id) {
                s.kv.len = s.kv.len.max(pos + 1);
            }
        }
        let hazards: Vec<f64> = std::iter::repeat_n(0.0, n_new)
            .chain(flights.iter().map(|f| f.hazard))
            .collect();
        self.after_pass(&meta, &hazards, &x, x_in.as_ref())?;
        self.carry = Some(x);
        let mut rows_per_depth = vec![0; loops];
        let mut requests: Vec<RequestId> = Vec::new();
        let mut ctx = 0;
        for &(id, pos, depth, _) in &meta {
            rows_per_depth[depth.min(loops - 1)] += 1;
            ctx += pos + 1;
            requests.push(id);
        }
        for &(_, id, pos, _) in &fill_meta {
            ctx += pos + 1;
            requests.push(id);
        }
        requests.sort_unstable();
        requests.dedup();
        self.last_pass = Some(PassInfo {
            rows_per_depth,
            fill_rows: fill_meta.len(),
            head_rows: (self.stats.head_rows - head0) as usize,
            ctx,
            tokens: (self.stats.tokens - tokens0) as usize,
            exits: self
                .stats
                .exits
                .iter()
                .zip(&exits0)
                .map(|(a, b)| (a - b) as usize)
                .collect(),
            requests,
            seconds: started.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    fn uses_saturation(&self) -> bool {
        matches!(&self.cfg.exit, Some(e) if e.criterion == Criterion::Saturation)
    }

    /// The most loops output token `i` of `s` may run.
    fn loop_limit(&self, s: &Seq) -> usize {
        let loops = self.model.loops;
        let mut limit = s.params.exit.max_loops.unwrap_or(loops).min(loops);
        if let Some(sched) = &s.params.exit.schedule
            && let Some(&l) = sched.get(s.out.len())
        {
            limit = limit.min((l as usize).clamp(1, loops));
        }
        limit
    }

    /// The exit threshold of `s` after loop `depth` (`None`: no exit test).
    ///
    /// The gate criterion accumulates over every loop of a token, so it is tested after every
    /// loop but the last whenever the token can exit at all (some loop's threshold below 1);
    /// a loop without a threshold of its own then gets 1 (accumulate, never exit there).
    fn threshold(&self, s: &Seq, depth: usize) -> Option<(Criterion, f32)> {
        let rule = self.cfg.exit.as_ref()?;
        if s.params.exit.full_depth || depth + 1 >= self.model.loops {
            return None;
        }
        if rule.criterion == Criterion::Gate {
            let t = s
                .params
                .exit
                .threshold
                .or_else(|| rule.thresholds.get(depth).copied().flatten());
            return rule
                .gate_can_exit(self.model.loops, &s.params.exit)
                .then(|| (Criterion::Gate, t.unwrap_or(1.0)));
        }
        let t = s
            .params
            .exit
            .threshold
            .or_else(|| rule.thresholds.get(depth).copied().flatten())?;
        Some((rule.criterion, t))
    }

    fn after_pass(
        &mut self,
        meta: &[(RequestId, usize, usize, bool)],
        hazards: &[f64],
        x: &B::Buf,
        x_in: Option<&B::Buf>,
    ) -> Result<(), EngineError> {
        let loops = self.model.loops;
        let vocab = self.model.config.vocab;
        let mut next = Vec::new();
        // Rows to decode now, and rows whose exit test needs the LM head.
        let mut decode: Vec<usize> = Vec::new();
        let mut test_head: Vec<(usize, Criterion, f32)> = Vec::new();
        let mut test_sat: Vec<(usize, f32)> = Vec::new();
        // Rows whose exit the gate decides: decoded tokens' rows, and prompt rows under
        // `EngineConfig::prompt_exits`. Each row's hazard starts from its flight's.
        let mut test_gate: Vec<(usize, f32)> = Vec::new();
        let mut hazard = hazards.to_vec();
        for (i, &(id, _, depth, emit)) in meta.iter().enumerate() {
            let Some(s) = self.seqs.get(&id) else { continue };
            if !emit {
                if depth + 1 < loops {
                    if prompt_depth(&self.cfg, loops, s) != PromptDepth::Full
                        && let Some((Criterion::Gate, t)) = self.threshold(s, depth)
                    {
                        test_gate.push((i, t));
                    } else {
                        next.push(Flight::deeper(meta[i], i, 0.0));
                    }
                }
                continue;
            }
            if depth + 1 >= self.loop_limit(s) {
                decode.push(i);
                continue;
            }
            match self.threshold(s, depth) {
                Some((Criterion::Saturation, t)) => test_sat.push((i, t)),
                Some((Criterion::Gate, t)) => test_gate.push((i, t)),
                Some((c, t)) => test_head.push((i, c, t)),
                None => {}
            }
        }
        if let (Some(xi), false) = (x_in, test_sat.is_empty()) {
            let rows: Vec<u32> = test_sat.iter().map(|t| t.0 as u32).collect();
            let cos = self.model.backend.cosine_rows(x, xi, self.model.config.hidden, &rows)?;
            for ((i, t), c) in test_sat.iter().zip(cos) {
                if c >= *t {
                    decode.push(*i);
                }
            }
        }
        // An exited prompt row's deeper keys and values are propagated from its state (a fill
        // row per skipped loop, next pass), as a decoded token's are.
        let mut prompt_fills: Vec<Fill> = Vec::new();
        if !test_gate.is_empty() {
            // One dot product per row on the loop's output (no LM head): accumulate each
            // row's hazard, exit once its cumulative exit probability reaches the threshold.
            let rows: Vec<u32> = test_gate.iter().map(|t| t.0 as u32).collect();
            debug_assert!(
                self.model.has_gate(),
                "Engine::new refuses the gate criterion without a gate"
            );
            let g = self.model.gate_logits(x, &rows)?;
            for (&(i, t), g) in test_gate.iter().zip(g) {
                hazard[i] += gate_hazard(g);
                match (meta[i].3, gate_exits(hazard[i], t)) {
                    (true, true) => decode.push(i),
                    // A decoded token's row that stays continues below, with the rows the
                    // softmax tests keep.
                    (true, false) => {}
                    (false, true) => {
                        self.stats.prompt_exits += 1;
                        prompt_fills.push(Fill::after(meta[i], i));
                    }
                    (false, false) => next.push(Flight::deeper(meta[i], i, hazard[i])),
                }
            }
        }
        // Logits for the softmax tests and the rows to decode, in one LM-head call.
        let head_rows: Vec<u32> = test_head
            .iter()
            .map(|t| t.0 as u32)
            .chain(decode.iter().map(|&i| i as u32))
            .collect();
        let t = std::time::Instant::now();
        // A GPU reduces the rows itself when no row needs its full logits (greedy, no
        // penalties, no top logprobs, not forced): then only ids and four numbers cross.
        let on_device = self.model.backend.prefers_head_top()
            && head_rows
                .iter()
                .all(|&r| self.seqs.get(&meta[r as usize].0).is_some_and(Seq::greedy_plain));
        let (logits, tops) = if on_device {
            (Vec::new(), self.model.head_top(x, &head_rows)?)
        } else {
            (self.model.logits(x, &head_rows)?, Vec::new())
        };
        self.stats.head_seconds += t.elapsed().as_secs_f64();
        self.stats.head_rows += head_rows.len() as u64;
        let row_of = |k: usize| -> Head<'_> {
            if on_device {
                Head::Top(tops[k])
            } else {
                Head::Logits(&logits[k * vocab..(k + 1) * vocab])
            }
        };
        let mut produce: Vec<(usize, Head<'_>)> = Vec::new();
        for (j, &(i, c, t)) in test_head.iter().enumerate() {
            let row = row_of(j);
            let (p1, margin) = match row {
                Head::Logits(l) => prob_scores(l),
                Head::Top(h) => (h.max_prob(), h.margin()),
            };
            let score = if c == Criterion::Margin { margin } else { p1 };
            if score >= t {
                produce.push((i, row));
            } else {
                self.stats.head_rows_wasted += 1;
            }
        }
        for (j, &i) in decode.iter().enumerate() {
            produce.push((i, row_of(test_head.len() + j)));
        }
        // Rows that neither decoded nor exited continue one loop deeper.
        let mut producing = vec![false; meta.len()];
        for &(i, _) in &produce {
            producing[i] = true;
        }
        for (i, &(id, _, _, emit)) in meta.iter().enumerate() {
            if emit && !producing[i] && self.seqs.contains_key(&id) {
                next.push(Flight::deeper(meta[i], i, hazard[i]));
            }
        }
        produce.sort_by_key(|p| p.0);
        let mut fills = Vec::new();
        for (i, row) in produce {
            let (id, _, depth, _) = meta[i];
            let finished = self.produce(id, row, depth + 1)?;
            if !finished && depth + 1 < loops {
                match self.cfg.kv_fill {
                    KvFill::Propagate => fills.push(Fill::after(meta[i], i)),
                    KvFill::Recompute => next.push(Flight {
                        emit: false,
                        ..Flight::deeper(meta[i], i, 0.0)
                    }),
                }
            }
        }
        fills.extend(prompt_fills);
        // Sequences finished or preempted during this call leave no rows behind.
        next.retain(|f| self.seqs.get(&f.seq).is_some_and(|s| s.running));
        fills.retain(|f| self.seqs.get(&f.seq).is_some_and(|s| s.running));
        self.flights = next;
        self.fills = fills;
        Ok(())
    }

    /// Samples the next token of `id` from `logits` (decoded after `loops` loops), streams it
    /// and finishes the request when it should. Returns whether it finished.
    fn produce(&mut self, id: RequestId, head: Head<'_>, loops: usize) -> Result<bool, EngineError> {
        let tok = self.tokenizer.clone();
        let s = self.seqs.get_mut(&id).expect("producing row of a live sequence");
        let (token, logprob, top_logprobs) = match head {
            Head::Logits(logits) => {
                let token = match s.params.forced.as_ref().and_then(|f| f.get(s.out.len())) {
                    Some(&t) => t,
                    None => s.sampler.sample(logits),
                };
                let lse = rrt_kernels::logsumexp(logits);
                (
                    token,
                    logits[token as usize] - lse,
                    top_n(logits, s.params.top_logprobs, lse),
                )
            }
            // Only for rows of `Seq::greedy_plain` sequences: the argmax is the greedy choice.
            Head::Top(h) => (h.id, h.logprob(), Vec::new()),
        };
        s.loops += loops;
        s.emit_in_flight = false;
        self.stats.tokens += 1;
        self.stats.exits[loops - 1] += 1;
        if s.params.stop_ids.contains(&token) {
            self.finish(id, FinishReason::Stop, String::new());
            return Ok(true);
        }
        if !s.params.ignore_eos && tok.is_eog(token) {
            self.finish(id, FinishReason::Eos, String::new());
            return Ok(true);
        }
        s.out.push(token);
        s.sampler.accept(token);
        let (text, stopped) = s.text.push(&tok, token)?;
        let done = s.out.len() >= s.params.max_tokens;
        self.events.push((
            id,
            Event::Token(TokenEvent {
                id: token,
                text,
                logprob,
                top_logprobs,
                loops,
            }),
        ));
        if stopped {
            self.finish(id, FinishReason::Stop, String::new());
            return Ok(true);
        }
        if done {
            self.finish(id, FinishReason::Length, String::new());
            return Ok(true);
        }
        Ok(false)
    }

    /// Steps until every submitted request has finished; returns all events in order.
    pub fn run_to_completion(&mut self) -> Result<Vec<(RequestId, Event)>, EngineError> {
        let mut all = Vec::new();
        while self.has_work() {
            all.extend(self.step()?);
        }
        Ok(all)
    }

    /// Invariant check for tests: every block is free or owned by exactly one live sequence,
    /// and every row in flight belongs to a running sequence.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut owned: Vec<u32> = self.seqs.values().flat_map(|s| s.kv.blocks.iter().copied()).collect();
        owned.extend(self.free.iter().copied());
        owned.sort_unstable();
        if owned != (0..self.n_blocks as u32).collect::<Vec<_>>() {
            return Err(format!("blocks leaked or shared: {owned:?}"));
        }
        for f in &self.flights {
            match self.seqs.get(&f.seq) {
                Some(s) if s.running => {}
                _ => return Err(format!("row in flight for dead or preempted sequence {}", f.seq)),
            }
        }
        for f in &self.fills {
            if !self.seqs.get(&f.seq).is_some_and(|s| s.running) {
                return Err(format!("fill row for dead or preempted sequence {}", f.seq));
            }
        }
        if self.flights.len() > self.cfg.max_step_rows {
            return Err(format!(
                "{} rows in flight > budget {}",
                self.flights.len(),
                self.cfg.max_step_rows
            ));
        }
        for (id, s) in &self.seqs {
            if s.kv.blocks.len() * self.cfg.block_size < s.fed {
                return Err(format!(
                    "sequence {id} fed {} positions with {} blocks",
                    s.fed,
                    s.kv.blocks.len()
                ));
            }
            let emitting = self.flights.iter().filter(|f| f.seq == *id && f.emit).count();
            if emitting > 1 {
                return Err(format!("sequence {id} has {emitting} token rows in flight"));
            }
        }
        Ok(())
    }
}

/// The `n` largest logits as (id, logprob), best first.
fn top_n(logits: &[f32], n: usize, lse: f32) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(idx.len());
    let cmp = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect()
}

/// How deep the prompt rows of `s` run: through the gate's exit test when prompt exits are on
/// for it (its own switch, else the engine's), fill is propagated, it is not held at full
/// depth, and the gate can let a token leave at all; otherwise every loop.
fn prompt_depth(cfg: &EngineConfig, loops: usize, s: &Seq) -> PromptDepth {
    let exit = &s.params.exit;
    let on = exit.prompt_exits.unwrap_or(cfg.prompt_exits) && cfg.kv_fill == KvFill::Propagate && !exit.full_depth;
    match &cfg.exit {
        Some(rule) if on && rule.gate_can_exit(loops, exit) => PromptDepth::GateExits {
            threshold: exit.threshold,
        },
        _ => PromptDepth::Full,
    }
}
