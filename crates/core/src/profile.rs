//! What the router knows about one request before it is routed.
//!
//! One struct handed to every policy, so that a new signal changes no policy signatures.

use serde::Serialize;

/// Which OpenAI-style API the request targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApiKind {
    Chat,
    Completion,
    Embedding,
    /// vLLM's Responses API (`/v1/responses`).
    Responses,
    /// vLLM's Anthropic-style Messages API (`/v1/messages`).
    Messages,
    /// Any other routed API (`/tokenize`, `/v1/rerank`, ...).
    Other,
}

/// Request priority: 1 is the most urgent, 3 the least; 2 when the client says nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Priority(u8);

impl Priority {
    pub const HIGH: Priority = Priority(1);
    pub const DEFAULT: Priority = Priority(2);
    pub const LOW: Priority = Priority(3);
    /// All priorities, most urgent first.
    pub const ALL: [Priority; 3] = [Self::HIGH, Self::DEFAULT, Self::LOW];

    /// `Some` for 1, 2 or 3.
    pub fn new(level: u8) -> Option<Priority> {
        (1..=3).contains(&level).then_some(Priority(level))
    }

    pub fn level(self) -> u8 {
        self.0
    }

    /// 0-based index, for per-priority arrays.
    pub fn index(self) -> usize {
        (self.0 - 1) as usize
    }
}

impl Default for Priority {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Which part of serving dominates the request's experience.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The wait for the first token dominates: long prompt, short answer.
    PrefillDominant,
    /// The streaming of the answer dominates: the expected decode time exceeds the prefill time.
    DecodeDominant,
}

/// The stage of a request when prefill and decode run on different engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Ordinary request: one engine does both.
    Whole,
    /// Carries `kv_transfer_params.do_remote_decode`: its KV goes on to another engine, which
    /// decodes.
    Prefill,
    /// Carries `kv_transfer_params.do_remote_prefill`: its KV was computed elsewhere.
    Decode,
}

/// Where the expected output length came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputSource {
    Header,
    MaxTokens,
    Learned,
}

/// Everything a policy may look at about a request.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestProfile {
    pub model: String,
    pub kind: ApiKind,
    pub stream: bool,
    /// Estimated (or, with a tokenizer, exact) prompt tokens.
    pub prompt_tokens: u32,
    /// Expected output tokens, see `output_source`.
    pub expected_output_tokens: u32,
    pub output_source: OutputSource,
    pub priority: Priority,
    /// Client's TTFT deadline in milliseconds (`x-sla-target-ms`).
    pub sla_ttft_ms: Option<u32>,
    /// Hash of the session key (header or body field), for session affinity.
    pub session_key: Option<u64>,
    /// Chained hashes of the prompt's full blocks (see [`crate::prompt`]).
    pub prefix_hashes: Vec<u64>,
    /// Prompt tokens per prefix block: [`crate::prompt::BLOCK_TOKENS`] by the estimate rule, the
    /// text's own density when a tokenizer counted it (a cached prefix of `k` blocks is
    /// `k × block_tokens` of `prompt_tokens`).
    pub block_tokens: f64,
    pub phase: Phase,
    pub stage: Stage,
}

impl RequestProfile {
    /// A minimal profile, handy for tests, benchmarks and the simulator.
    pub fn new(model: impl Into<String>, prompt_tokens: u32, expected_output_tokens: u32) -> Self {
        RequestProfile {
            model: model.into(),
            kind: ApiKind::Completion,
            stream: true,
            prompt_tokens,
            expected_output_tokens,
            output_source: OutputSource::MaxTokens,
            priority: Priority::DEFAULT,
            sla_ttft_ms: None,
            session_key: None,
            prefix_hashes: Vec::new(),
            block_tokens: crate::prompt::BLOCK_TOKENS as f64,
            phase: Phase::DecodeDominant,
            stage: Stage::Whole,
        }
    }
}
