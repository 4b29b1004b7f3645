//! Secrets as a type: read from a 0600 file, zeroized on drop, never printable.

use std::fmt;
use std::path::Path;

use zeroize::Zeroizing;

pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Reads a secret file. The file must be ours and 0600/0400, not a symlink, at most 64 KiB
    /// (checked on the opened descriptor: `crate::files`); one trailing newline (LF or CRLF) is
    /// trimmed and nothing else (design.md §7).
    pub fn from_file(path: &Path) -> Result<Secret, String> {
        let bytes = Zeroizing::new(crate::files::read(
            path,
            crate::files::Rule::Secret,
            crate::files::MAX_SECRET_BYTES,
        )?);
        let text = std::str::from_utf8(&bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
        let trimmed = text.strip_suffix("\r\n").or_else(|| text.strip_suffix('\n')).unwrap_or(text);
        if trimmed.is_empty() {
            return Err(format!("{}: the file is empty", path.display()));
        }
        Ok(Secret(Zeroizing::new(trimmed.to_string())))
    }

    /// The secret's text, for the one place that must send or hash it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
impl Secret {
    pub fn for_test(text: &str) -> Secret {
        Secret(Zeroizing::new(text.to_string()))
    }
}
