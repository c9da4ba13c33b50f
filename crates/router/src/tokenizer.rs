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
//! `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`. Without a usable
//! template, or for messages it cannot render, a chat is counted as the analyzer flattens it
//! (`role: content` lines). Not passed to the template: the request's `tools`, a message's
//! `tool_calls`, `chat_template_kwargs`, and an engine's own `--chat-template`; chats that use
//! them count short.

use qoe_core::prompt::PromptTokenizer;
use std::path::Path;

/// Loads the tokenizer at `path` (the `--tokenizer` setting), or says why it cannot.
pub fn load(path: &Path) -> anyhow::Result<PromptTokenizer> {
    imp::load(path).map_err(|e| anyhow::anyhow!("--tokenizer {}: {e}", path.display()))
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
    use qoe_core::prompt::{estimate_tokens, ChatMessage, PromptTokenizer, TokenCounter};
    use std::path::Path;
    use std::sync::Arc;

    struct HfTokenizer {
        tokenizer: tokenizers::Tokenizer,
        chat: Option<ChatTemplate>,
    }

    /// A model's chat template and the special tokens it refers to.
    pub(super) struct ChatTemplate {
        env: minijinja::Environment<'static>,
        bos_token: String,
        eos_token: String,
        unk_token: String,
        pad_token: String,
    }

    impl ChatTemplate {
        /// The prompt text vLLM would build for `messages`, as transformers renders it: no
        /// tools, no documents (the router does not pass a request's `tools` on), a generation
        /// prompt.
        pub(super) fn render(&self, messages: &[ChatMessage<'_>]) -> Option<String> {
            let messages: Vec<_> = messages
                .iter()
                .map(|m| minijinja::context! { role => m.role, content => m.content })
                .collect();
            let ctx = minijinja::context! {
                messages,
                add_generation_prompt => true,
                tools => (),
                documents => (),
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                unk_token => &self.unk_token,
                pad_token => &self.pad_token,
            };
            self.env.get_template("chat").ok()?.render(ctx).ok()
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
            template.render(&probe).is_some(),
            "its chat template cannot render a one-message chat"
        );
        Ok(Some(template))
    }

    /// Text counted exactly at most (≈ 13 ms of CPU at 5 MB/s, on the request's own thread);
    /// beyond it the count is extrapolated at the density of what was counted.
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

        fn count_chat(&self, messages: &[ChatMessage<'_>]) -> Option<u32> {
            let rendered = self.chat.as_ref()?.render(messages)?;
            Some(self.bounded(&rendered, false))
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<PromptTokenizer> {
        let bytes = std::fs::read(path)?;
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow::anyhow!("not a Hugging Face tokenizer.json: {e}"))?;
        // A file saved with truncation or padding on would cap or pad every count.
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_padding(None);
        let chat = chat_template(path);
        Ok(PromptTokenizer(Arc::new(HfTokenizer { tokenizer, chat })))
    }
}

#[cfg(not(feature = "tokenizer"))]
mod imp {
    use qoe_core::prompt::PromptTokenizer;
    use std::path::Path;

    pub const WITHOUT: &str = "this qoe-router was built without tokenizer support; build it \
                               with `cargo build --release --features tokenizer`";

    pub fn load(_: &Path) -> anyhow::Result<PromptTokenizer> {
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
        let t = load(Path::new(WORDS)).unwrap();
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
        let t = load(Path::new(WORDS)).unwrap();
        let m = |role, content| ChatMessage { role, content };
        // "<s> system be brief\n<s> user hello world\n<s> assistant": the template's own BOS
        // tokens, no added one; `.strip()` (Python's, through pycompat) trims the content.
        let chat = [m("system", "  be brief  "), m("user", "hello world")];
        assert_eq!(t.count_chat(&chat), Some(10));
        // A template that raises for these messages: no count (the analyzer falls back).
        assert_eq!(t.count_chat(&[m("tool", "x")]), None);
        // A tokenizer with no template beside it.
        let dir = std::env::temp_dir().join(format!("qoe-tok-plain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(WORDS, dir.join("tokenizer.json")).unwrap();
        let plain = load(&dir.join("tokenizer.json")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(plain.count_chat(&chat), None);
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
        assert_eq!(t.render(&m).unwrap(), "[user] hi\n</s>");
        std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}").unwrap();
        assert!(super::imp::chat_template(&tokenizer).is_none());
        assert_eq!(load(&tokenizer).unwrap().count_chat(&m), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_that_is_not_a_tokenizer_is_an_error_naming_the_setting() {
        let path = std::env::temp_dir().join(format!("qoe-tok-bad-{}.json", std::process::id()));
        std::fs::write(&path, "{\"model\": 3}").unwrap();
        let err = load(&path).err().unwrap().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(err.starts_with("--tokenizer "), "{err}");
        assert!(err.contains("not a Hugging Face tokenizer.json"), "{err}");
        let err = load(Path::new("/nonexistent/tokenizer.json"))
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
            load(Path::new("t.json")).err().unwrap(),
            check(Path::new("t.json")).err().unwrap(),
        ] {
            let err = err.to_string();
            assert!(err.starts_with("--tokenizer t.json: "), "{err}");
            assert!(err.contains("--features tokenizer"), "{err}");
        }
    }
}
