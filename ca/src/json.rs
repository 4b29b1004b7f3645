//! A small JSON reader and writer for config files, `state.json` and CA responses.
//!
//! Why not serde: the config must name the full path of an unknown or mistyped field
//! (`renewal.at_fracton`), CA bodies must be parsed with bounds (depth, size) whatever their shape,
//! and numbers such as EnOS `certSn` must keep all 64 bits. A 300-line DOM does all three and costs
//! fewer bytes than serde_json; serde-json-core has no field paths in its errors.

use std::fmt::Write as _;

/// Nesting deeper than this is refused (CA answers and configs are shallow).
const MAX_DEPTH: usize = 32;
/// Values in one document (every scalar, array and object counts one). A config, `state.json` or
/// CA answer holds a few hundred at most; the cap bounds the DOM's memory whatever the body's
/// shape (a 1 MiB `[0,0,…]` would otherwise be half a million values, about 40 MB).
pub const MAX_VALUES: usize = 16_384;
/// Members of one object or items of one array.
pub const MAX_ITEMS: usize = 4_096;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// The number's text, exactly as written, so integers keep full precision.
    Number(String),
    String(String),
    Array(Vec<Value>),
    /// Members in document order; duplicate keys are refused by the parser.
    Object(Vec<(String, Value)>),
}

impl Value {
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Number(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) => n.parse().ok(),
            _ => None,
        }
    }

    /// The number as f64, for the config's fractions: up to 15 significant digits with a
    /// decimal exponent within ±22, which one IEEE multiplication or division by an exact
    /// power of ten rounds correctly; others are `None`. (`str::parse::<f64>` would link core's
    /// general decimal-to-float converter and its tables, about 15 KB of the device binary.)
    pub fn as_f64(&self) -> Option<f64> {
        let Value::Number(text) = self else { return None };
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        let (decimal, exponent) = match unsigned.split_once(['e', 'E']) {
            Some((decimal, exponent)) => (decimal, exponent.parse::<i32>().ok()?),
            None => (unsigned, 0),
        };
        let (whole, fraction) = decimal.split_once('.').unwrap_or((decimal, ""));
        let significant = whole.trim_start_matches('0').len() + fraction.len();
        if significant > 15 || !whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mantissa = whole.bytes().chain(fraction.bytes()).fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
        let exponent = exponent.checked_sub(i32::try_from(fraction.len()).ok()?)?;
        const POWERS_OF_TEN: [f64; 23] = [
            1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17,
            1e18, 1e19, 1e20, 1e21, 1e22,
        ];
        let scale = *POWERS_OF_TEN.get(exponent.unsigned_abs() as usize)?;
        let magnitude = if exponent < 0 { mantissa as f64 / scale } else { mantissa as f64 * scale };
        Some(if negative { -magnitude } else { magnitude })
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The JSON type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }

    /// Compact serialisation.
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        write_value(&mut out, self, None, 0);
        out
    }

    /// Two-space indented serialisation (state.json, `status --json`).
    pub fn to_json_pretty(&self) -> String {
        let mut out = String::new();
        write_value(&mut out, self, Some(2), 0);
        out
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}

impl From<u64> for Value {
    fn from(n: u64) -> Self {
        Value::Number(n.to_string())
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Number(n.to_string())
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Builds an object from `(key, value)` pairs.
pub fn object<const N: usize>(members: [(&str, Value); N]) -> Value {
    Value::Object(members.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// A parse failure with the byte offset where it was found.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub offset: usize,
    pub reason: &'static str,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid JSON at byte {}: {}", self.offset, self.reason)
    }
}

impl std::error::Error for ParseError {}

pub fn parse(input: &[u8]) -> Result<Value, ParseError> {
    let mut parser = Parser { input, pos: 0, values: 0 };
    parser.skip_whitespace();
    let value = parser.value(0)?;
    parser.skip_whitespace();
    if parser.pos != input.len() {
        return Err(parser.error("trailing characters after the JSON value"));
    }
    Ok(value)
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
    /// Values started so far (bounded by [`MAX_VALUES`]).
    values: usize,
}

impl Parser<'_> {
    fn error(&self, reason: &'static str) -> ParseError {
        ParseError { offset: self.pos, reason }
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn expect_literal(&mut self, literal: &'static [u8], value: Value) -> Result<Value, ParseError> {
        if self.input[self.pos..].starts_with(literal) {
            self.pos += literal.len();
            Ok(value)
        } else {
            Err(self.error("unexpected character"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(self.error("too many values"));
        }
        match self.peek() {
            None => Err(self.error("unexpected end of input")),
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => Ok(Value::String(self.string()?)),
            Some(b't') => self.expect_literal(b"true", Value::Bool(true)),
            Some(b'f') => self.expect_literal(b"false", Value::Bool(false)),
            Some(b'n') => self.expect_literal(b"null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.error("unexpected character")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, ParseError> {
        self.pos += 1;
        let mut members: Vec<(String, Value)> = Vec::new();
        // Where each member's name ended, to report a duplicate where it was written.
        let mut key_ends: Vec<usize> = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a member name"));
            }
            if members.len() >= MAX_ITEMS {
                return Err(self.error("too many members in one object"));
            }
            let key = self.string()?;
            key_ends.push(self.pos);
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(self.error("expected ':'"));
            }
            self.pos += 1;
            self.skip_whitespace();
            let value = self.value(depth + 1)?;
            members.push((key, value));
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    if let Some(i) = first_duplicate(&members) {
                        return Err(ParseError { offset: key_ends[i], reason: "duplicate member name" });
                    }
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                None => return Err(self.error("unexpected end of input")),
                _ => return Err(self.error("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, ParseError> {
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_whitespace();
            if items.len() >= MAX_ITEMS {
                return Err(self.error("too many items in one array"));
            }
            items.push(self.value(depth + 1)?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                None => return Err(self.error("unexpected end of input")),
                _ => return Err(self.error("expected ',' or ']'")),
            }
        }
    }

    fn number(&mut self) -> Result<Value, ParseError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let digits = |p: &mut Self| {
            let s = p.pos;
            while matches!(p.peek(), Some(b'0'..=b'9')) {
                p.pos += 1;
            }
            p.pos > s
        };
        if !digits(self) {
            return Err(self.error("expected a digit"));
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !digits(self) {
                return Err(self.error("expected a digit after '.'"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !digits(self) {
                return Err(self.error("expected an exponent"));
            }
        }
        // The slice is ASCII digits and signs only.
        Ok(Value::Number(String::from_utf8_lossy(&self.input[start..self.pos]).into_owned()))
    }

    fn string(&mut self) -> Result<String, ParseError> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(byte) = self.peek() else {
                return Err(self.error("unterminated string"));
            };
            self.pos += 1;
            match byte {
                b'"' => break,
                b'\\' => self.escape(&mut out)?,
                0x00..=0x1f => return Err(self.error("control character in string")),
                _ => out.push(byte),
            }
        }
        String::from_utf8(out).map_err(|_| self.error("string is not valid UTF-8"))
    }

    fn escape(&mut self, out: &mut Vec<u8>) -> Result<(), ParseError> {
        let Some(byte) = self.peek() else {
            return Err(self.error("unterminated escape"));
        };
        self.pos += 1;
        let simple = match byte {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let ch = self.unicode_escape()?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                return Ok(());
            }
            _ => return Err(self.error("invalid escape")),
        };
        out.push(simple);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, ParseError> {
        let digits = self.input.get(self.pos..self.pos + 4).ok_or_else(|| self.error("short \\u escape"))?;
        let text = std::str::from_utf8(digits).map_err(|_| self.error("invalid \\u escape"))?;
        let value = u32::from_str_radix(text, 16).map_err(|_| self.error("invalid \\u escape"))?;
        self.pos += 4;
        Ok(value)
    }

    fn unicode_escape(&mut self) -> Result<char, ParseError> {
        let first = self.hex4()?;
        let code = if (0xd800..0xdc00).contains(&first) {
            if !self.input[self.pos..].starts_with(b"\\u") {
                return Err(self.error("unpaired surrogate"));
            }
            self.pos += 2;
            let second = self.hex4()?;
            if !(0xdc00..0xe000).contains(&second) {
                return Err(self.error("unpaired surrogate"));
            }
            0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00)
        } else {
            first
        };
        char::from_u32(code).ok_or_else(|| self.error("invalid code point"))
    }
}

/// The index of the first member whose name was already used, in O(n log n): member indices
/// sorted by name (then position) put equal names next to each other.
fn first_duplicate(members: &[(String, Value)]) -> Option<usize> {
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_unstable_by(|&a, &b| members[a].0.cmp(&members[b].0).then(a.cmp(&b)));
    order.windows(2).filter(|pair| members[pair[0]].0 == members[pair[1]].0).map(|pair| pair[1]).min()
}

fn write_value(out: &mut String, value: &Value, indent: Option<usize>, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => write_container(out, '[', ']', items.iter().map(|v| (None, v)), indent, level),
        Value::Object(members) => {
            write_container(out, '{', '}', members.iter().map(|(k, v)| (Some(k.as_str()), v)), indent, level)
        }
    }
}

fn write_container<'a>(
    out: &mut String,
    open: char,
    close: char,
    items: impl ExactSizeIterator<Item = (Option<&'a str>, &'a Value)>,
    indent: Option<usize>,
    level: usize,
) {
    out.push(open);
    let empty = items.len() == 0;
    for (i, (key, value)) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * (level + 1)));
        }
        if let Some(key) = key {
            write_string(out, key);
            out.push(':');
            if indent.is_some() {
                out.push(' ');
            }
        }
        write_value(out, value, indent, level + 1);
    }
    if let (Some(width), false) = (indent, empty) {
        out.push('\n');
        out.push_str(&" ".repeat(width * level));
    }
    out.push(close);
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_read_exactly_as_the_standard_parser_reads_them() {
        for text in
            ["0.66", "0.05", "1", "0", "-2.5e-3", "1E2", "66e-2", "0.123456789012345", "12345e+10", "3.0"]
        {
            let number = Value::Number(text.into());
            assert_eq!(number.as_f64(), Some(text.parse::<f64>().unwrap()), "{text}");
        }
        for text in ["0.1234567890123456", "1e23", "1e-30", "12345678901234567890"] {
            assert_eq!(Value::Number(text.into()).as_f64(), None, "{text}");
        }
    }

    #[test]
    fn round_trips_nested_values_and_keeps_big_integers_exact() {
        let text =
            br#"{"a":[1,-2.5e3,true,null],"b":{"c":"x\"y\n\u00e9\ud83d\ude00"},"sn":9223372036854775807}"#;
        let value = parse(text).unwrap();
        assert_eq!(value.get("sn").unwrap().as_i64(), Some(i64::MAX));
        assert_eq!(value.get("b").unwrap().get("c").unwrap().as_str(), Some("x\"y\n\u{e9}\u{1f600}"));
        assert_eq!(parse(value.to_json().as_bytes()).unwrap(), value);
        assert_eq!(parse(value.to_json_pretty().as_bytes()).unwrap(), value);
    }

    #[test]
    fn refuses_truncated_duplicate_deep_and_trailing_input() {
        for (bad, reason) in [
            (&br#"{"a":1"#[..], "unexpected end of input"),
            (br#"{"a":1,"a":2}"#, "duplicate member name"),
            (br#"{"a":1} x"#, "trailing characters after the JSON value"),
            (br#"{"a":"\x"}"#, "invalid escape"),
            (b"", "unexpected end of input"),
        ] {
            assert_eq!(parse(bad).unwrap_err().reason, reason, "{}", String::from_utf8_lossy(bad));
        }
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert_eq!(parse(deep.as_bytes()).unwrap_err().reason, "nested too deeply");
        // The duplicate is reported where its second name was written.
        let error = parse(br#"{"b":1,"a":2,"c":3,"a":4}"#).unwrap_err();
        assert_eq!((error.reason, error.offset), ("duplicate member name", 22));
    }

    /// `{"k0":0,"k1":0,…}` with `n` distinct members (plus `extra` before the closing brace).
    fn object_of(n: usize, extra: &str) -> Vec<u8> {
        let members: Vec<String> = (0..n).map(|i| format!("\"k{i}\":0")).collect();
        format!("{{{}{extra}}}", members.join(",")).into_bytes()
    }

    #[test]
    fn a_megabyte_of_distinct_keys_is_refused_by_count_not_by_quadratic_search() {
        // Issue 14 item 6: 87,380 keys in 1 MiB took 21.7 s of CPU with a linear duplicate check.
        let huge = object_of(87_380, "");
        assert!(huge.len() < 1 << 20);
        assert_eq!(parse(&huge).unwrap_err().reason, "too many members in one object");
        // At the cap, the check is O(n log n); a duplicate at the very end is still found.
        let full = object_of(MAX_ITEMS, "");
        assert!(matches!(parse(&full), Ok(Value::Object(m)) if m.len() == MAX_ITEMS));
        let dup = object_of(MAX_ITEMS - 1, r#","k0":1"#);
        assert_eq!(parse(&dup).unwrap_err().reason, "duplicate member name");
    }

    #[test]
    fn element_counts_are_capped_per_container_and_per_document() {
        let array = format!("[{}]", vec!["0"; 524_288].join(","));
        assert_eq!(parse(array.as_bytes()).unwrap_err().reason, "too many items in one array");
        let at_cap = format!("[{}]", vec!["0"; MAX_ITEMS].join(","));
        assert!(parse(at_cap.as_bytes()).is_ok());
        // Many small containers: each under the per-container cap, together over the total.
        let inner = format!("[{}]", vec!["0"; 1_000].join(","));
        let many = format!("[{}]", vec![inner.as_str(); 17].join(","));
        assert_eq!(parse(many.as_bytes()).unwrap_err().reason, "too many values");
        let fewer = format!("[{}]", vec![inner.as_str(); 16].join(","));
        assert!(parse(fewer.as_bytes()).is_ok());
    }
}
