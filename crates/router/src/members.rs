//! The top-level members of a JSON object, edited in place: a body the router changes (a split
//! stage's, a priority it caps) keeps every other member where the client put it, with its
//! value's exact text (a round trip through a JSON value would sort keys and turn integers
//! beyond 64 bits into floats).

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The top-level members of a JSON object in the order the client wrote them, each value as
/// its exact text.
pub struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'a> Members<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let members = de.deserialize_map(MembersVisitor)?;
        de.end()?;
        Ok(members)
    }

    /// The value of `key`; the last one when the client sent it twice (as a JSON parser reads it).
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// The object with `set` members given these values (in place, or added at the end),
    /// `replace` members given theirs only where present, and `remove` members left out. A key
    /// the client sent twice that is set or replaced appears once.
    pub fn edited(&self, set: &[(&str, &str)], replace: &[(&str, &str)], remove: &[&str]) -> Bytes {
        let len = self
            .0
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>();
        let mut out = Vec::with_capacity(len + 256);
        let mut written: Vec<&str> = Vec::new();
        for (key, value) in &self.0 {
            let new = set.iter().chain(replace).find(|(k, _)| k == key);
            match new {
                Some(&(k, v)) if !written.contains(&k) => {
                    member(&mut out, key, v);
                    written.push(k);
                }
                Some(_) => {}
                None if remove.contains(&key.as_str()) => {}
                None => member(&mut out, key, value.get()),
            }
        }
        for &(k, v) in set {
            if !written.contains(&k) {
                member(&mut out, k, v);
            }
        }
        if out.is_empty() {
            out.push(b'{');
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

/// Appends `"key":value` to the object being written in `out`.
fn member(out: &mut Vec<u8>, key: &str, value: &str) {
    out.push(if out.is_empty() { b'{' } else { b',' });
    serde_json::to_writer(&mut *out, key).expect("a string serializes");
    out.push(b':');
    out.extend_from_slice(value.as_bytes());
}

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Members<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
        while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
            members.push(entry);
        }
        Ok(Members(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Bytes) -> String {
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn members_set_replaced_and_removed_keep_the_rest_as_written() {
        let body = br#"{ "stream" : true, "seed": 18446744073709551617, "x\"y": [1, 2], "n": 3 }"#;
        let members = Members::parse(body).unwrap();
        let edited = members.edited(
            &[("kv", r#"{"a":1}"#)],
            &[("seed", "7"), ("gone", "1")],
            &["n"],
        );
        assert_eq!(
            text(edited),
            r#"{"stream":true,"seed":7,"x\"y":[1, 2],"kv":{"a":1}}"#
        );
        // A member sent twice reads as the last; set, it appears once where it first was.
        let twice = Members::parse(br#"{"p":1,"m":"x","p":2}"#).unwrap();
        assert_eq!(twice.get("p").unwrap().get(), "2");
        assert_eq!(
            text(twice.edited(&[("p", "0")], &[], &[])),
            r#"{"p":0,"m":"x"}"#
        );
        // Replaced only where present; an empty object stays an object.
        let empty = Members::parse(b"{}").unwrap();
        assert_eq!(text(empty.edited(&[], &[("n", "1")], &[])), "{}");
        assert!(Members::parse(b"[1]").is_err());
        assert!(Members::parse(br#"{"a":1} x"#).is_err());
    }
}
