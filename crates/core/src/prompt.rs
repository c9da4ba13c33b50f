//! The prompt as the router and the simulated engine both see it: a deterministic token estimate and
//! chained prefix-block hashes.
//!
//! Without a tokenizer the router estimates tokens from bytes; the simulated engine uses the very same
//! rule as its "tokenizer", so the router's prefix index and the engine's prefix cache agree on block
//! boundaries. The rule, documented for users: **one token per [`BYTES_PER_TOKEN`] bytes of UTF-8,
//! rounded up**, and a prefix block is [`BLOCK_TOKENS`] tokens (vLLM's default block size), i.e.
//! `BLOCK_TOKENS * BYTES_PER_TOKEN` bytes. English text averages close to four bytes per token with
//! Llama-3-class tokenizers.

/// Bytes of UTF-8 counted as one token.
pub const BYTES_PER_TOKEN: usize = 4;
/// Tokens in one KV / prefix-cache block (vLLM's default block size).
pub const BLOCK_TOKENS: usize = 16;
/// Bytes of prompt text that make one prefix block.
pub const BLOCK_BYTES: usize = BLOCK_TOKENS * BYTES_PER_TOKEN;

/// Estimated token count of `text`: `ceil(len / BYTES_PER_TOKEN)`.
pub fn estimate_tokens(text: &str) -> u32 {
    estimate_tokens_from_len(text.len())
}

/// Estimated token count of a text of `len` bytes.
pub fn estimate_tokens_from_len(len: usize) -> u32 {
    len.div_ceil(BYTES_PER_TOKEN).min(u32::MAX as usize) as u32
}

/// Exact token counts of prompt text (the router's `--tokenizer`, a Hugging Face
/// `tokenizer.json`); without one the analyzer estimates ([`estimate_tokens`]).
pub trait TokenCounter: Send + Sync {
    /// Tokens the engine would make of `text`, its tokenizer's special tokens included.
    fn count(&self, text: &str) -> u32;

    /// Tokens of a chat's prompt as the engine builds it (through the model's chat template);
    /// `None` when this counter has no template, or it cannot render these messages. `request`
    /// is the whole request body (JSON), for what a template reads besides each message's role
    /// and text: `tools`, a message's `tool_calls` or `name`, `add_generation_prompt`,
    /// `chat_template_kwargs`, ...
    fn count_chat(&self, messages: &[ChatMessage<'_>], request: &[u8]) -> Option<u32> {
        let _ = (messages, request);
        None
    }
}

/// One message of a chat, as the analyzer read it (text parts of its content joined).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatMessage<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// A shared [`TokenCounter`]: cheap to clone, equal only to itself.
#[derive(Clone)]
pub struct PromptTokenizer(pub std::sync::Arc<dyn TokenCounter>);

impl PromptTokenizer {
    pub fn count(&self, text: &str) -> u32 {
        self.0.count(text)
    }

    pub fn count_chat(&self, messages: &[ChatMessage<'_>], request: &[u8]) -> Option<u32> {
        self.0.count_chat(messages, request)
    }
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PromptTokenizer")
    }
}

impl PartialEq for PromptTokenizer {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A fast 64-bit hash of `bytes`, eight bytes at a time (prompts can be hundreds of KB, and this
/// runs on every request). Stable across platforms and releases.
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed ^ 0x243f_6a88_85a3_08d3 ^ (bytes.len() as u64);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let word = u64::from_le_bytes(w.try_into().expect("eight bytes"));
        h = mix(h.rotate_left(23) ^ word);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        h = mix(h.rotate_left(23) ^ u64::from_le_bytes(last));
    }
    mix(h)
}

/// One multiply-xorshift round (as in splitmix64's finalizer, halved).
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 32)).wrapping_mul(0xd6e8_feb8_6659_fd93);
    z ^ (z >> 29)
}

/// Chained hashes of the *full* blocks of `text`, at most `max_blocks` of them: block `i`'s hash
/// covers every byte before its end, so equal hashes mean equal prefixes (as vLLM's prefix cache
/// chains block hashes). A trailing partial block is not hashed, as vLLM does not cache it.
pub fn prefix_block_hashes(text: &[u8], max_blocks: usize) -> Vec<u64> {
    let blocks = (text.len() / BLOCK_BYTES).min(max_blocks);
    let mut out = Vec::with_capacity(blocks);
    let mut chained = 0u64;
    for block in text.chunks_exact(BLOCK_BYTES).take(blocks) {
        chained = hash_bytes(chained, block);
        out.push(chained);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_estimate_rounds_up() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("a"), 1);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
    }

    #[test]
    fn block_hashes_chain_over_prefixes() {
        let a = "x".repeat(BLOCK_BYTES * 3 + 5);
        let mut b = "x".repeat(BLOCK_BYTES * 2);
        b.push_str(&"y".repeat(BLOCK_BYTES));
        let ha = prefix_block_hashes(a.as_bytes(), 64);
        let hb = prefix_block_hashes(b.as_bytes(), 64);
        assert_eq!(ha.len(), 3, "partial block not hashed");
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        // Same block content at a different position hashes differently (chained).
        assert_ne!(ha[0], ha[1]);
        assert_eq!(prefix_block_hashes(a.as_bytes(), 1).len(), 1);
    }
}
