//! The little the analyzer reads from a `multipart/form-data` body (vLLM's audio routes,
//! `/v1/audio/transcriptions` and `/translations`): the `model` and `stream` fields. The body
//! itself is forwarded untouched; its file part is skipped, not parsed.

/// The boundary of a `multipart/form-data` body, from its `Content-Type` value.
pub(super) fn boundary(content_type: &[u8]) -> Option<&[u8]> {
    let value = std::str::from_utf8(content_type).ok()?;
    let (mime, params) = value.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .split(';')
        .filter_map(|p| p.split_once('='))
        .find(|(key, _)| key.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, b)| b.trim().trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .map(str::as_bytes)
}

/// The value of the first form field called `name`, if the body has one.
pub(super) fn field<'a>(body: &'a [u8], boundary: &[u8], name: &str) -> Option<&'a [u8]> {
    let delimiter = [b"--", boundary].concat();
    let next_part = [b"\r\n--", boundary].concat();
    let mut rest = &body[find(body, &delimiter)? + delimiter.len()..];
    // Each part: CRLF, headers, a blank line, the content, then CRLF and the delimiter.
    while !rest.starts_with(b"--") {
        let headers_end = find(rest, b"\r\n\r\n")?;
        let content = &rest[headers_end + 4..];
        let end = find(content, &next_part)?;
        if part_name(&rest[..headers_end]) == Some(name) {
            return Some(&content[..end]);
        }
        rest = &content[end + next_part.len()..];
    }
    None
}

/// The `name` of a part, from its `Content-Disposition: form-data; name="..."` header.
fn part_name(headers: &[u8]) -> Option<&str> {
    let headers = std::str::from_utf8(headers).ok()?;
    let disposition = headers.split("\r\n").find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case("content-disposition")
            .then_some(value)
    })?;
    disposition
        .split(';')
        .filter_map(|p| p.split_once('='))
        .find(|(key, _)| key.trim() == "name")
        .map(|(_, v)| v.trim().trim_matches('"'))
}

/// The first position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, tail) = needle.split_first()?;
    let mut from = 0;
    while let Some(i) = hay[from..].iter().position(|&b| b == first) {
        let at = from + i;
        if hay[at + 1..].starts_with(tail) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As Python's `openai` client sends a transcription: the file first, then the fields.
    fn form() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(
            b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model.wav\"\r\n\
              Content-Type: audio/wav\r\n\r\nRIFF--xy\r\n-\x00\xff--xyz-not\r\n",
        );
        body.extend_from_slice(
            b"--xyz\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
              --xyz\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n--xyz--\r\n",
        );
        body
    }

    #[test]
    fn fields_are_found_past_the_file() {
        let body = form();
        let b = boundary(b"multipart/form-data; boundary=xyz").unwrap();
        assert_eq!(field(&body, b, "model"), Some(&b"whisper-1"[..]));
        assert_eq!(field(&body, b, "stream"), Some(&b"true"[..]));
        assert_eq!(field(&body, b, "language"), None);
        assert_eq!(
            field(&body, b, "file"),
            Some(&b"RIFF--xy\r\n-\x00\xff--xyz-not"[..])
        );
        assert_eq!(field(b"garbage", b, "model"), None);
        assert_eq!(field(&body[..60], b, "model"), None, "cut short");
    }

    #[test]
    fn boundaries() {
        assert_eq!(
            boundary(b"Multipart/Form-Data; charset=utf-8; boundary=\"a b\""),
            Some(&b"a b"[..])
        );
        assert_eq!(boundary(b"application/json"), None);
        assert_eq!(boundary(b"multipart/form-data"), None);
        assert_eq!(boundary(b"multipart/form-data; boundary="), None);
    }
}
