//! The KV cache: a pool of fixed-size blocks with a prefix cache, after vLLM V1's `BlockPool`.
//!
//! Every block is either *referenced* (held by one or more running sequences) or *free*. Free
//! blocks sit in one queue; a free block may still hold a cached prefix (it has a hash), so a later
//! request with the same prefix can take it back without recomputing it. Allocation takes the head
//! of the queue and evicts whatever prefix it held. Released blocks go to the tail when they hold a
//! hash (so cached prefixes are evicted least-recently-used first) and to the head when they do not
//! (an empty block is worth nothing; vLLM appends both to the tail, which evicts cached prefixes
//! while empty blocks wait; we prefer to keep the cache).
//!
//! Usage is `referenced / total`, as vLLM's `kv_cache_usage_perc` counts it: cached-but-free blocks
//! are capacity, not usage. Everything is sized by the number of blocks at construction and never
//! grows.

use foldhash::fast::RandomState;
use std::collections::HashMap;

const NIL: u32 = u32::MAX;

/// One block's state, kept together: an allocation, a release or a hit touches one cache line of
/// it rather than one per field (the pool of a 200-engine fleet is far larger than any cache).
#[derive(Clone, Copy, Debug)]
struct Block {
    /// The prefix hash this block caches, meaningful only when `hashed` (a flag rather than an
    /// `Option<u64>` keeps the struct at 24 bytes instead of 32).
    hash: u64,
    ref_cnt: u32,
    prev: u32,
    next: u32,
    hashed: bool,
}

/// The block pool. Block ids are `0..num_blocks`.
#[derive(Clone, Debug)]
pub(crate) struct BlockPool {
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    num_free: u32,
    /// Prefix hash -> the block holding it: exactly the blocks with `hashed` set. Hashed with
    /// foldhash (random seed; the map is only probed, never iterated, so runs stay deterministic):
    /// these probes are a large share of a big fleet's simulation time.
    cached: HashMap<u64, u32, RandomState>,
}

impl BlockPool {
    pub(crate) fn new(num_blocks: u32) -> Self {
        let empty = Block {
            hash: 0,
            ref_cnt: 0,
            prev: NIL,
            next: NIL,
            hashed: false,
        };
        let mut pool = Self {
            blocks: vec![empty; num_blocks as usize],
            head: NIL,
            tail: NIL,
            num_free: 0,
            cached: HashMap::with_capacity_and_hasher(num_blocks as usize, RandomState::default()),
        };
        for b in 0..num_blocks {
            pool.push_back(b);
        }
        pool
    }

    pub(crate) fn num_blocks(&self) -> u32 {
        self.blocks.len() as u32
    }

    /// Blocks not referenced by any sequence (cached or empty): what an allocation can use.
    pub(crate) fn num_free(&self) -> u32 {
        self.num_free
    }

    pub(crate) fn num_used(&self) -> u32 {
        self.num_blocks() - self.num_free
    }

    /// The block caching prefix `hash`, if any.
    #[inline]
    pub(crate) fn lookup(&self, hash: u64) -> Option<u32> {
        self.cached.get(&hash).copied()
    }

    /// True if `block` is free (so taking it by [`Self::touch`] reduces [`Self::num_free`]).
    pub(crate) fn is_free(&self, block: u32) -> bool {
        self.blocks[block as usize].ref_cnt == 0
    }

    /// Takes a reference on a cached block (a prefix hit).
    pub(crate) fn touch(&mut self, block: u32) {
        if self.blocks[block as usize].ref_cnt == 0 {
            self.unlink(block);
        }
        self.blocks[block as usize].ref_cnt += 1;
    }

    /// Allocates an empty block, evicting the prefix the least recently used free block held.
    pub(crate) fn alloc(&mut self) -> Option<u32> {
        let b = self.head;
        if b == NIL {
            return None;
        }
        self.unlink(b);
        let block = &mut self.blocks[b as usize];
        block.ref_cnt = 1;
        if std::mem::take(&mut block.hashed) {
            let evicted = self.cached.remove(&block.hash);
            debug_assert_eq!(
                evicted,
                Some(b),
                "a hashed block is the one cached under its hash"
            );
        }
        Some(b)
    }

    /// Drops one reference on `block`; at zero it becomes free (and stays cached if hashed).
    pub(crate) fn release(&mut self, block: u32) {
        let b = &mut self.blocks[block as usize];
        debug_assert!(b.ref_cnt > 0, "double free of block {block}");
        b.ref_cnt -= 1;
        if b.ref_cnt == 0 {
            if b.hashed {
                self.push_back(block);
            } else {
                self.push_front(block);
            }
        }
    }

    /// Records that `block` (full, referenced) holds the prefix `hash`, unless another block
    /// already does (then this one simply stays uncached, as in vLLM).
    pub(crate) fn register(&mut self, block: u32, hash: u64) {
        let b = &mut self.blocks[block as usize];
        if b.hashed {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(block);
            b.hash = hash;
            b.hashed = true;
        }
    }

    fn unlink(&mut self, b: u32) {
        let Block {
            prev: p, next: n, ..
        } = self.blocks[b as usize];
        if p == NIL {
            self.head = n;
        } else {
            self.blocks[p as usize].next = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.blocks[n as usize].prev = p;
        }
        let block = &mut self.blocks[b as usize];
        block.prev = NIL;
        block.next = NIL;
        self.num_free -= 1;
    }

    fn push_back(&mut self, b: u32) {
        let tail = self.tail;
        let block = &mut self.blocks[b as usize];
        block.prev = tail;
        block.next = NIL;
        if tail == NIL {
            self.head = b;
        } else {
            self.blocks[tail as usize].next = b;
        }
        self.tail = b;
        self.num_free += 1;
    }

    fn push_front(&mut self, b: u32) {
        let head = self.head;
        let block = &mut self.blocks[b as usize];
        block.next = head;
        block.prev = NIL;
        if head == NIL {
            self.tail = b;
        } else {
            self.blocks[head as usize].prev = b;
        }
        self.head = b;
        self.num_free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_release_and_reuse_cached() {
        let mut p = BlockPool::new(4);
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        assert_eq!(p.num_free(), 2);
        p.register(a, 111);
        p.release(a);
        p.release(b);
        assert_eq!(p.num_free(), 4);
        // The cached block survives until the empty ones are used up.
        assert_eq!(p.lookup(111), Some(a));
        let x = p.alloc().unwrap();
        let y = p.alloc().unwrap();
        let z = p.alloc().unwrap();
        assert!(![x, y, z].contains(&a));
        assert_eq!(p.lookup(111), Some(a));
        // A hit takes it back without allocation.
        p.touch(a);
        assert_eq!(p.num_free(), 0);
        assert!(p.alloc().is_none());
        p.release(a);
        // Now it is the only free block: the next allocation evicts it.
        assert_eq!(p.alloc(), Some(a));
        assert_eq!(p.lookup(111), None);
    }

    #[test]
    fn lru_order_among_cached_blocks() {
        let mut p = BlockPool::new(3);
        let blocks: Vec<u32> = (0..3).map(|_| p.alloc().unwrap()).collect();
        for (i, &b) in blocks.iter().enumerate() {
            p.register(b, 10 + i as u64);
        }
        // Released in order 0, 1, 2: 0 is the least recently used.
        for &b in &blocks {
            p.release(b);
        }
        p.alloc().unwrap();
        assert_eq!(p.lookup(10), None);
        assert!(p.lookup(11).is_some() && p.lookup(12).is_some());
    }

    #[test]
    fn shared_block_needs_every_release() {
        let mut p = BlockPool::new(2);
        let a = p.alloc().unwrap();
        p.register(a, 5);
        p.touch(a);
        p.release(a);
        assert!(!p.is_free(a));
        p.release(a);
        assert!(p.is_free(a));
        assert_eq!(p.num_used(), 0);
    }
}
