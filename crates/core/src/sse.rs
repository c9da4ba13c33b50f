//! Incremental parser for the server-sent events of a streamed OpenAI-style response.
//!
//! The router passes streamed bytes through untouched and watches them on the side (DESIGN,
//! "measure what the user feels"): every event is timestamped by the caller and classified here
//! as a chunk of tokens, a usage report, `[DONE]`, an error, or something else. It sits on the hot
//! path of every streamed token, so:
//!
//! * **No copy in the common case.** Events that lie within one `feed` are read straight from the
//!   caller's chunk; only an event split across feeds is gathered in a buffer.
//! * **Bounded memory.** An event larger than [`SseConfig::max_event_bytes`] is not buffered: its
//!   bytes are skipped up to its end, and it is reported as [`SseEvent::Oversized`] and counted.
//! * **No JSON DOM.** The `data` payload goes through `serde_json` into small derived structs
//!   whose custom leaves only answer "is this string/array non-empty?": strings are never
//!   allocated, unknown fields (ids, logprobs) are skipped in place.
//!
//! Framing follows the WHATWG server-sent events spec: lines end in CRLF, LF or CR (a chunk may
//! split a CRLF, or a UTF-8 character, anywhere); a blank line ends an event; `data:` lines are
//! joined with `\n`; `:` lines are comments; an event without data is not dispatched; a leading
//! UTF-8 BOM is skipped. One liberty: [`SseParser::finish`] dispatches an event left unterminated
//! at the end of the stream, where the spec drops it, so a truncated stream still counts its last
//! tokens.
//!
//! ## Counting rule
//!
//! * A chunk counts **one token per choice** that carries a token: a completions choice with a
//!   `text` string, a chat choice whose `delta.content`, `delta.reasoning_content`,
//!   `delta.reasoning` or `delta.tool_calls` is non-empty, or whose `delta.content` (or reasoning,
//!   from vLLM's reasoning parsers) is an empty string with no `role` beside it. vLLM emits one chunk per generated token by default, and a
//!   token whose text its detokenizer holds back (part of a multi-byte character, EOS, a stop
//!   string) still gets its chunk, with empty text; only the first chat chunk (`role` with empty
//!   `content`) carries none. So this is exact for vLLM, and a lower bound where an engine batches
//!   several tokens per chunk.
//! * Responses API (`/v1/responses`) and Anthropic-style (`/v1/messages`) streams: an event whose
//!   `type` ends in `.delta` (`response.output_text.delta`, `response.reasoning_text.delta`,
//!   `response.function_call_arguments.delta`, ...; not the base64 audio of an `audio.delta`) or
//!   is `content_block_delta` counts one token.
//!   Their usage (`response.usage` of `response.completed`; the top-level `usage` of
//!   `message_delta`, `input_tokens` / `output_tokens`) is read as a usage report; a `type` of
//!   `error` or `response.failed` is an error.
//! * When a chunk that carries one choice also carries `usage.completion_tokens` (vLLM's
//!   `stream_options.continuous_usage_stats`), the **increase of `completion_tokens`** since the
//!   previous such report for the same choice `index` is the count instead (vLLM counts each
//!   choice apart): exact whatever the chunking. The first [`TRACKED_CHOICES`] choices are
//!   followed so; a chunk of a later choice, or of several, is counted by its content. Such a chunk is a
//!   [`SseEvent::Tokens`] if the count is positive or any choice shows content (so its arrival
//!   time is still a token time), else a [`SseEvent::Usage`].
//! * A usage report with no choices (the final chunk under `stream_options.include_usage`) is a
//!   [`SseEvent::Usage`] and counts nothing: its `completion_tokens` is the authoritative total for
//!   reconciling the count at the end.

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;

/// Bounds of an [`SseParser`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SseConfig {
    /// Largest event that is buffered and classified, in bytes: its lines with their line endings,
    /// not the blank line that ends it. An OpenAI token
    /// chunk is a few hundred bytes, a few KB with `top_logprobs`; 64 KiB leaves room for big
    /// tool-call chunks while bounding memory per stream.
    pub max_event_bytes: usize,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig {
            max_event_bytes: 64 * 1024,
        }
    }
}

/// Token counts from an OpenAI `usage` object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

/// What one complete event was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SseEvent {
    /// A chunk carrying generated text: `count` tokens by the counting rule (module docs), and
    /// the chunk's usage if it had one.
    Tokens { count: u32, usage: Option<Usage> },
    /// A usage report that carries no new tokens.
    Usage(Usage),
    /// `data: [DONE]`.
    Done,
    /// An error: `event: error`, a payload with a non-null `error`, or `"object": "error"`.
    Error,
    /// Anything else with data: the first chat chunk (role only), a finish chunk without a delta,
    /// a Responses API event other than a delta, non-JSON data.
    Other,
    /// An event over [`SseConfig::max_event_bytes`], dropped unread; `bytes` is its size.
    Oversized { bytes: usize },
}

/// Counters since the parser was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SseStats {
    /// Bytes fed.
    pub bytes: u64,
    /// Events dispatched (all kinds but [`SseEvent::Oversized`]).
    pub events: u64,
    /// Events dropped for their size.
    pub oversized: u64,
    /// Tokens counted, the sum of [`SseEvent::Tokens`] counts.
    pub tokens: u64,
}

/// Incremental SSE parser for one response stream. Feed it byte chunks as they arrive; it calls
/// back once per complete event.
#[derive(Clone, Debug)]
pub struct SseParser {
    cfg: SseConfig,
    /// Bytes of the current event received in earlier feeds (at most `max_event_bytes`).
    buf: Vec<u8>,
    /// Joined data of a multi-line `data:` event.
    scratch: Vec<u8>,
    /// The next byte starts a line.
    at_line_start: bool,
    /// The last byte fed was a CR: an LF right after it is part of the same line ending.
    skip_lf: bool,
    /// The current event is over the limit: skip to its end.
    discarding: bool,
    /// Bytes of the current event skipped so far.
    discarded: usize,
    /// Leading BOM bytes matched so far; 3 once the stream start is settled.
    bom: u8,
    /// The last `usage.completion_tokens` seen on a chunk with choices, per choice index (vLLM
    /// reports each choice's own count); see [`TRACKED_CHOICES`].
    last_completion: [Option<u64>; TRACKED_CHOICES],
    stats: SseStats,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser::new(SseConfig::default())
    }
}

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

impl SseParser {
    pub fn new(cfg: SseConfig) -> Self {
        SseParser {
            cfg,
            buf: Vec::new(),
            scratch: Vec::new(),
            at_line_start: true,
            skip_lf: false,
            discarding: false,
            discarded: 0,
            bom: 0,
            last_completion: [None; TRACKED_CHOICES],
            stats: SseStats::default(),
        }
    }

    pub fn config(&self) -> SseConfig {
        self.cfg
    }

    pub fn stats(&self) -> SseStats {
        self.stats
    }

    /// Feeds the next bytes of the stream; `on_event` is called for each event they complete,
    /// in order.
    pub fn feed<F: FnMut(SseEvent)>(&mut self, chunk: &[u8], mut on_event: F) {
        self.stats.bytes += chunk.len() as u64;
        let n = chunk.len();
        let mut i = self.skip_bom(chunk);
        let mut ev_start = i;
        while i < n {
            if self.skip_lf {
                self.skip_lf = false;
                if chunk[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            let Some(rel) = find_eol(&chunk[i..]) else {
                self.at_line_start = false;
                break;
            };
            let j = i + rel;
            let blank = self.at_line_start && j == i;
            i = j + 1;
            if chunk[j] == b'\r' {
                if i < n {
                    if chunk[i] == b'\n' {
                        i += 1;
                    }
                } else {
                    self.skip_lf = true;
                }
            }
            self.at_line_start = true;
            if blank {
                self.end_event(&chunk[ev_start..j], &mut on_event);
                ev_start = i;
            }
        }
        self.keep_tail(&chunk[ev_start..]);
    }

    /// Ends the stream: an unterminated last event is dispatched (see the module docs), and the
    /// parser is reset for reuse (counters are kept). Returns the counters.
    pub fn finish<F: FnMut(SseEvent)>(&mut self, mut on_event: F) -> SseStats {
        if self.discarding || !self.buf.is_empty() {
            self.end_event(&[], &mut on_event);
        }
        let stats = self.stats;
        *self = SseParser {
            buf: std::mem::take(&mut self.buf),
            scratch: std::mem::take(&mut self.scratch),
            stats,
            ..SseParser::new(self.cfg)
        };
        stats
    }

    /// Bytes of the event left unfinished by what was fed so far (0 at an event boundary), or
    /// `None` while an event over the size limit is being skipped. A relay that forwards only
    /// complete events holds back this many bytes of what it received.
    pub fn unfinished_len(&self) -> Option<usize> {
        (!self.discarding).then_some(self.buf.len())
    }

    /// Feeds `chunk` and collects its events (convenience for tests and tools; the callback form
    /// allocates nothing).
    pub fn feed_to_vec(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        self.feed(chunk, |e| out.push(e));
        out
    }

    fn skip_bom(&mut self, chunk: &[u8]) -> usize {
        let mut i = 0;
        while self.bom < 3 && i < chunk.len() {
            if chunk[i] == BOM[self.bom as usize] {
                self.bom += 1;
                i += 1;
            } else {
                // Not a BOM (a partial match cannot be valid UTF-8 anyway; its bytes are dropped).
                self.bom = 3;
            }
        }
        i
    }

    /// The current event ends with `part` (its bytes in this feed, before the blank line).
    fn end_event<F: FnMut(SseEvent)>(&mut self, part: &[u8], on_event: &mut F) {
        let total = self.buf.len() + part.len();
        if self.discarding || total > self.cfg.max_event_bytes {
            let bytes = if self.discarding {
                self.discarded + part.len()
            } else {
                total
            };
            self.discarding = false;
            self.discarded = 0;
            self.buf.clear();
            self.stats.oversized += 1;
            on_event(SseEvent::Oversized { bytes });
            return;
        }
        let ev = if self.buf.is_empty() {
            classify(part, &mut self.scratch, &mut self.last_completion)
        } else {
            self.buf.extend_from_slice(part);
            let ev = classify(&self.buf, &mut self.scratch, &mut self.last_completion);
            self.buf.clear();
            ev
        };
        if let Some(ev) = ev {
            self.stats.events += 1;
            if let SseEvent::Tokens { count, .. } = ev {
                self.stats.tokens += count as u64;
            }
            on_event(ev);
        }
    }

    /// Keeps the unfinished event's bytes from this feed, within the size bound.
    fn keep_tail(&mut self, tail: &[u8]) {
        if tail.is_empty() {
            return;
        }
        if self.discarding {
            self.discarded += tail.len();
        } else if self.buf.len() + tail.len() > self.cfg.max_event_bytes {
            self.discarding = true;
            self.discarded = self.buf.len() + tail.len();
            self.buf.clear();
        } else {
            self.buf.extend_from_slice(tail);
        }
    }
}

/// Index of the first CR or LF, eight bytes at a time (framing is scanned twice per event, and
/// a byte loop was a third of the parser's time). The "has a zero byte" test on `word ^ needle`
/// flags false positives only above a true match, so the lowest flagged byte is the first match.
#[inline]
fn find_eol(b: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const CR: u64 = LO * b'\r' as u64;
    const LF: u64 = LO * b'\n' as u64;
    let zero = |x: u64| x.wrapping_sub(LO) & !x & HI;
    let mut chunks = b.chunks_exact(8);
    let mut off = 0;
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let w = u64::from_le_bytes(w);
        let t = zero(w ^ CR) | zero(w ^ LF);
        if t != 0 {
            return Some(off + (t.trailing_zeros() / 8) as usize);
        }
        off += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&c| c == b'\n' || c == b'\r')
        .map(|p| off + p)
}

/// Reads one complete event (its lines, without the blank line) and classifies it; `None` when
/// it has no data (comments, keep-alives, stray blank lines).
/// Choices whose continuous usage counts are followed one by one; a chunk of a choice beyond
/// these, or with several choices, is counted by its content instead.
const TRACKED_CHOICES: usize = 4;

fn classify(
    ev: &[u8],
    scratch: &mut Vec<u8>,
    last: &mut [Option<u64>; TRACKED_CHOICES],
) -> Option<SseEvent> {
    let mut data: Option<&[u8]> = None;
    let mut joined = false;
    let mut is_error_event = false;
    let mut i = 0;
    while i < ev.len() {
        let end = find_eol(&ev[i..]).map_or(ev.len(), |r| i + r);
        let line = &ev[i..end];
        i = end + 1;
        if end < ev.len() && ev[end] == b'\r' && ev.get(i) == Some(&b'\n') {
            i += 1;
        }
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (field, value) = match line.iter().position(|&c| c == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => match data {
                None => data = Some(value),
                Some(first) => {
                    if !joined {
                        scratch.clear();
                        scratch.extend_from_slice(first);
                        joined = true;
                    }
                    scratch.push(b'\n');
                    scratch.extend_from_slice(value);
                }
            },
            b"event" => is_error_event = value == b"error",
            _ => {}
        }
    }
    let data: &[u8] = if joined { scratch } else { data? };
    if data.is_empty() {
        return None;
    }
    if is_error_event {
        return Some(SseEvent::Error);
    }
    let trimmed = data.trim_ascii();
    if trimmed == b"[DONE]" {
        return Some(SseEvent::Done);
    }
    if trimmed.first() != Some(&b'{') {
        return Some(SseEvent::Other);
    }
    // Checked as UTF-8 once, the payload's keys and strings are not checked again one by one;
    // a payload that is not UTF-8 is read as bytes, as before.
    let parsed = match std::str::from_utf8(trimmed) {
        Ok(text) => serde_json::from_str::<ChunkJson>(text),
        Err(_) => serde_json::from_slice::<ChunkJson>(trimmed),
    };
    let Ok(chunk) = parsed else {
        return Some(SseEvent::Other);
    };
    Some(count_chunk(&chunk, last))
}

/// Applies the counting rule to a parsed chunk.
fn count_chunk(chunk: &ChunkJson, last: &mut [Option<u64>; TRACKED_CHOICES]) -> SseEvent {
    if chunk.error.is_some() || chunk.object.is_some_and(|o| o.0) || chunk.kind == EventKind::Error
    {
        return SseEvent::Error;
    }
    let usage = chunk
        .usage
        .or_else(|| chunk.response.and_then(|r| r.usage))
        .map(|u| Usage {
            prompt_tokens: u.prompt_tokens.or(u.input_tokens),
            completion_tokens: u.completion_tokens.or(u.output_tokens),
        });
    let content = chunk.choices.with_content + u32::from(chunk.kind == EventKind::Delta);
    let tracked = chunk
        .choices
        .single_index
        .and_then(|i| last.get_mut(i as usize));
    match (usage.and_then(|u| u.completion_tokens), tracked) {
        (Some(c), Some(last)) => {
            let prev = last.unwrap_or(0);
            let count = c.saturating_sub(prev).min(u32::MAX as u64) as u32;
            *last = Some(c.max(prev));
            if count > 0 || content > 0 {
                SseEvent::Tokens { count, usage }
            } else {
                SseEvent::Usage(usage.unwrap_or_default())
            }
        }
        (Some(_), None) if chunk.choices.total > 0 && content == 0 => {
            SseEvent::Usage(usage.unwrap_or_default())
        }
        _ if content > 0 => SseEvent::Tokens {
            count: content,
            usage,
        },
        _ => match usage {
            Some(u) => SseEvent::Usage(u),
            None => SseEvent::Other,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// The slice of an OpenAI chunk the observer reads. Everything else is skipped by serde.

#[derive(Deserialize)]
struct ChunkJson {
    #[serde(default)]
    choices: Choices,
    #[serde(default)]
    usage: Option<UsageJson>,
    #[serde(default)]
    error: Option<IgnoredAny>,
    #[serde(default)]
    object: Option<IsError>,
    /// The event type of Responses API and Anthropic-style streams.
    #[serde(default, rename = "type")]
    kind: EventKind,
    /// The response object of Responses API events (`response.completed` has the usage).
    #[serde(default)]
    response: Option<ResponseJson>,
}

#[derive(Clone, Copy, Deserialize)]
struct UsageJson {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    /// The Responses API's and Anthropic's names.
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

#[derive(Clone, Copy, Deserialize)]
struct ResponseJson {
    #[serde(default)]
    usage: Option<UsageJson>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: Index,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Text,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    role: Option<IgnoredAny>,
    #[serde(default)]
    content: Text,
    #[serde(default)]
    reasoning_content: Text,
    #[serde(default)]
    reasoning: Text,
    #[serde(default)]
    tool_calls: Text,
}

impl Choice {
    /// Whether this choice carries a generated token (module docs, "Counting rule").
    fn has_token(&self) -> bool {
        match &self.delta {
            Some(d) => {
                let text = [d.content, d.reasoning_content, d.reasoning];
                text.iter()
                    .chain([&d.tool_calls])
                    .any(|t| *t == Text::Content)
                    || (text.contains(&Text::Empty) && d.role.is_none())
            }
            None => self.text != Text::Absent,
        }
    }
}

/// `choices`, reduced to two counts while deserializing (no `Vec`).
#[derive(Default)]
struct Choices {
    total: u32,
    with_content: u32,
    /// The choice's `index` when there is exactly one (absent: 0).
    single_index: Option<u32>,
}

impl<'de> Deserialize<'de> for Choices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Choices;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices, A::Error> {
                let mut c = Choices::default();
                while let Some(choice) = seq.next_element::<Choice>()? {
                    c.total = c.total.saturating_add(1);
                    c.single_index = (c.total == 1).then_some(choice.index.0.unwrap_or(0));
                    if choice.has_token() {
                        c.with_content = c.with_content.saturating_add(1);
                    }
                }
                Ok(c)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Choices, E> {
                Ok(Choices::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// A leaf of interest, reduced to a small value while deserializing: strings are read without
/// allocating (escaped ones go through serde_json's scratch buffer), everything else is skipped.
trait Leaf: Sized {
    fn from_str(s: &str) -> Self;
    /// An array, by whether it has elements.
    fn from_seq(non_empty: bool) -> Self;
    /// A non-negative integer.
    fn from_u64(_: u64) -> Self {
        Self::OTHER
    }
    /// Null, another number, a boolean or an object.
    const OTHER: Self;
}

struct LeafVisitor<T>(PhantomData<T>);

impl<'de, T: Leaf> Visitor<'de> for LeafVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
        Ok(T::from_str(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        let mut any = false;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            any = true;
        }
        Ok(T::from_seq(any))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(T::OTHER)
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::OTHER)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Ok(T::OTHER)
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
        Ok(u64::try_from(n).map_or(T::OTHER, T::from_u64))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
        Ok(T::from_u64(n))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Ok(T::OTHER)
    }
}

fn leaf<'de, T: Leaf, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(LeafVisitor(PhantomData))
}

/// What a text leaf holds: nothing (absent, null, not a string or array), an empty string or
/// array, or content.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Text {
    #[default]
    Absent,
    Empty,
    Content,
}

impl Leaf for Text {
    fn from_str(s: &str) -> Self {
        Self::from_seq(!s.is_empty())
    }
    fn from_seq(non_empty: bool) -> Self {
        if non_empty {
            Text::Content
        } else {
            Text::Empty
        }
    }
    const OTHER: Self = Text::Absent;
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d)
    }
}

/// A choice's `index`: a small non-negative integer, or nothing (any other value is skipped).
#[derive(Default)]
struct Index(Option<u32>);

impl Leaf for Index {
    fn from_str(_: &str) -> Self {
        Index(None)
    }
    fn from_seq(_: bool) -> Self {
        Index(None)
    }
    fn from_u64(n: u64) -> Self {
        Index(u32::try_from(n).ok())
    }
    const OTHER: Self = Index(None);
}

impl<'de> Deserialize<'de> for Index {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d)
    }
}

/// What an event's `type` says (Responses API and Anthropic-style streams).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum EventKind {
    #[default]
    Other,
    /// A delta of generated output: one token.
    Delta,
    /// `error` or `response.failed`.
    Error,
}

impl Leaf for EventKind {
    fn from_str(s: &str) -> Self {
        // Audio bytes are not tokens (`response.audio.delta`, `response.output_audio.delta`);
        // their transcript (`response.audio.transcript.delta`) is.
        if (s.ends_with(".delta") && !s.ends_with("audio.delta")) || s == "content_block_delta" {
            EventKind::Delta
        } else if s == "error" || s == "response.failed" {
            EventKind::Error
        } else {
            EventKind::Other
        }
    }
    fn from_seq(_: bool) -> Self {
        EventKind::Other
    }
    const OTHER: Self = EventKind::Other;
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d)
    }
}

/// Whether a value is the string `"error"`.
#[derive(Clone, Copy)]
struct IsError(bool);

impl Leaf for IsError {
    fn from_str(s: &str) -> Self {
        IsError(s == "error")
    }
    fn from_seq(_: bool) -> Self {
        IsError(false)
    }
    const OTHER: Self = IsError(false);
}

impl<'de> Deserialize<'de> for IsError {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        leaf(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chat(content: &str) -> String {
        format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n",
            serde_json::to_string(content).unwrap()
        )
    }

    fn all(input: &[u8]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = p.feed_to_vec(input);
        p.finish(|e| out.push(e));
        out
    }

    fn tok(count: u32) -> SseEvent {
        SseEvent::Tokens { count, usage: None }
    }

    #[test]
    fn a_vllm_chat_stream() {
        let mut s = String::new();
        s.push_str("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
        s.push_str(&chat("Hello"));
        s.push_str(&chat(" wor\"ld\n\u{e9}"));
        s.push_str("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"logprobs\":null,\"finish_reason\":\"stop\",\"stop_reason\":null}]}\n\n");
        s.push_str("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"total_tokens\":10,\"completion_tokens\":3}}\n\n");
        s.push_str("data: [DONE]\n\n");
        // The last chunk is the token that ended it (EOS or a stop string), with no text.
        let want = vec![
            SseEvent::Other,
            tok(1),
            tok(1),
            tok(1),
            SseEvent::Usage(Usage {
                prompt_tokens: Some(7),
                completion_tokens: Some(3),
            }),
            SseEvent::Done,
        ];
        assert_eq!(all(s.as_bytes()), want);
        // Byte by byte, and over CRLF or CR line endings.
        let mut p = SseParser::default();
        let mut got = vec![];
        for b in s.as_bytes() {
            p.feed(std::slice::from_ref(b), |e| got.push(e));
        }
        assert_eq!(got, want);
        assert_eq!(p.stats().tokens, 3);
        assert_eq!(p.stats().events, 6);
        assert_eq!(p.stats().bytes, s.len() as u64);
        assert_eq!(all(s.replace('\n', "\r\n").as_bytes()), want);
        assert_eq!(all(s.replace('\n', "\r").as_bytes()), want);
    }

    #[test]
    fn completions_reasoning_and_tool_calls() {
        let ev = |d: &str| all(format!("data: {d}\n\n").as_bytes());
        assert_eq!(
            ev(r#"{"choices":[{"index":0,"text":" a","logprobs":null}]}"#),
            [tok(1)]
        );
        // vLLM sends a token whose text it holds back (EOS, part of a character) with empty text.
        assert_eq!(ev(r#"{"choices":[{"index":0,"text":""}]}"#), [tok(1)]);
        assert_eq!(
            ev(r#"{"choices":[{"index":0,"text":null,"finish_reason":"stop"}]}"#),
            [SseEvent::Other]
        );
        assert_eq!(
            ev(r#"{"choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop"}]}"#),
            [tok(1)]
        );
        // Reasoning parsers send a held-back token as empty reasoning.
        assert_eq!(
            ev(r#"{"choices":[{"index":0,"delta":{"reasoning":""}}]}"#),
            [tok(1)]
        );
        assert_eq!(
            ev(r#"{"choices":[{"index":0,"delta":{"reasoning_content":"","content":null}}]}"#),
            [tok(1)]
        );
        // Both usage spellings in one object.
        let both = r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":3,"input_tokens":3}}"#;
        let usage = Some(Usage {
            prompt_tokens: Some(3),
            completion_tokens: None,
        });
        assert_eq!(ev(both), [SseEvent::Tokens { count: 1, usage }]);
        // The first chat chunk names the role and carries no token; a finish without a delta none.
        assert_eq!(
            ev(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#),
            [SseEvent::Other]
        );
        assert_eq!(
            ev(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"}}]}"#),
            [tok(1)]
        );
        assert_eq!(
            ev(r#"{"choices":[{"index":0,"delta":{"role":null,"content":""}}]}"#),
            [tok(1)]
        );
        assert_eq!(
            ev(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#),
            [SseEvent::Other]
        );
        assert_eq!(
            ev(r#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#),
            [tok(1)]
        );
        assert_eq!(
            ev(r#"{"choices":[{"delta":{"reasoning":"hm"}}]}"#),
            [tok(1)]
        );
        assert_eq!(
            ev(
                r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\""}}]}}]}"#
            ),
            [tok(1)]
        );
        assert_eq!(
            ev(r#"{"choices":[{"delta":{"tool_calls":[]}}]}"#),
            [SseEvent::Other]
        );
        assert_eq!(
            ev(r#"{"choices":[{"delta":{"content":null}}]}"#),
            [SseEvent::Other]
        );
        // n = 2 in one chunk: one token per choice with content.
        assert_eq!(
            ev(
                r#"{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}},{"index":2,"delta":{}}]}"#
            ),
            [tok(2)]
        );
        assert_eq!(ev(r#"{"choices":null}"#), [SseEvent::Other]);
        // include_usage without continuous stats: intermediate chunks carry `"usage": null`.
        assert_eq!(
            ev(r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}"#),
            [tok(1)]
        );
    }

    /// Events as vLLM 0.32 streams them on `/v1/responses` and `/v1/messages` (shortened).
    #[test]
    fn responses_and_messages_streams() {
        let ev = |d: &str| all(format!("data: {d}\n\n").as_bytes());
        let created = r#"{"response":{"id":"resp_1","object":"response","output":[],"status":"in_progress","usage":null},"sequence_number":0,"type":"response.created"}"#;
        assert_eq!(ev(created), [SseEvent::Other]);
        let part = r#"{"content_index":0,"item_id":"msg_1","output_index":0,"part":{"annotations":[],"text":"","type":"output_text","logprobs":[]},"sequence_number":3,"type":"response.content_part.added"}"#;
        assert_eq!(ev(part), [SseEvent::Other]);
        let delta = r#"{"content_index":0,"delta":"bo","item_id":"msg_1","logprobs":[],"output_index":0,"sequence_number":4,"type":"response.output_text.delta"}"#;
        assert_eq!(ev(delta), [tok(1)]);
        let reasoning = r#"{"delta":"hm","item_id":"rs_1","output_index":0,"type":"response.reasoning_text.delta"}"#;
        assert_eq!(ev(reasoning), [tok(1)]);
        let audio = r#"{"delta":"UklGRg==","item_id":"msg_2","output_index":1,"type":"response.audio.delta"}"#;
        assert_eq!(ev(audio), [SseEvent::Other]);
        let audio = r#"{"delta":"UklGRg==","item_id":"msg_2","output_index":1,"type":"response.output_audio.delta"}"#;
        assert_eq!(ev(audio), [SseEvent::Other]);
        let transcript = r#"{"delta":"hi","item_id":"msg_2","output_index":1,"type":"response.audio.transcript.delta"}"#;
        assert_eq!(ev(transcript), [tok(1)]);
        let done = r#"{"content_index":0,"item_id":"msg_1","output_index":0,"text":"bo tute its","type":"response.output_text.done"}"#;
        assert_eq!(ev(done), [SseEvent::Other]);
        let completed = r#"{"response":{"id":"resp_1","output":[{"content":[{"text":"bo tute its","type":"output_text"}]}],"status":"completed","usage":{"input_tokens":15,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"total_tokens":19}},"sequence_number":11,"type":"response.completed"}"#;
        let usage = Usage {
            prompt_tokens: Some(15),
            completion_tokens: Some(4),
        };
        assert_eq!(ev(completed), [SseEvent::Usage(usage)]);
        let failed = r#"{"response":{"id":"resp_1","status":"failed","error":{"code":"server_error","message":"x"}},"type":"response.failed"}"#;
        assert_eq!(ev(failed), [SseEvent::Error]);
        assert_eq!(
            ev(r#"{"type":"error","code":"x","message":"y","sequence_number":2}"#),
            [SseEvent::Error]
        );
        // Anthropic-style /v1/messages.
        let start = r#"{"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[],"usage":{"input_tokens":13,"output_tokens":0}}}"#;
        assert_eq!(ev(start), [SseEvent::Other]);
        let block = r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":" string"},"index":0}"#;
        assert_eq!(ev(block), [tok(1)]);
        let end = r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},"usage":{"input_tokens":13,"output_tokens":5}}"#;
        let usage = Usage {
            prompt_tokens: Some(13),
            completion_tokens: Some(5),
        };
        assert_eq!(ev(end), [SseEvent::Usage(usage)]);
        assert_eq!(ev(r#"{"type":"message_stop"}"#), [SseEvent::Other]);
        // A `type` that is not a string is ignored, not an error.
        assert_eq!(ev(r#"{"type":{"a":1},"choices":[]}"#), [SseEvent::Other]);
    }

    /// vLLM with `n` = 2 and continuous usage: each choice's chunks carry that choice's count.
    #[test]
    fn continuous_usage_is_followed_per_choice() {
        let chunk = |i: u32, c: u64| {
            format!("data: {{\"choices\":[{{\"index\":{i},\"text\":\"x\"}}],\"usage\":{{\"prompt_tokens\":2,\"completion_tokens\":{c}}}}}\n\n")
        };
        let mut s = String::new();
        for (i, c) in [
            (0, 1),
            (0, 2),
            (1, 1),
            (0, 3),
            (1, 2),
            (0, 4),
            (1, 3),
            (1, 4),
        ] {
            s.push_str(&chunk(i, c));
        }
        let mut p = SseParser::default();
        p.feed(s.as_bytes(), |_| {});
        assert_eq!(p.stats().tokens, 8);
        // Beyond the tracked choices, each chunk counts by its content.
        let mut p = SseParser::default();
        p.feed(format!("{}{}", chunk(9, 1), chunk(9, 2)).as_bytes(), |_| {});
        assert_eq!(p.stats().tokens, 2);
    }

    #[test]
    fn continuous_usage_counts_the_increase() {
        let chunk = |content: &str, c: u64| {
            format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{c},\"total_tokens\":{}}}}}\n\n",
                c + 5
            )
        };
        let mut s = String::new();
        s.push_str("data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":0,\"total_tokens\":5}}\n\n");
        s.push_str(&chunk("a", 1));
        s.push_str(&chunk("bcd", 4)); // three tokens released at once (detokenizer hold-back)
        s.push_str(&chunk("e", 4)); // visible text, no new token: still a token-time event
        s.push_str("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4,\"total_tokens\":9}}\n\n");
        s.push_str("data: [DONE]\n\n");
        let u = |c| {
            Some(Usage {
                prompt_tokens: Some(5),
                completion_tokens: Some(c),
            })
        };
        let got = all(s.as_bytes());
        assert_eq!(
            got,
            vec![
                SseEvent::Usage(u(0).unwrap()),
                SseEvent::Tokens {
                    count: 1,
                    usage: u(1)
                },
                SseEvent::Tokens {
                    count: 3,
                    usage: u(4)
                },
                SseEvent::Tokens {
                    count: 0,
                    usage: u(4)
                },
                SseEvent::Usage(u(4).unwrap()),
                SseEvent::Done,
            ]
        );
        let mut p = SseParser::default();
        p.feed(s.as_bytes(), |_| {});
        assert_eq!(
            p.stats().tokens,
            4,
            "the sum of counts is the final completion_tokens"
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            all(b"data: {\"error\":{\"message\":\"boom\",\"type\":\"InternalServerError\",\"code\":500}}\n\n"),
            [SseEvent::Error]
        );
        assert_eq!(
            all(b"data: {\"object\":\"error\",\"message\":\"x\",\"code\":400}\n\n"),
            [SseEvent::Error]
        );
        assert_eq!(all(b"event: error\ndata: oops\n\n"), [SseEvent::Error]);
        assert_eq!(
            all(b"data: {\"error\":null,\"choices\":[{\"text\":\"a\"}]}\n\n"),
            [tok(1)]
        );
    }

    #[test]
    fn framing_details() {
        // Comments and keep-alives dispatch nothing; `data` without a space; field without colon.
        assert_eq!(all(b": ping\n\n: ping\r\n\r\n"), []);
        assert_eq!(all(b"data:[DONE]\n\n"), [SseEvent::Done]);
        assert_eq!(all(b"data\n\n"), [], "empty data is not dispatched");
        assert_eq!(all(b"id: 3\nretry: 10\n\n"), []);
        assert_eq!(all(b"event: ping\ndata: hi\n\n"), [SseEvent::Other]);
        // Multi-line data is joined with \n before parsing.
        assert_eq!(
            all(b"data: {\"choices\":\ndata: [{\"text\":\"x\"}]}\n\n"),
            [tok(1)]
        );
        assert_eq!(all(b"data: not json\n\n"), [SseEvent::Other]);
        assert_eq!(all(b"data: {\"choices\": [\n\n"), [SseEvent::Other]);
        // BOM at the start is skipped, even split.
        let mut p = SseParser::default();
        let mut got = p.feed_to_vec(&[0xEF, 0xBB]);
        got.extend(p.feed_to_vec(b"\xBFdata: [DONE]\n\n"));
        assert_eq!(got, [SseEvent::Done]);
        // An unterminated last event is flushed by finish, not by feed.
        let mut p = SseParser::default();
        assert_eq!(p.feed_to_vec(b"data: [DONE]\n"), []);
        let mut got = vec![];
        p.finish(|e| got.push(e));
        assert_eq!(got, [SseEvent::Done]);
        // CR at the end of a feed, LF at the start of the next: one line ending.
        let mut p = SseParser::default();
        let mut got = p.feed_to_vec(b"data: [DONE]\r");
        got.extend(p.feed_to_vec(b"\n"));
        assert_eq!(got, [], "CRLF split: still only one line ending");
        got.extend(p.feed_to_vec(b"\r\n"));
        assert_eq!(got, [SseEvent::Done]);
        // Split inside a UTF-8 character.
        let s = chat("\u{1F600}x");
        let cut = s.find('x').unwrap() - 2;
        let mut p = SseParser::default();
        let mut got = p.feed_to_vec(&s.as_bytes()[..cut]);
        got.extend(p.feed_to_vec(&s.as_bytes()[cut..]));
        assert_eq!(got, [tok(1)]);
    }

    #[test]
    fn oversized_events_are_dropped_and_counted() {
        let cfg = SseConfig {
            max_event_bytes: 64,
        };
        let big = format!("data: {}\n\n", "x".repeat(200));
        let small = "data: [DONE]\n\n";
        // In one feed.
        let mut p = SseParser::new(cfg);
        let got = p.feed_to_vec(format!("{big}{small}").as_bytes());
        assert_eq!(got, [SseEvent::Oversized { bytes: 207 }, SseEvent::Done]);
        // Across many feeds: never buffered past the limit.
        let mut p = SseParser::new(cfg);
        let mut got = vec![];
        for piece in format!("{small}{big}{small}").as_bytes().chunks(10) {
            p.feed(piece, |e| got.push(e));
            assert!(p.buf.len() <= 64);
        }
        assert_eq!(
            got,
            [
                SseEvent::Done,
                SseEvent::Oversized { bytes: 207 },
                SseEvent::Done
            ]
        );
        assert_eq!(p.stats().oversized, 1);
        assert_eq!(p.stats().events, 2);
        // An oversized event cut off by the end of the stream.
        let mut p = SseParser::new(cfg);
        p.feed(&big.as_bytes()[..150], |_| {});
        let mut got = vec![];
        p.finish(|e| got.push(e));
        assert_eq!(got, [SseEvent::Oversized { bytes: 150 }]);
        // Exactly at the limit is fine.
        let exact = format!("data: {}\n\n", "y".repeat(64 - 7));
        assert_eq!(
            SseParser::new(cfg).feed_to_vec(exact.as_bytes()),
            [SseEvent::Other]
        );
    }

    /// Reference framing: the spec's algorithm over the whole input, returning each dispatched
    /// event's data.
    fn reference_data(input: &[u8]) -> Vec<Vec<u8>> {
        let mut out = vec![];
        let mut data: Option<Vec<u8>> = None;
        // Leading bytes matching a prefix of the BOM are dropped, as the parser does.
        let mut i = input.iter().zip(BOM).take_while(|(a, b)| **a == *b).count();
        let mut line = vec![];
        let flush_line =
            |line: &mut Vec<u8>, data: &mut Option<Vec<u8>>, out: &mut Vec<Vec<u8>>| {
                if line.is_empty() {
                    if let Some(d) = data.take() {
                        if !d.is_empty() {
                            out.push(d);
                        }
                    }
                } else if line[0] != b':' {
                    let (f, v) = match line.iter().position(|&c| c == b':') {
                        Some(p) => {
                            let v = &line[p + 1..];
                            (
                                line[..p].to_vec(),
                                v.strip_prefix(b" ").unwrap_or(v).to_vec(),
                            )
                        }
                        None => (line.clone(), vec![]),
                    };
                    if f == b"data" {
                        match data {
                            Some(d) => {
                                d.push(b'\n');
                                d.extend(v);
                            }
                            None => *data = Some(v),
                        }
                    }
                }
                line.clear();
            };
        while i < input.len() {
            match input[i] {
                b'\r' => {
                    flush_line(&mut line, &mut data, &mut out);
                    if input.get(i + 1) == Some(&b'\n') {
                        i += 1;
                    }
                }
                b'\n' => flush_line(&mut line, &mut data, &mut out),
                c => line.push(c),
            }
            i += 1;
        }
        out
    }

    fn arb_stream() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            Just(b"data: [DONE]".to_vec()),
            "[a-z ]{0,8}".prop_map(|s| format!("data: {{\"choices\":[{{\"text\":\"{s}\"}}]}}").into_bytes()),
            "[a-z ]{0,8}".prop_map(|s| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{s}\"}}}}],\"usage\":{{\"completion_tokens\":{}}}}}", s.len()).into_bytes()),
            Just(b": keep-alive".to_vec()),
            Just(b"event: error".to_vec()),
            Just(b"data".to_vec()),
            prop::collection::vec(any::<u8>(), 0..12)
                .prop_map(|v| v.into_iter().filter(|&c| c != b'\r' && c != b'\n').collect()),
            Just(vec![]),
        ];
        let eol = prop_oneof![Just(&b"\n"[..]), Just(&b"\r\n"[..]), Just(&b"\r"[..])];
        prop::collection::vec((line, eol), 0..30).prop_map(|lines| {
            let mut out = vec![];
            for (l, e) in lines {
                out.extend(l);
                out.extend(e);
            }
            out
        })
    }

    fn feed_split(input: &[u8], cuts: &[usize], cfg: SseConfig) -> (Vec<SseEvent>, SseStats) {
        let mut p = SseParser::new(cfg);
        let mut got = vec![];
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut prev = 0;
        for c in cuts.into_iter().chain([input.len()]) {
            p.feed(&input[prev..c], |e| got.push(e));
            assert!(p.buf.len() <= cfg.max_event_bytes);
            prev = c;
        }
        let stats = p.stats();
        (got, stats)
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_events(
            input in arb_stream(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let cfg = SseConfig::default();
            let (whole, _) = feed_split(&input, &[], cfg);
            let (split, _) = feed_split(&input, &cuts, cfg);
            prop_assert_eq!(&whole, &split);
            let mut p = SseParser::new(cfg);
            let mut bytewise = vec![];
            for b in &input {
                p.feed(std::slice::from_ref(b), |e| bytewise.push(e));
            }
            prop_assert_eq!(&whole, &bytewise);
            // Framing agrees with the reference (events carrying data are all dispatched).
            prop_assert_eq!(whole.len(), reference_data(&input).len());
        }

        /// A relay that forwards what it received less `unfinished_len` bytes forwards whole
        /// events only, and loses nothing.
        #[test]
        fn holding_back_the_unfinished_event_forwards_whole_events(
            input in arb_stream(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let cfg = SseConfig::default();
            let (mut relay, mut check) = (SseParser::new(cfg), SseParser::new(cfg));
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
            cuts.sort_unstable();
            let (mut held, mut forwarded, mut prev) = (Vec::new(), Vec::new(), 0);
            for c in cuts.into_iter().chain([input.len()]) {
                let piece = &input[prev..c];
                prev = c;
                relay.feed(piece, |_| {});
                held.extend_from_slice(piece);
                let keep = relay.unfinished_len().unwrap();
                prop_assert!(keep <= held.len());
                let out: Vec<u8> = held.drain(..held.len() - keep).collect();
                check.feed(&out, |_| {});
                prop_assert_eq!(check.unfinished_len(), Some(0));
                forwarded.extend(out);
            }
            forwarded.extend(held);
            prop_assert_eq!(forwarded, input);
        }

        #[test]
        fn never_panics_and_stays_bounded(
            input in prop::collection::vec(any::<u8>(), 0..600),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
            max in 0usize..100,
        ) {
            let cfg = SseConfig { max_event_bytes: max };
            let (events, stats) = feed_split(&input, &cuts, cfg);
            prop_assert_eq!(stats.events + stats.oversized, events.len() as u64);
        }

        #[test]
        fn find_eol_matches_a_byte_loop(hay in prop::collection::vec(
            prop_oneof![Just(b'\r'), Just(b'\n'), any::<u8>()], 0..40)
        ) {
            prop_assert_eq!(find_eol(&hay), hay.iter().position(|&c| c == b'\n' || c == b'\r'));
        }

        #[test]
        fn token_counts_match_visible_chunks(texts in prop::collection::vec("[a-z]{0,3}", 0..40)) {
            let mut s = String::new();
            for t in &texts {
                s.push_str(&chat(t));
            }
            let (events, stats) = feed_split(s.as_bytes(), &[7, 100, 333], SseConfig::default());
            // Each chunk is a token, its text held back by the detokenizer or not.
            prop_assert_eq!(stats.tokens, texts.len() as u64);
            prop_assert_eq!(events.len(), texts.len());
        }
    }
}
