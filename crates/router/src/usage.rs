//! The output-token count of a non-streamed JSON answer, read from its top-level `usage` object as
//! the body streams past, in constant memory.
//!
//! The answer is relayed chunk by chunk, never buffered, so its `usage` has to be caught on the
//! way, wherever the engine puts it (vLLM's Responses API with `enable_response_messages` sends the
//! messages after it). The scanner follows the JSON's structure, not its bytes: it tracks strings
//! (and their escapes) and the nesting of objects and arrays, takes a string followed by `:` as a
//! key, and reads `completion_tokens` (chat, completions) or `output_tokens` (Responses API,
//! Anthropic-style `/v1/messages`) only as members of the member `usage` of the top-level object.
//! A key of the same name deeper down (a tool call's `input`, a tool's parameter schema) or inside
//! a string is not it. It validates nothing: on malformed JSON it finds what it finds, never
//! panics, and keeps no more than a key's worth of bytes.

/// Longest key kept for comparison, bytes; a longer one is none of those looked for.
const KEY_MAX: usize = 24;
/// `key_len` of a string that cannot be a key looked for (too long, escaped, or too deep).
const NOT_A_KEY: usize = KEY_MAX + 1;

/// The counts looked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Count {
    Completion,
    Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between tokens.
    Structure,
    /// Inside a string; `escaped` after a backslash.
    Str { escaped: bool },
    /// A string just closed: a `:` next (after whitespace) makes it a key.
    AfterString,
    /// The value of a count in the usage object: digits, after optional whitespace.
    Number {
        count: Count,
        value: u64,
        digits: bool,
    },
}

/// Reads `usage.completion_tokens` / `usage.output_tokens` from a JSON body fed in chunks.
#[derive(Debug)]
pub struct UsageScanner {
    state: State,
    /// Objects and arrays open (outside strings).
    depth: u32,
    key: [u8; KEY_MAX],
    key_len: usize,
    /// The member of the top-level object being read is `usage`.
    in_usage: bool,
    completion: Option<u64>,
    output: Option<u64>,
}

impl Default for UsageScanner {
    fn default() -> Self {
        Self {
            state: State::Structure,
            depth: 0,
            key: [0; KEY_MAX],
            key_len: NOT_A_KEY,
            in_usage: false,
            completion: None,
            output: None,
        }
    }
}

impl UsageScanner {
    pub fn feed(&mut self, data: &[u8]) {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Structure => {
                    // Most bytes between strings are digits, commas and blanks.
                    let Some(skip) = data[i..]
                        .iter()
                        .position(|b| matches!(b, b'"' | b'{' | b'}' | b'[' | b']'))
                    else {
                        return;
                    };
                    i += skip;
                    match data[i] {
                        b'"' => {
                            self.key_len = if matches!(self.depth, 1 | 2) {
                                0
                            } else {
                                NOT_A_KEY
                            };
                            self.state = State::Str { escaped: false };
                        }
                        b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                        _ => self.depth = self.depth.saturating_sub(1),
                    }
                    i += 1;
                }
                State::Str { escaped: true } => {
                    self.key_len = NOT_A_KEY;
                    self.state = State::Str { escaped: false };
                    i += 1;
                }
                State::Str { escaped: false } => {
                    let rest = &data[i..];
                    let end = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
                    self.keep(&rest[..end]);
                    i += end;
                    if end < rest.len() {
                        self.state = if rest[end] == b'"' {
                            State::AfterString
                        } else {
                            State::Str { escaped: true }
                        };
                        i += 1;
                    }
                }
                State::AfterString => match data[i] {
                    b if b.is_ascii_whitespace() => i += 1,
                    b':' => {
                        self.state = self.on_key();
                        i += 1;
                    }
                    // A string value: the byte is read again as structure.
                    _ => self.state = State::Structure,
                },
                State::Number {
                    count,
                    value,
                    digits,
                } => match data[i] {
                    b if b.is_ascii_whitespace() && !digits => i += 1,
                    b @ b'0'..=b'9' => {
                        let value = value.saturating_mul(10).saturating_add(u64::from(b - b'0'));
                        self.state = State::Number {
                            count,
                            value,
                            digits: true,
                        };
                        i += 1;
                    }
                    // The number ended (or was none): the byte is read again as structure.
                    _ => {
                        self.record();
                        self.state = State::Structure;
                    }
                },
            }
        }
    }

    /// Keeps a string's bytes while it may still be a key looked for.
    fn keep(&mut self, bytes: &[u8]) {
        if self.key_len + bytes.len() <= KEY_MAX {
            self.key[self.key_len..self.key_len + bytes.len()].copy_from_slice(bytes);
            self.key_len += bytes.len();
        } else {
            self.key_len = NOT_A_KEY;
        }
    }

    /// A key was read; what comes next.
    fn on_key(&mut self) -> State {
        let key = self.key.get(..self.key_len).unwrap_or_default();
        match self.depth {
            1 => {
                self.in_usage = key == b"usage";
                if self.in_usage {
                    // A repeated `usage` key: the last one counts.
                    (self.completion, self.output) = (None, None);
                }
                State::Structure
            }
            2 if self.in_usage => {
                let count = match key {
                    b"completion_tokens" => Count::Completion,
                    b"output_tokens" => Count::Output,
                    _ => return State::Structure,
                };
                State::Number {
                    count,
                    value: 0,
                    digits: false,
                }
            }
            _ => State::Structure,
        }
    }

    /// The counts with the number being read, if one is.
    fn counts(&self) -> (Option<u64>, Option<u64>) {
        match self.state {
            State::Number {
                count: Count::Completion,
                value,
                digits: true,
            } => (Some(value), self.output),
            State::Number {
                count: Count::Output,
                value,
                digits: true,
            } => (self.completion, Some(value)),
            _ => (self.completion, self.output),
        }
    }

    fn record(&mut self) {
        (self.completion, self.output) = self.counts();
    }

    /// `completion_tokens`, else `output_tokens`, of the top-level `usage` object, if any.
    pub fn output_tokens(&self) -> Option<u32> {
        let (completion, output) = self.counts();
        let n = completion.or(output)?;
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
        let chat = br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":5,"total_tokens":12,"completion_tokens": 7}}"#;
        assert_eq!(count(chat), Some(7));
        assert_eq!(count(b"{}"), None);
        assert_eq!(count(br#"{"usage":null}"#), None);
        // vLLM's /v1/responses and /v1/messages answers.
        let responses = br#"{"output":[],"usage":{"input_tokens":15,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"output_tokens_details":{"reasoning_tokens":0,"tool_output_tokens":0,"output_tokens_per_turn":[]},"total_tokens":19},"user":null}"#;
        assert_eq!(count(responses), Some(4));
        let messages =
            br#"{"stop_reason":"max_tokens","usage":{"input_tokens":13,"output_tokens":5}}"#;
        assert_eq!(count(messages), Some(5));
        // Python's json.dumps puts a space after each colon and comma; pretty-printing newlines.
        assert_eq!(
            count(b"{\n  \"usage\" : {\n    \"completion_tokens\" : 3\n  }\n}"),
            Some(3)
        );
        // The count is the last thing in a body cut short.
        assert_eq!(count(br#"{"usage":{"completion_tokens":12"#), Some(12));
    }

    #[test]
    fn only_the_top_level_usage_counts() {
        // A tool call's input is the model's own JSON: the usage after it counts.
        let tool = br#"{"content":[{"type":"tool_use","name":"f","input":{"usage":{"output_tokens":3}}}],"usage":{"input_tokens":13,"output_tokens":40}}"#;
        assert_eq!(count(tool), Some(40));
        // vLLM's enable_response_messages puts messages after usage, a tool's schema among
        // them, long past any tail.
        let messages = format!(
            r#"{{"usage":{{"input_tokens":9,"output_tokens":21}},"input_messages":[{{"content":[{{"tools":[{{"name":"f","parameters":{{"properties":{{"usage":{{"output_tokens":"x"}}}}}}}}]}}]}}],"output_messages":[{{"role":"assistant","content":"{}"}}]}}"#,
            "x".repeat(10_000)
        );
        assert_eq!(count(messages.as_bytes()), Some(21));
        // "usage" as a value, inside a string, or as an escaped key is not the key.
        let value = br#"{"usage":{"completion_tokens":8},"type":"usage","text":"a \"usage\":{\"completion_tokens\":99}"}"#;
        assert_eq!(count(value), Some(8));
        assert_eq!(count(br#"{"\"usage":{"completion_tokens":99}}"#), None);
        // A count outside the usage object is not one.
        assert_eq!(count(br#"{"output_tokens":5,"completion_tokens":9}"#), None);
        assert_eq!(
            count(br#"{"usage":{"details":{"completion_tokens":9}},"completion_tokens":9}"#),
            None
        );
        // A repeated usage key: the last one.
        assert_eq!(
            count(br#"{"usage":{"completion_tokens":1},"usage":{"output_tokens":2}}"#),
            Some(2)
        );
    }

    #[test]
    fn malformed_input_finds_nothing_and_memory_is_constant() {
        for junk in [
            &b"}}}]]]\"usage\":{\"completion_tokens\":4}"[..],
            b"\"\\",
            b"{\"usage\":{\"completion_tokens\":-3}}",
            b"{\"usage\":{\"completion_tokens\":\"7\"}}",
        ] {
            let mut s = UsageScanner::default();
            s.feed(junk);
            assert_eq!(s.output_tokens(), None, "{}", String::from_utf8_lossy(junk));
        }
        let mut s = UsageScanner::default();
        s.feed(br#"{"usage":{"completion_tokens":"#);
        for _ in 0..1_000 {
            s.feed(&[b'9'; 1_000]);
        }
        assert_eq!(s.output_tokens(), Some(u32::MAX), "saturates");
        assert!(std::mem::size_of::<UsageScanner>() < 128);
    }
}
