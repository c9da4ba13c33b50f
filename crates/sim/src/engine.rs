//! A vLLM-like engine in virtual time: continuous batching, chunked prefill, paged KV with a prefix
//! cache, recompute preemption, and FCFS or priority scheduling.
//!
//! # Why a model and not fixed latencies
//!
//! A router is judged by what happens *under load*: the prompt tokens queued ahead of a request
//! set its TTFT, the batch size sets its ITL, a prefill sharing an iteration slows every decode in
//! it, a full KV cache preempts, a prefix hit skips prefill. Each of those is a mechanism here, not
//! a number, so a routing policy that exploits (or ignores) them sees the consequences.
//!
//! # One iteration ([`Engine::step`])
//!
//! Mirrors vLLM V1's scheduler with chunked prefill:
//!
//! 1. **Decodes first.** Every running sequence with exactly one token left to compute (a decode)
//!    gets it, one token each, within the budget `max_num_batched_tokens`.
//! 2. **Then partial prefills** of running sequences, in admission order, each taking as much of
//!    the remaining budget as it needs.
//! 3. **Then admissions** from the waiting queue (unless something was preempted this iteration, as
//!    vLLM does) of requests that arrived by the iteration's start, while the budget,
//!    `max_num_seqs` and the KV cache allow. A newly admitted sequence
//!    first looks its prompt's chained block hashes up in the prefix cache; hit blocks are shared,
//!    not recomputed. The queue's head blocks the rest when it does not fit (no skipping ahead).
//!
//! Before computing tokens a sequence needs KV blocks for them (16 tokens per block). When none are
//! free, the engine preempts a victim, the newest running sequence under FCFS and the
//! lowest-priority (then newest) one under priority scheduling, exactly like vLLM's recompute
//! preemption: its KV is freed, it goes back to the waiting queue at its original position, and it
//! later re-prefills its prompt *and* the tokens it already generated.
//!
//! The iteration's duration comes from [`Profile::iteration_ms`](crate::Profile::iteration_ms),
//! divided by the speed factor and multiplied by an optional seeded lognormal jitter. A sequence
//! whose KV computation reaches its last token samples one new token at the end of the iteration:
//! events are stamped `now + duration`.
//!
//! # Disaggregated decode (`skip_prefill`)
//!
//! A request with `skip_prefill` is the decode stage of disaggregated serving: its prompt's KV is
//! computed elsewhere and pulled over the network. On admission it allocates blocks for the whole
//! prompt and waits [`Profile::kv_transfer_ms`](crate::Profile::kv_transfer_ms) (a fixed handshake
//! plus a per-token cost, documented on each profile) holding a seat and its KV, then computes only
//! the last prompt token to sample its first output token, as vLLM's NIXL connector does. It is
//! counted as waiting while its KV is in flight. If it is preempted, it recomputes locally.
//!
//! # Bounded by design
//!
//! Finished and aborted requests are dropped at once; the id map, the slot table and the queues
//! hold live requests only (at most `max_num_seqs + max_num_queued_reqs`); the KV pool and the
//! histograms are fixed-size. Memory does not grow with the number of requests ever served.

use crate::histogram::{Histogram, ITL_BOUNDS, REQUEST_LATENCY_BOUNDS, TTFT_BOUNDS};
use crate::kv::BlockPool;
use crate::profile::{BatchShape, Profile};
use crate::rng::SplitMix64;
use foldhash::fast::RandomState;
use qoe_core::prompt::BLOCK_TOKENS;
use qoe_core::Micros;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

const BLOCK: u32 = BLOCK_TOKENS as u32;

#[inline]
fn blocks_for(tokens: u32) -> usize {
    tokens.div_ceil(BLOCK) as usize
}

/// Order in which waiting requests are admitted (vLLM's `--scheduling-policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduling {
    /// First come, first served; the request's `priority` is ignored.
    #[default]
    Fcfs,
    /// Lower `priority` value first, ties by arrival. Preemption picks the lowest priority.
    Priority,
}

impl FromStr for Scheduling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fcfs" => Ok(Self::Fcfs),
            "priority" => Ok(Self::Priority),
            other => Err(format!(
                "unknown scheduling policy `{other}` (fcfs, priority)"
            )),
        }
    }
}

impl fmt::Display for Scheduling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fcfs => "fcfs",
            Self::Priority => "priority",
        })
    }
}

/// Everything that configures one engine. Build with [`EngineConfig::for_profile`] and adjust.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Cost model and hardware defaults.
    pub profile: Profile,
    /// Token budget of one iteration (vLLM `--max-num-batched-tokens`, default 2048).
    pub max_num_batched_tokens: u32,
    /// Most sequences in one batch (vLLM `--max-num-seqs`, default 256).
    pub max_num_seqs: u32,
    /// Most requests waiting; further submissions are refused ([`SubmitError::QueueFull`]), as
    /// vLLM's `max_num_queued_reqs` admission limit does. Bounds the engine's memory.
    pub max_num_queued_reqs: u32,
    /// KV-cache capacity in tokens (rounded down to whole blocks of 16).
    pub kv_capacity_tokens: u64,
    /// Longest prompt + output.
    pub max_model_len: u32,
    /// FCFS or priority.
    pub scheduling: Scheduling,
    /// Speed factor: 2.0 runs every iteration in half the time.
    pub speed: f64,
    /// Lognormal jitter of iteration times: each duration is multiplied by `exp(jitter·z)`,
    /// `z ~ N(0,1)`; 0.05 gives about ±5% (one sigma). 0 disables it.
    pub jitter: f64,
    /// Seed of the jitter.
    pub seed: u64,
    /// vLLM's `--enable-prefix-caching` (on by default in V1).
    pub enable_prefix_caching: bool,
}

impl EngineConfig {
    /// vLLM's defaults on `profile`'s hardware.
    pub fn for_profile(profile: Profile) -> Self {
        Self {
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            max_num_queued_reqs: 65_536,
            kv_capacity_tokens: profile.kv_capacity_tokens,
            max_model_len: profile.max_model_len,
            scheduling: Scheduling::Fcfs,
            speed: 1.0,
            jitter: 0.0,
            seed: 0,
            enable_prefix_caching: true,
            profile,
        }
    }

    /// Number of KV blocks.
    pub fn kv_blocks(&self) -> u32 {
        (self.kv_capacity_tokens / BLOCK as u64).min(u32::MAX as u64 - 1) as u32
    }

    /// Checks the invariants [`Engine::new`] relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |what: &str| Err(ConfigError(what.to_string()));
        if self.max_num_batched_tokens == 0 || self.max_num_seqs == 0 {
            return bad("max_num_batched_tokens and max_num_seqs must be positive");
        }
        if self.max_num_queued_reqs == 0 {
            // Every request waits in the queue before its first iteration: none would be taken.
            return bad("max_num_queued_reqs must be positive");
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            // As vLLM: otherwise decodes beyond the budget would starve every iteration.
            return bad("max_num_batched_tokens must be at least max_num_seqs");
        }
        if self.kv_blocks() == 0 {
            return bad("kv_capacity_tokens must hold at least one block of 16 tokens");
        }
        if self.max_model_len < 2 {
            return bad("max_model_len must be at least 2");
        }
        if !(self.speed.is_finite() && self.speed > 0.0) {
            return bad("speed must be a positive number");
        }
        if !(self.jitter.is_finite() && self.jitter >= 0.0 && self.jitter <= 2.0) {
            return bad("jitter must be in [0, 2]");
        }
        Ok(())
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self::for_profile(Profile::default())
    }
}

/// An invalid [`EngineConfig`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid engine config: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// One request as the engine sees it: sizes, not text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimRequest {
    /// Caller's id, unique among live requests.
    pub id: u64,
    /// Prompt length in tokens (`qoe_core::prompt::estimate_tokens` of the text).
    pub prompt_tokens: u32,
    /// `qoe_core::prompt::prefix_block_hashes` of the prompt text: the prefix-cache keys.
    pub prefix_hashes: Vec<u64>,
    /// The true output length: the engine stops after this many tokens.
    pub output_tokens: u32,
    /// True if the output ends by itself (EOS, finish reason `stop`) rather than at `max_tokens`
    /// (finish reason `length`).
    pub stops_at_eos: bool,
    /// vLLM's request `priority`: lower is served first under [`Scheduling::Priority`].
    pub priority: i32,
    /// Decode stage of disaggregated serving: the prompt's KV arrives by transfer.
    pub skip_prefill: bool,
}

impl SimRequest {
    /// A plain request: no prefix hashes, priority 0, ends at `output_tokens` with `length`.
    pub fn new(id: u64, prompt_tokens: u32, output_tokens: u32) -> Self {
        Self {
            id,
            prompt_tokens,
            prefix_hashes: Vec::new(),
            output_tokens,
            stops_at_eos: false,
            priority: 0,
            skip_prefill: false,
        }
    }
}

/// Why [`Engine::submit`] refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Another live request has this id.
    DuplicateId(u64),
    /// A prompt of zero tokens.
    EmptyPrompt,
    /// `output_tokens` of zero.
    NoOutput,
    /// The prompt leaves no room for one output token within `max_model_len`.
    TooLong {
        prompt_tokens: u32,
        max_model_len: u32,
    },
    /// Prompt + output need more KV than the whole cache holds: it could never run.
    ExceedsKvCapacity { tokens: u64, capacity_tokens: u64 },
    /// `max_num_queued_reqs` requests are already waiting.
    QueueFull { limit: u32 },
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DuplicateId(id) => write!(f, "request id {id} is already live"),
            Self::EmptyPrompt => f.write_str("the prompt is empty"),
            Self::NoOutput => f.write_str("output_tokens must be at least 1"),
            Self::TooLong { prompt_tokens, max_model_len } => write!(
                f,
                "prompt of {prompt_tokens} tokens leaves no room for output within max_model_len {max_model_len}"
            ),
            Self::ExceedsKvCapacity { tokens, capacity_tokens } => write!(
                f,
                "request needs {tokens} tokens of KV cache but the engine holds {capacity_tokens}"
            ),
            Self::QueueFull { limit } => write!(f, "{limit} requests already waiting"),
        }
    }
}

impl std::error::Error for SubmitError {}

/// Why a request finished (vLLM's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The output ended by itself (EOS).
    Stop,
    /// `max_tokens` or `max_model_len` reached.
    Length,
    /// Aborted by the caller.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }
}

/// What an iteration produced, stamped in virtual time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    /// One output token of request `id`; `first` for its first token.
    Token { id: u64, at: Micros, first: bool },
    /// Request `id` is done (after its last `Token` of the same iteration).
    Finished {
        id: u64,
        at: Micros,
        reason: FinishReason,
    },
    /// Request `id` lost its KV and went back to the waiting queue; it will recompute.
    Preempted { id: u64, at: Micros },
}

/// Counters, gauges and histograms, named after the vLLM metrics they feed.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineStats {
    /// `vllm:num_requests_running`: sequences in the batch.
    pub running: u32,
    /// `vllm:num_requests_waiting`: queued, preempted, or waiting for a KV transfer.
    pub waiting: u32,
    /// KV blocks referenced by live sequences.
    pub kv_blocks_used: u32,
    /// KV blocks in the cache.
    pub kv_blocks_total: u32,
    /// `vllm:prefix_cache_queries_total`: prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// `vllm:prefix_cache_hits_total`: of those, tokens found cached.
    pub prefix_cache_hits: u64,
    /// `vllm:num_preemptions_total`.
    pub preemptions: u64,
    /// `vllm:prompt_tokens_total`: prompt tokens of requests that reached their first token.
    pub prompt_tokens: u64,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: u64,
    /// `vllm:request_success_total` by reason: stop, length, abort.
    pub finished_stop: u64,
    pub finished_length: u64,
    pub finished_abort: u64,
    /// Requests accepted by `submit`.
    pub submitted: u64,
    /// Iterations that computed something.
    pub iterations: u64,
    /// Virtual time spent in those iterations.
    pub busy_micros: u64,
    /// `vllm:time_to_first_token_seconds`.
    pub ttft: Histogram,
    /// `vllm:inter_token_latency_seconds`.
    pub itl: Histogram,
    /// `vllm:e2e_request_latency_seconds` (finished, not aborted, requests).
    pub e2e: Histogram,
    /// `vllm:request_queue_time_seconds`: arrival to first scheduling.
    pub queue_time: Histogram,
}

impl EngineStats {
    fn new(kv_blocks_total: u32) -> Self {
        Self {
            running: 0,
            waiting: 0,
            kv_blocks_used: 0,
            kv_blocks_total,
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
            preemptions: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            finished_stop: 0,
            finished_length: 0,
            finished_abort: 0,
            submitted: 0,
            iterations: 0,
            busy_micros: 0,
            ttft: Histogram::new(TTFT_BOUNDS),
            itl: Histogram::new(ITL_BOUNDS),
            e2e: Histogram::new(REQUEST_LATENCY_BOUNDS),
            queue_time: Histogram::new(REQUEST_LATENCY_BOUNDS),
        }
    }

    /// `vllm:kv_cache_usage_perc`: referenced blocks over all blocks, 0..1.
    pub fn kv_usage(&self) -> f64 {
        self.kv_blocks_used as f64 / self.kv_blocks_total.max(1) as f64
    }

    /// Prefix-cache hit rate in tokens (V0's `vllm:gpu_prefix_cache_hit_rate`), 0 before any query.
    pub fn prefix_hit_rate(&self) -> f64 {
        if self.prefix_cache_queries == 0 {
            0.0
        } else {
            self.prefix_cache_hits as f64 / self.prefix_cache_queries as f64
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
}

#[derive(Debug)]
struct Seq {
    id: u64,
    prompt: u32,
    /// Output tokens to generate (clipped to `max_model_len`).
    output: u32,
    reason: FinishReason,
    generated: u32,
    /// Tokens whose KV is computed (or cached, or transferred).
    computed: u32,
    priority: i32,
    order: u64,
    prefix_hashes: Vec<u64>,
    /// Leading blocks whose prefix hash is registered in (or came from) the cache.
    hashed: u32,
    blocks: Vec<u32>,
    arrival: Micros,
    scheduled: bool,
    last_token: Micros,
    skip_prefill: bool,
    /// KV transfer lands at this time (only while `transferring`).
    ready_at: Micros,
    transferring: bool,
    state: State,
    /// Tokens scheduled in the current iteration.
    sched: u32,
}

impl Seq {
    #[inline]
    fn num_tokens(&self) -> u32 {
        self.prompt + self.generated
    }
}

/// The engine model. Drive it with [`Engine::submit`], [`Engine::abort`] and [`Engine::step`].
///
/// ```
/// use qoe_sim::{Engine, EngineConfig, EngineEvent, Profile, SimRequest};
/// let mut engine = Engine::new(EngineConfig::for_profile(Profile::tiny())).unwrap();
/// engine.submit(SimRequest::new(1, 100, 3), 0).unwrap();
/// let (mut now, mut events) = (0, Vec::new());
/// while engine.has_work() {
///     now += engine.step(now, &mut events);
/// }
/// let tokens = events.iter().filter(|e| matches!(e, EngineEvent::Token { .. })).count();
/// assert_eq!(tokens, 3);
/// ```
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    pool: BlockPool,
    slots: Vec<Option<Seq>>,
    free_slots: Vec<u32>,
    by_id: HashMap<u64, u32, RandomState>,
    /// Admission order.
    running: Vec<u32>,
    /// (priority key, arrival order) -> slot.
    waiting: BTreeMap<(i32, u64), u32>,
    next_order: u64,
    /// Slots scheduled in the current iteration (entries with `sched == 0` were undone).
    sched: Vec<u32>,
    hit_scratch: Vec<u32>,
    transferring: u32,
    rng: SplitMix64,
    speed: f64,
    stats: EngineStats,
}

impl Engine {
    /// An idle engine with an empty KV cache.
    pub fn new(cfg: EngineConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let blocks = cfg.kv_blocks();
        Ok(Self {
            pool: BlockPool::new(blocks),
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_id: HashMap::default(),
            running: Vec::new(),
            waiting: BTreeMap::new(),
            next_order: 0,
            sched: Vec::new(),
            hit_scratch: Vec::new(),
            transferring: 0,
            rng: SplitMix64::new(cfg.seed),
            speed: cfg.speed,
            stats: EngineStats::new(blocks),
            cfg,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Changes the speed factor from the next iteration on (fault injection: a slowed engine).
    pub fn set_speed(&mut self, speed: f64) {
        if speed.is_finite() && speed > 0.0 {
            self.speed = speed;
        }
    }

    /// The current speed factor.
    pub fn speed(&self) -> f64 {
        self.speed
    }

    /// Queues a request arriving at `now`. It is considered by the first [`Engine::step`] that
    /// starts at or after `now`.
    ///
    /// A live driver stamps arrivals with the wall clock while its steps run on virtual time that
    /// may trail it (a host stall it is catching up on), so `now` may exceed the next step's
    /// start: such a step leaves the request waiting, as a GPU busy with an iteration launched
    /// before the request reached it would. Stamp arrivals in submission order.
    pub fn submit(&mut self, req: SimRequest, now: Micros) -> Result<(), SubmitError> {
        if self.by_id.contains_key(&req.id) {
            return Err(SubmitError::DuplicateId(req.id));
        }
        if req.prompt_tokens == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.output_tokens == 0 {
            return Err(SubmitError::NoOutput);
        }
        let max_len = self.cfg.max_model_len;
        if req.prompt_tokens >= max_len {
            return Err(SubmitError::TooLong {
                prompt_tokens: req.prompt_tokens,
                max_model_len: max_len,
            });
        }
        let (output, reason) = if req.prompt_tokens + req.output_tokens > max_len {
            (max_len - req.prompt_tokens, FinishReason::Length)
        } else if req.stops_at_eos {
            (req.output_tokens, FinishReason::Stop)
        } else {
            (req.output_tokens, FinishReason::Length)
        };
        let tokens = req.prompt_tokens as u64 + output as u64;
        let capacity = self.pool.num_blocks() as u64 * BLOCK as u64;
        if tokens > capacity {
            return Err(SubmitError::ExceedsKvCapacity {
                tokens,
                capacity_tokens: capacity,
            });
        }
        if self.waiting.len() >= self.cfg.max_num_queued_reqs as usize {
            return Err(SubmitError::QueueFull {
                limit: self.cfg.max_num_queued_reqs,
            });
        }
        let order = self.next_order;
        self.next_order += 1;
        let seq = Seq {
            id: req.id,
            prompt: req.prompt_tokens,
            output,
            reason,
            generated: 0,
            computed: 0,
            priority: req.priority,
            order,
            prefix_hashes: req.prefix_hashes,
            hashed: 0,
            blocks: Vec::with_capacity(blocks_for(req.prompt_tokens + output.min(256))),
            arrival: now,
            scheduled: false,
            last_token: now,
            skip_prefill: req.skip_prefill,
            ready_at: 0,
            transferring: false,
            state: State::Waiting,
            sched: 0,
        };
        let key = self.waiting_key(&seq);
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(seq);
                s
            }
            None => {
                self.slots.push(Some(seq));
                (self.slots.len() - 1) as u32
            }
        };
        self.by_id.insert(req.id, slot);
        self.waiting.insert(key, slot);
        self.stats.submitted += 1;
        self.refresh_gauges();
        Ok(())
    }

    /// Cancels request `id` wherever it is, freeing its KV at once. False if it is not live.
    pub fn abort(&mut self, id: u64, _now: Micros) -> bool {
        let Some(slot) = self.by_id.remove(&id) else {
            return false;
        };
        let seq = self.slots[slot as usize].take().expect("live slot");
        match seq.state {
            State::Waiting => {
                self.waiting.remove(&self.waiting_key(&seq));
            }
            State::Running => {
                if let Some(i) = self.running.iter().position(|&s| s == slot) {
                    self.running.remove(i);
                }
                if seq.transferring {
                    self.transferring -= 1;
                }
            }
        }
        self.release_blocks(&seq.blocks);
        self.free_slots.push(slot);
        self.stats.finished_abort += 1;
        self.refresh_gauges();
        true
    }

    /// True while any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// True if request `id` is queued or running.
    pub fn is_live(&self, id: u64) -> bool {
        self.by_id.contains_key(&id)
    }

    /// Number of live (queued or running) requests.
    pub fn live_requests(&self) -> usize {
        self.by_id.len()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Runs one iteration starting at `now`, appends the events it produces (stamped
    /// `now + duration`, preemptions at `now`) to `events`, and returns its duration.
    ///
    /// Returns 0 when there is no work. When every running sequence is waiting for a KV transfer
    /// and nothing else can run, returns the time until the first transfer lands (an idle wait).
    pub fn step(&mut self, now: Micros, events: &mut Vec<EngineEvent>) -> Micros {
        if !self.has_work() {
            return 0;
        }
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut preempted = false;
        self.sched.clear();
        self.schedule_running(now, true, &mut budget, &mut preempted, events);
        self.schedule_running(now, false, &mut budget, &mut preempted, events);
        if !preempted {
            self.admit(now, &mut budget);
        }

        let mut shape = BatchShape::default();
        for &slot in &self.sched {
            let seq = self.slots[slot as usize].as_ref().expect("scheduled slot");
            if seq.sched == 0 {
                continue;
            }
            if seq.num_tokens() - seq.computed == 1 {
                shape.add_decode(seq.computed as u64 + 1);
            } else {
                shape.add_prefill(seq.sched as u64, seq.computed as u64);
            }
        }
        if shape.is_empty() {
            self.refresh_gauges();
            return self.idle_wait(now);
        }
        let dur = self.duration(&shape);
        let end = now.saturating_add(dur);
        self.stats.iterations += 1;
        self.stats.busy_micros += dur;

        let mut any_finished = false;
        for k in 0..self.sched.len() {
            let slot = self.sched[k];
            any_finished |= self.commit(slot, end, events);
        }
        if any_finished {
            let slots = &self.slots;
            self.running.retain(|&s| slots[s as usize].is_some());
        }
        self.refresh_gauges();
        dur
    }

    /// Schedules running sequences: decodes (`decodes == true`) or partial prefills.
    fn schedule_running(
        &mut self,
        now: Micros,
        decodes: bool,
        budget: &mut u32,
        preempted: &mut bool,
        events: &mut Vec<EngineEvent>,
    ) {
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let slot = self.running[i];
            let seq = self.slots[slot as usize].as_mut().expect("running slot");
            if seq.transferring {
                if seq.ready_at > now {
                    i += 1;
                    continue;
                }
                seq.transferring = false;
                self.transferring -= 1;
            }
            let remaining = seq.num_tokens() - seq.computed;
            if seq.sched > 0 || (remaining == 1) != decodes {
                i += 1;
                continue;
            }
            let n = remaining.min(*budget);
            let need = blocks_for(seq.computed + n).saturating_sub(seq.blocks.len());
            let mut self_preempted = false;
            while (self.pool.num_free() as usize) < need {
                let v = self.pick_victim();
                self.preempt(v, now, budget, events);
                *preempted = true;
                if v == i {
                    self_preempted = true;
                    break;
                }
                if v < i {
                    i -= 1;
                }
            }
            if self_preempted {
                continue;
            }
            let seq = self.slots[slot as usize].as_mut().expect("running slot");
            for _ in 0..need {
                seq.blocks
                    .push(self.pool.alloc().expect("checked free blocks"));
            }
            seq.sched = n;
            *budget -= n;
            self.sched.push(slot);
            i += 1;
        }
    }

    /// Admits waiting requests while budget, seats and KV allow.
    fn admit(&mut self, now: Micros, budget: &mut u32) {
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs as usize {
            let Some((key, slot)) = self.first_arrived(now) else {
                break;
            };
            let seq = self.slots[slot as usize].as_mut().expect("waiting slot");
            if seq.skip_prefill {
                // Decode stage: hold KV for the whole prompt while it is transferred.
                let need = blocks_for(seq.prompt);
                if (self.pool.num_free() as usize) < need {
                    break;
                }
                for _ in 0..need {
                    seq.blocks
                        .push(self.pool.alloc().expect("checked free blocks"));
                }
                seq.computed = seq.prompt - 1;
                let ms = self.cfg.profile.kv_transfer_ms(seq.prompt) / self.speed;
                seq.ready_at = now.saturating_add(micros_of_ms(ms));
                seq.transferring = true;
                self.transferring += 1;
            } else {
                // Prefix-cache lookup; at least the last token is computed, for its logits.
                self.hit_scratch.clear();
                let num_tokens = seq.num_tokens();
                if self.cfg.enable_prefix_caching {
                    let max_hit = ((num_tokens - 1) / BLOCK) as usize;
                    for &h in seq.prefix_hashes.iter().take(max_hit) {
                        match self.pool.lookup(h) {
                            Some(b) => self.hit_scratch.push(b),
                            None => break,
                        }
                    }
                }
                let hits = self.hit_scratch.len();
                let hit_tokens = hits as u32 * BLOCK;
                let n = (num_tokens - hit_tokens).min(*budget);
                let need = blocks_for(hit_tokens + n) - hits;
                let hits_free = self
                    .hit_scratch
                    .iter()
                    .filter(|&&b| self.pool.is_free(b))
                    .count();
                if (self.pool.num_free() as usize) < need + hits_free {
                    break; // the head does not fit: it blocks the queue, as in vLLM
                }
                for &b in &self.hit_scratch {
                    self.pool.touch(b);
                }
                seq.blocks.extend_from_slice(&self.hit_scratch);
                for _ in 0..need {
                    seq.blocks
                        .push(self.pool.alloc().expect("checked free blocks"));
                }
                seq.computed = hit_tokens;
                seq.hashed = hits as u32;
                if self.cfg.enable_prefix_caching {
                    self.stats.prefix_cache_queries += num_tokens as u64;
                    self.stats.prefix_cache_hits += hit_tokens as u64;
                }
                seq.sched = n;
                *budget -= n;
                self.sched.push(slot);
            }
            if !seq.scheduled {
                seq.scheduled = true;
                self.stats
                    .queue_time
                    .observe(now.saturating_sub(seq.arrival));
            }
            seq.state = State::Running;
            self.waiting.remove(&key);
            self.running.push(slot);
        }
    }

    /// The head of the waiting queue among the requests that have arrived by `now`.
    fn first_arrived(&self, now: Micros) -> Option<((i32, u64), u32)> {
        let arrived = |s: &u32| {
            self.slots[*s as usize]
                .as_ref()
                .expect("waiting slot")
                .arrival
                <= now
        };
        let head = match self.cfg.scheduling {
            // Arrivals come in submission order: if the oldest has not arrived, none has.
            Scheduling::Fcfs => self.waiting.first_key_value().filter(|(_, s)| arrived(s)),
            Scheduling::Priority => self.waiting.iter().find(|(_, s)| arrived(s)),
        };
        head.map(|(&k, &s)| (k, s))
    }

    /// The earliest arrival after `now` in the waiting queue.
    fn next_arrival(&self, now: Micros) -> Option<Micros> {
        let arrival = |s: &u32| {
            self.slots[*s as usize]
                .as_ref()
                .expect("waiting slot")
                .arrival
        };
        match self.cfg.scheduling {
            Scheduling::Fcfs => self
                .waiting
                .values()
                .next()
                .map(arrival)
                .filter(|&a| a > now),
            Scheduling::Priority => self
                .waiting
                .values()
                .map(arrival)
                .filter(|&a| a > now)
                .min(),
        }
    }

    /// Index in `running` of the sequence to preempt.
    fn pick_victim(&self) -> usize {
        match self.cfg.scheduling {
            Scheduling::Fcfs => self.running.len() - 1,
            Scheduling::Priority => {
                let key = |&(_, &s): &(usize, &u32)| {
                    let q = self.slots[s as usize].as_ref().expect("running slot");
                    (q.priority, q.order)
                };
                self.running
                    .iter()
                    .enumerate()
                    .max_by_key(key)
                    .map(|(i, _)| i)
                    .expect("a running sequence to preempt")
            }
        }
    }

    /// Recompute preemption of `running[index]`.
    fn preempt(
        &mut self,
        index: usize,
        now: Micros,
        budget: &mut u32,
        events: &mut Vec<EngineEvent>,
    ) {
        let slot = self.running.remove(index);
        let mut seq = self.slots[slot as usize].take().expect("running slot");
        // Undo this iteration's schedule of it (priority mode can pick a scheduled victim).
        *budget += seq.sched;
        seq.sched = 0;
        if seq.transferring {
            seq.transferring = false;
            self.transferring -= 1;
        }
        self.release_blocks(&seq.blocks);
        seq.blocks.clear();
        seq.computed = 0;
        seq.hashed = 0;
        seq.skip_prefill = false; // its transferred KV is gone: recompute locally
        seq.state = State::Waiting;
        self.stats.preemptions += 1;
        events.push(EngineEvent::Preempted {
            id: seq.id,
            at: now,
        });
        self.waiting.insert(self.waiting_key(&seq), slot);
        self.slots[slot as usize] = Some(seq);
    }

    /// Applies the iteration's work to `slot`; true if the request finished.
    fn commit(&mut self, slot: u32, end: Micros, events: &mut Vec<EngineEvent>) -> bool {
        let seq = self.slots[slot as usize].as_mut().expect("scheduled slot");
        if seq.sched == 0 {
            return false;
        }
        seq.computed += seq.sched;
        seq.sched = 0;
        if self.cfg.enable_prefix_caching {
            let full = (seq.computed / BLOCK).min(seq.prefix_hashes.len() as u32);
            while seq.hashed < full {
                let i = seq.hashed as usize;
                self.pool.register(seq.blocks[i], seq.prefix_hashes[i]);
                seq.hashed += 1;
            }
        }
        if seq.computed < seq.num_tokens() {
            return false; // a prefill chunk short of the last prompt token
        }
        seq.generated += 1;
        let first = seq.generated == 1;
        events.push(EngineEvent::Token {
            id: seq.id,
            at: end,
            first,
        });
        self.stats.generation_tokens += 1;
        if first {
            self.stats.ttft.observe(end.saturating_sub(seq.arrival));
            self.stats.prompt_tokens += seq.prompt as u64;
        } else {
            self.stats.itl.observe(end.saturating_sub(seq.last_token));
        }
        seq.last_token = end;
        if seq.generated < seq.output {
            return false;
        }
        let seq = self.slots[slot as usize].take().expect("scheduled slot");
        events.push(EngineEvent::Finished {
            id: seq.id,
            at: end,
            reason: seq.reason,
        });
        self.stats.e2e.observe(end.saturating_sub(seq.arrival));
        match seq.reason {
            FinishReason::Stop => self.stats.finished_stop += 1,
            _ => self.stats.finished_length += 1,
        }
        self.release_blocks(&seq.blocks);
        self.by_id.remove(&seq.id);
        self.free_slots.push(slot);
        true
    }

    /// Frees a sequence's blocks, last first, so its tail is evicted before its shared prefix.
    fn release_blocks(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            self.pool.release(b);
        }
    }

    fn waiting_key(&self, seq: &Seq) -> (i32, u64) {
        match self.cfg.scheduling {
            Scheduling::Fcfs => (0, seq.order),
            Scheduling::Priority => (seq.priority, seq.order),
        }
    }

    /// Duration of an iteration of `shape`: the cost model, speed and jitter.
    fn duration(&mut self, shape: &BatchShape) -> Micros {
        let mut ms = self.cfg.profile.iteration_ms(shape) / self.speed;
        if self.cfg.jitter > 0.0 {
            ms *= (self.cfg.jitter * self.rng.next_normal()).exp();
        }
        micros_of_ms(ms)
    }

    /// Nothing could be computed: wait for the earliest KV transfer or arrival, or one CPU tick.
    fn idle_wait(&self, now: Micros) -> Micros {
        let transfer = self
            .running
            .iter()
            .filter_map(|&s| self.slots[s as usize].as_ref())
            .filter(|q| q.transferring)
            .map(|q| q.ready_at)
            .min();
        let next = match (transfer, self.next_arrival(now)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match next {
            Some(t) if t > now => t - now,
            _ => micros_of_ms(self.cfg.profile.cpu_overhead_ms / self.speed),
        }
    }

    fn refresh_gauges(&mut self) {
        self.stats.running = self.running.len() as u32 - self.transferring;
        self.stats.waiting = self.waiting.len() as u32 + self.transferring;
        self.stats.kv_blocks_used = self.pool.num_used();
    }
}

/// The longest step the engine takes: 11.6 days, longer than any run. A speed close enough to 0
/// asks for more; taken literally, the microseconds would pass `u64::MAX` (the cast caps them
/// there, and `now + duration` wrapped, so the slowest engine answered at once).
const LONGEST_STEP: Micros = 1_000_000_000_000;

/// `ms` as whole microseconds, at least 1 and at most [`LONGEST_STEP`].
fn micros_of_ms(ms: f64) -> Micros {
    let us = (ms * 1000.0).round();
    if us.is_nan() {
        return LONGEST_STEP;
    }
    us.clamp(1.0, LONGEST_STEP as f64) as Micros
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine slowed past what microseconds can count is as slow as they can say, never
    /// instant: its first token comes after the longest step, not before the request was sent.
    #[test]
    fn an_engine_slower_than_time_can_count_is_slow_not_instant() {
        for speed in [1e-20, f64::MIN_POSITIVE] {
            let mut cfg = EngineConfig::for_profile(Profile::h100_llama3_8b());
            cfg.speed = speed;
            let mut e = Engine::new(cfg).unwrap();
            e.submit(SimRequest::new(1, 100, 2), 7).unwrap();
            let mut ev = Vec::new();
            let took = e.step(7, &mut ev);
            assert_eq!(took, LONGEST_STEP, "speed {speed}");
            for event in &ev {
                if let EngineEvent::Token { at, .. } = event {
                    assert_eq!(*at, 7 + LONGEST_STEP);
                }
            }
        }
    }

    #[test]
    fn tables_are_sized_by_live_requests_not_by_history() {
        let mut e = Engine::new(EngineConfig::for_profile(Profile::tiny())).unwrap();
        let (mut now, mut ev) = (0, Vec::new());
        let mut next = 0;
        for _ in 0..5_000 {
            while e.live_requests() < 16 {
                e.submit(SimRequest::new(next, 40, 3), now).unwrap();
                next += 1;
            }
            ev.clear();
            now += e.step(now, &mut ev);
        }
        assert!(next > 5_000);
        assert!(e.slots.len() <= 16, "slot table grew to {}", e.slots.len());
        assert!(e.by_id.len() <= 16 && e.waiting.len() <= 16 && e.running.len() <= 16);
        assert!(e.sched.capacity() <= 64);
    }
}
