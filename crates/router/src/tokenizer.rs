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
    use qoe_core::prompt::{estimate_tokens, PromptTokenizer, TokenCounter};
    use std::path::Path;
    use std::sync::Arc;

    struct HfTokenizer(tokenizers::Tokenizer);

    /// Text counted exactly at most (≈ 13 ms of CPU at 5 MB/s, on the request's own thread);
    /// beyond it the count is extrapolated at the density of what was counted.
    const EXACT_MAX_BYTES: usize = 64 * 1024;

    impl HfTokenizer {
        fn exact(&self, text: &str) -> u32 {
            match self.0.encode_fast(text, true) {
                Ok(encoding) => encoding.len().min(u32::MAX as usize) as u32,
                // Not expected for text (a model that cannot tokenize some input): estimated.
                Err(_) => estimate_tokens(text),
            }
        }
    }

    impl TokenCounter for HfTokenizer {
        fn count(&self, text: &str) -> u32 {
            if text.len() <= EXACT_MAX_BYTES {
                return self.exact(text);
            }
            let mut end = EXACT_MAX_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let head = self.exact(&text[..end]) as f64;
            (head * text.len() as f64 / end as f64).min(u32::MAX as f64) as u32
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
        Ok(PromptTokenizer(Arc::new(HfTokenizer(tokenizer))))
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
        "/tests/fixtures/words-tokenizer.json"
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
