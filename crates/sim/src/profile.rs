//! How long one engine iteration takes: the cost model and its named hardware profiles.
//!
//! One vLLM iteration runs the decode step of every running sequence plus prefill chunks within a
//! token budget. Following FIELD-NOTES ("How long an engine iteration takes", fitted from Vidur's
//! Llama-3-8B profiles, est. ±30%):
//!
//! ```text
//! t_iter = max(t_floor, a + b·N_tok) + c_p·Σ p_i·(p_i + 2·k_i) + c_d·Σ ctx_j + cpu_overhead
//! ```
//!
//! `N_tok` is the number of tokens in the batch, `p_i` a prefill chunk's length, `k_i` the tokens of
//! that sequence already in the KV cache (attention over the cached part is linear, over the chunk
//! itself quadratic), and `ctx_j` each decoding sequence's context length (decode attention reads
//! the whole KV of the sequence: memory bound). The `max(t_floor, ..)` term is the weight-loading
//! floor: a small batch costs as much as reading the weights once.
//!
//! Why this shape and not fixed latencies: the three effects a QoE router exploits all come out of
//! it. TTFT grows with the prompt tokens queued ahead (the linear `b·N_tok` term), ITL grows with the
//! batch (`c_d·Σ ctx` plus `b·N_tok` once past the floor), and a prefill chunk sharing an iteration
//! with decodes slows every one of them (`N_tok` jumps by the chunk length).

//!
//! # Calibration against FIELD-NOTES
//!
//! What the model predicts on an idle engine (no jitter; TTFT includes chunking at 2,048 tokens),
//! against the figures FIELD-NOTES publishes for an H100 (est. ±30%); asserted by
//! `tests/model.rs::h100_profile_matches_field_notes_within_30_percent`:
//!
//! | | FIELD-NOTES | `h100-llama3-8b` | `a100-llama3-8b` | `tiny` |
//! |---|---|---|---|---|
//! | prefill 1k tokens | ≈ 27 ms | 27.0 ms | 73.2 ms | 2.3 ms |
//! | prefill 4k tokens | ≈ 101 ms | 105.5 ms | 303 ms | 9.2 ms |
//! | decode step, batch 64 @ 1k ctx | ≈ 11 ms | 10.5 ms | 16.3 ms | 1.9 ms |
//! | decode step, batch 128 @ 1k ctx | ≈ 14 ms | 14.0 ms | 23.0 ms | 2.6 ms |
//!
//! (`tiny` measured with enough KV and context for every row; its defaults are 16k tokens of KV
//! and `max_model_len` 4096. `cargo test -p qoe-sim --test model -- --ignored --nocapture` prints
//! the full table.)
//! | KV capacity | 430–445k tokens | 430k | 430k | 16k |

use serde::{Deserialize, Serialize};

/// A named set of cost coefficients and engine defaults.
///
/// Times are in milliseconds as in FIELD-NOTES, to keep the published numbers recognisable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Name used on the command line (`--profile`).
    pub name: String,
    /// Weight-loading floor of one iteration, ms.
    pub t_floor_ms: f64,
    /// Fixed part of the linear batch cost, ms.
    pub a_ms: f64,
    /// Per-token part of the linear batch cost, ms per batched token.
    pub b_ms_per_token: f64,
    /// Prefill attention cost, ms per `p·(p + 2k)` token².
    pub c_p_ms: f64,
    /// Decode attention cost, ms per token of context of each decoding sequence.
    pub c_d_ms: f64,
    /// Scheduler and sampling overhead on the CPU per iteration, ms.
    pub cpu_overhead_ms: f64,
    /// KV-cache capacity in tokens (default for `--kv-capacity-tokens`).
    pub kv_capacity_tokens: u64,
    /// Longest prompt + output (default for `--max-model-len`).
    pub max_model_len: u32,
    /// Fixed latency of pulling a prompt's KV from a prefill engine (disaggregated serving), ms.
    pub kv_transfer_base_ms: f64,
    /// Per-prompt-token cost of that transfer, ms per token.
    pub kv_transfer_ms_per_token: f64,
}

/// Names accepted by [`Profile::by_name`].
pub const PROFILE_NAMES: [&str; 3] = ["h100-llama3-8b", "a100-llama3-8b", "tiny"];

/// The shape of one iteration's batch: what the cost model needs to know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchShape {
    /// Tokens computed in the iteration (decodes count one each).
    pub tokens: u64,
    /// `Σ p_i·(p_i + 2·k_i)` over prefill chunks.
    pub prefill_work: u64,
    /// `Σ ctx_j` over decoding sequences.
    pub decode_context: u64,
}

impl BatchShape {
    /// Adds a prefill chunk of `chunk` tokens to a sequence with `cached` tokens already in KV.
    #[inline]
    pub fn add_prefill(&mut self, chunk: u64, cached: u64) {
        self.tokens += chunk;
        self.prefill_work += chunk * (chunk + 2 * cached);
    }

    /// Adds one decode step of a sequence whose context (KV including the new token) is `context`.
    #[inline]
    pub fn add_decode(&mut self, context: u64) {
        self.tokens += 1;
        self.decode_context += context;
    }

    /// True if nothing is computed.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }
}

impl Profile {
    /// Llama-3-8B bf16 on one H100 80GB (FIELD-NOTES: `max(6.2, 3.5 + 0.0215·N)`, `c_p` 5e-7,
    /// `c_d` 5e-5, ~1 ms CPU; 128 KiB of KV per token gives ≈ 430k tokens at 0.9 memory use).
    ///
    /// KV transfer: 128 KiB per token over a 400 Gb/s RDMA link (≈ 50 GB/s) is ≈ 2.6 µs per token,
    /// plus ≈ 1 ms of connector handshake (est.).
    pub fn h100_llama3_8b() -> Profile {
        Profile {
            name: "h100-llama3-8b".into(),
            t_floor_ms: 6.2,
            a_ms: 3.5,
            b_ms_per_token: 0.0215,
            c_p_ms: 5e-7,
            c_d_ms: 5e-5,
            cpu_overhead_ms: 1.0,
            kv_capacity_tokens: 430_000,
            max_model_len: 8192,
            kv_transfer_base_ms: 1.0,
            kv_transfer_ms_per_token: 0.0026,
        }
    }

    /// Llama-3-8B bf16 on one A100 80GB (FIELD-NOTES: `max(10, 2.6 + 0.0665·N)`, `c_p` 1.4e-6,
    /// `c_d` 8e-5). KV transfer over 200 Gb/s (≈ 5.2 µs per token) plus 1 ms.
    pub fn a100_llama3_8b() -> Profile {
        Profile {
            name: "a100-llama3-8b".into(),
            t_floor_ms: 10.0,
            a_ms: 2.6,
            b_ms_per_token: 0.0665,
            c_p_ms: 1.4e-6,
            c_d_ms: 8e-5,
            cpu_overhead_ms: 1.0,
            kv_capacity_tokens: 430_000,
            max_model_len: 8192,
            kv_transfer_base_ms: 1.0,
            kv_transfer_ms_per_token: 0.0052,
        }
    }

    /// A fast, small engine for tests and demos: iterations of ~1–3 ms and a KV cache of 16k tokens
    /// (1,024 blocks), small enough for a test to exhaust. Same shape as the GPU profiles, so the
    /// effects (prefill interference, batch-dependent ITL) are all there, only smaller.
    pub fn tiny() -> Profile {
        Profile {
            name: "tiny".into(),
            t_floor_ms: 1.0,
            a_ms: 0.5,
            b_ms_per_token: 0.0015,
            c_p_ms: 1e-7,
            c_d_ms: 1e-5,
            cpu_overhead_ms: 0.2,
            kv_capacity_tokens: 16_384,
            max_model_len: 4096,
            kv_transfer_base_ms: 0.2,
            kv_transfer_ms_per_token: 0.0005,
        }
    }

    /// The profile called `name` (see [`PROFILE_NAMES`]).
    pub fn by_name(name: &str) -> Option<Profile> {
        match name {
            "h100-llama3-8b" | "h100" => Some(Self::h100_llama3_8b()),
            "a100-llama3-8b" | "a100" => Some(Self::a100_llama3_8b()),
            "tiny" => Some(Self::tiny()),
            _ => None,
        }
    }

    /// Duration of one iteration of shape `batch`, ms, before speed and jitter.
    pub fn iteration_ms(&self, batch: &BatchShape) -> f64 {
        let linear = self.a_ms + self.b_ms_per_token * batch.tokens as f64;
        linear.max(self.t_floor_ms)
            + self.c_p_ms * batch.prefill_work as f64
            + self.c_d_ms * batch.decode_context as f64
            + self.cpu_overhead_ms
    }

    /// Time to pull the KV of `prompt_tokens` tokens from a prefill engine, ms.
    pub fn kv_transfer_ms(&self, prompt_tokens: u32) -> f64 {
        self.kv_transfer_base_ms + self.kv_transfer_ms_per_token * prompt_tokens as f64
    }
}

impl Default for Profile {
    fn default() -> Self {
        Self::h100_llama3_8b()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_resolves() {
        for name in PROFILE_NAMES {
            assert_eq!(Profile::by_name(name).unwrap().name, name);
        }
        assert!(Profile::by_name("b200").is_none());
    }

    #[test]
    fn floor_dominates_small_batches() {
        let p = Profile::h100_llama3_8b();
        let mut one = BatchShape::default();
        one.add_decode(1);
        let mut ten = BatchShape::default();
        for _ in 0..10 {
            ten.add_decode(1);
        }
        // Both under the floor: the same cost but for the tiny attention term.
        assert!((p.iteration_ms(&one) - p.iteration_ms(&ten)).abs() < 0.01);
        assert!((p.iteration_ms(&one) - 7.2).abs() < 0.01);
    }
}
