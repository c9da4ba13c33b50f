//! Request fields read as vLLM's request models read them: pydantic's lax mode. The router must
//! not refuse what the engine accepts, and the simulated engine must accept what vLLM accepts, so
//! both read integers and booleans through these two functions.

use serde_json::Value;

/// Why a value is not an integer, in pydantic's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntError {
    /// A number with a fractional part (`1.5`).
    Fraction,
    /// A string that is not an integer (`"ten"`, `"1e1"`).
    Parsing,
    /// Not a number, boolean or string.
    Type,
}

/// Why a value is not a boolean, in pydantic's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoolError {
    /// A number other than 0 and 1, or a string not in the accepted set.
    Parsing,
    /// Not a boolean, number or string.
    Type,
}

/// An integer: a number with no fraction, a boolean (0 or 1), or a string of an integer,
/// surrounding spaces and a zero fraction allowed (`"3"`, `" 3 "`, `"3.0"`; not `"1e1"`).
pub fn int(v: &Value) -> Result<i128, IntError> {
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                return Ok(i128::from(u));
            }
            if let Some(i) = n.as_i64() {
                return Ok(i128::from(i));
            }
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() < 1e30 {
                Ok(f as i128)
            } else {
                Err(IntError::Fraction)
            }
        }
        Value::Bool(b) => Ok(i128::from(*b)),
        Value::String(s) => {
            let s = s.trim();
            let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
            let digits = whole.strip_prefix(['-', '+']).unwrap_or(whole);
            let integer = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
            if !integer || !fraction.bytes().all(|b| b == b'0') {
                return Err(IntError::Parsing);
            }
            whole.parse::<i128>().map_err(|_| IntError::Parsing)
        }
        _ => Err(IntError::Type),
    }
}

/// A boolean: `true`/`false`, the numbers 0 and 1, or one of the strings true/false, yes/no,
/// on/off, 1/0, t/f, y/n (any case).
pub fn bool(v: &Value) -> Result<bool, BoolError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Ok(false),
            Some(1.0) => Ok(true),
            _ => Err(BoolError::Parsing),
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
            "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
            _ => Err(BoolError::Parsing),
        },
        _ => Err(BoolError::Type),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Each case checked against vLLM 0.32 (`max_tokens` and `stream` of a completion).
    #[test]
    fn as_vllm_reads_them() {
        for (v, want) in [
            (json!(3), Ok(3)),
            (json!(3.0), Ok(3)),
            (json!(true), Ok(1)),
            (json!("3"), Ok(3)),
            (json!(" 3 "), Ok(3)),
            (json!("3.0"), Ok(3)),
            (json!("-3"), Ok(-3)),
            (json!(1.5), Err(IntError::Fraction)),
            (json!("1e1"), Err(IntError::Parsing)),
            (json!("3.5"), Err(IntError::Parsing)),
            (json!(""), Err(IntError::Parsing)),
            (json!([1]), Err(IntError::Type)),
        ] {
            assert_eq!(int(&v), want, "{v}");
        }
        for (v, want) in [
            (json!("yes"), Ok(true)),
            (json!(1), Ok(true)),
            (json!("ON"), Ok(true)),
            (json!("f"), Ok(false)),
            (json!(0), Ok(false)),
            (json!(2), Err(BoolError::Parsing)),
            (json!("maybe"), Err(BoolError::Parsing)),
            (json!([]), Err(BoolError::Type)),
        ] {
            assert_eq!(bool(&v), want, "{v}");
        }
    }
}
