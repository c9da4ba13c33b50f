//! A borrowing parser for the Prometheus text exposition format (version 0.0.4).
//!
//! Why a hand-written parser: the router scrapes every endpoint's `/metrics` every second, for up to
//! a thousand endpoints, and a vLLM scrape is ~60 KB of ~700 lines of which the router wants a dozen
//! (see `vllm-0.32-metrics-under-load.txt` in the field notes). The general-purpose crates build a
//! map of owned strings per sample; this one allocates nothing: a [`Sample`] borrows its name and
//! labels from the scraped text, labels are validated once and re-read lazily ([`Labels`]), and
//! escapes are only decoded when asked for ([`LabelValue::unescape`]). A caller that wants a few
//! names can skip the rest of a line after reading its name ([`Parser::next_sample_where`]), which
//! is most of the cost of a vLLM scrape (histogram buckets).
//!
//! What it accepts, following the format's spec and Prometheus' own lexer:
//! * `# HELP name doc`, `# TYPE name kind`, other `#` comments, blank lines;
//! * `name value`, `name{} value`, `name{a="b",c="d",} value` (trailing comma), optional blanks
//!   around label tokens, an optional integer timestamp (ms) after the value;
//! * label values containing `}` `,` `=` `#` and the escapes `\\`, `\"`, `\n` (any other `\x` is
//!   kept verbatim, as Prometheus does);
//! * values `NaN`, `+Inf`, `-Inf`, `Inf`, scientific notation, a leading `+`;
//! * LF or CRLF line endings, a final line without a newline.
//!
//! A line that does not parse is skipped and counted ([`Parser::malformed`]); nothing panics on
//! any input. Not supported: the OpenMetrics/UTF-8 extensions (quoted metric names, `# EOF`,
//! exemplars); such lines count as malformed.

use std::borrow::Cow;
use std::fmt;

/// The `# TYPE` of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    /// `untyped` (0.0.4) or `unknown` (OpenMetrics).
    Untyped,
}

impl MetricType {
    fn from_token(s: &str) -> Option<Self> {
        Some(match s {
            "counter" => MetricType::Counter,
            "gauge" => MetricType::Gauge,
            "histogram" => MetricType::Histogram,
            "summary" => MetricType::Summary,
            "untyped" | "unknown" => MetricType::Untyped,
            _ => return None,
        })
    }
}

/// Why a line was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParseError {
    /// The line does not start with a valid metric name.
    MetricName,
    /// A label name was expected (after `{` or `,`).
    LabelName,
    /// `=` was expected after a label name.
    Equals,
    /// `"` was expected to open a label value.
    Quote,
    /// A label value has no closing `"` on its line.
    UnterminatedValue,
    /// `,` or `}` was expected after a label value.
    CommaOrBrace,
    /// The sample has no value, or it is not a float.
    Value,
    /// The timestamp is not an integer.
    Timestamp,
    /// Something follows the timestamp.
    TrailingGarbage,
    /// A `# HELP` or `# TYPE` line without a valid metric name, or an unknown type.
    Descriptor,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ParseError::MetricName => "invalid metric name",
            ParseError::LabelName => "expected a label name",
            ParseError::Equals => "expected '=' after a label name",
            ParseError::Quote => "expected '\"' to open a label value",
            ParseError::UnterminatedValue => "unterminated label value",
            ParseError::CommaOrBrace => "expected ',' or '}' after a label value",
            ParseError::Value => "missing or invalid sample value",
            ParseError::Timestamp => "invalid timestamp",
            ParseError::TrailingGarbage => "unexpected text after the sample",
            ParseError::Descriptor => "invalid # HELP or # TYPE line",
        };
        f.write_str(s)
    }
}

impl std::error::Error for ParseError {}

/// One sample line: `name{labels} value [timestamp]`, borrowed from the scraped text.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Labels<'a>,
    pub value: f64,
    /// Milliseconds since the Unix epoch, when the exporter gave one.
    pub timestamp_ms: Option<i64>,
}

impl<'a> Sample<'a> {
    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<LabelValue<'a>> {
        self.labels.get(name)
    }
}

impl fmt::Display for Sample<'_> {
    /// Writes the sample back in exposition format (labels exactly as they were escaped).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)?;
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}=\"{}\"", v.raw())?;
            }
            f.write_str("}")?;
        }
        f.write_str(" ")?;
        write_value(f, self.value)?;
        if let Some(ts) = self.timestamp_ms {
            write!(f, " {ts}")?;
        }
        Ok(())
    }
}

/// The labels of a sample: the validated text between `{` and `}`, read lazily.
///
/// Lookups scan the (short) label text; there is no map. Duplicate names are not rejected;
/// [`Labels::get`] returns the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Labels<'a> {
    raw: &'a str,
}

impl<'a> Labels<'a> {
    /// The text between the braces, escapes intact (empty for `{}` or no braces).
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// The labels in order of appearance.
    pub fn iter(&self) -> LabelIter<'a> {
        LabelIter {
            b: self.raw.as_bytes(),
            s: self.raw,
            i: 0,
        }
    }

    /// The value of the first label called `name`.
    pub fn get(&self, name: &str) -> Option<LabelValue<'a>> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// No labels (`{}` or no braces).
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.iter().count()
    }
}

impl<'a> IntoIterator for Labels<'a> {
    type Item = (&'a str, LabelValue<'a>);
    type IntoIter = LabelIter<'a>;
    fn into_iter(self) -> LabelIter<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for &Labels<'a> {
    type Item = (&'a str, LabelValue<'a>);
    type IntoIter = LabelIter<'a>;
    fn into_iter(self) -> LabelIter<'a> {
        self.iter()
    }
}

/// Iterator over `(name, value)` pairs of a [`Labels`].
#[derive(Clone, Debug)]
pub struct LabelIter<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Iterator for LabelIter<'a> {
    type Item = (&'a str, LabelValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        // The text was validated by the parser; stop quietly on anything unexpected anyway.
        let b = self.b;
        let mut i = skip_blanks(b, self.i);
        if i < b.len() && b[i] == b',' {
            i = skip_blanks(b, i + 1);
        }
        let start = i;
        while i < b.len() && LABEL_CHAR[b[i] as usize] {
            i += 1;
        }
        if i == start {
            self.i = b.len();
            return None;
        }
        let name = &self.s[start..i];
        i = skip_blanks(b, i);
        if b.get(i) != Some(&b'=') {
            self.i = b.len();
            return None;
        }
        i = skip_blanks(b, i + 1);
        if b.get(i) != Some(&b'"') {
            self.i = b.len();
            return None;
        }
        let vstart = i + 1;
        let Ok(end) = scan_quoted(b, vstart) else {
            self.i = b.len();
            return None;
        };
        self.i = end;
        Some((
            name,
            LabelValue {
                raw: &self.s[vstart..end - 1],
            },
        ))
    }
}

/// A label value as written (between the quotes, escapes intact). Compare it with a `&str`
/// without allocating (`v == "x"` compares the *unescaped* value), or decode it with
/// [`LabelValue::unescape`].
#[derive(Clone, Copy, Debug)]
pub struct LabelValue<'a> {
    raw: &'a str,
}

impl<'a> LabelValue<'a> {
    /// The escaped text between the quotes.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// Whether the value contains a backslash escape.
    pub fn has_escapes(&self) -> bool {
        self.raw.as_bytes().contains(&b'\\')
    }

    /// The decoded value; borrows unless the value has escapes.
    pub fn unescape(&self) -> Cow<'a, str> {
        if self.has_escapes() {
            Cow::Owned(self.chars().collect())
        } else {
            Cow::Borrowed(self.raw)
        }
    }

    /// The decoded characters.
    pub fn chars(&self) -> Unescape<'a> {
        Unescape {
            inner: self.raw.chars(),
            pending: None,
        }
    }
}

impl PartialEq<str> for LabelValue<'_> {
    fn eq(&self, other: &str) -> bool {
        if !self.has_escapes() {
            return self.raw == other;
        }
        self.chars().eq(other.chars())
    }
}

impl PartialEq<&str> for LabelValue<'_> {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl PartialEq for LabelValue<'_> {
    /// Compares decoded values: `a\x` and `a\\x` are equal (both decode to `a\x`).
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw || self.chars().eq(other.chars())
    }
}

impl fmt::Display for LabelValue<'_> {
    /// Writes the decoded value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.has_escapes() {
            return f.write_str(self.raw);
        }
        for c in self.chars() {
            fmt::Write::write_char(f, c)?;
        }
        Ok(())
    }
}

/// Decoding iterator over a label value: `\\` → `\`, `\"` → `"`, `\n` → newline; any other
/// backslash sequence is kept as written.
#[derive(Clone, Debug)]
pub struct Unescape<'a> {
    inner: std::str::Chars<'a>,
    pending: Option<char>,
}

impl Iterator for Unescape<'_> {
    type Item = char;
    fn next(&mut self) -> Option<char> {
        if let Some(c) = self.pending.take() {
            return Some(c);
        }
        let c = self.inner.next()?;
        if c != '\\' {
            return Some(c);
        }
        match self.inner.next() {
            Some('\\') => Some('\\'),
            Some('"') => Some('"'),
            Some('n') => Some('\n'),
            Some(other) => {
                self.pending = Some(other);
                Some('\\')
            }
            None => Some('\\'),
        }
    }
}

/// One line of an exposition, as [`Parser::next_entry`] reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Entry<'a> {
    Sample(Sample<'a>),
    /// `# HELP name doc`; `doc` is raw (escapes `\\` and `\n` intact).
    Help {
        name: &'a str,
        doc: &'a str,
    },
    /// `# TYPE name kind`.
    Type {
        name: &'a str,
        kind: MetricType,
    },
    /// Any other `#` line; the text after `#`, leading blanks removed.
    Comment(&'a str),
    /// An empty or all-blank line.
    Blank,
    /// A line that does not parse (without its line ending), and why.
    Malformed {
        line: &'a str,
        error: ParseError,
    },
}

/// Pull parser over a whole exposition. As an [`Iterator`] it yields the samples; see
/// [`Parser::next_entry`] for every line, and [`Parser::malformed`] for lines rejected so far.
#[derive(Clone, Debug)]
pub struct Parser<'a> {
    text: &'a str,
    pos: usize,
    lines: usize,
    malformed: usize,
}

/// Parses `text`; iterate the result for its samples. Shorthand for [`Parser::new`].
pub fn parse(text: &str) -> Parser<'_> {
    Parser::new(text)
}

impl<'a> Parser<'a> {
    pub fn new(text: &'a str) -> Self {
        Parser {
            text,
            pos: 0,
            lines: 0,
            malformed: 0,
        }
    }

    /// Lines rejected so far. The sample paths ([`Parser::next_sample`], iteration,
    /// [`Parser::next_sample_where`]) do not validate `#` lines, nor sample lines their filter
    /// skipped, so those are not counted there; [`Parser::next_entry`] validates every line.
    pub fn malformed(&self) -> usize {
        self.malformed
    }

    /// Lines consumed so far.
    pub fn lines(&self) -> usize {
        self.lines
    }

    /// The next line, whatever it is; `None` at the end of the text.
    pub fn next_entry(&mut self) -> Option<Entry<'a>> {
        let b = self.text.as_bytes();
        if self.pos >= b.len() {
            return None;
        }
        self.lines += 1;
        let start = skip_blanks(b, self.pos);
        if let Some(next) = line_end(b, start) {
            self.pos = next;
            return Some(Entry::Blank);
        }
        if b[start] == b'#' {
            let (entry, next) = parse_comment(self.text, start + 1);
            if let Entry::Malformed { .. } = entry {
                self.malformed += 1;
            }
            self.pos = next;
            return Some(entry);
        }
        match parse_sample_at(self.text, start) {
            Ok((sample, next)) => {
                self.pos = next;
                Some(Entry::Sample(sample))
            }
            Err((error, _)) => {
                let next = next_line(b, start);
                self.malformed += 1;
                let line = line_text(self.text, self.pos, next);
                self.pos = next;
                Some(Entry::Malformed { line, error })
            }
        }
    }

    /// The next sample; comments and malformed lines are skipped.
    pub fn next_sample(&mut self) -> Option<Sample<'a>> {
        self.next_sample_where(|_| true)
    }

    /// The next sample whose metric name passes `keep`. Lines whose name fails it are skipped
    /// right after the name, without reading labels or value: the fast path for a caller that
    /// wants a few metrics out of hundreds.
    pub fn next_sample_where<F: FnMut(&'a str) -> bool>(
        &mut self,
        mut keep: F,
    ) -> Option<Sample<'a>> {
        let text = self.text;
        let b = text.as_bytes();
        while self.pos < b.len() {
            self.lines += 1;
            let start = skip_blanks(b, self.pos);
            if let Some(next) = line_end(b, start) {
                self.pos = next;
                continue;
            }
            if b[start] == b'#' {
                // Descriptors are not validated on this path; they carry no sample.
                self.pos = next_line(b, start);
                continue;
            }
            let name_end = scan_metric_name(b, start);
            if name_end == start {
                self.malformed += 1;
                self.pos = next_line(b, start);
                continue;
            }
            let name = &text[start..name_end];
            if !keep(name) {
                self.pos = next_line(b, name_end);
                continue;
            }
            match parse_after_name(text, name, name_end) {
                Ok((sample, next)) => {
                    self.pos = next;
                    return Some(sample);
                }
                Err((_, at)) => {
                    self.malformed += 1;
                    self.pos = next_line(b, at);
                }
            }
        }
        None
    }

    /// Every line as an [`Entry`], as an iterator.
    pub fn entries(self) -> Entries<'a> {
        Entries(self)
    }
}

impl<'a> Iterator for Parser<'a> {
    type Item = Sample<'a>;
    fn next(&mut self) -> Option<Sample<'a>> {
        self.next_sample()
    }
}

/// Iterator over every line of an exposition (see [`Parser::entries`]).
#[derive(Clone, Debug)]
pub struct Entries<'a>(Parser<'a>);

impl Entries<'_> {
    /// Lines rejected so far.
    pub fn malformed(&self) -> usize {
        self.0.malformed
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Entry<'a>;
    fn next(&mut self) -> Option<Entry<'a>> {
        self.0.next_entry()
    }
}

/// Parses one sample line (no line ending inside; a trailing `\r\n` or `\n` is allowed).
pub fn parse_sample_line(line: &str) -> Result<Sample<'_>, ParseError> {
    let b = line.as_bytes();
    let start = skip_blanks(b, 0);
    let (sample, next) = parse_sample_at(line, start).map_err(|(e, _)| e)?;
    if next < b.len() {
        return Err(ParseError::TrailingGarbage);
    }
    Ok(sample)
}

/// Escapes a label value for the exposition format (`\` → `\\`, `"` → `\"`, newline → `\n`).
pub fn escape_label_value(v: &str) -> Cow<'_, str> {
    if !v.bytes().any(|c| matches!(c, b'\\' | b'"' | b'\n')) {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Writes a value the way Prometheus spells it: `NaN`, `+Inf`, `-Inf`, else the shortest
/// representation that reads back to the same `f64`.
pub fn write_value<W: fmt::Write + ?Sized>(out: &mut W, v: f64) -> fmt::Result {
    if v.is_nan() {
        out.write_str("NaN")
    } else if v == f64::INFINITY {
        out.write_str("+Inf")
    } else if v == f64::NEG_INFINITY {
        out.write_str("-Inf")
    } else {
        write!(out, "{v:?}")
    }
}

/// Writes one sample line (with `\n`), escaping label values.
pub fn write_sample<W: fmt::Write + ?Sized>(
    out: &mut W,
    name: &str,
    labels: &[(&str, &str)],
    value: f64,
    timestamp_ms: Option<i64>,
) -> fmt::Result {
    out.write_str(name)?;
    if !labels.is_empty() {
        out.write_char('{')?;
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.write_char(',')?;
            }
            write!(out, "{k}=\"{}\"", escape_label_value(v))?;
        }
        out.write_char('}')?;
    }
    out.write_char(' ')?;
    write_value(out, value)?;
    if let Some(ts) = timestamp_ms {
        write!(out, " {ts}")?;
    }
    out.write_char('\n')
}

// ---------------------------------------------------------------------------------------------
// Scanning helpers. Every index stays within `b`; slices of the text are only taken at ASCII
// delimiters, so they always fall on char boundaries.

const fn class(first: bool, colon: bool) -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphabetic()
            || b == b'_'
            || (colon && b == b':')
            || (!first && b.is_ascii_digit());
        c += 1;
    }
    t
}

static METRIC_START: [bool; 256] = class(true, true);
static METRIC_CHAR: [bool; 256] = class(false, true);
static LABEL_START: [bool; 256] = class(true, false);
static LABEL_CHAR: [bool; 256] = class(false, false);

#[inline]
fn skip_blanks(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
        i += 1;
    }
    i
}

/// If `i` is at the end of a line, the start of the next one.
#[inline]
fn line_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i) {
        None => Some(b.len()),
        Some(b'\n') => Some(i + 1),
        Some(b'\r') => match b.get(i + 1) {
            None => Some(i + 1),
            Some(b'\n') => Some(i + 2),
            _ => None,
        },
        _ => None,
    }
}

/// Start of the line after the one containing `i`.
#[inline]
fn next_line(b: &[u8], i: usize) -> usize {
    match find_byte(b'\n', &b[i.min(b.len())..]) {
        Some(off) => i + off + 1,
        None => b.len(),
    }
}

/// A word-at-a-time `memchr` (no dependency, no `unsafe`): HELP lines are long and skipping them
/// is a good part of a scrape. The classic "has a zero byte" test on `word ^ needle`; the lowest
/// flagged byte is always a true match (false positives only appear above a true one).
#[inline]
fn find_byte(needle: u8, hay: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let rep = LO * needle as u64;
    let mut chunks = hay.chunks_exact(8);
    let mut off = 0;
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let x = u64::from_le_bytes(w) ^ rep;
        let t = x.wrapping_sub(LO) & !x & HI;
        if t != 0 {
            return Some(off + (t.trailing_zeros() / 8) as usize);
        }
        off += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&c| c == needle)
        .map(|p| off + p)
}

/// The line that starts at `start` and ends before `next`, without its line ending.
fn line_text(text: &str, start: usize, next: usize) -> &str {
    let s = &text[start..next];
    let s = s.strip_suffix('\n').unwrap_or(s);
    s.strip_suffix('\r').unwrap_or(s)
}

#[inline]
fn scan_metric_name(b: &[u8], start: usize) -> usize {
    if start >= b.len() || !METRIC_START[b[start] as usize] {
        return start;
    }
    let mut i = start + 1;
    while i < b.len() && METRIC_CHAR[b[i] as usize] {
        i += 1;
    }
    i
}

/// Scans a quoted value starting after its opening quote; returns the index after the closing
/// quote.
#[inline]
fn scan_quoted(b: &[u8], mut i: usize) -> Result<usize, usize> {
    loop {
        match b.get(i) {
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') => match b.get(i + 1) {
                None | Some(b'\n') => return Err(i),
                Some(_) => i += 2,
            },
            None | Some(b'\n') => return Err(i),
            Some(_) => i += 1,
        }
    }
}

type Scan<T> = Result<T, (ParseError, usize)>;

fn parse_sample_at(text: &str, start: usize) -> Scan<(Sample<'_>, usize)> {
    let b = text.as_bytes();
    let name_end = scan_metric_name(b, start);
    if name_end == start {
        return Err((ParseError::MetricName, start));
    }
    parse_after_name(text, &text[start..name_end], name_end)
}

/// Parses `{labels} value [timestamp]` and the line ending after a metric name ending at `i`.
fn parse_after_name<'a>(text: &'a str, name: &'a str, mut i: usize) -> Scan<(Sample<'a>, usize)> {
    let b = text.as_bytes();
    let mut labels = Labels { raw: "" };
    let mut j = skip_blanks(b, i);
    if b.get(j) == Some(&b'{') {
        let open = j + 1;
        let close = parse_labels(b, open)?;
        labels = Labels {
            raw: &text[open..close],
        };
        i = close + 1;
        j = skip_blanks(b, i);
    }
    // The value needs a blank before it (`name{}1` is malformed).
    let vstart = j;
    if vstart == i {
        return Err((ParseError::Value, i));
    }
    let vend = scan_token(b, vstart);
    if vend == vstart {
        return Err((ParseError::Value, vstart));
    }
    let value = parse_value(&text[vstart..vend]).ok_or((ParseError::Value, vstart))?;
    i = skip_blanks(b, vend);
    if let Some(next) = line_end(b, i) {
        return Ok((
            Sample {
                name,
                labels,
                value,
                timestamp_ms: None,
            },
            next,
        ));
    }
    if i == vend {
        // The value token stopped at something that is neither a blank nor a line end (a bare \r).
        return Err((ParseError::Value, i));
    }
    let tend = scan_token(b, i);
    let ts: i64 = text[i..tend]
        .parse()
        .map_err(|_| (ParseError::Timestamp, i))?;
    let j = skip_blanks(b, tend);
    match line_end(b, j) {
        Some(next) => Ok((
            Sample {
                name,
                labels,
                value,
                timestamp_ms: Some(ts),
            },
            next,
        )),
        None => Err((ParseError::TrailingGarbage, j)),
    }
}

/// Validates labels starting after `{`; returns the index of the closing `}`.
fn parse_labels(b: &[u8], mut i: usize) -> Scan<usize> {
    loop {
        i = skip_blanks(b, i);
        match b.get(i) {
            Some(b'}') => return Ok(i),
            Some(&c) if LABEL_START[c as usize] => {}
            _ => return Err((ParseError::LabelName, i)),
        }
        i += 1;
        while i < b.len() && LABEL_CHAR[b[i] as usize] {
            i += 1;
        }
        i = skip_blanks(b, i);
        if b.get(i) != Some(&b'=') {
            return Err((ParseError::Equals, i));
        }
        i = skip_blanks(b, i + 1);
        if b.get(i) != Some(&b'"') {
            return Err((ParseError::Quote, i));
        }
        i = scan_quoted(b, i + 1).map_err(|at| (ParseError::UnterminatedValue, at))?;
        i = skip_blanks(b, i);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => return Ok(i),
            _ => return Err((ParseError::CommaOrBrace, i)),
        }
    }
}

/// End of a value or timestamp token: the next blank, CR, LF or end of text.
#[inline]
fn scan_token(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && !matches!(b[i], b' ' | b'\t' | b'\r' | b'\n') {
        i += 1;
    }
    i
}

/// Parses a sample value. Fast path for plain decimals (`64.0`, `0.011780504181163387` falls
/// back), exact by Clinger's argument: an integer mantissa below 2^53 times or divided by a power
/// of ten up to 10^22 is one correctly rounded operation. Everything else goes to the standard
/// library, which also accepts `NaN`, `Inf`, `+Inf`, `-Inf`, `infinity` in any case.
#[inline]
fn parse_value(s: &str) -> Option<f64> {
    if let Some(v) = parse_simple_decimal(s.as_bytes()) {
        return Some(v);
    }
    s.parse::<f64>().ok()
}

const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

#[inline]
fn parse_simple_decimal(b: &[u8]) -> Option<f64> {
    let (neg, mut i) = match b.first()? {
        b'-' => (true, 1),
        b'+' => (false, 1),
        _ => (false, 0),
    };
    let mut mant: u64 = 0;
    let mut digits = 0u32;
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        mant = mant.wrapping_mul(10).wrapping_add((b[i] - b'0') as u64);
        digits += 1;
        i += 1;
    }
    let mut frac = 0usize;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let fs = i;
        while i < b.len() && b[i].is_ascii_digit() {
            mant = mant.wrapping_mul(10).wrapping_add((b[i] - b'0') as u64);
            digits += 1;
            i += 1;
        }
        frac = i - fs;
    }
    if i != b.len() || i == int_start || digits == 0 || digits > 15 || frac > 22 {
        // Exponents, long mantissas, `.`, special values: the slow path.
        return None;
    }
    // 15 digits < 2^53, so `mant` is exact in f64 (and did not wrap).
    let v = mant as f64 / POW10[frac];
    Some(if neg { -v } else { v })
}

/// Parses the rest of a `#` line (from after the `#`).
fn parse_comment(text: &str, i: usize) -> (Entry<'_>, usize) {
    let b = text.as_bytes();
    let next = next_line(b, i);
    let body = line_text(text, i, next);
    let body = body.trim_start_matches([' ', '\t']);
    let (keyword, rest) = split_token(body);
    let entry = match keyword {
        "HELP" => {
            let (name, doc) = split_token(rest);
            if is_metric_name(name) {
                Entry::Help { name, doc }
            } else {
                malformed_comment(text, i, next)
            }
        }
        "TYPE" => {
            let (name, kind) = split_token(rest);
            let (kind, tail) = split_token(kind);
            match MetricType::from_token(kind) {
                Some(kind) if is_metric_name(name) && tail.is_empty() => Entry::Type { name, kind },
                _ => malformed_comment(text, i, next),
            }
        }
        _ => Entry::Comment(body),
    };
    (entry, next)
}

fn malformed_comment(text: &str, hash_plus_one: usize, next: usize) -> Entry<'_> {
    Entry::Malformed {
        line: line_text(text, hash_plus_one - 1, next),
        error: ParseError::Descriptor,
    }
}

/// Splits off the first blank-delimited token; the rest has its leading blanks removed.
fn split_token(s: &str) -> (&str, &str) {
    let end = s.find([' ', '\t']).unwrap_or(s.len());
    let (tok, rest) = s.split_at(end);
    (tok, rest.trim_start_matches([' ', '\t']))
}

fn is_metric_name(s: &str) -> bool {
    !s.is_empty() && scan_metric_name(s.as_bytes(), 0) == s.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UNDER_LOAD: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/reference/vllm-0.32-metrics-under-load.txt"
    ));

    fn one(line: &str) -> Sample<'_> {
        parse_sample_line(line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    #[test]
    fn plain_samples() {
        let s = one("process_open_fds 98.0");
        assert_eq!(s.name, "process_open_fds");
        assert!(s.labels.is_empty());
        assert_eq!(s.value, 98.0);
        assert_eq!(s.timestamp_ms, None);

        let s = one("a{} 1");
        assert!(s.labels.is_empty());
        assert_eq!(s.value, 1.0);

        let s = one("vllm:num_requests_running{engine=\"0\",model_name=\"tiny-llama\"} 64.0");
        assert_eq!(s.name, "vllm:num_requests_running");
        assert_eq!(s.labels.len(), 2);
        assert_eq!(s.label("engine").unwrap(), "0");
        assert_eq!(s.label("model_name").unwrap(), "tiny-llama");
        assert!(s.label("missing").is_none());
        assert_eq!(s.value, 64.0);
    }

    #[test]
    fn special_and_scientific_values() {
        assert!(one("x NaN").value.is_nan());
        assert_eq!(one("x +Inf").value, f64::INFINITY);
        assert_eq!(one("x -Inf").value, f64::NEG_INFINITY);
        assert_eq!(one("x Inf").value, f64::INFINITY);
        assert_eq!(one("x 4.860719104e+09").value, 4.860719104e9);
        assert_eq!(one("x 1.5E-3").value, 1.5e-3);
        assert_eq!(one("x -0.25").value, -0.25);
        assert_eq!(one("x +7").value, 7.0);
        assert_eq!(one("x .5").value, 0.5);
        assert_eq!(one("x 0.011780504181163387").value, 0.011780504181163387);
        assert_eq!(
            one("x 123456789012345678901").value,
            123456789012345678901.0
        );
        assert_eq!(one("x 1e400").value, f64::INFINITY);
        for bad in [
            "x", "x ", "x abc", "x 1.2.3", "x --1", "x 1e", "x .", "x +", "x -",
        ] {
            assert_eq!(
                parse_sample_line(bad).unwrap_err(),
                ParseError::Value,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn fast_path_matches_std() {
        for s in [
            "0",
            "0.0",
            "64.0",
            "-3.5",
            "+1",
            "123456789012345",
            "0.1",
            "0.3",
            "1.000000000000001",
            "99999999999999.9",
            "0.0000000000000000000001",
            "7.",
            "-0.0",
        ] {
            let std: f64 = s.parse().unwrap();
            assert_eq!(parse_value(s).unwrap().to_bits(), std.to_bits(), "{s}");
        }
    }

    #[test]
    fn timestamps() {
        let s = one("http_requests_total{method=\"post\",code=\"200\"} 1027 1395066363000");
        assert_eq!(s.value, 1027.0);
        assert_eq!(s.timestamp_ms, Some(1395066363000));
        assert_eq!(one("x 1 -5").timestamp_ms, Some(-5));
        assert_eq!(one("x 1 7 \r\n").timestamp_ms, Some(7));
        assert_eq!(
            parse_sample_line("x 1 1.5").unwrap_err(),
            ParseError::Timestamp
        );
        assert_eq!(
            parse_sample_line("x 1 2 3").unwrap_err(),
            ParseError::TrailingGarbage
        );
    }

    #[test]
    fn tricky_labels() {
        let s = one(r#"m{a="x}y",b="1,2=3",c="q\"uote",d="back\\slash",e="new\nline",} 2"#);
        let got: Vec<(&str, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k, v.unescape().into_owned()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", "x}y".to_string()),
                ("b", "1,2=3".to_string()),
                ("c", "q\"uote".to_string()),
                ("d", "back\\slash".to_string()),
                ("e", "new\nline".to_string()),
            ]
        );
        assert_eq!(s.label("c").unwrap(), "q\"uote");
        assert_eq!(s.label("c").unwrap().raw(), "q\\\"uote");
        assert_eq!(s.label("e").unwrap().to_string(), "new\nline");
        assert!(matches!(
            s.label("a").unwrap().unescape(),
            Cow::Borrowed("x}y")
        ));
        assert_eq!(s.value, 2.0);

        // Blanks around tokens, unknown escapes kept, an empty value, UTF-8.
        let s = one("m{ a = \"\\t\" , b=\"\" ,c=\"héllo ✓\"\t}\t3");
        assert_eq!(s.label("a").unwrap().unescape(), "\\t");
        assert_eq!(s.label("b").unwrap(), "");
        assert_eq!(s.label("c").unwrap(), "héllo ✓");
        assert_eq!(s.value, 3.0);
        // A value ending in an escaped backslash.
        let s = one(r#"m{a="x\\"} 1"#);
        assert_eq!(s.label("a").unwrap(), "x\\");
        // An unknown escape decodes to itself, so it equals the escaped backslash spelling.
        let s = one(r#"m{a="a\x",b="a\\x"} 1"#);
        assert_eq!(s.label("a").unwrap(), s.label("b").unwrap());
        assert_eq!(s.label("a").unwrap(), "a\\x");
    }

    #[test]
    fn malformed_lines() {
        let cases = [
            ("{a=\"b\"} 1", ParseError::MetricName),
            ("1abc 1", ParseError::MetricName),
            ("m{,} 1", ParseError::LabelName),
            ("m{1a=\"b\"} 1", ParseError::LabelName),
            ("m{a} 1", ParseError::Equals),
            ("m{a=b} 1", ParseError::Quote),
            ("m{a=\"b} 1", ParseError::UnterminatedValue),
            ("m{a=\"b\\", ParseError::UnterminatedValue),
            ("m{a=\"b\" c=\"d\"} 1", ParseError::CommaOrBrace),
            ("m{a=\"b\"", ParseError::CommaOrBrace),
            ("m{}1", ParseError::Value),
            ("m{a=\"b\"}", ParseError::Value),
            ("m\r1", ParseError::Value),
            ("m 1\rx", ParseError::Value),
        ];
        for (line, want) in cases {
            assert_eq!(parse_sample_line(line).unwrap_err(), want, "{line:?}");
        }
    }

    #[test]
    fn comments_blank_lines_and_crlf() {
        let text = "# HELP a Some\\ndoc.\r\n# TYPE a counter\r\n\r\n   \r\n# just a comment\r\na_total{x=\"1\"} 1\r\nbroken{ 2\r\n\r\n#TYPE b gauge\nb 2\n# TYPE c bogus\nc 3";
        let entries: Vec<Entry> = parse(text).entries().collect();
        assert_eq!(entries.len(), 12);
        assert_eq!(
            entries[0],
            Entry::Help {
                name: "a",
                doc: "Some\\ndoc."
            }
        );
        assert_eq!(
            entries[1],
            Entry::Type {
                name: "a",
                kind: MetricType::Counter
            }
        );
        assert_eq!(entries[2], Entry::Blank);
        assert_eq!(entries[3], Entry::Blank);
        assert_eq!(entries[4], Entry::Comment("just a comment"));
        assert!(matches!(entries[5], Entry::Sample(s) if s.name == "a_total" && s.value == 1.0));
        assert_eq!(
            entries[6],
            Entry::Malformed {
                line: "broken{ 2",
                error: ParseError::LabelName
            }
        );
        assert_eq!(entries[7], Entry::Blank);
        assert_eq!(
            entries[8],
            Entry::Type {
                name: "b",
                kind: MetricType::Gauge
            }
        );
        assert!(matches!(entries[11], Entry::Sample(s) if s.name == "c" && s.value == 3.0));
        assert!(matches!(
            entries[10],
            Entry::Malformed {
                error: ParseError::Descriptor,
                ..
            }
        ));

        let mut p = parse(text);
        let names: Vec<&str> = p.by_ref().map(|s| s.name).collect();
        assert_eq!(names, ["a_total", "b", "c"]);
        assert_eq!(
            p.malformed(),
            1,
            "the samples path does not validate descriptors"
        );
    }

    #[test]
    fn filtered_path_skips_without_parsing() {
        let text = "keep 1\nskip{this is not valid 2\nkeep{a=\"b\"} 3\nkeep{bad 4\n";
        let mut p = parse(text);
        let mut got = vec![];
        while let Some(s) = p.next_sample_where(|n| n == "keep") {
            got.push(s.value);
        }
        assert_eq!(got, [1.0, 3.0]);
        assert_eq!(p.malformed(), 1);
        assert_eq!(p.lines(), 4);
    }

    #[test]
    fn real_vllm_sample() {
        let mut p = parse(UNDER_LOAD);
        let mut n = 0;
        let mut running = None;
        let mut info_labels = 0;
        for s in p.by_ref() {
            n += 1;
            if s.name == "vllm:num_requests_running" {
                running = Some(s.value);
            }
            if s.name == "vllm:cache_config_info" {
                info_labels = s.labels.len();
                assert_eq!(s.label("kv_cache_size_tokens").unwrap(), "2097152");
            }
        }
        assert_eq!(p.malformed(), 0);
        assert_eq!(running, Some(64.0));
        assert_eq!(info_labels, 37);
        let comments = UNDER_LOAD.lines().filter(|l| l.starts_with('#')).count();
        assert_eq!(n, UNDER_LOAD.lines().count() - comments);
        // And every line is understood on the full path.
        let mut e = parse(UNDER_LOAD).entries();
        assert_eq!(e.by_ref().count(), 681);
        assert_eq!(e.malformed(), 0);
        // CRLF gives the same samples.
        let crlf = UNDER_LOAD.replace('\n', "\r\n");
        assert!(parse(&crlf).zip(parse(UNDER_LOAD)).all(|(a, b)| a == b));
        assert_eq!(parse(&crlf).count(), n);
    }

    #[test]
    fn display_round_trips() {
        let line = r#"m{a="x\"}",b="\\"} -Inf 12"#;
        let s = one(line);
        assert_eq!(s.to_string(), line);
        assert_eq!(one(&s.to_string()), s);
    }

    #[test]
    fn escape_helpers() {
        assert!(matches!(
            escape_label_value("plain"),
            Cow::Borrowed("plain")
        ));
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut out = String::new();
        write_sample(&mut out, "m", &[("a", "x\"y")], f64::NAN, Some(3)).unwrap();
        assert_eq!(out, "m{a=\"x\\\"y\"} NaN 3\n");
    }

    fn arb_label_value() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[a-z{},=\"\\\\\n #]{0,12}",]
    }

    fn same_value(a: f64, b: f64) -> bool {
        (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(text in any::<String>()) {
            let mut p = parse(&text);
            for s in p.by_ref() {
                let _ = s.labels.iter().count();
                let _ = s.to_string();
            }
            let lines = parse(&text).entries().count();
            prop_assert!(lines <= text.len() + 1);
        }

        #[test]
        fn never_panics_on_mutated_real_text(
            cut in 0usize..4000, len in 0usize..400, junk in "[ -~\r\n\t{}\"\\\\=,#]{0,40}"
        ) {
            let base = &UNDER_LOAD[..4000];
            let start = cut.min(base.len());
            let end = (start + len).min(base.len());
            let text = format!("{}{}{}", &base[..start], junk, &base[end..]);
            let total = parse(&text).entries().count();
            let mut p = parse(&text);
            let samples = p.by_ref().count();
            prop_assert!(samples + p.malformed() <= total);
        }

        #[test]
        fn round_trips(
            rows in prop::collection::vec(
                (
                    "[a-zA-Z_:][a-zA-Z0-9_:]{0,20}",
                    prop::collection::vec(("[a-zA-Z_][a-zA-Z0-9_]{0,10}", arb_label_value()), 0..5),
                    any::<f64>(),
                    prop::option::of(any::<i64>()),
                ),
                0..20,
            ),
            crlf in any::<bool>(),
        ) {
            let mut text = String::new();
            for (name, labels, value, ts) in &rows {
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                text.push_str(&format!("# TYPE {name} untyped\n"));
                write_sample(&mut text, name, &labels, *value, *ts).unwrap();
            }
            if crlf {
                text = text.replace('\n', "\r\n");
            }
            let mut p = parse(&text);
            let parsed: Vec<Sample> = p.by_ref().collect();
            prop_assert_eq!(p.malformed(), 0);
            prop_assert_eq!(parsed.len(), rows.len());
            for (s, (name, labels, value, ts)) in parsed.iter().zip(&rows) {
                prop_assert_eq!(s.name, name.as_str());
                prop_assert!(same_value(s.value, *value));
                prop_assert_eq!(s.timestamp_ms, *ts);
                let got: Vec<(&str, String)> =
                    s.labels.iter().map(|(k, v)| (k, v.unescape().into_owned())).collect();
                let want: Vec<(&str, String)> =
                    labels.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                prop_assert_eq!(got, want);
                for (k, v) in labels {
                    // `get` finds the first label of that name.
                    let first = labels.iter().find(|(k2, _)| k2 == k).unwrap();
                    prop_assert!(s.label(k).unwrap() == first.1.as_str());
                    let _ = v;
                }
            }
        }

        #[test]
        fn find_byte_matches_position(hay in prop::collection::vec(any::<u8>(), 0..64), needle in any::<u8>()) {
            prop_assert_eq!(find_byte(needle, &hay), hay.iter().position(|&c| c == needle));
        }

        #[test]
        fn simple_decimal_matches_std(int in 0u64..1_000_000_000, frac in 0u64..1_000_000, neg in any::<bool>()) {
            let s = format!("{}{int}.{frac}", if neg { "-" } else { "" });
            let std: f64 = s.parse().unwrap();
            prop_assert_eq!(parse_value(&s).unwrap().to_bits(), std.to_bits());
        }
    }
}
