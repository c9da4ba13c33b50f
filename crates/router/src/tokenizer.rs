//! `--tokenizer PATH`: prompt tokens counted exactly, with the served model's Hugging Face
//! `tokenizer.json`, instead of estimated from the text's length (one token per 4 bytes).
//!
//! Why it is optional: the estimate is off by tens of percent for code, non-English text or a
//! tokenizer unlike Llama 3's, and a prompt's size is what the TTFT prediction and the phase rule
//! start from; but the `tokenizers` crate is a large dependency (regex engines, a thread pool),
//! so it is compiled in only with `--features tokenizer`. Counts include the tokenizer's special
//! tokens (the BOS a completion prompt gets from vLLM). A chat is rendered through the model's
//! chat template, as vLLM renders it (transformers' Jinja settings, `add_generation_prompt`), and
//! its text counted without added special tokens, when the template is beside the tokenizer:
//! `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`. The template gets what
//! vLLM gives it (tools, tool calls, `chat_template_kwargs`, ...; see `ChatTemplate::render`).
//! Without a usable template, or for messages it cannot render, a chat is counted as the
//! analyzer flattens it (`role: content` lines). An engine's own `--chat-template` is not known
//! here: the same file beside the tokenizer gives the same count.

use prometheus_client::metrics::counter::Counter;
use qoe_core::prompt::PromptTokenizer;
use std::path::Path;

/// Loads the tokenizer at `path` (the `--tokenizer` setting), or says why it cannot;
/// `fallbacks` counts the chats its template could not render.
pub fn load(path: &Path, fallbacks: Counter) -> anyhow::Result<PromptTokenizer> {
    imp::load(path, fallbacks).map_err(|e| anyhow::anyhow!("--tokenizer {}: {e}", path.display()))
}

/// What can be checked of the setting without loading it (`--print-config`, a reloaded file):
/// that this build can use it and that the file is there. A relative path is the working
/// directory's, as for every path setting.
pub fn check(path: &Path) -> anyhow::Result<()> {
    let fail = |e: String| anyhow::anyhow!("--tokenizer {}: {e}", path.display());
    #[cfg(not(feature = "tokenizer"))]
    return Err(fail(imp::WITHOUT.into()));
    #[cfg(feature = "tokenizer")]
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(fail("not a file".into())),
        Err(e) => Err(fail(e.to_string())),
    }
}

#[cfg(feature = "tokenizer")]
mod imp {
    use indexmap::IndexMap;
    use minijinja::value::{Kwargs, Value, ValueKind};
    use prometheus_client::metrics::counter::Counter;
    use qoe_core::prompt::{estimate_tokens, ChatMessage, PromptTokenizer, TokenCounter};
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    struct HfTokenizer {
        tokenizer: tokenizers::Tokenizer,
        chat: Option<ChatTemplate>,
        /// The `tokenizer.json`, for what is logged.
        path: std::path::PathBuf,
        /// Chats counted as flattened text (`qoe_router_chat_template_fallbacks_total`).
        fallbacks: Counter,
        /// When a failed render was last logged, in seconds of [`Instant`] since `started`.
        warned_at: AtomicU64,
        started: Instant,
    }

    /// Failed renders are logged at most once a minute (with the template's error); every one
    /// is counted.
    const WARN_EVERY_SECS: u64 = 60;

    /// A model's chat template and the special tokens it refers to.
    pub(super) struct ChatTemplate {
        env: minijinja::Environment<'static>,
        bos_token: String,
        eos_token: String,
        unk_token: String,
        pad_token: String,
    }

    impl ChatTemplate {
        /// The prompt text vLLM would build for `messages` (roles and text as the analyzer read
        /// them) of the chat `request`, as transformers renders it: the request's `tools`,
        /// `documents`, `add_generation_prompt` (default on), `continue_final_message` and
        /// `chat_template_kwargs`, and each message's `name`, `tool_call_id` and `tool_calls`, as
        /// vLLM passes them on. An error when the template raises for them, or runs past its
        /// bounds.
        pub(super) fn render(
            &self,
            messages: &[ChatMessage<'_>],
            request: &[u8],
        ) -> Result<String, String> {
            // Keys in the order sent (the `preserve_order` feature), as Python reads them.
            let request: Value = serde_json::from_slice(request).unwrap_or_default();
            let sent = request.get_attr("messages").unwrap_or_default();
            let messages: Vec<Value> = messages
                .iter()
                .enumerate()
                .map(|(i, m)| template_message(m, &sent.get_item_by_index(i).unwrap_or_default()))
                .collect();
            let field = |key: &str| request.get_attr(key).ok().filter(|v| !v.is_undefined());
            let flag = |key: &str, default: bool| field(key).map_or(default, |v| truthy(&v));
            let mut ctx: IndexMap<Value, Value> = [
                ("bos_token", Value::from(&*self.bos_token)),
                ("eos_token", Value::from(&*self.eos_token)),
                ("unk_token", Value::from(&*self.unk_token)),
                ("pad_token", Value::from(&*self.pad_token)),
                (
                    "add_generation_prompt",
                    Value::from(flag("add_generation_prompt", true)),
                ),
                (
                    "continue_final_message",
                    Value::from(flag("continue_final_message", false)),
                ),
                (
                    "tools",
                    field("tools")
                        .filter(is_list)
                        .map(|t| tools(&t))
                        .unwrap_or(Value::from(())),
                ),
                ("documents", field("documents").unwrap_or(Value::from(()))),
            ]
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect();
            if let Some(kwargs) = field("chat_template_kwargs") {
                for key in kwargs.try_iter().into_iter().flatten() {
                    let value = kwargs.get_item(&key).unwrap_or_default();
                    ctx.insert(key, value);
                }
            }
            // The request's field only: vLLM does not let the kwargs set it.
            let continue_final = flag("continue_final_message", false);
            let last = messages
                .last()
                .map(|m| m.get_attr("content").unwrap_or_default());
            ctx.insert(Value::from("messages"), Value::from(messages));
            let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
            let mut out = BoundedText::default();
            template
                .render_captured_to(Value::from_object(ctx), &mut out)
                .map_err(|e| e.to_string())?;
            let rendered = String::from_utf8(out.0).map_err(|e| e.to_string())?;
            if !continue_final {
                return Ok(rendered);
            }
            // As transformers: the text ends where the final message's content, stripped, last
            // appears, with its trailing spaces if the template kept them; a template that
            // drops it is an error.
            let final_text = last.as_ref().and_then(|v| v.as_str()).unwrap_or_default();
            let stripped = final_text.trim();
            let at = rendered
                .rfind(stripped)
                .ok_or("continue_final_message: the final message is not in the rendered text")?;
            let kept = final_text.trim_start().len();
            let end = if rendered.get(at..at + kept) == Some(final_text) {
                at + kept
            } else {
                at + stripped.len()
            };
            Ok(rendered[..end].to_string())
        }
    }

    /// A message as vLLM hands it to the template: the role and text the analyzer read, the
    /// `name` it was sent with, a tool result's `tool_call_id`, and an assistant's `tool_calls`
    /// (a non-empty list, their JSON `arguments` decoded) and `reasoning`.
    fn template_message(message: &ChatMessage<'_>, sent: &Value) -> Value {
        let mut m: IndexMap<Value, Value> = IndexMap::new();
        m.insert(Value::from("role"), Value::from(message.role));
        m.insert(Value::from("content"), Value::from(message.content));
        let mut copy = |key: &str, keep: &dyn Fn(&Value) -> Option<Value>| {
            if let Some(v) = sent.get_attr(key).ok().as_ref().and_then(keep) {
                m.insert(Value::from(key), v);
            }
        };
        copy("name", &|v| v.as_str().map(Value::from));
        if message.role == "tool" {
            copy("tool_call_id", &|v| (!v.is_undefined()).then(|| v.clone()));
        }
        if message.role == "assistant" {
            // Only a list with calls in it: vLLM drops an empty one.
            copy("tool_calls", &|v| {
                let calls = v
                    .try_iter()
                    .ok()
                    .filter(|_| is_list(v) && v.len() != Some(0))?;
                Some(calls.map(|call| decoded_arguments(&call)).collect())
            });
            // vLLM takes `reasoning`, else `reasoning_content`, and passes it under both names.
            let reasoning = ["reasoning", "reasoning_content"]
                .into_iter()
                .find_map(|key| {
                    let v = sent.get_attr(key).ok()?;
                    v.as_str().is_some_and(|r| !r.is_empty()).then_some(v)
                });
            if let Some(reasoning) = reasoning {
                m.insert(Value::from("reasoning"), reasoning.clone());
                m.insert(Value::from("reasoning_content"), reasoning);
            }
        }
        Value::from_object(m)
    }

    fn is_list(v: &Value) -> bool {
        v.kind() == ValueKind::Seq
    }

    /// A boolean request field as pydantic reads it: JSON booleans, and the strings it takes
    /// for them (`"true"`, `"yes"`, `"1"`, ...); anything else (which vLLM refuses) as Jinja's
    /// truth.
    fn truthy(v: &Value) -> bool {
        match v.as_str().map(str::to_ascii_lowercase).as_deref() {
            Some("1" | "true" | "t" | "yes" | "y" | "on") => true,
            Some(_) => false,
            None => v.is_true(),
        }
    }

    /// Rendered text, at most [`RENDERED_MAX_BYTES`]: a template can multiply what it is given
    /// (`tojson(indent=4)` over nested lists), and a render past the bound fails, so that the
    /// chat is counted as its flattened text instead.
    #[derive(Default)]
    struct BoundedText(Vec<u8>);

    /// Template instructions per render, at most.
    const TEMPLATE_FUEL: u64 = 5_000_000;

    /// Four times the longest context of common models in bytes of text (≈ 1M tokens).
    const RENDERED_MAX_BYTES: usize = 4 << 20;

    impl std::io::Write for BoundedText {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0.len() + buf.len() > RENDERED_MAX_BYTES {
                return Err(std::io::Error::other("the rendered chat is too long"));
            }
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A tool call with `function.arguments` as vLLM hands it on: a JSON string decoded into
    /// its value, an object or a list kept, anything else (missing, empty, not JSON) `{}`.
    fn decoded_arguments(call: &Value) -> Value {
        let Ok(function) = call.get_attr("function") else {
            return call.clone();
        };
        if function.is_undefined() {
            return call.clone();
        }
        let arguments = function.get_attr("arguments").unwrap_or_default();
        let empty = || Value::from_object(IndexMap::<Value, Value>::new());
        let decoded = match arguments.as_str() {
            Some(text) => serde_json::from_str::<Value>(text).unwrap_or_else(|_| empty()),
            None if matches!(arguments.kind(), ValueKind::Map | ValueKind::Seq) => arguments,
            None => empty(),
        };
        let function = with_key(&function, "arguments", decoded);
        with_key(call, "function", function)
    }

    /// `map` with `key` set to `value` (in its place if there, else last).
    fn with_key(map: &Value, key: &str, value: Value) -> Value {
        let mut out: IndexMap<Value, Value> = map
            .try_iter()
            .into_iter()
            .flatten()
            .map(|k| {
                let v = map.get_item(&k).unwrap_or_default();
                (k, v)
            })
            .collect();
        out.insert(Value::from(key), value);
        Value::from_object(out)
    }

    /// The request's `tools` as vLLM dumps its tool model for the template: `type` (default
    /// `function`) and `function` with `name`, `description` and `parameters` (none when not
    /// sent), and `strict` when sent; other keys are not passed on.
    fn tools(sent: &Value) -> Value {
        let Ok(list) = sent.try_iter() else {
            return sent.clone();
        };
        list.map(|tool| {
            let function = tool.get_attr("function").unwrap_or_default();
            let get = |key: &str| {
                let v = function.get_attr(key).unwrap_or_default();
                if v.is_undefined() {
                    Value::from(())
                } else {
                    v
                }
            };
            let mut f: IndexMap<Value, Value> = ["name", "description", "parameters"]
                .into_iter()
                .map(|k| (Value::from(k), get(k)))
                .collect();
            if !get("strict").is_none() {
                f.insert(Value::from("strict"), get("strict"));
            }
            let kind = tool.get_attr("type").unwrap_or_default();
            let kind = if kind.is_undefined() {
                Value::from("function")
            } else {
                kind
            };
            let t: IndexMap<Value, Value> = [
                (Value::from("type"), kind),
                (Value::from("function"), Value::from_object(f)),
            ]
            .into_iter()
            .collect();
            Value::from_object(t)
        })
        .collect()
    }

    /// transformers' `tojson` (Python's `json.dumps`, `ensure_ascii=False`): `", "` and `": "`
    /// between items, `indent=N` for one item per line, keys in their order, nothing escaped
    /// for HTML (minijinja's own filter escapes `<`, `>`, `&` and `'`, which changes the count).
    fn python_tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
        let indent: Option<Value> = kwargs.get("indent")?;
        let separators: Option<Vec<String>> = kwargs.get("separators")?;
        let (item, key) = match &separators {
            Some(s) if s.len() == 2 => (s[0].as_str(), s[1].as_str()),
            _ if indent.as_ref().is_some_and(|i| !i.is_none()) => (",", ": "),
            _ => (", ", ": "),
        };
        let pad = match &indent {
            Some(i) if i.as_str().is_some() => Some(i.as_str().unwrap_or_default().to_string()),
            Some(i) if !i.is_none() => Some(" ".repeat(i.as_usize().unwrap_or(0))),
            _ => None,
        };
        let mut out = BoundedText::default();
        let formatter = PythonJson {
            item: item.as_bytes(),
            key: key.as_bytes(),
            pad: pad.as_deref().map(str::as_bytes),
            depth: 0,
            has_value: false,
        };
        let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
        serde::Serialize::serialize(&value, &mut serializer).map_err(|e| {
            minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
        })?;
        Ok(Value::from(String::from_utf8(out.0).unwrap_or_default()))
    }

    /// `json.dumps`' layout: `item` between items, `key` after a key, and with `pad` each item
    /// on its own line indented by `pad` per level (an empty container stays `[]` / `{}`).
    struct PythonJson<'a> {
        item: &'a [u8],
        key: &'a [u8],
        pad: Option<&'a [u8]>,
        depth: usize,
        has_value: bool,
    }

    impl PythonJson<'_> {
        fn open<W: ?Sized + std::io::Write>(&mut self, w: &mut W, c: &[u8]) -> std::io::Result<()> {
            self.depth += 1;
            self.has_value = false;
            w.write_all(c)
        }
        fn close<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            c: &[u8],
        ) -> std::io::Result<()> {
            self.depth -= 1;
            if let (Some(pad), true) = (self.pad, self.has_value) {
                self.newline(w, pad)?;
            }
            self.has_value = true;
            w.write_all(c)
        }
        fn next<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if !first {
                w.write_all(self.item)?;
            }
            match self.pad {
                Some(pad) => self.newline(w, pad),
                None => Ok(()),
            }
        }
        fn newline<W: ?Sized + std::io::Write>(
            &self,
            w: &mut W,
            pad: &[u8],
        ) -> std::io::Result<()> {
            w.write_all(b"\n")?;
            (0..self.depth).try_for_each(|_| w.write_all(pad))
        }
    }

    impl serde_json::ser::Formatter for PythonJson<'_> {
        fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            self.open(w, b"[")
        }
        fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            self.close(w, b"]")
        }
        fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            self.open(w, b"{")
        }
        fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            self.close(w, b"}")
        }
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            self.next(w, first)
        }
        fn end_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            _: &mut W,
        ) -> std::io::Result<()> {
            self.has_value = true;
            Ok(())
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            self.next(w, first)
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            w.write_all(self.key)
        }
        fn end_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            _: &mut W,
        ) -> std::io::Result<()> {
            self.has_value = true;
            Ok(())
        }
    }

    /// The chat template beside `tokenizer_json`, if there is one that compiles and renders a
    /// one-message chat; otherwise chats are counted as flattened text (with a warning when a
    /// template was there but unusable): the tokenizer itself still counts.
    pub(super) fn chat_template(tokenizer_json: &Path) -> Option<ChatTemplate> {
        match try_chat_template(tokenizer_json) {
            Ok(template) => template,
            Err(e) => {
                tracing::warn!(
                    "--tokenizer {}: {e}; chats are counted without a chat template",
                    tokenizer_json.display()
                );
                None
            }
        }
    }

    fn try_chat_template(tokenizer_json: &Path) -> anyhow::Result<Option<ChatTemplate>> {
        let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
        let config: serde_json::Value = match std::fs::read(dir.join("tokenizer_config.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("tokenizer_config.json beside it: {e}"))?,
            Err(_) => serde_json::Value::Null,
        };
        let token = |key: &str| match &config[key] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_string(),
        };
        let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(text) => text,
            Err(_) => match &config["chat_template"] {
                serde_json::Value::String(s) => s.clone(),
                // A list of named templates: the default one.
                serde_json::Value::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or(named.first())
                    .and_then(|t| t["template"].as_str())
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            },
        };
        if source.is_empty() {
            return Ok(None);
        }
        let mut env = minijinja::Environment::new();
        // As transformers renders chat templates.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", python_tojson);
        // A bound on a template's work per chat (a few hundred instructions a message for
        // the common templates): one that loops beyond it fails, and the chat is counted as
        // its flattened text.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        // Templates that date their system prompt: a date of the same shape.
        env.add_function("strftime_now", |_format: String| "01 Jan 2026".to_string());
        env.add_template_owned("chat", source)
            .map_err(|e| anyhow::anyhow!("its chat template does not compile: {e}"))?;
        let template = ChatTemplate {
            env,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            unk_token: token("unk_token"),
            pad_token: token("pad_token"),
        };
        let probe = [ChatMessage {
            role: "user",
            content: "hello",
        }];
        anyhow::ensure!(
            template.render(&probe, b"{}").is_ok(),
            "its chat template cannot render a one-message chat"
        );
        Ok(Some(template))
    }

    /// Text counted exactly at most (≈ 13 ms of CPU at 5 MB/s, on tokio's blocking pool for a
    /// long body: see the proxy); beyond it the count is extrapolated at the density of what
    /// was counted.
    const EXACT_MAX_BYTES: usize = 64 * 1024;

    impl HfTokenizer {
        fn exact(&self, text: &str, special: bool) -> u32 {
            match self.tokenizer.encode_fast(text, special) {
                Ok(encoding) => encoding.len().min(u32::MAX as usize) as u32,
                // Not expected for text (a model that cannot tokenize some input): estimated.
                Err(_) => estimate_tokens(text),
            }
        }

        /// Exact up to [`EXACT_MAX_BYTES`], extrapolated beyond. `special`: add the tokenizer's
        /// special tokens (a completion prompt; a rendered chat template has its own).
        fn bounded(&self, text: &str, special: bool) -> u32 {
            if text.len() <= EXACT_MAX_BYTES {
                return self.exact(text, special);
            }
            let mut end = EXACT_MAX_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let head = self.exact(&text[..end], special) as f64;
            (head * text.len() as f64 / end as f64).min(u32::MAX as f64) as u32
        }
    }

    impl TokenCounter for HfTokenizer {
        fn count(&self, text: &str) -> u32 {
            self.bounded(text, true)
        }

        fn count_chat(&self, messages: &[ChatMessage<'_>], request: &[u8]) -> Option<u32> {
            match self.chat.as_ref()?.render(messages, request) {
                Ok(rendered) => Some(self.bounded(&rendered, false)),
                Err(e) => {
                    self.fallbacks.inc();
                    self.warn_at_most_once_a_minute(&e);
                    None
                }
            }
        }
    }

    impl HfTokenizer {
        fn warn_at_most_once_a_minute(&self, error: &str) {
            let now = self.started.elapsed().as_secs() + WARN_EVERY_SECS;
            let last = self.warned_at.load(Ordering::Relaxed);
            let due = last == 0 || now >= last + WARN_EVERY_SECS;
            if due
                && self
                    .warned_at
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    "--tokenizer {}: the chat template could not render a request ({error}); \
                     such chats are counted as their flattened text \
                     (qoe_router_chat_template_fallbacks_total)",
                    self.path.display()
                );
            }
        }
    }

    pub fn load(path: &Path, fallbacks: Counter) -> anyhow::Result<PromptTokenizer> {
        let bytes = std::fs::read(path)?;
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow::anyhow!("not a Hugging Face tokenizer.json: {e}"))?;
        // A file saved with truncation or padding on would cap or pad every count.
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_padding(None);
        let chat = chat_template(path);
        Ok(PromptTokenizer(Arc::new(HfTokenizer {
            tokenizer,
            chat,
            path: path.to_path_buf(),
            fallbacks,
            warned_at: AtomicU64::new(0),
            started: Instant::now(),
        })))
    }
}

#[cfg(not(feature = "tokenizer"))]
mod imp {
    use qoe_core::prompt::PromptTokenizer;
    use std::path::Path;

    pub const WITHOUT: &str = "this qoe-router was built without tokenizer support; build it \
                               with `cargo build --release --features tokenizer`";

    pub fn load(
        _: &Path,
        _: prometheus_client::metrics::counter::Counter,
    ) -> anyhow::Result<PromptTokenizer> {
        anyhow::bail!(WITHOUT)
    }
}

#[cfg(all(test, feature = "tokenizer"))]
mod tests {
    use super::*;

    /// A word-level tokenizer over whitespace-split words, with a BOS added to every sequence
    /// and, saved in the file, truncation to 4 tokens.
    const WORDS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/words/tokenizer.json"
    );

    #[test]
    fn counts_words_and_the_bos_without_the_files_truncation() {
        let t = load(Path::new(WORDS), Counter::default()).unwrap();
        assert_eq!(t.count("hello world"), 3);
        // Unknown words are one token each; the file's truncation to 4 is lifted.
        assert_eq!(t.count("hello there big wide world"), 6);
        // Past 64 KiB the rest is extrapolated at the density counted: 2 bytes a word here.
        let long = "a ".repeat(100 * 1024);
        let n = t.count(&long) as f64;
        assert!((n - 102_400.0).abs() < 10.0, "{n}");
    }

    #[test]
    fn a_chat_is_rendered_through_the_template_beside_the_tokenizer() {
        use qoe_core::prompt::ChatMessage;
        let fallbacks = Counter::default();
        let t = load(Path::new(WORDS), fallbacks.clone()).unwrap();
        let m = |role, content| ChatMessage { role, content };
        // "<s> system be brief\n<s> user hello world\n<s> assistant": the template's own BOS
        // tokens, no added one; `.strip()` (Python's, through pycompat) trims the content.
        let chat = [m("system", "  be brief  "), m("user", "hello world")];
        assert_eq!(t.count_chat(&chat, b"{}"), Some(10));
        assert_eq!(fallbacks.get(), 0);
        // A template that raises for these messages: no count (the analyzer falls back), and
        // each such chat is counted.
        assert_eq!(t.count_chat(&[m("tool", "x")], b"{}"), None);
        assert_eq!(t.count_chat(&[m("tool", "y")], b"{}"), None);
        assert_eq!(fallbacks.get(), 2);
        // A tokenizer with no template beside it.
        let dir = std::env::temp_dir().join(format!("qoe-tok-plain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(WORDS, dir.join("tokenizer.json")).unwrap();
        let plain = load(&dir.join("tokenizer.json"), Counter::default()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(plain.count_chat(&chat, b"{}"), None);
    }

    /// Renders as transformers does: a newline after a block tag is dropped, the indentation
    /// before one stripped; `tools` is none; a template that does not compile leaves no
    /// template (and the tokenizer still loads).
    #[test]
    fn templates_render_with_transformers_settings_and_fail_safe() {
        use qoe_core::prompt::ChatMessage;
        let dir = std::env::temp_dir().join(format!("qoe-tok-tpl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokenizer = dir.join("tokenizer.json");
        std::fs::copy(WORDS, &tokenizer).unwrap();
        let template = "{% for m in messages %}\n    {% if tools is not none %}TOOLS{% endif %}\n[{{ m.role }}] {{ m.content }}\n{% endfor %}\n{{ eos_token }}";
        std::fs::write(dir.join("chat_template.jinja"), template).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": {"content": "</s>"}}"#,
        )
        .unwrap();
        let t = super::imp::chat_template(&tokenizer).unwrap();
        let m = [ChatMessage {
            role: "user",
            content: "hi",
        }];
        assert_eq!(t.render(&m, b"{}").unwrap(), "[user] hi\n</s>");
        std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}").unwrap();
        assert!(super::imp::chat_template(&tokenizer).is_none());
        assert_eq!(
            load(&tokenizer, Counter::default())
                .unwrap()
                .count_chat(&m, b"{}"),
            None
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What vLLM passes a template besides roles and text, checked against what vLLM 0.32
    /// rendered for the same request (its `/tokenize` then `/detokenize`): the tools as its
    /// tool model dumps them, names, decoded tool-call arguments, `chat_template_kwargs`,
    /// `add_generation_prompt`, `continue_final_message`, and Python's `json.dumps` layout.
    #[test]
    fn a_template_sees_tools_tool_calls_and_the_requests_settings() {
        use qoe_core::prompt::ChatMessage;
        let t = template_beside_words(concat!(
            "{% if tools is none %}-{% endif %}",
            "{% for t in tools %}{{ t | tojson }}{{ '\\n' }}{% endfor %}",
            "{% for m in messages %}[{{ m.role }}{% if m.name %} {{ m.name }}{% endif %}",
            "{% if 'tool_calls' in m %}+{% endif %}",
            "{% if m.reasoning_content %} <{{ m.reasoning_content }}>{% endif %}",
            "{% if m.tool_call_id %} {{ m.tool_call_id }}{% endif %}] {{ m.content }}",
            "{% for c in m.tool_calls %} {{ c.function.arguments | tojson }}{% endfor %}",
            "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
            "{% if greeting is defined %}{{ greeting }}{% endif %}",
            "{% if shape is defined %}{{ shape | tojson(indent=2) }}{% endif %}",
        ));
        let m = |role, content| ChatMessage { role, content };
        let request = r#"{"model": "m", "tools": [{"function": {"strict": false,
            "parameters": {"b": 1, "a": [true, null, 1.5, "é<\n"]}, "name": "f", "x": 1},
            "extra": 2}, {"type": "function", "function": {"name": "g", "strict": null}}],
            "messages": [{"role": "user", "content": "hi", "name": "ann"},
              {"role": "assistant", "content": null, "reasoning": "hm", "tool_calls": [{"id": "c1",
                "function": {"name": "f", "arguments": "{\"x\": [1, 2]}"}},
                {"function": {"name": "g", "arguments": ""}},
                {"function": {"name": "g", "arguments": "not json"}}]},
              {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
              {"role": "assistant", "content": "ok", "tool_calls": [], "reasoning_content": "x"}],
            "chat_template_kwargs": {"greeting": "!"}, "add_generation_prompt": false}"#;
        let chat = [
            m("user", "hi"),
            m("assistant", ""),
            m("tool", "sunny"),
            m("assistant", "ok"),
        ];
        // As vLLM 0.32 rendered the same request (`/tokenize`, then `/detokenize`).
        assert_eq!(
            t.render(&chat, request.as_bytes()).unwrap(),
            concat!(
                r#"{"type": "function", "function": {"name": "f", "description": null, "#,
                r#""parameters": {"b": 1, "a": [true, null, 1.5, "é<\n"]}, "strict": false}}"#,
                "\n",
                r#"{"type": "function", "function": {"name": "g", "description": null, "#,
                r#""parameters": null}}"#,
                "\n[user ann] hi\n",
                r#"[assistant+ <hm>]  {"x": [1, 2]} {} {}"#,
                "\n[tool c1] sunny\n[assistant <x>] ok\n!",
            )
        );
        // The generation prompt is on by default, and off for pydantic's false strings; a
        // final message continued ends the text, when the request (not its kwargs) asks.
        let chat = [m("user", "hi"), m("assistant", "Sure, ")];
        let plain = r#"{"tools": null, "messages": [{"role": "user", "content": "hi"}]}"#;
        assert_eq!(
            t.render(&chat[..1], plain.as_bytes()).unwrap(),
            "-[user] hi\n[assistant]"
        );
        assert_eq!(
            t.render(&chat[..1], br#"{"add_generation_prompt": "no"}"#)
                .unwrap(),
            "-[user] hi\n"
        );
        let continued = r#"{"continue_final_message": true, "add_generation_prompt": false}"#;
        assert_eq!(
            t.render(&chat, continued.as_bytes()).unwrap(),
            "-[user] hi\n[assistant] Sure, "
        );
        let in_kwargs = r#"{"chat_template_kwargs": {"continue_final_message": true},
            "add_generation_prompt": false}"#;
        assert_eq!(
            t.render(&chat, in_kwargs.as_bytes()).unwrap(),
            "-[user] hi\n[assistant] Sure, \n"
        );
        // The final message continued where its stripped text last appears, its trailing
        // space kept only if the template kept it (here `trim` drops it).
        let trimming = template_beside_words(
            "{% for m in messages %}[{{ m.role }}] {{ m.content | trim }}{{ '\\n' }}{% endfor %}",
        );
        let chat = [m("user", "Sure, go"), m("assistant", "Sure, ")];
        assert_eq!(
            trimming.render(&chat, continued.as_bytes()).unwrap(),
            "[user] Sure, go\n[assistant] Sure,"
        );
        // `json.dumps(indent=2)`: one item per line, empty containers kept short.
        let shaped = r#"{"chat_template_kwargs": {"shape": {"a": [1, {}], "b": []}},
            "add_generation_prompt": false}"#;
        assert_eq!(
            t.render(&[], shaped.as_bytes()).unwrap(),
            "-{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}"
        );
    }

    /// Requests of the wrong shapes (which vLLM refuses) render or fail, never panic: the
    /// template sees what it can of them.
    #[test]
    fn a_template_survives_requests_of_any_shape() {
        use qoe_core::prompt::ChatMessage;
        let t = template_beside_words(concat!(
            "{% for t in tools %}{{ t | tojson }}{{ t.function.name }}{% endfor %}",
            "{% for m in messages %}{{ m.role }} {{ m.content }}",
            "{% for c in m.tool_calls %}{{ c.function.arguments | tojson(indent=1) }}{% endfor %}",
            "{% endfor %}{{ greeting }}",
        ));
        let m = [
            ChatMessage {
                role: "assistant",
                content: "é",
            },
            ChatMessage {
                role: "user",
                content: "x",
            },
        ];
        for request in [
            "",
            "not json",
            "[1, 2]",
            r#"{"tools": {"a": 1}, "messages": "no"}"#,
            r#"{"tools": ["f", 3, null, {"function": "g"}, {"function": {"name": [1]}}]}"#,
            r#"{"messages": [{"tool_calls": "x"}, {"tool_calls": [1, "a", {"function": 5}]}]}"#,
            r#"{"messages": [{"tool_calls": [{"function": {"arguments": 7}},
                {"function": {"arguments": "[1, {\"a\": null}]"}},
                {"function": {"arguments": "\"é\""}}]}]}"#,
            r#"{"chat_template_kwargs": [1, 2], "add_generation_prompt": {"a": 1},
                "continue_final_message": "yes"}"#,
            r#"{"chat_template_kwargs": {"messages": 1, "tools": "t", "greeting": {"a": [1]}}}"#,
            r#"{"messages": [{"reasoning": 5, "name": 3, "tool_call_id": [1]}], "documents": 1}"#,
        ] {
            let _ = t.render(&m, request.as_bytes());
            let _ = t.render(&[], request.as_bytes());
        }
        // Decoded arguments keep their JSON: a list, and a string.
        let request = r#"{"messages": [{"role": "assistant", "tool_calls": [
            {"function": {"arguments": "[1, {\"a\": null}]"}}]}]}"#;
        assert_eq!(
            t.render(&m[..1], request.as_bytes()).unwrap(),
            "assistant é[\n 1,\n {\n  \"a\": null\n }\n]"
        );
    }

    /// A template's work and output are bounded: past either bound the render fails and the
    /// chat is counted as its flattened text.
    #[test]
    fn a_template_cannot_run_away() {
        use qoe_core::prompt::ChatMessage;
        let m = [ChatMessage {
            role: "user",
            content: "hi",
        }];
        let looping = template_beside_words(concat!(
            "{% if spin %}{% for i in range(100000) %}{% for j in range(100000) %}",
            "{% endfor %}{% endfor %}{% endif %}{{ messages[0].content }}",
        ));
        assert_eq!(looping.render(&m, b"{}").unwrap(), "hi");
        let spin = br#"{"chat_template_kwargs": {"spin": true}}"#;
        assert!(looping.render(&m, spin).is_err());
        let copies = template_beside_words("{{ x }}{{ x }}{{ x }}{{ x }}{{ x }}{{ x }}");
        let x = |bytes: usize| {
            format!(
                r#"{{"chat_template_kwargs": {{"x": "{}"}}}}"#,
                "a".repeat(bytes)
            )
        };
        assert!(copies.render(&m, x(1 << 20).as_bytes()).is_err());
        assert_eq!(
            copies.render(&m, x(1 << 10).as_bytes()).unwrap().len(),
            6 << 10
        );
    }

    /// The chat template `source` beside a copy of the words tokenizer.
    fn template_beside_words(source: &str) -> super::imp::ChatTemplate {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("qoe-tok-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokenizer = dir.join("tokenizer.json");
        std::fs::copy(WORDS, &tokenizer).unwrap();
        std::fs::write(dir.join("chat_template.jinja"), source).unwrap();
        let template = super::imp::chat_template(&tokenizer);
        let _ = std::fs::remove_dir_all(&dir);
        template.expect("the template renders a one-message chat")
    }

    #[test]
    fn a_file_that_is_not_a_tokenizer_is_an_error_naming_the_setting() {
        let path = std::env::temp_dir().join(format!("qoe-tok-bad-{}.json", std::process::id()));
        std::fs::write(&path, "{\"model\": 3}").unwrap();
        let err = load(&path, Counter::default()).err().unwrap().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(err.starts_with("--tokenizer "), "{err}");
        assert!(err.contains("not a Hugging Face tokenizer.json"), "{err}");
        let err = load(Path::new("/nonexistent/tokenizer.json"), Counter::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
        assert!(
            !err.contains("not a Hugging Face"),
            "a missing file is not a bad one: {err}"
        );
    }
}

#[cfg(all(test, not(feature = "tokenizer")))]
mod tests {
    use super::*;

    #[test]
    fn without_the_feature_the_setting_says_how_to_get_it() {
        for err in [
            load(Path::new("t.json"), Counter::default()).err().unwrap(),
            check(Path::new("t.json")).err().unwrap(),
        ] {
            let err = err.to_string();
            assert!(err.starts_with("--tokenizer t.json: "), "{err}");
            assert!(err.contains("--features tokenizer"), "{err}");
        }
    }
}
