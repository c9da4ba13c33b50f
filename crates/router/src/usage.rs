//! The output-token count of a non-streamed JSON answer, read from its `usage` object as the body
//! streams past, in bounded memory.
//!
//! The answer is relayed chunk by chunk, never buffered, so its `usage` has to be caught on the
//! way. The scanner looks for the key `"usage"` followed by `:`; it keeps the bytes after the last
//! such key (up to [`CAPTURE_BYTES`]) and, at the end, reads `completion_tokens` (chat,
//! completions) or `output_tokens` (Responses API, Anthropic-style `/v1/messages`) from the object
//! there. The last key wins because `usage` is the top-level summary while an earlier key of that
//! name can be model output (a tool call's `input` object); a later key can only be that summary,
//! wherever the engine puts it (vLLM's Responses API with `enable_response_messages` sends the
//! messages after it). In valid JSON the bytes `"usage"` followed by `:` are always a key: inside a
//! string, a quote is escaped.

/// Bytes kept after the last `"usage":` key: vLLM's usage objects are 100–300 bytes.
pub const CAPTURE_BYTES: usize = 2048;

const KEY: &[u8] = b"\"usage\"";

/// Where the scanner is in the key `"usage"` followed by optional whitespace and `:`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// This many bytes of [`KEY`] matched (0 = looking for its opening quote).
    Key(usize),
    /// The whole key matched: whitespace, then `:` makes it a key.
    Colon,
}

/// Finds the last `"usage":` in a body fed in chunks and keeps what follows it.
#[derive(Debug)]
pub struct UsageScanner {
    state: State,
    capture: Vec<u8>,
}

impl Default for UsageScanner {
    fn default() -> Self {
        Self {
            state: State::Key(0),
            capture: Vec::new(),
        }
    }
}

impl UsageScanner {
    pub fn feed(&mut self, data: &[u8]) {
        let mut i = 0;
        while i < data.len() {
            if self.state == State::Key(0) {
                // Most bytes are not a quote: jump to the next one, keeping what is skipped.
                let skip = memchr::memchr(b'"', &data[i..]).unwrap_or(data.len() - i);
                self.keep(&data[i..i + skip]);
                i += skip;
                if i == data.len() {
                    break;
                }
            }
            let b = data[i];
            self.state = match self.state {
                State::Key(n) if b == KEY[n] => {
                    if n + 1 == KEY.len() {
                        State::Colon
                    } else {
                        State::Key(n + 1)
                    }
                }
                State::Key(_) => State::Key(usize::from(b == b'"')),
                State::Colon if b.is_ascii_whitespace() => State::Colon,
                State::Colon if b == b':' => {
                    self.capture.clear();
                    self.state = State::Key(0);
                    i += 1;
                    continue;
                }
                State::Colon => State::Key(usize::from(b == b'"')),
            };
            self.keep(&data[i..i + 1]);
            i += 1;
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = CAPTURE_BYTES - self.capture.len();
        self.capture
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// `completion_tokens`, else `output_tokens`, of the last `usage` object seen, if it was one.
    pub fn output_tokens(&self) -> Option<u32> {
        #[derive(serde::Deserialize)]
        struct Usage {
            completion_tokens: Option<u64>,
            output_tokens: Option<u64>,
        }
        if self.capture.is_empty() {
            return None;
        }
        let mut values = serde_json::Deserializer::from_slice(&self.capture).into_iter::<Usage>();
        let usage = values.next()?.ok()?;
        let n = usage.completion_tokens.or(usage.output_tokens)?;
        Some(n.min(u32::MAX as u64) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body fed whole, and fed in every split into two and into single bytes.
    fn count(body: &[u8]) -> Option<u32> {
        let mut whole = UsageScanner::default();
        whole.feed(body);
        let expected = whole.output_tokens();
        for cut in 0..=body.len() {
            let mut s = UsageScanner::default();
            s.feed(&body[..cut]);
            s.feed(&body[cut..]);
            assert_eq!(s.output_tokens(), expected, "split at {cut}");
        }
        let mut s = UsageScanner::default();
        for b in body {
            s.feed(std::slice::from_ref(b));
        }
        assert_eq!(s.output_tokens(), expected, "byte by byte");
        expected
    }

    #[test]
    fn reads_each_apis_usage() {
        let chat = br#"{"choices":[],"usage":{"prompt_tokens":5,"total_tokens":12,"completion_tokens": 7}}"#;
        assert_eq!(count(chat), Some(7));
        assert_eq!(count(b"{}"), None);
        assert_eq!(count(br#"{"usage":null}"#), None);
        // vLLM's /v1/responses and /v1/messages answers.
        let responses = br#"{"output":[],"usage":{"input_tokens":15,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"output_tokens_details":{"reasoning_tokens":0,"tool_output_tokens":0},"total_tokens":19},"user":null}"#;
        assert_eq!(count(responses), Some(4));
        let messages =
            br#"{"stop_reason":"max_tokens","usage":{"input_tokens":13,"output_tokens":5}}"#;
        assert_eq!(count(messages), Some(5));
        // Python's json.dumps puts a space after each colon.
        assert_eq!(count(br#"{"usage" : {"completion_tokens": 3}}"#), Some(3));
    }

    #[test]
    fn the_last_usage_key_counts_wherever_it_is() {
        // A tool call's input is the model's own JSON: the usage after it counts.
        let tool = br#"{"content":[{"type":"tool_use","name":"f","input":{"usage":{"output_tokens":3}}}],"usage":{"input_tokens":13,"output_tokens":40}}"#;
        assert_eq!(count(tool), Some(40));
        // vLLM's enable_response_messages puts messages after usage, beyond any tail.
        let messages = format!(
            r#"{{"usage":{{"input_tokens":9,"output_tokens":21}},"output_messages":[{{"role":"assistant","content":"{}"}}]}}"#,
            "x".repeat(10_000)
        );
        assert_eq!(count(messages.as_bytes()), Some(21));
        // "usage" as a value, or inside a string, is not the key.
        let value = br#"{"usage":{"completion_tokens":8},"type":"usage","text":"a \"usage\": 99"}"#;
        assert_eq!(count(value), Some(8));
    }

    #[test]
    fn memory_is_bounded() {
        let mut s = UsageScanner::default();
        s.feed(br#"{"usage":"#);
        for _ in 0..1_000 {
            s.feed(&[b'7'; 1_000]);
        }
        assert!(s.capture.len() <= CAPTURE_BYTES);
        // A usage object longer than the capture reads as none, not as a wrong count.
        assert_eq!(s.output_tokens(), None);
    }
}
