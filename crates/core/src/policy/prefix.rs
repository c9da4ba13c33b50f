//! Prefix-aware routing: send a prompt where its longest prefix was sent before, so the engine's
//! prefix cache skips that prefill, unless that endpoint is overloaded.
//!
//! The index maps a chained prompt-block hash (see [`crate::prompt`]) to the endpoints that recently
//! received it. It is bounded by a two-generation scheme: inserts go to the young map; when it holds
//! half the capacity, the old map is dropped and the young one becomes old. A lookup hit in the old
//! generation is promoted. This approximates LRU with O(1) work per operation and never more than
//! `capacity` entries, however many requests pass.
//!
//! The maps hash with foldhash, seeded at random: the block hashes are already well mixed, so
//! SipHash's cost (most of a long prompt's decision time) buys nothing but resistance to crafted
//! collisions, which a random seed keeps; a fixed hasher would let a client who knows the block
//! hash crowd one probe sequence. No decision depends on the maps' order.

use super::{least_loaded_index, Decision, PolicyConfig, Reason, RoutingPolicy, SharedRng};
use crate::{EndpointView, Micros, RequestProfile};
use foldhash::fast::RandomState;
use std::collections::HashMap;
use std::sync::Mutex;

/// Endpoints remembered per block (most recent first).
const WAYS: usize = 4;

type Holders = [u64; WAYS];

type BlockMap = HashMap<u64, Holders, RandomState>;

/// A bounded map from block hash to the endpoint keys that received it last.
#[derive(Debug)]
pub struct PrefixIndex {
    young: BlockMap,
    old: BlockMap,
    generation_size: usize,
}

impl PrefixIndex {
    /// An index holding at most `capacity` block entries.
    pub fn new(capacity: usize) -> Self {
        let generation_size = (capacity / 2).max(1);
        PrefixIndex {
            young: BlockMap::with_capacity_and_hasher(
                generation_size.min(1 << 16),
                RandomState::default(),
            ),
            old: BlockMap::default(),
            generation_size,
        }
    }

    /// Entries currently held (young and old).
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn holders(&mut self, hash: u64) -> Option<Holders> {
        if let Some(h) = self.young.get(&hash) {
            return Some(*h);
        }
        let h = self.old.remove(&hash)?;
        self.insert_holders(hash, h);
        Some(h)
    }

    fn insert_holders(&mut self, hash: u64, holders: Holders) {
        if self.young.len() >= self.generation_size && !self.young.contains_key(&hash) {
            // Rotate without allocating: the old generation's table, emptied, becomes the young
            // one. Both tables keep their capacity, so memory stays flat once they are full
            // (fresh tables growing by doubling each rotation fragmented the heap).
            self.old.clear();
            std::mem::swap(&mut self.young, &mut self.old);
        }
        self.young.insert(hash, holders);
    }

    /// Records that `endpoint` received a prompt with these block hashes.
    pub fn record(&mut self, hashes: &[u64], endpoint: u64) {
        for &hash in hashes {
            let mut holders = self.holders(hash).unwrap_or([0; WAYS]);
            if holders[0] == endpoint {
                continue;
            }
            let pos = holders
                .iter()
                .position(|&k| k == endpoint)
                .unwrap_or(WAYS - 1);
            holders.copy_within(0..pos, 1);
            holders[0] = endpoint;
            self.insert_holders(hash, holders);
        }
    }

    /// The longest prefix of `hashes` held by one of `endpoints`: (index into `endpoints`, blocks
    /// matched). Chained hashes make a match at block `i` imply the whole prefix up to `i`, so a
    /// binary search over the prompt's blocks suffices (eviction can make it miss a longer match,
    /// never invent one).
    pub fn longest_match(
        &mut self,
        hashes: &[u64],
        endpoints: &[EndpointView],
    ) -> Option<(usize, usize)> {
        let mut best = None;
        let (mut lo, mut hi) = (0usize, hashes.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            let found = self.holders(hashes[mid]).and_then(|holders| {
                holders
                    .iter()
                    .filter(|&&k| k != 0)
                    .find_map(|&k| endpoints.iter().position(|e| e.key == k))
            });
            match found {
                Some(index) => {
                    best = Some((index, mid + 1));
                    lo = mid + 1;
                }
                None => hi = mid,
            }
        }
        best
    }

    /// Per-endpoint prefix matches: for each endpoint key believed to hold a prefix of `hashes`,
    /// the number of leading blocks it holds, written to `out` (cleared first; at most `2 × WAYS`
    /// keys, longest first). The keys considered are the holders of the longest matched block and
    /// of the first block; each one's length is found by binary search, so the cost is
    /// `O(WAYS · log(blocks))` lookups whatever the number of endpoints. Like
    /// [`longest_match`](Self::longest_match) it may miss a match the bounded index forgot, never
    /// invent one.
    pub fn match_lengths(&mut self, hashes: &[u64], out: &mut Vec<(u64, usize)>) {
        out.clear();
        if hashes.is_empty() {
            return;
        }
        let nonempty = |h: &Option<Holders>| h.is_some_and(|h| h.iter().any(|&k| k != 0));
        // Longest block anyone holds.
        let (mut lo, mut hi) = (0usize, hashes.len());
        let mut longest: Option<(usize, Holders)> = None;
        while lo < hi {
            let mid = (lo + hi) / 2;
            let h = self.holders(hashes[mid]);
            if nonempty(&h) {
                longest = h.map(|h| (mid + 1, h));
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let Some((len, top)) = longest else {
            return;
        };
        for &k in top.iter().filter(|&&k| k != 0) {
            if !out.iter().any(|&(o, _)| o == k) {
                out.push((k, len));
            }
        }
        if len > 1 {
            let first = self.holders(hashes[0]).unwrap_or([0; WAYS]);
            for &k in first.iter().filter(|&&k| k != 0) {
                if out.iter().any(|&(o, _)| o == k) {
                    continue;
                }
                // Longest i < len with k among the holders of block i (block 0 holds it).
                let (mut lo, mut hi) = (1usize, len);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    let holds = self.holders(hashes[mid]).is_some_and(|h| h.contains(&k));
                    if holds {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                out.push((k, lo));
            }
        }
    }
}

/// Longest prefix match, unless the match is `margin` requests busier than the least-loaded
/// candidate; otherwise least-loaded.
#[derive(Debug)]
pub struct PrefixAware {
    index: Mutex<PrefixIndex>,
    margin: u32,
    rng: SharedRng,
}

impl PrefixAware {
    pub fn new(config: &PolicyConfig) -> Self {
        PrefixAware {
            index: Mutex::new(PrefixIndex::new(config.prefix_index_blocks)),
            margin: config.prefix_balance_margin,
            rng: SharedRng::new(config.seed),
        }
    }
}

impl RoutingPolicy for PrefixAware {
    fn name(&self) -> &'static str {
        "prefix-aware"
    }

    fn pick(
        &self,
        req: &RequestProfile,
        endpoints: &[EndpointView],
        _: Micros,
    ) -> Option<Decision> {
        let least = least_loaded_index(endpoints, &self.rng)?;
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let (chosen, reason) = match index.longest_match(&req.prefix_hashes, endpoints) {
            Some((matched, _)) => {
                let excess = endpoints[matched]
                    .load
                    .in_flight()
                    .saturating_sub(endpoints[least].load.in_flight());
                if excess > self.margin {
                    (least, Reason::PrefixOverloaded)
                } else {
                    (matched, Reason::PrefixHit)
                }
            }
            None => (least, Reason::PrefixMiss),
        };
        index.record(&req.prefix_hashes, endpoints[chosen].key);
        Some(Decision::new(endpoints, chosen, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::prompt::prefix_block_hashes;

    fn prompt_request(text: &str) -> RequestProfile {
        let mut r = request();
        r.prefix_hashes = prefix_block_hashes(text.as_bytes(), 256);
        r
    }

    #[test]
    fn shared_prefix_follows_the_first_endpoint_until_overloaded() {
        let cfg = PolicyConfig {
            prefix_balance_margin: 2,
            ..PolicyConfig::default()
        };
        let p = PrefixAware::new(&cfg);
        let system = "You are a helpful assistant. ".repeat(40);
        let first = p
            .pick(
                &prompt_request(&format!("{system} Q1")),
                &views(&[1, 0, 1]),
                0,
            )
            .unwrap();
        assert_eq!((first.index, first.reason), (1, Reason::PrefixMiss));
        // Same prefix: follows endpoint 1 although endpoint 0 is now less loaded.
        let second = p
            .pick(
                &prompt_request(&format!("{system} Q2")),
                &views(&[0, 2, 1]),
                0,
            )
            .unwrap();
        assert_eq!((second.index, second.reason), (1, Reason::PrefixHit));
        // Endpoint 1 more than `margin` busier than the least-loaded: balance instead.
        let third = p
            .pick(
                &prompt_request(&format!("{system} Q3")),
                &views(&[0, 3, 1]),
                0,
            )
            .unwrap();
        assert_eq!((third.index, third.reason), (0, Reason::PrefixOverloaded));
        // Unrelated prompt: a miss.
        let other = p
            .pick(&prompt_request(&"z".repeat(500)), &views(&[0, 0, 0]), 0)
            .unwrap();
        assert_eq!(other.reason, Reason::PrefixMiss);
    }

    #[test]
    fn longest_match_wins() {
        let mut index = PrefixIndex::new(1000);
        let v = views(&[0, 0]);
        let base = "a".repeat(64 * 4);
        let short = prefix_block_hashes(base.as_bytes(), 64);
        let long_text = format!("{base}{}", "b".repeat(64 * 4));
        let long = prefix_block_hashes(long_text.as_bytes(), 64);
        index.record(&short, v[0].key);
        index.record(&long, v[1].key);
        // Endpoint 1 holds all 8 blocks, endpoint 0 the first 4 (and endpoint 1 too).
        assert_eq!(index.longest_match(&long, &v), Some((1, 8)));
        // Only endpoint 0 among candidates: it matches 4 blocks.
        assert_eq!(index.longest_match(&long, &v[..1]), Some((0, 4)));
    }

    #[test]
    fn match_lengths_per_endpoint() {
        let mut index = PrefixIndex::new(1000);
        let mut out = Vec::new();
        let text = "a".repeat(64 * 12);
        let hashes = prefix_block_hashes(text.as_bytes(), 64);
        index.match_lengths(&hashes, &mut out);
        assert!(out.is_empty());
        // Turn 1 (4 blocks) went to 7, turn 2 (8 blocks) to 9, turn 3 (12 blocks) to 11.
        index.record(&hashes[..4], 7);
        index.record(&hashes[..8], 9);
        index.record(&hashes, 11);
        index.match_lengths(&hashes, &mut out);
        out.sort();
        assert_eq!(out, vec![(7, 4), (9, 8), (11, 12)]);
        index.match_lengths(&hashes[..6], &mut out);
        out.sort();
        assert_eq!(out, vec![(7, 4), (9, 6), (11, 6)]);
        index.match_lengths(&[], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn index_stays_bounded() {
        let mut index = PrefixIndex::new(1000);
        for i in 0..100_000u64 {
            index.record(&[i, i + 1_000_000], 1 + i % 7);
            assert!(index.len() <= 1000);
        }
        // Recent entries survive.
        let v = views(&[0; 8]);
        let recent = [99_999u64];
        assert!(
            index.longest_match(&recent, &v).is_none(),
            "keys 1000+i are not 1..7"
        );
        let mut v7 = views(&[0]);
        v7[0].key = 1 + 99_999 % 7;
        assert_eq!(index.longest_match(&recent, &v7), Some((0, 1)));
    }
}
