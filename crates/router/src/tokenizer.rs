//! `--tokenizer PATH`: prompt tokens counted exactly, with the served model's Hugging Face
//! `tokenizer.json`, instead of estimated from the text's length (one token per 4 bytes).
//!
//! Why it is optional: the estimate is off by tens of percent for code, non-English text or a
//! tokenizer unlike Llama 3's, and a prompt's size is what the TTFT prediction and the phase rule
//! start from; but the `tokenizers` crate is a large dependency (regex engines, a thread pool),
//! so it is compiled in only with `--features tokenizer`. Counts include the tokenizer's special
//! tokens (the BOS a completion prompt gets from vLLM); a chat prompt is counted as the analyzer
//! flattens it (`role: content` lines), not through the model's chat template.

use qoe_core::prompt::PromptTokenizer;
use std::path::Path;

/// Loads the tokenizer at `path` (the `--tokenizer` setting), or says why it cannot.
pub fn load(path: &Path) -> anyhow::Result<PromptTokenizer> {
    imp::load(path).map_err(|e| anyhow::anyhow!("--tokenizer {}: {e}", path.display()))
}

#[cfg(feature = "tokenizer")]
mod imp {
    use qoe_core::prompt::{estimate_tokens, PromptTokenizer, TokenCounter};
    use std::path::Path;
    use std::sync::Arc;

    struct HfTokenizer(tokenizers::Tokenizer);

    impl TokenCounter for HfTokenizer {
        fn count(&self, text: &str) -> u32 {
            match self.0.encode_fast(text, true) {
                Ok(encoding) => encoding.len().min(u32::MAX as usize) as u32,
                // Not expected for text (a model that cannot tokenize some input): estimated.
                Err(_) => estimate_tokens(text),
            }
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<PromptTokenizer> {
        let mut tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            anyhow::anyhow!("not a Hugging Face tokenizer.json that can be read: {e}")
        })?;
        // A file saved with truncation or padding on would cap or pad every count.
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_padding(None);
        Ok(PromptTokenizer(Arc::new(HfTokenizer(tokenizer))))
    }
}

#[cfg(not(feature = "tokenizer"))]
mod imp {
    use qoe_core::prompt::PromptTokenizer;
    use std::path::Path;

    pub fn load(_: &Path) -> anyhow::Result<PromptTokenizer> {
        anyhow::bail!(
            "this qoe-router was built without tokenizer support; build it with \
             `cargo build --release --features tokenizer`"
        )
    }
}

#[cfg(all(test, feature = "tokenizer"))]
mod tests {
    use super::*;

    /// A word-level tokenizer over whitespace-split words, with a BOS added to every sequence
    /// and, saved in the file, truncation to 4 tokens.
    const WORDS_JSON: &str = include_str!("../tests/fixtures/words-tokenizer.json");

    #[test]
    fn counts_words_and_the_bos_without_the_files_truncation() {
        let path = std::env::temp_dir().join(format!("qoe-tok-{}.json", std::process::id()));
        std::fs::write(&path, WORDS_JSON).unwrap();
        let t = load(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(t.count("hello world"), 3);
        // Unknown words are one token each; the file's truncation to 4 is lifted.
        assert_eq!(t.count("hello there big wide world"), 6);
    }

    #[test]
    fn a_file_that_is_not_a_tokenizer_is_an_error_naming_the_setting() {
        let path = std::env::temp_dir().join(format!("qoe-tok-bad-{}.json", std::process::id()));
        std::fs::write(&path, "{\"model\": 3}").unwrap();
        let err = load(&path).err().unwrap().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(err.starts_with("--tokenizer "), "{err}");
        let err = load(Path::new("/nonexistent/tokenizer.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
    }
}

#[cfg(all(test, not(feature = "tokenizer")))]
mod tests {
    use super::*;

    #[test]
    fn without_the_feature_the_setting_says_how_to_get_it() {
        let err = load(Path::new("t.json")).err().unwrap().to_string();
        assert!(err.starts_with("--tokenizer t.json: "), "{err}");
        assert!(err.contains("--features tokenizer"), "{err}");
    }
}
