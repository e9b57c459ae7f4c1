//! Bencode, as rtpengine's NG protocol uses it: integers, byte strings, lists and
//! dictionaries (whose keys rtpengine does not sort, so neither do we).
//!
//! Written by hand (about 150 lines) because the crates either sort dictionaries, which
//! changes what a byte-for-byte comparison with rtpengine sees, or do not bound nesting
//! and sizes, which a network-facing parser must.

use std::fmt;

/// A bencoded value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `i<n>e`
    Int(i64),
    /// `<len>:<bytes>`
    Bytes(Vec<u8>),
    /// `l…e`
    List(Vec<Value>),
    /// `d…e`, keys in wire order.
    Dict(Vec<(Vec<u8>, Value)>),
}

/// Why a message did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended inside a value: on a stream, read more and retry.
    Incomplete,
    /// The input is not bencode; the message names the first problem.
    Invalid(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Incomplete => f.write_str("truncated bencode"),
            DecodeError::Invalid(m) => write!(f, "invalid bencode: {m}"),
        }
    }
}

/// Nesting limit: NG messages nest three or four deep.
pub const MAX_DEPTH: usize = 32;
/// Limit on values in one message, so a small message cannot make us allocate a lot.
pub const MAX_ITEMS: usize = 100_000;

impl Value {
    /// A byte-string value from text.
    pub fn str(s: impl AsRef<str>) -> Self {
        Value::Bytes(s.as_ref().as_bytes().to_vec())
    }

    /// A dictionary from `(key, value)` pairs, in order.
    pub fn dict<K: AsRef<str>>(items: impl IntoIterator<Item = (K, Value)>) -> Self {
        Value::Dict(items.into_iter().map(|(k, v)| (k.as_ref().as_bytes().to_vec(), v)).collect())
    }

    /// Looks a key up in a dictionary (first occurrence).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| k == key.as_bytes()).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value as UTF-8 text, if it is a valid UTF-8 byte string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value as a list.
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    /// The value as an integer (also from a decimal byte string, as clients send both).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bytes(_) => self.as_str()?.trim().parse().ok(),
            _ => None,
        }
    }

    /// Appends the encoding to `out`.
    pub fn encode_to(&self, out: &mut Vec<u8>) {
        match self {
            Value::Int(i) => {
                out.push(b'i');
                out.extend_from_slice(i.to_string().as_bytes());
                out.push(b'e');
            }
            Value::Bytes(b) => {
                out.extend_from_slice(b.len().to_string().as_bytes());
                out.push(b':');
                out.extend_from_slice(b);
            }
            Value::List(l) => {
                out.push(b'l');
                for v in l {
                    v.encode_to(out);
                }
                out.push(b'e');
            }
            Value::Dict(d) => {
                out.push(b'd');
                for (k, v) in d {
                    Value::Bytes(k.clone()).encode_to(out);
                    v.encode_to(out);
                }
                out.push(b'e');
            }
        }
    }

    /// The encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_to(&mut v);
        v
    }
}

/// Decodes one value from the start of `input`; returns it and the bytes consumed.
pub fn decode(input: &[u8]) -> Result<(Value, usize), DecodeError> {
    let mut d = Decoder { input, pos: 0, items: 0 };
    let v = d.value(0)?;
    Ok((v, d.pos))
}

struct Decoder<'a> {
    input: &'a [u8],
    pos: usize,
    items: usize,
}

fn invalid(m: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(m.into())
}

impl Decoder<'_> {
    fn peek(&self) -> Result<u8, DecodeError> {
        self.input.get(self.pos).copied().ok_or(DecodeError::Incomplete)
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!("nested deeper than {MAX_DEPTH}")));
        }
        self.items += 1;
        if self.items > MAX_ITEMS {
            return Err(invalid(format!("more than {MAX_ITEMS} values")));
        }
        match self.peek()? {
            b'i' => {
                self.pos += 1;
                let n = self.number(b'e')?;
                Ok(Value::Int(n))
            }
            b'0'..=b'9' => Ok(Value::Bytes(self.bytes()?)),
            b'l' => {
                self.pos += 1;
                let mut l = Vec::new();
                while self.peek()? != b'e' {
                    l.push(self.value(depth + 1)?);
                }
                self.pos += 1;
                Ok(Value::List(l))
            }
            b'd' => {
                self.pos += 1;
                let mut d = Vec::new();
                while self.peek()? != b'e' {
                    if !self.peek()?.is_ascii_digit() {
                        return Err(invalid(format!("dictionary key at byte {} is not a string", self.pos)));
                    }
                    let k = self.bytes()?;
                    let v = self.value(depth + 1)?;
                    d.push((k, v));
                }
                self.pos += 1;
                Ok(Value::Dict(d))
            }
            c => Err(invalid(format!("unexpected byte {:?} at {}", c as char, self.pos))),
        }
    }

    /// Digits (with an optional minus) up to `end`, which is consumed.
    fn number(&mut self, end: u8) -> Result<i64, DecodeError> {
        let start = self.pos;
        loop {
            let c = self.peek()?;
            if c == end {
                break;
            }
            if !(c.is_ascii_digit() || (c == b'-' && self.pos == start)) || self.pos - start > 20 {
                return Err(invalid(format!("bad number at byte {}", self.pos)));
            }
            self.pos += 1;
        }
        let text = std::str::from_utf8(&self.input[start..self.pos]).map_err(|_| invalid("bad number"))?;
        self.pos += 1;
        text.parse().map_err(|_| invalid(format!("bad number {text:?}")))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.number(b':')?;
        let n = usize::try_from(n).map_err(|_| invalid("negative string length"))?;
        let end = self.pos.checked_add(n).ok_or_else(|| invalid("string length overflow"))?;
        if end > self.input.len() {
            return Err(DecodeError::Incomplete);
        }
        let b = self.input[self.pos..end].to_vec();
        self.pos = end;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_ng_ping_example_and_round_trips() {
        let (v, n) = decode(b"d7:command4:pinge").unwrap();
        assert_eq!(n, 17);
        assert_eq!(v.get("command").and_then(Value::as_str), Some("ping"));
        assert_eq!(v.encode(), b"d7:command4:pinge");
        let v = Value::dict([("b", Value::Int(-3)), ("a", Value::List(vec![Value::str("x")]))]);
        assert_eq!(v.encode(), b"d1:bi-3e1:al1:xee", "keys stay in insertion order");
        assert_eq!(decode(&v.encode()).unwrap().0, v);
    }

    #[test]
    fn reports_truncation_and_garbage() {
        assert_eq!(decode(b"d7:command4:pi"), Err(DecodeError::Incomplete));
        assert_eq!(decode(b"d7:command"), Err(DecodeError::Incomplete));
        assert_eq!(decode(b""), Err(DecodeError::Incomplete));
        assert!(matches!(decode(b"x"), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(b"di1ei2ee"), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(b"i12a3e"), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(b"99999999999999999999999:x"), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode(b"-1:x"), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn bounds_nesting() {
        let deep = "l".repeat(1000) + &"e".repeat(1000);
        assert!(matches!(decode(deep.as_bytes()), Err(DecodeError::Invalid(_))));
    }
}
