//! Routing: which node gets a request.
//!
//! Each node's load report gives its **expected work**: every row in flight at loop depth `d`
//! still has about `B - d` loops to run, and every token waiting to enter loop 0 has `B`
//! (early exit only makes this an upper bound). A request goes to the healthy,
//! non-draining node with the least expected work among those with room in their KV cache,
//! except that, with prefix affinity on ([`route_with`]), requests sharing a prompt prefix
//! prefer the same node (rendezvous hashing of the first [`AFFINITY_TOKENS`] tokens), as
//! long as that node's work is within [`AFFINITY_SLACK`] of the least loaded one: worth it
//! only where nodes cache prefixes. Nodes do (the engine's prefix cache), and report it in
//! their load; the coordinator turns affinity on when every node that could take a request
//! keeps a cache, unless `coordinator.prefix_affinity` says otherwise. The cost: traffic that
//! all shares one prefix (one system prompt for every chat) leans on one node until the slack
//! is used up; without caches `rrt capacity` measured 4.5x the nodes for such traffic, which
//! is why affinity stays off for nodes without a cache (with one, every node caches the
//! prefix after its first such request, so affinity matters most for many distinct
//! prefixes, each on its own node).

/// Prompt tokens hashed for prefix affinity.
pub const AFFINITY_TOKENS: usize = 32;
/// How much more expected work (relative, plus one full request's worth) the preferred node
/// may have before affinity gives way to load.
pub const AFFINITY_SLACK: f64 = 0.25;

/// What routing knows about a node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeView {
    pub id: String,
    /// The model it serves (what clients put in `model`) and its weights' fingerprint (empty
    /// until the node has hashed them).
    pub model: String,
    pub fingerprint: String,
    pub healthy: bool,
    pub draining: bool,
    pub loops: usize,
    pub rows_per_depth: Vec<usize>,
    pub waiting_tokens: usize,
    pub free_kv_blocks: usize,
    pub total_kv_blocks: usize,
    pub kv_block_size: usize,
    /// Requests this coordinator sent that the last report cannot include yet.
    pub pending: usize,
    /// The node keeps a prefix cache (requests sharing a prompt prefix gain from landing on
    /// it together).
    pub prefix_cache: bool,
}

impl NodeView {
    /// Expected loop-rows of work queued on the node.
    pub fn expected_work(&self, request_tokens: usize) -> f64 {
        let b = self.loops.max(1);
        let in_flight: usize = self
            .rows_per_depth
            .iter()
            .enumerate()
            .map(|(d, &rows)| rows * b.saturating_sub(d))
            .sum();
        (in_flight + (self.waiting_tokens + self.pending * request_tokens) * b) as f64
    }

    /// Whether `positions` more KV positions fit right now.
    pub fn has_room(&self, positions: usize) -> bool {
        let bs = self.kv_block_size.max(1);
        positions.div_ceil(bs) <= self.free_kv_blocks
    }

    pub fn usable(&self) -> bool {
        self.healthy && !self.draining
    }

    /// Whether it serves `model` with the weights `fingerprint` (empty: any weights).
    pub fn serves(&self, model: &str, fingerprint: &str) -> bool {
        self.model == model && (fingerprint.is_empty() || self.fingerprint == fingerprint)
    }
}

/// FNV-1a over the token ids.
fn hash_tokens(tokens: &[u32], seed: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes().chain(tokens.iter().flat_map(|t| t.to_le_bytes())) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The node whose rendezvous hash with the prompt prefix is highest.
fn preferred<'a>(nodes: &[&'a NodeView], prompt: &[u32]) -> Option<&'a NodeView> {
    let prefix = &prompt[..prompt.len().min(AFFINITY_TOKENS)];
    nodes.iter().copied().max_by_key(|n| hash_tokens(prefix, &n.id))
}

/// Picks the node for a request of `prompt` that may generate `max_tokens` tokens, with
/// prefix affinity; `None` when no node is usable.
pub fn route<'a>(nodes: &'a [NodeView], prompt: &[u32], max_tokens: usize) -> Option<&'a NodeView> {
    route_with(nodes, prompt, max_tokens, true)
}

/// [`route`] with prefix affinity on or off (off: the least expected work among nodes with
/// room, ties by id).
pub fn route_with<'a>(
    nodes: &'a [NodeView],
    prompt: &[u32],
    max_tokens: usize,
    affinity: bool,
) -> Option<&'a NodeView> {
    let usable: Vec<&NodeView> = nodes.iter().filter(|n| n.usable()).collect();
    if usable.is_empty() {
        return None;
    }
    let positions = prompt.len() + max_tokens;
    // Prefer nodes with room now; if none has, queue on the least loaded anyway (the node
    // preempts or waits rather than failing).
    let roomy: Vec<&NodeView> = usable.iter().copied().filter(|n| n.has_room(positions)).collect();
    let pool = if roomy.is_empty() { usable } else { roomy };
    let work = |n: &NodeView| n.expected_work(prompt.len());
    let least = pool
        .iter()
        .copied()
        .min_by(|a, b| work(a).total_cmp(&work(b)).then_with(|| a.id.cmp(&b.id)))?;
    if !affinity {
        return Some(least);
    }
    let pref = preferred(&pool, prompt)?;
    let one_request = (prompt.len() * pref.loops.max(1)) as f64;
    if work(pref) <= work(least) * (1.0 + AFFINITY_SLACK) + one_request {
        Some(pref)
    } else {
        Some(least)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_affinity_a_shared_prefix_goes_to_the_least_loaded() {
        let nodes = vec![
            node("a", vec![0, 0], 40),
            node("b", vec![0, 0], 0),
            node("c", vec![0, 0], 10),
        ];
        let p: Vec<u32> = (0..40).collect();
        assert_eq!(route_with(&nodes, &p, 16, false).unwrap().id, "b");
        // With affinity the preferred node may take it while within a request's work.
        let pref = route_with(&nodes, &p, 16, true).unwrap().id.clone();
        assert!(["a", "b", "c"].contains(&pref.as_str()));
    }

    fn node(id: &str, rows: Vec<usize>, waiting: usize) -> NodeView {
        NodeView {
            id: id.into(),
            healthy: true,
            loops: 2,
            rows_per_depth: rows,
            waiting_tokens: waiting,
            free_kv_blocks: 100,
            total_kv_blocks: 100,
            kv_block_size: 16,
            ..Default::default()
        }
    }

    #[test]
    fn expected_work_weights_rows_by_remaining_loops() {
        // 4 rows at loop 0 (2 loops left each), 6 at loop 1 (1 left), 10 waiting tokens (2 each).
        assert_eq!(node("a", vec![4, 6], 10).expected_work(5), 8.0 + 6.0 + 20.0);
        let mut n = node("a", vec![0, 0], 0);
        n.pending = 2;
        assert_eq!(n.expected_work(5), 20.0, "pending requests count as their prompt");
    }

    #[test]
    fn same_prefix_same_node_and_load_wins_when_skewed() {
        let nodes = vec![
            node("a", vec![1, 1], 0),
            node("b", vec![1, 1], 0),
            node("c", vec![1, 1], 0),
        ];
        let p1: Vec<u32> = (0..40).collect();
        let mut p2 = p1.clone();
        p2.push(999);
        let first = route(&nodes, &p1, 16).unwrap().id.clone();
        assert_eq!(
            route(&nodes, &p2, 16).unwrap().id,
            first,
            "shared 32-token prefix -> same node"
        );
        // Different prefixes spread over the nodes.
        let mut seen = std::collections::HashSet::new();
        for s in 0..30u32 {
            let p: Vec<u32> = (s * 100..s * 100 + 40).collect();
            seen.insert(route(&nodes, &p, 16).unwrap().id.clone());
        }
        assert_eq!(seen.len(), 3, "prefixes spread over all nodes");
        // Overload the preferred node: load wins.
        let mut skewed = nodes.clone();
        for n in &mut skewed {
            if n.id == first {
                n.waiting_tokens = 10_000;
            }
        }
        assert_ne!(route(&skewed, &p1, 16).unwrap().id, first);
    }

    #[test]
    fn unhealthy_draining_and_full_nodes_are_avoided() {
        let mut a = node("a", vec![0, 0], 0);
        a.healthy = false;
        let mut b = node("b", vec![0, 0], 0);
        b.draining = true;
        let mut c = node("c", vec![0, 0], 0);
        c.free_kv_blocks = 1;
        let d = node("d", vec![50, 50], 500);
        let nodes = vec![a.clone(), b.clone(), c.clone(), d];
        assert_eq!(route(&nodes, &[1, 2, 3], 100).unwrap().id, "d", "only d has room");
        assert_eq!(route(&[a.clone(), b.clone()], &[1], 1), None);
        assert_eq!(
            route(&[a, b, c], &[1, 2, 3], 100).unwrap().id,
            "c",
            "no room anywhere: queue"
        );
    }
}
