//! The config walker every `ca` block is read with: each error names the JSON path of the field
//! (`ca.org_id: missing`), and a member nobody read is an unknown field.

use std::path::Path;

use crate::error::{Error, Result};
use crate::files::Rule;
use crate::json::Value;
use crate::secret::Secret;

/// One JSON object being read: remembers which members were used so unknown ones are reported
/// with their full path.
pub struct Fields<'a> {
    path: String,
    members: &'a [(String, Value)],
    used: Vec<bool>,
}

impl<'a> Fields<'a> {
    pub fn new(value: &'a Value, path: &str) -> Result<Fields<'a>> {
        match value {
            Value::Object(members) => {
                Ok(Fields { path: path.to_string(), members, used: vec![false; members.len()] })
            }
            other => Err(Error::config(format!(
                "{}: expected an object, found {}",
                display_path(path),
                other.type_name()
            ))),
        }
    }

    pub fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.members.iter().any(|(k, _)| k == key)
    }

    /// The member's value; JSON `null` counts as absent.
    pub fn take(&mut self, key: &str) -> Option<&'a Value> {
        let index = self.members.iter().position(|(k, _)| k == key)?;
        self.used[index] = true;
        let value = &self.members[index].1;
        (!value.is_null()).then_some(value)
    }

    pub fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        Error::config(format!("{}: expected {expected}, found {}", self.path_of(key), found.type_name()))
    }

    pub fn string(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    pub fn required_string(&mut self, key: &str) -> Result<String> {
        match self.string(key)? {
            Some(s) if !s.is_empty() => Ok(s),
            Some(_) => Err(Error::config(format!("{}: must not be empty", self.path_of(key)))),
            None => Err(Error::config(format!("{}: missing", self.path_of(key)))),
        }
    }

    pub fn number(&mut self, key: &str) -> Result<Option<f64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v @ Value::Number(_)) => v.as_f64().map(Some).ok_or_else(|| {
                Error::config(format!("{}: use at most 15 digits (a number such as 0.66)", self.path_of(key)))
            }),
            Some(other) => Err(self.wrong_type(key, "a number", other)),
        }
    }

    /// A whole number ≥ 1.
    pub fn positive(&mut self, key: &str) -> Result<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v @ Value::Number(_)) => match v.as_u64() {
                Some(n) if n >= 1 => Ok(Some(n)),
                _ => {
                    Err(Error::config(format!("{}: must be a whole number of at least 1", self.path_of(key))))
                }
            },
            Some(other) => Err(self.wrong_type(key, "a number", other)),
        }
    }

    pub fn boolean(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(key, "true or false", other)),
        }
    }

    pub fn string_list(&mut self, key: &str) -> Result<Option<Vec<String>>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(Error::config(format!(
                        "{}[{i}]: expected a string, found {}",
                        self.path_of(key),
                        other.type_name()
                    ))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => Err(self.wrong_type(key, "an array of strings", other)),
        }
    }

    pub fn object(&mut self, key: &str) -> Result<Option<Fields<'a>>> {
        let path = self.path_of(key);
        self.take(key).map(|v| Fields::new(v, &path)).transpose()
    }

    /// An `https://` URL (or `http://` with `tls.danger_allow_http`).
    pub fn url(&mut self, key: &str, default: Option<&str>, allow_http: bool) -> Result<String> {
        let url = match (self.string(key)?, default) {
            (Some(url), _) => url,
            (None, Some(default)) => default.to_string(),
            (None, None) => return Err(Error::config(format!("{}: missing", self.path_of(key)))),
        };
        let rest = if let Some(rest) = url.strip_prefix("https://") {
            rest
        } else if let Some(rest) = url.strip_prefix("http://") {
            if !allow_http {
                return Err(Error::config(format!(
                    "{}: plain http:// is refused; use https:// (or set tls.danger_allow_http for a lab)",
                    self.path_of(key)
                )));
            }
            rest
        } else {
            return Err(Error::config(format!("{}: {url:?} is not an https:// URL", self.path_of(key))));
        };
        if rest.is_empty()
            || rest.starts_with('/')
            || rest.contains(char::is_whitespace)
            || rest.contains(['?', '#'])
        {
            return Err(Error::config(format!("{}: {url:?} has no host or has a query", self.path_of(key))));
        }
        Ok(url.trim_end_matches('/').to_string())
    }

    /// A whole number ≥ 0.
    pub fn positive_or_zero(&mut self, key: &str) -> Result<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(v @ Value::Number(_)) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| Error::config(format!("{}: must be a whole number", self.path_of(key)))),
            Some(other) => Err(self.wrong_type(key, "a number", other)),
        }
    }

    pub fn required_positive(&mut self, key: &str) -> Result<u64> {
        self.positive(key)?.ok_or_else(|| Error::config(format!("{}: missing", self.path_of(key))))
    }

    /// Upper-case enum names such as `DIGITAL_SIGNATURE` (Securosys TSB).
    pub fn enum_names(&mut self, key: &str) -> Result<Option<Vec<String>>> {
        let list = self.string_list(key)?;
        if let Some(bad) = list.iter().flatten().find(|v| {
            v.is_empty() || !v.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        }) {
            return Err(Error::config(format!(
                "{}: {bad:?} is not an enum name such as \"DIGITAL_SIGNATURE\"",
                self.path_of(key)
            )));
        }
        Ok(list)
    }

    pub fn optional_secret_file(&mut self, key: &str) -> Result<Option<Secret>> {
        match self.has(key) {
            true => self.secret_file(key).map(Some),
            false => Ok(None),
        }
    }

    /// A PEM file of one or more certificates, read now (so a bad file fails before anything is
    /// created), returned as DER.
    pub fn certificate_file(&mut self, key: &str) -> Result<Vec<Vec<u8>>> {
        let path = self.required_string(key)?;
        let bytes = crate::files::read(Path::new(&path), Rule::Trusted, crate::files::MAX_PEM_BYTES)
            .map_err(|e| Error::config(format!("{}: {e}", self.path_of(key))))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::config(format!("{}: {path}: not UTF-8 text", self.path_of(key))))?;
        let certs = crate::pki::parse_pem_certs(&text)
            .map_err(|e| Error::config(format!("{}: {path}: {e}", self.path_of(key))))?;
        if certs.is_empty() {
            return Err(Error::config(format!("{}: {path}: holds no certificate", self.path_of(key))));
        }
        Ok(certs.into_iter().map(|c| c.der).collect())
    }

    pub fn secret_file(&mut self, key: &str) -> Result<Secret> {
        let path = self.required_string(key)?;
        Secret::from_file(Path::new(&path)).map_err(|e| Error::config(format!("{}: {e}", self.path_of(key))))
    }

    /// Every member must have been read: a typo must not be silently ignored.
    pub fn finish(self) -> Result<()> {
        match self.used.iter().position(|used| !used) {
            Some(i) => Err(Error::config(format!("{}: unknown field", self.path_of(&self.members[i].0)))),
            None => Ok(()),
        }
    }
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "config"
    } else {
        path
    }
}
