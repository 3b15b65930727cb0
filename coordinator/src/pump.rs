//! [`RequestPump`]: one request's life after admission. It relays the node's token stream to
//! the client, records every token in the request table, and moves the request to another
//! node when its node fails (replay from the prompt and the tokens so far) or drains (with its
//! keys/values when the peer can take them); it ends with one [`Outcome`].
//!
//! Every exit goes through [`RequestPump::finish`]: the request leaves the table, its node's
//! pending count drops (the [`Pending`] guard it holds), the metrics and the span get the
//! outcome, and a client that went away (or whose deadline passed) has its request cancelled
//! on the node.

use crate::core::{Coordinator, KvMove, Outcome, Pending, node_error};
use crate::error::CoordError;
use crate::metrics::ExitLoop;
use crate::request::{Alt, Finish, GenEvent, GenToken, GenUsage};
use rrt_proto::v1::node as pb;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

type NodeClient = pb::node_client::NodeClient<tonic::transport::Channel>;

/// What the pump does after handling one event.
enum Next {
    Continue,
    End(Outcome),
}

/// One admitted request (see the module documentation).
pub(crate) struct RequestPump {
    pub(crate) coord: Arc<Coordinator>,
    pub(crate) id: String,
    /// The request as nodes see it; `generated` is refreshed before every move.
    pub(crate) run: pb::RunRequest,
    pub(crate) node: String,
    pub(crate) client: NodeClient,
    pub(crate) stream: tonic::Streaming<pb::RunEvent>,
    /// The request in its node's pending count (replaced when it moves).
    pub(crate) pending: Pending,
    pub(crate) tx: mpsc::Sender<Result<GenEvent, CoordError>>,
    pub(crate) arrived: Instant,
    /// Set when its node drains: move to a peer.
    pub(crate) move_now: Arc<tokio::sync::Notify>,
    pub(crate) last_token: Option<Instant>,
    pub(crate) loops: u64,
    pub(crate) tokens: u64,
    pub(crate) migrations: u32,
    /// A peer holding the request's keys/values, waiting for the old stream's "moved".
    pub(crate) switching: Option<(String, String)>,
}

impl RequestPump {
    /// Runs the request to its end.
    pub(crate) async fn run(mut self, deadline: Option<Instant>) {
        let deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let outcome = loop {
            let msg = tokio::select! {
                _ = self.tx.closed() => break Outcome::Cancelled,
                _ = self.move_now.notified(), if self.switching.is_none() => {
                    self.move_off_draining().await;
                    continue;
                }
                _ = &mut deadline => {
                    let e = CoordError::DeadlineExceeded(self.arrived.elapsed());
                    let _ = tokio::time::timeout(Duration::from_millis(100), self.tx.send(Err(e))).await;
                    break Outcome::Deadline;
                }
                m = self.stream.message() => m,
            };
            let next = match msg {
                Ok(Some(pb::RunEvent { event: Some(e) })) => self.on_event(e).await,
                Ok(Some(pb::RunEvent { event: None })) => Next::Continue,
                Ok(None) => {
                    let e = CoordError::Unavailable(format!(
                        " (node {} ended the stream before the request finished)",
                        self.node
                    ));
                    self.on_failure(e).await
                }
                Err(s) => {
                    let e = node_error(&self.node, s);
                    self.on_failure(e).await
                }
            };
            if let Next::End(o) = next {
                break o;
            }
        };
        self.finish(outcome).await;
    }

    fn generated(&self) -> Vec<u32> {
        self.coord.tracked_generated(&self.id)
    }

    /// Switches to a new node's stream (the old pending count drops with the old guard).
    fn switch_to(&mut self, opened: (String, NodeClient, tonic::Streaming<pb::RunEvent>, Pending)) {
        let (n, c, st, p) = opened;
        self.node = n;
        self.client = c;
        self.stream = st;
        self.pending = p;
        self.migrations += 1;
        self.coord.metrics.migrations.inc();
        self.coord.set_tracked_node(&self.id, &self.node, self.migrations);
    }

    async fn on_event(&mut self, ev: pb::run_event::Event) -> Next {
        match ev {
            pb::run_event::Event::Token(t) => self.on_token(t).await,
            pb::run_event::Event::Finished(f) => match Finish::from_node(f.reason()) {
                None => self.on_moved().await,
                Some(finish) => self.on_finished(finish, f).await,
            },
        }
    }

    async fn on_token(&mut self, t: pb::Token) -> Next {
        let now = Instant::now();
        let m = &self.coord.metrics;
        match self.last_token {
            None => {
                m.queued.dec();
                m.time_to_first_token
                    .observe(now.duration_since(self.arrived).as_secs_f64());
            }
            Some(p) => m.time_per_output_token.observe(now.duration_since(p).as_secs_f64()),
        }
        self.last_token = Some(now);
        m.generation_tokens.inc();
        self.loops += t.exit_loop as u64;
        self.tokens += 1;
        m.token_exits.get_or_create(&ExitLoop { exit_loop: t.exit_loop }).inc();
        self.coord.push_generated(&self.id, t.token_id);
        let g = GenToken {
            id: t.token_id,
            text: t.text,
            token_text: t.token,
            logprob: t.logprob,
            exit_loop: t.exit_loop,
            top: t
                .top_logprobs
                .into_iter()
                .map(|a| Alt {
                    id: a.token_id,
                    text: a.token,
                    logprob: a.logprob,
                })
                .collect(),
        };
        if self.tx.send(Ok(GenEvent::Token(g))).await.is_err() {
            return Next::End(Outcome::Cancelled);
        }
        Next::Continue
    }

    async fn on_finished(&mut self, finish: Finish, f: pb::Finished) -> Next {
        // After a migration the node saw the earlier output as prompt.
        let moved = self.run.generated.len() as u32;
        let usage = GenUsage {
            prompt_tokens: f.prompt_tokens - moved.min(f.prompt_tokens),
            completion_tokens: f.completion_tokens + moved,
            // Over the tokens streamed (the node's count also has the end token's).
            mean_loops: if self.tokens > 0 {
                self.loops as f32 / self.tokens as f32
            } else {
                0.0
            },
        };
        self.coord
            .metrics
            .e2e_latency
            .observe(self.arrived.elapsed().as_secs_f64());
        let _ = self
            .tx
            .send(Ok(GenEvent::Done {
                finish,
                text: f.text,
                usage,
            }))
            .await;
        Next::End(Outcome::Finished(finish))
    }

    /// The old node let go of the request after its last token: continue on the peer holding
    /// its keys/values, or replay it anywhere.
    async fn on_moved(&mut self) -> Next {
        self.cancel_on_node();
        self.run.generated = self.generated();
        let opened = match self.switching.take() {
            Some((to, ticket)) => {
                self.run.kv_ticket = ticket;
                self.coord.open_run_on(&to, &mut self.run).await
            }
            None => self.coord.open_run(&mut self.run).await,
        };
        match opened {
            Ok(o) => {
                tracing::info!(
                    request = self.id,
                    from = self.node,
                    to = o.0,
                    "moved off a draining node"
                );
                self.switch_to(o);
                Next::Continue
            }
            Err(e) => {
                let _ = self.tx.send(Err(e)).await;
                Next::End(Outcome::Error)
            }
        }
    }

    /// `Cancel` of the request on the node the pump reads now, in the background, before it
    /// switches away: frees the request there when it replays elsewhere, or releases its
    /// export once the stream said "moved" (a draining node keeps its connections open until
    /// every export is released, `rrt_node::outbound`).
    fn cancel_on_node(&self) {
        let mut old = self.client.clone();
        let req = pb::CancelRequest {
            request_id: self.id.clone(),
        };
        let timeout = self.coord.config().node_timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, old.cancel(req)).await;
        });
    }

    /// The node failed the request (died, froze past the keepalive, or broke the stream):
    /// resume it elsewhere from its prompt and the tokens already streamed, unless the error
    /// is the request's own fault or it has moved too often.
    async fn on_failure(&mut self, e: CoordError) -> Next {
        let own_fault = matches!(&e, CoordError::Node { status, .. } if matches!(
            status.code(),
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ));
        if own_fault || self.migrations >= self.coord.config().max_migrations {
            let _ = self.tx.send(Err(e)).await;
            return Next::End(Outcome::Error);
        }
        self.coord.registry.mark_failed(&self.node);
        tracing::warn!(request = self.id, node = self.node, error = %e, "node failed mid-request; migrating");
        self.run.generated = self.generated();
        let opened = match self.switching.take() {
            // Its keys/values made it to a peer before the old stream broke.
            Some((to, ticket)) => {
                self.cancel_on_node();
                self.run.kv_ticket = ticket;
                self.coord.open_run_on(&to, &mut self.run).await
            }
            None => self.coord.open_run(&mut self.run).await,
        };
        match opened {
            Ok(o) => {
                self.switch_to(o);
                Next::Continue
            }
            Err(e2) => {
                // Nothing left to move to: the client hears it now, not later.
                let _ = self.tx.send(Err(e2)).await;
                Next::End(Outcome::Error)
            }
        }
    }

    /// The node is draining: move the request to a peer with its keys/values (by replay when
    /// that cannot be done), if there is a peer (otherwise it finishes where it is).
    async fn move_off_draining(&mut self) {
        let snap = self.coord.registry.snapshot();
        // A notification stored while the request was already moving is stale: only a request
        // on a draining node moves.
        if !snap.iter().any(|n| n.id == self.node && n.draining) {
            return;
        }
        if !snap.iter().any(|n| {
            n.id != self.node && n.healthy && !n.draining && n.serves(&self.run.model, &self.run.model_fingerprint)
        }) {
            return;
        }
        let mut tokens = self.run.prompt.clone();
        tokens.extend(self.generated());
        let remaining = (self.run.max_new_tokens as usize + self.run.prompt.len()).saturating_sub(tokens.len());
        match self
            .coord
            .move_kv(&self.run, &self.node, &mut self.client, &tokens, remaining)
            .await
        {
            KvMove::Staged { node: to, ticket } => self.switching = Some((to, ticket)),
            KvMove::HandedOff => {}
            KvMove::Kept(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::DeadlineExceeded) => {}
            KvMove::Kept(s) => {
                tracing::info!(request = self.id, node = self.node, error = %s, "cannot move keys/values; replaying");
                self.run.generated = self.generated();
                match self.coord.open_run(&mut self.run).await {
                    Ok(o) => {
                        let old_node = self.node.clone();
                        self.cancel_on_node();
                        self.switch_to(o);
                        tracing::info!(
                            request = self.id,
                            from = old_node,
                            to = self.node,
                            "moved off a draining node by replay"
                        );
                    }
                    Err(e) => tracing::warn!(request = self.id, error = %e, "could not move off a draining node"),
                }
            }
        }
    }

    /// The one way out: see the module documentation.
    async fn finish(self, outcome: Outcome) {
        let RequestPump {
            coord,
            id,
            node,
            mut client,
            stream,
            pending,
            last_token,
            migrations,
            tokens,
            loops,
            ..
        } = self;
        // Dropping the node stream resets it (the node cancels when it next sends); the
        // explicit Cancel frees the request's rows and KV at once.
        drop(stream);
        if matches!(outcome, Outcome::Cancelled | Outcome::Deadline) {
            let req = pb::CancelRequest { request_id: id.clone() };
            let _ = tokio::time::timeout(coord.config().node_timeout, client.cancel(req)).await;
        }
        coord.forget(&id);
        drop(pending);
        let m = &coord.metrics;
        m.running.dec();
        if last_token.is_none() {
            m.queued.dec();
        }
        m.outcome(outcome);
        let span = tracing::Span::current();
        span.record("node", node.as_str());
        span.record("migrations", migrations as i64);
        span.record("tokens", tokens as i64);
        span.record("finish_reason", outcome.label());
        span.record(
            "mean_loops",
            if tokens > 0 { loops as f64 / tokens as f64 } else { 0.0 },
        );
    }
}
