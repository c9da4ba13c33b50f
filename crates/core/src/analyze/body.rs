//! One pass over a request body: the few small fields the analyzer reads come out as
//! [`Value`]s, the prompt (`messages`, or `prompt`/`input`/...) goes straight into its text
//! without a tree of it being built, and everything else is skipped unparsed.
//!
//! Why: a chat body is mostly prompt, and building a [`Value`] for it costs an allocation per
//! string, object and array, freed again at once; the router does this for every request. The
//! result is the same as reading the fields from a parsed [`Value`]: for a duplicate key the last
//! one counts, chat messages are joined as `role: content\n` whichever key comes first, and the
//! first bad message, or the first bad field in the order `prompt`, `input`, `text`, `query`,
//! `documents`, is the one reported. One difference: a skipped value (an unknown field, a token id
//! array) is not held to serde_json's nesting limit of 128, since skipping does not recurse; the
//! body goes on to the engine, whose parser has its own limit.

use super::BadRequest;
use crate::profile::ApiKind;
use serde::de::{
    value::MapAccessDeserializer, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess,
    Visitor,
};
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;

/// Top-level fields read from the body of a non-chat request, in the order their texts are joined.
const PROMPT_FIELDS: [&str; 5] = ["prompt", "input", "text", "query", "documents"];

/// Whether the router refuses a bad `field` on a route of `kind`: only the fields the route's own
/// API defines, which vLLM refuses too. Any other field the analyzer reads (another API's prompt
/// field, an output bound the API does not have) is read if well formed and otherwise adds
/// nothing: the engine ignores it, so must the router. `model` and `stream` are always checked.
pub(super) fn validated(kind: ApiKind, field: &str) -> bool {
    match kind {
        ApiKind::Chat => matches!(field, "messages" | "max_tokens" | "max_completion_tokens"),
        ApiKind::Completion => matches!(field, "prompt" | "max_tokens"),
        ApiKind::Embedding => field == "input",
        ApiKind::Responses | ApiKind::Messages | ApiKind::Other => false,
    }
}

/// Instructions ahead of the prompt on non-chat routes (Responses API `instructions`,
/// Anthropic-style `system`): a string or an array of parts, joined first, in this order, then
/// `messages` (Anthropic-style), then the [`PROMPT_FIELDS`]. These routes are not the router's to
/// validate: a field of another shape adds nothing, it is not an error.
pub(super) const PREAMBLE_FIELDS: [&str; 2] = ["instructions", "system"];

/// The prompt as one text (for prefix hashes) plus tokens given as ids.
#[derive(Debug, Default, PartialEq)]
pub(super) struct PromptText {
    pub(super) text: String,
    pub(super) token_ids: u64,
    /// Chat messages, where their role and content are in `text` (for a chat template).
    pub(super) messages: Vec<MessageSpan>,
    /// Where the request's `tools` list is in the body (chat, Responses and Messages routes;
    /// empty without one): tool definitions are rendered into the prompt, ahead of the
    /// messages.
    pub(super) tools: std::ops::Range<usize>,
    /// Bytes of the messages' `tool_calls` lists, which the chat template renders too.
    pub(super) call_bytes: usize,
}

impl PromptText {
    /// Bytes of the request's tool definitions and of its messages' tool calls.
    pub(super) fn tool_bytes(&self) -> usize {
        self.tools.len() + self.call_bytes
    }
}

/// Where one chat message's role and content are in its prompt's text.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct MessageSpan {
    pub(super) role: std::ops::Range<usize>,
    pub(super) content: std::ops::Range<usize>,
}

impl PromptText {
    fn append(&mut self, other: PromptText) {
        let shift = self.text.len();
        if self.text.is_empty() {
            self.text = other.text;
        } else {
            self.text.push_str(&other.text);
        }
        self.token_ids += other.token_ids;
        self.call_bytes += other.call_bytes;
        self.messages
            .extend(other.messages.into_iter().map(|m| MessageSpan {
                role: m.role.start + shift..m.role.end + shift,
                content: m.content.start + shift..m.content.end + shift,
            }));
    }
}

/// What the analyzer reads from a body. `None`: the key was absent.
pub(super) struct Fields {
    /// False when the body is valid JSON but not an object.
    pub(super) is_object: bool,
    pub(super) model: Option<Value>,
    pub(super) stream: Option<Value>,
    pub(super) max_tokens: Option<Value>,
    pub(super) max_completion_tokens: Option<Value>,
    /// The Responses API's output bound.
    pub(super) max_output_tokens: Option<Value>,
    pub(super) kv_transfer_params: Option<Value>,
    /// The body field named like the session key (unless that is a field read above, or a
    /// prompt field).
    pub(super) session: Option<Value>,
    /// Chat routes: whether `messages` was present.
    pub(super) has_messages: bool,
    /// The prompt's text, or the first error found in it.
    pub(super) prompt: Result<PromptText, BadRequest>,
}

impl Fields {
    fn empty() -> Self {
        Fields {
            is_object: false,
            model: None,
            stream: None,
            max_tokens: None,
            max_completion_tokens: None,
            max_output_tokens: None,
            kv_transfer_params: None,
            session: None,
            has_messages: false,
            prompt: Ok(PromptText::default()),
        }
    }

    /// What an empty object gives.
    pub(super) fn empty_object() -> Self {
        Fields {
            is_object: true,
            ..Fields::empty()
        }
    }

    /// The body field named like the session key.
    pub(super) fn take_session(&mut self, session_key: &str) -> Option<Value> {
        match session_key {
            "model" => self.model.clone(),
            "stream" => self.stream.clone(),
            "max_tokens" => self.max_tokens.clone(),
            "max_completion_tokens" => self.max_completion_tokens.clone(),
            "max_output_tokens" => self.max_output_tokens.clone(),
            "kv_transfer_params" => self.kv_transfer_params.clone(),
            _ => self.session.take(),
        }
    }
}

/// Parses `body` in one pass. A chat route's prompt is `messages`; any other's is the
/// [`PROMPT_FIELDS`]. The error says why the body is not JSON; errors in fields are in the
/// result. The whole body is checked to be UTF-8 first, as JSON must be: skipped strings are
/// not looked into.
pub(super) fn read(body: &[u8], kind: ApiKind, session_key: &str) -> Result<Fields, String> {
    let text = std::str::from_utf8(body)
        .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = (&mut de)
        .deserialize_any(Top {
            kind,
            session_key,
            body: text,
        })
        .and_then(|fields| de.end().map(|()| fields))
        .map_err(|e| e.to_string())?;
    Ok(fields)
}

/// Which top-level key this is.
enum Key {
    Model,
    Stream,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    KvTransferParams,
    Messages,
    /// Not a chat route: `messages` (Anthropic-style `/v1/messages`), read if well formed.
    OtherMessages,
    /// Not a chat route: index into [`PREAMBLE_FIELDS`].
    Preamble(usize),
    /// `tools`, on the routes whose prompt renders them.
    Tools,
    /// Index into [`PROMPT_FIELDS`].
    Prompt(usize),
    Session,
    Other,
}

#[derive(Clone, Copy)]
struct Top<'k> {
    kind: ApiKind,
    session_key: &'k str,
    /// The whole body, which borrowed values (`tools`) are slices of.
    body: &'k str,
}

impl<'de> DeserializeSeed<'de> for Top<'_> {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(KeyVisitor(self))
    }
}

struct KeyVisitor<'k>(Top<'k>);

impl<'de> Visitor<'de> for KeyVisitor<'_> {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<Key, E> {
        let chat = self.0.kind == ApiKind::Chat;
        Ok(match k {
            "model" => Key::Model,
            "stream" => Key::Stream,
            "max_tokens" => Key::MaxTokens,
            "max_completion_tokens" => Key::MaxCompletionTokens,
            "max_output_tokens" => Key::MaxOutputTokens,
            "kv_transfer_params" => Key::KvTransferParams,
            "messages" if chat => Key::Messages,
            "messages" => Key::OtherMessages,
            "tools" if renders_tools(self.0.kind) => Key::Tools,
            _ if chat && k == self.0.session_key => Key::Session,
            _ if chat => Key::Other,
            _ => {
                let at = |fields: &[&str]| fields.iter().position(|f| *f == k);
                match (at(&PROMPT_FIELDS), at(&PREAMBLE_FIELDS)) {
                    (Some(i), _) => Key::Prompt(i),
                    (_, Some(i)) => Key::Preamble(i),
                    _ if k == self.0.session_key => Key::Session,
                    _ => Key::Other,
                }
            }
        })
    }
}

/// The `visit_*` methods for numbers, booleans and null, all answering `$scalar`.
macro_rules! others {
    ($ty:ty, $scalar:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<$ty, E> {
            Ok($scalar)
        }
        fn visit_i64<E>(self, _: i64) -> Result<$ty, E> {
            Ok($scalar)
        }
        fn visit_u64<E>(self, _: u64) -> Result<$ty, E> {
            Ok($scalar)
        }
        fn visit_f64<E>(self, _: f64) -> Result<$ty, E> {
            Ok($scalar)
        }
        fn visit_unit<E>(self) -> Result<$ty, E> {
            Ok($scalar)
        }
    };
}

/// The `visit_*` methods for numbers and booleans, all answering `self.$method()`.
macro_rules! numbers_via {
    ($ty:ty, $method:ident) => {
        fn visit_bool<E>(self, _: bool) -> Result<$ty, E> {
            Ok(self.$method())
        }
        fn visit_i64<E>(self, _: i64) -> Result<$ty, E> {
            Ok(self.$method())
        }
        fn visit_u64<E>(self, _: u64) -> Result<$ty, E> {
            Ok(self.$method())
        }
        fn visit_f64<E>(self, _: f64) -> Result<$ty, E> {
            Ok(self.$method())
        }
    };
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = Fields;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields = Fields::empty_object();
        // Chat: `messages` in the first slot; otherwise one slot per prompt field.
        let mut parts: [Option<Result<PromptText, BadRequest>>; 5] = Default::default();
        let mut preamble: [Option<String>; 2] = Default::default();
        let mut other_messages = None;
        let mut tools = 0..0;
        while let Some(key) = map.next_key_seed(self)? {
            match key {
                Key::Model => fields.model = Some(map.next_value()?),
                Key::Stream => fields.stream = Some(map.next_value()?),
                Key::MaxTokens => fields.max_tokens = Some(map.next_value()?),
                Key::MaxCompletionTokens => fields.max_completion_tokens = Some(map.next_value()?),
                Key::MaxOutputTokens => fields.max_output_tokens = Some(map.next_value()?),
                Key::KvTransferParams => fields.kv_transfer_params = Some(map.next_value()?),
                Key::Session => fields.session = Some(map.next_value()?),
                Key::Messages => {
                    fields.has_messages = true;
                    parts[0] = Some(map.next_value_seed(Messages { body: self.body })?);
                }
                Key::Prompt(i) => {
                    let field = PromptField {
                        index: i,
                        strict: validated(self.kind, PROMPT_FIELDS[i]),
                    };
                    parts[i] = Some(map.next_value_seed(field)?);
                }
                // Read for their text only: no chat template applies to them here.
                Key::OtherMessages => {
                    let messages = Messages { body: self.body };
                    other_messages = map.next_value_seed(messages)?.ok().map(|mut p| {
                        p.messages.clear();
                        p
                    })
                }
                Key::Preamble(i) => {
                    let mut text = String::new();
                    let ok = map.next_value_seed(Content { text: &mut text })?;
                    preamble[i] = ok.then_some(text);
                }
                Key::Tools => {
                    let raw: &serde_json::value::RawValue = map.next_value()?;
                    tools = tool_list(self.body, raw.get());
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let mut prompt = PromptText {
            tools,
            ..PromptText::default()
        };
        for text in preamble.into_iter().flatten() {
            prompt.text.push_str(&text);
        }
        if let Some(messages) = other_messages {
            prompt.append(messages);
        }
        for part in parts.into_iter().flatten() {
            match part {
                Ok(text) => prompt.append(text),
                Err(e) => {
                    fields.prompt = Err(e);
                    return Ok(fields);
                }
            }
        }
        fields.prompt = Ok(prompt);
        Ok(fields)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Fields, A::Error> {
        drain_seq(seq)?;
        Ok(Fields::empty())
    }
    fn visit_str<E>(self, _: &str) -> Result<Fields, E> {
        Ok(Fields::empty())
    }
    others!(Fields, Fields::empty());
}

/// Whether requests of `kind` have their `tools` rendered into the prompt (by the chat template).
pub(super) fn renders_tools(kind: ApiKind) -> bool {
    matches!(kind, ApiKind::Chat | ApiKind::Responses | ApiKind::Messages)
}

/// Where a `tools` (or `tool_calls`) value, `raw` (a slice of `body`), is in `body` when it is
/// a list; else empty (`null`, or a value vLLM refuses).
pub(super) fn tool_list(body: &str, raw: &str) -> std::ops::Range<usize> {
    let start = (raw.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
    let end = start.wrapping_add(raw.len());
    match body.get(start..end) {
        Some(slice) if std::ptr::eq(slice, raw) && raw.starts_with('[') => start..end,
        _ => 0..0,
    }
}

/// Skips the rest of an array; returns how many elements it had.
fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<u64, A::Error> {
    let mut n = 0;
    while seq.next_element::<IgnoredAny>()?.is_some() {
        n += 1;
    }
    Ok(n)
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A value where only "a string, or not" matters: the string (borrowed from the body when it has
/// no escapes), or `None` for anything else, which is skipped.
struct Str<'de>(Option<Cow<'de, str>>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrVisitor)
    }
}

struct StrVisitor;

impl<'de> Visitor<'de> for StrVisitor {
    type Value = Str<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Str<'de>, E> {
        Ok(Str(Some(Cow::Borrowed(s))))
    }
    fn visit_str<E>(self, s: &str) -> Result<Str<'de>, E> {
        Ok(Str(Some(Cow::Owned(s.to_owned()))))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Str<'de>, A::Error> {
        drain_seq(seq)?;
        Ok(Str(None))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Str<'de>, A::Error> {
        drain_map(map)?;
        Ok(Str(None))
    }
    others!(Str<'de>, Str(None));
}

/// `messages`: an array of `{role, content}` objects, joined as `role: content\n`.
struct Messages<'k> {
    /// The whole body, which borrowed values (`tool_calls`) are slices of.
    body: &'k str,
}

type Prompt = Result<PromptText, BadRequest>;

fn not_an_array() -> Prompt {
    Err(BadRequest::new("messages", "'messages' must be an array"))
}

impl<'de> DeserializeSeed<'de> for Messages<'_> {
    type Value = Prompt;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Prompt, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Messages<'_> {
    type Value = Prompt;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
        let mut prompt = PromptText::default();
        let mut i = 0;
        while let Some(result) = seq.next_element_seed(Message {
            text: &mut prompt.text,
            spans: &mut prompt.messages,
            call_bytes: &mut prompt.call_bytes,
            body: self.body,
            i,
        })? {
            if let Err(e) = result {
                drain_seq(seq)?;
                return Ok(Err(e));
            }
            i += 1;
        }
        Ok(Ok(prompt))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Prompt, A::Error> {
        drain_map(map)?;
        Ok(not_an_array())
    }
    fn visit_str<E>(self, _: &str) -> Result<Prompt, E> {
        Ok(not_an_array())
    }
    others!(Prompt, not_an_array());
}

/// One chat message, appended to `text`, its place recorded in `spans`.
struct Message<'t> {
    text: &'t mut String,
    spans: &'t mut Vec<MessageSpan>,
    /// Where a message's `tool_calls` bytes are added.
    call_bytes: &'t mut usize,
    body: &'t str,
    i: usize,
}

impl Message<'_> {
    fn not_an_object(&self) -> Result<(), BadRequest> {
        Err(BadRequest::new(
            "messages",
            format!(
                "messages[{}] must be an object with 'role' and 'content'",
                self.i
            ),
        ))
    }
}

impl<'de> DeserializeSeed<'de> for Message<'_> {
    type Value = Result<(), BadRequest>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Message<'_> {
    type Value = Result<(), BadRequest>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // The message's text is `role: content`: `prefix` bytes of `role: ` from `start`, then
        // the content from `content_start`. Either key may come first, and the last of a
        // duplicate counts.
        let start = self.text.len();
        let mut prefix = 0;
        let mut content_start = None;
        let mut role_is_string = false;
        let mut content_ok = true;
        let mut calls = 0;
        while let Some(Str(key)) = map.next_key::<Str>()? {
            match key.as_deref() {
                Some("role") => {
                    let Str(role) = map.next_value()?;
                    self.text.replace_range(start..start + prefix, "");
                    prefix = role.as_ref().map_or(0, |r| r.len() + 2);
                    if let Some(r) = &role {
                        self.text.insert_str(start, ": ");
                        self.text.insert_str(start, r);
                    }
                    role_is_string = role.is_some();
                    content_start = content_start.map(|_| start + prefix);
                }
                Some("content") => {
                    self.text.truncate(content_start.unwrap_or(self.text.len()));
                    content_start = Some(self.text.len());
                    content_ok = map.next_value_seed(Content {
                        text: &mut *self.text,
                    })?;
                }
                Some("tool_calls") => {
                    let raw: &serde_json::value::RawValue = map.next_value()?;
                    calls = tool_list(self.body, raw.get()).len();
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !role_is_string {
            return Ok(Err(BadRequest::new(
                "messages",
                format!("messages[{}].role must be a string", self.i),
            )));
        }
        if !content_ok {
            return Ok(Err(BadRequest::new(
                "messages",
                format!(
                    "messages[{}].content must be a string or an array of parts",
                    self.i
                ),
            )));
        }
        *self.call_bytes += calls;
        let end = self.text.len();
        self.spans.push(MessageSpan {
            role: start..start + prefix - 2,
            content: (start + prefix).min(end)..end,
        });
        self.text.push('\n');
        Ok(Ok(()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        drain_seq(seq)?;
        Ok(self.not_an_object())
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(self.not_an_object())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(self.not_an_object())
    }
    numbers_via!(Self::Value, not_an_object);
}

/// A message's `content`: null, a string, or an array of parts whose `text` strings count.
/// `false` for anything else.
struct Content<'t> {
    text: &'t mut String,
}

impl<'de> DeserializeSeed<'de> for Content<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Content<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_str<E>(self, s: &str) -> Result<bool, E> {
        self.text.push_str(s);
        Ok(true)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(true)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        // Text parts joined by a newline, as vLLM joins them for the chat template.
        let mut first = true;
        while let Some(Part(text)) = seq.next_element()? {
            if let Some(t) = text {
                if !std::mem::take(&mut first) {
                    self.text.push('\n');
                }
                self.text.push_str(&t);
            }
        }
        Ok(true)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        drain_map(map)?;
        Ok(false)
    }
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
}

/// A content part: its `text` if that is a string (the last `text` key counts); other parts, and
/// parts that are not objects, add nothing.
struct Part<'de>(Option<Cow<'de, str>>);

impl<'de> Deserialize<'de> for Part<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PartVisitor)
    }
}

struct PartVisitor;

impl<'de> Visitor<'de> for PartVisitor {
    type Value = Part<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Part<'de>, A::Error> {
        let mut text = None;
        while let Some(Str(key)) = map.next_key::<Str>()? {
            if key.as_deref() == Some("text") {
                text = map.next_value::<Str>()?.0;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Part(text))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Part<'de>, A::Error> {
        drain_seq(seq)?;
        Ok(Part(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<Part<'de>, E> {
        Ok(Part(None))
    }
    others!(Part<'de>, Part(None));
}

/// One of the [`PROMPT_FIELDS`]: a string, an array of strings, token ids, or arrays of token
/// ids (and, for `input`, Responses API items, counted by their JSON text).
struct PromptField {
    /// Index into [`PROMPT_FIELDS`].
    index: usize,
    /// Whether a bad value is an error ([`validated`]) or adds nothing.
    strict: bool,
}

impl PromptField {
    fn bad(&self) -> Prompt {
        let field = PROMPT_FIELDS[self.index];
        if !self.strict {
            return Ok(PromptText::default());
        }
        Err(BadRequest::new(
            field,
            format!("'{field}' must be a string, an array of strings, or token ids"),
        ))
    }
}

impl<'de> DeserializeSeed<'de> for PromptField {
    type Value = Prompt;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Prompt, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PromptField {
    type Value = Prompt;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_str<E>(self, s: &str) -> Result<Prompt, E> {
        Ok(Ok(PromptText {
            text: s.to_owned(),
            ..PromptText::default()
        }))
    }
    fn visit_unit<E>(self) -> Result<Prompt, E> {
        Ok(Ok(PromptText::default()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
        let mut prompt = PromptText::default();
        let input = PROMPT_FIELDS[self.index] == "input";
        while let Some(ok) = seq.next_element_seed(Item {
            prompt: &mut prompt,
            input,
        })? {
            if !ok {
                drain_seq(seq)?;
                return Ok(self.bad());
            }
        }
        Ok(Ok(prompt))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Prompt, A::Error> {
        drain_map(map)?;
        Ok(self.bad())
    }
    numbers_via!(Prompt, bad);
}

/// One element of a prompt array; `false` if it is of a kind not allowed there.
struct Item<'p> {
    prompt: &'p mut PromptText,
    input: bool,
}

impl<'de> DeserializeSeed<'de> for Item<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Item<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_str<E>(self, s: &str) -> Result<bool, E> {
        self.prompt.text.push_str(s);
        Ok(true)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        self.prompt.token_ids += 1;
        Ok(true)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        self.prompt.token_ids += 1;
        Ok(true)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        self.prompt.token_ids += 1;
        Ok(true)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bool, A::Error> {
        self.prompt.token_ids += drain_seq(seq)?;
        Ok(true)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        if !self.input {
            drain_map(map)?;
            return Ok(false);
        }
        // Responses API items: counted by their text as JSON.
        let item = Value::deserialize(MapAccessDeserializer::new(map))?;
        self.prompt.text.push_str(&item.to_string());
        Ok(true)
    }
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
}
