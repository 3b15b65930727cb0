//! The engine actor: owns an [`Engine`] on a dedicated OS thread (its passes are CPU- or
//! GPU-bound and must not block the async runtime) and serves it through a cloneable
//! [`EngineHandle`] over a bounded command channel.
//!
//! Between two passes the task drains every pending command, so a submission or cancellation
//! waits at most one pass. Each request's events go to its own unbounded channel (events are
//! small and a slow client must never stall the engine); when a client drops its
//! [`RequestStream`], the request is cancelled on the next loop iteration.

use crate::engine::{Engine, EngineError, EngineStats, Event, KvGeometry, KvState, LoadReport, Request, RequestId};
use rrt_kernels::Backend;
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};

/// Commands the engine task accepts.
pub enum EngineCommand {
    Submit {
        request: Box<Request>,
        /// A moved request's keys/values ([`Engine::submit_imported`]).
        import: Option<Box<KvState>>,
        /// The request's span: every engine step with a row of it links to it.
        span: tracing::Span,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<RequestId, EngineError>>,
    },
    /// Take a request off with its state ([`Engine::begin_export`]); `None` when it is not
    /// (or no longer) here.
    Export {
        id: RequestId,
        reply: oneshot::Sender<Option<KvState>>,
    },
    /// The engine's counters and cache geometry.
    Stats {
        reply: oneshot::Sender<(EngineStats, KvGeometry)>,
    },
    Cancel {
        id: RequestId,
    },
    Load {
        reply: oneshot::Sender<LoadReport>,
    },
    /// Stop taking work; with `drain`, finish what is in flight first.
    Shutdown {
        drain: bool,
        reply: oneshot::Sender<()>,
    },
}

/// Errors of the handle.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error("the engine has shut down")]
    Closed,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// How long a pass should last at least (seconds), from what it did: a simulated node paces
/// its passes with a cost model this way (`crate::sim`, feature `sim`).
pub type Pace = Box<dyn Fn(&crate::engine::PassInfo) -> f64 + Send>;

/// A cloneable handle to the engine task.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<EngineCommand>,
}

/// The events of one request; dropping it cancels the request.
pub struct RequestStream {
    pub id: RequestId,
    rx: mpsc::UnboundedReceiver<Event>,
    handle: EngineHandle,
    done: bool,
}

impl RequestStream {
    /// The next event; `None` after the final `Done` (or if the engine went away).
    pub async fn next(&mut self) -> Option<Event> {
        let e = self.rx.recv().await;
        if matches!(e, Some(Event::Done { .. }) | None) {
            self.done = true;
        }
        e
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.handle.tx.try_send(EngineCommand::Cancel { id: self.id });
        }
    }
}

/// The engine's thread: it ends with `Err` when its backend failed (a device fault: the
/// engine cannot go on), with `Ok` after a shutdown or when every handle was dropped.
pub type EngineThread = std::thread::JoinHandle<Result<(), EngineError>>;

impl EngineHandle {
    /// Starts the engine task on its own thread. `capacity` bounds the command channel.
    pub fn spawn<B: Backend>(engine: Engine<B>, capacity: usize) -> (Self, EngineThread) {
        Self::spawn_paced(engine, capacity, None)
    }

    /// Like [`EngineHandle::spawn`]; with `pace`, every pass lasts at least the time it gives
    /// (a simulated node then runs in real time).
    pub fn spawn_paced<B: Backend>(engine: Engine<B>, capacity: usize, pace: Option<Pace>) -> (Self, EngineThread) {
        Self::spawn_named(engine, capacity, pace, String::new())
    }

    /// Like [`EngineHandle::spawn_paced`]; its `engine.step` spans name the served `model`
    /// (one trace file may hold several models' nodes: `rrt capacity` plans each).
    pub fn spawn_named<B: Backend>(
        engine: Engine<B>,
        capacity: usize,
        pace: Option<Pace>,
        model: String,
    ) -> (Self, EngineThread) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let join = std::thread::Builder::new()
            .name("rrt-engine".into())
            .spawn(move || run(engine, rx, pace, model))
            .expect("spawning the engine thread");
        (Self { tx }, join)
    }

    /// Submits a request; its events arrive on the returned stream.
    pub async fn submit(&self, request: Request) -> Result<RequestStream, ActorError> {
        self.submit_with(request, None, tracing::Span::none()).await
    }

    /// Submits a request moved here with its keys/values (used when the cache has room).
    pub async fn submit_with(
        &self,
        request: Request,
        import: Option<KvState>,
        span: tracing::Span,
    ) -> Result<RequestStream, ActorError> {
        let (etx, erx) = mpsc::unbounded_channel();
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(EngineCommand::Submit {
                request: Box::new(request),
                import: import.map(Box::new),
                span,
                events: etx,
                reply,
            })
            .await
            .map_err(|_| ActorError::Closed)?;
        let id = wait.await.map_err(|_| ActorError::Closed)??;
        Ok(RequestStream {
            id,
            rx: erx,
            handle: self.clone(),
            done: false,
        })
    }

    pub async fn cancel(&self, id: RequestId) -> Result<(), ActorError> {
        self.tx
            .send(EngineCommand::Cancel { id })
            .await
            .map_err(|_| ActorError::Closed)
    }

    /// Takes request `id` off the engine once nothing of it is in flight (at most one token's
    /// loops) and returns its state; its stream ends with `Done { Moved }`.
    pub async fn export(&self, id: RequestId) -> Result<Option<KvState>, ActorError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(EngineCommand::Export { id, reply })
            .await
            .map_err(|_| ActorError::Closed)?;
        wait.await.map_err(|_| ActorError::Closed)
    }

    pub async fn stats(&self) -> Result<(EngineStats, KvGeometry), ActorError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(EngineCommand::Stats { reply })
            .await
            .map_err(|_| ActorError::Closed)?;
        wait.await.map_err(|_| ActorError::Closed)
    }

    pub async fn load(&self) -> Result<LoadReport, ActorError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(EngineCommand::Load { reply })
            .await
            .map_err(|_| ActorError::Closed)?;
        wait.await.map_err(|_| ActorError::Closed)
    }

    /// Stops the task (after finishing in-flight requests when `drain`).
    pub async fn shutdown(&self, drain: bool) -> Result<(), ActorError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(EngineCommand::Shutdown { drain, reply })
            .await
            .map_err(|_| ActorError::Closed)?;
        wait.await.map_err(|_| ActorError::Closed)
    }
}

/// The task: apply commands, run a pass when there is work, route events.
fn run<B: Backend>(
    mut engine: Engine<B>,
    mut rx: mpsc::Receiver<EngineCommand>,
    pace: Option<Pace>,
    model: String,
) -> Result<(), EngineError> {
    let mut streams: HashMap<RequestId, mpsc::UnboundedSender<Event>> = HashMap::new();
    let mut closing: Option<(bool, oneshot::Sender<()>)> = None;
    let mut exports: HashMap<RequestId, oneshot::Sender<Option<KvState>>> = HashMap::new();
    let mut spans: HashMap<RequestId, tracing::Span> = HashMap::new();
    loop {
        // Block for a command only when there is nothing to compute.
        let mut first = if engine.has_work() || closing.is_some() {
            None
        } else {
            match rx.blocking_recv() {
                Some(c) => Some(c),
                None => return Ok(()),
            }
        };
        loop {
            let cmd = match first.take() {
                Some(c) => c,
                None => match rx.try_recv() {
                    Ok(c) => c,
                    Err(_) => break,
                },
            };
            match cmd {
                EngineCommand::Submit {
                    request,
                    import,
                    span,
                    events,
                    reply,
                } => {
                    if closing.is_some() {
                        let _ = reply.send(Err(EngineError::Config {
                            field: "shutdown",
                            msg: "the node is shutting down and takes no new requests".into(),
                        }));
                        continue;
                    }
                    let r = match import {
                        Some(state) => engine.submit_imported(*request, &state).map(|(id, _)| id),
                        None => engine.submit(*request),
                    };
                    if let Ok(id) = &r {
                        streams.insert(*id, events);
                        if !span.is_none() {
                            spans.insert(*id, span);
                        }
                    }
                    let _ = reply.send(r);
                }
                EngineCommand::Cancel { id } => {
                    engine.cancel(id);
                }
                EngineCommand::Load { reply } => {
                    let _ = reply.send(engine.load_report());
                }
                EngineCommand::Export { id, reply } => {
                    if engine.begin_export(id) {
                        exports.insert(id, reply);
                    } else {
                        let _ = reply.send(None);
                    }
                }
                EngineCommand::Stats { reply } => {
                    let _ = reply.send((engine.stats().clone(), engine.kv_geometry()));
                }
                EngineCommand::Shutdown { drain, reply } => closing = Some((drain, reply)),
            }
        }
        // Clients that went away cancel their requests.
        let gone: Vec<RequestId> = streams
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            engine.cancel(id);
        }
        hand_off(&mut engine, &mut exports, &mut streams);
        if let Some((drain, _)) = &closing
            && (!drain || engine.active() == 0)
        {
            let ids: Vec<RequestId> = streams.keys().copied().collect();
            for id in ids {
                engine.cancel(id);
            }
            route(&mut streams, engine.step().unwrap_or_default());
            if let Some((_, reply)) = closing.take() {
                let _ = reply.send(());
            }
            return Ok(());
        }
        let step = tracing::info_span!(
            target: "rrt_node",
            "engine.step",
            model = model.as_str(),
            rows = tracing::field::Empty,
            rows_per_depth = tracing::field::Empty,
            fill_rows = tracing::field::Empty,
            head_rows = tracing::field::Empty,
            ctx = tracing::field::Empty,
            tokens = tracing::field::Empty,
            exits_per_loop = tracing::field::Empty,
            step_ms = tracing::field::Empty,
        );
        let stepped = step.in_scope(|| engine.step());
        let mut pass = engine.take_last_pass();
        if let (Some(c), Some(p)) = (&pace, pass.as_mut()) {
            let want = c(p);
            if want > p.seconds {
                step.in_scope(|| std::thread::sleep(std::time::Duration::from_secs_f64(want - p.seconds)));
            }
            p.seconds = p.seconds.max(want);
        }
        if let Some(p) = pass
            && !step.is_disabled()
        {
            use rrt_telemetry::span_fields::step as f;
            let list = |v: &[usize]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
            step.record(f::ROWS, p.rows_per_depth.iter().sum::<usize>() as i64);
            step.record(f::ROWS_PER_DEPTH, list(&p.rows_per_depth));
            step.record(f::FILL_ROWS, p.fill_rows as i64);
            step.record(f::HEAD_ROWS, p.head_rows as i64);
            step.record(f::CTX, p.ctx as i64);
            step.record(f::TOKENS, p.tokens as i64);
            step.record(f::EXITS_PER_LOOP, list(&p.exits));
            step.record(f::STEP_MS, p.seconds * 1e3);
            for id in &p.requests {
                if let Some(s) = spans.get(id) {
                    step.follows_from(s);
                }
            }
        }
        drop(step);
        spans.retain(|id, _| engine.is_active(*id));
        match stepped {
            Ok(events) => route(&mut streams, events),
            Err(EngineError::Backend(e)) => {
                // The device failed: nothing it computes can be trusted any more. The thread
                // ends with the error; its supervisor fails the requests in flight (the
                // coordinator moves them), turns health NOT_SERVING and stops the node.
                tracing::error!(error = %e, "the compute backend failed; the engine stops");
                return Err(EngineError::Backend(e));
            }
            Err(e) => {
                // A pass failed (a backend error): fail every request rather than lose them silently.
                tracing::error!(error = %e, "engine pass failed; cancelling all requests");
                let ids: Vec<RequestId> = streams.keys().copied().collect();
                for id in ids {
                    engine.cancel(id);
                }
                route(&mut streams, engine.step().unwrap_or_default());
            }
        }
        hand_off(&mut engine, &mut exports, &mut streams);
    }
}

/// Answers the exports that are ready (their `Moved` events go out first) and those whose
/// request finished before it could be taken off.
fn hand_off<B: Backend>(
    engine: &mut Engine<B>,
    exports: &mut HashMap<RequestId, oneshot::Sender<Option<KvState>>>,
    streams: &mut HashMap<RequestId, mpsc::UnboundedSender<Event>>,
) {
    if exports.is_empty() {
        return;
    }
    let ready = engine.take_exports();
    route(streams, engine.take_events());
    for (id, state) in ready {
        if let Some(reply) = exports.remove(&id) {
            let _ = reply.send(Some(state));
        }
    }
    let gone: Vec<RequestId> = exports.keys().copied().filter(|id| !engine.is_active(*id)).collect();
    for id in gone {
        if let Some(reply) = exports.remove(&id) {
            let _ = reply.send(None);
        }
    }
}

fn route(streams: &mut HashMap<RequestId, mpsc::UnboundedSender<Event>>, events: Vec<(RequestId, Event)>) {
    for (id, e) in events {
        let last = matches!(e, Event::Done { .. });
        if let Some(tx) = streams.get(&id) {
            let _ = tx.send(e);
        }
        if last {
            streams.remove(&id);
        }
    }
}
