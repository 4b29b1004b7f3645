//! Reading the files a config names, safely (issue 14 item 8): the config itself, `*_file`
//! secrets, `tls.trust_bundle`, `ca.ca_bundle`, and checking `hooks.after_install`'s program.
//!
//! Each file is opened with `O_NOFOLLOW` (a symlink is refused, not followed) and `O_NONBLOCK` (a
//! FIFO cannot hang the open), owner and mode are checked on the opened descriptor (no race with a
//! rename between check and read), it must be a regular file (not `/dev/zero`), and at most
//! `limit` bytes are read. Errors are `"<path>: <reason>"`; callers prefix the config field.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Who may own and write a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// A secret: owned by the agent's user, no access at all for group or others (0600/0400).
    Secret,
    /// Read by the agent and trusted by it (config, trust bundle, hook program): owned by root or
    /// the agent's user, and not writable by group or others.
    Trusted,
}

/// Secrets (tokens, passwords, JWTs) are far smaller than this.
pub const MAX_SECRET_BYTES: u64 = 64 << 10;
/// A PEM bundle of CA certificates (a system bundle is about 200 KiB).
pub const MAX_PEM_BYTES: u64 = 4 << 20;

/// Opens `path` without following a final symlink, checks it against `rule` on the descriptor,
/// and reads at most `limit` bytes.
pub fn read(path: &Path, rule: Rule, limit: u64) -> Result<Vec<u8>, String> {
    let file = open_no_follow(path)?;
    let meta = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
    check(path, &meta, rule)?;
    read_bounded(path, file, limit)
}

/// Reads at most `limit` bytes of a file we do not own and may reach through symlinks (the
/// system CA bundle, which distributions link into place): regular file and size only.
pub fn read_system(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: is not a regular file", path.display()));
    }
    read_bounded(path, file, limit)
}

/// The program a hook runs: a regular, executable file, owned by root or the agent's user and
/// not writable by group or others (else anyone who can write it runs code as the agent). The
/// program may be reached through symlinks (`/usr/bin/python3`); its target is what is checked.
pub fn check_program(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    check(path, &meta, Rule::Trusted)?;
    if meta.mode() & 0o111 == 0 {
        return Err(format!("{}: is not executable", path.display()));
    }
    Ok(())
}

fn open_no_follow(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(nix::libc::ELOOP) => {
                format!(
                    "{}: is a symbolic link; name the file itself (symlinks are not followed)",
                    path.display()
                )
            }
            _ => format!("{}: {e}", path.display()),
        })
}

fn check(path: &Path, meta: &Metadata, rule: Rule) -> Result<(), String> {
    if !meta.is_file() {
        return Err(format!("{}: is not a regular file", path.display()));
    }
    let uid = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    match rule {
        Rule::Secret if meta.uid() != uid => {
            Err(format!("{}: owned by uid {}, but the agent runs as uid {uid}", path.display(), meta.uid()))
        }
        Rule::Secret if mode & 0o077 != 0 => Err(format!(
            "{}: mode {mode:04o} gives group/others access; it must be 0600 or 0400",
            path.display()
        )),
        Rule::Trusted if meta.uid() != uid && meta.uid() != 0 => Err(format!(
            "{}: owned by uid {}; it must be owned by root or by the agent's uid {uid}",
            path.display(),
            meta.uid()
        )),
        Rule::Trusted if mode & 0o022 != 0 => Err(format!(
            "{}: mode {mode:04o} lets group/others write it; remove their write permission (chmod go-w)",
            path.display()
        )),
        _ => Ok(()),
    }
}

fn read_bounded(path: &Path, file: File, limit: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{}: larger than {limit} bytes", path.display()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("enroll-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn file(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn symlinks_devices_loose_modes_and_oversized_files_are_refused() {
        let dir = scratch("rules");
        let secret = file(&dir, "secret", "s3cret\n", 0o600);
        assert_eq!(read(&secret, Rule::Secret, 100).unwrap(), b"s3cret\n");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let error = read(&link, Rule::Secret, 100).unwrap_err();
        assert!(error.contains("is a symbolic link"), "{error}");
        let error = read(Path::new("/dev/zero"), Rule::Trusted, 100).unwrap_err();
        assert_eq!(error, "/dev/zero: is not a regular file");
        assert!(read(&secret, Rule::Secret, 3).unwrap_err().ends_with("larger than 3 bytes"));
        let loose = file(&dir, "loose", "x", 0o640);
        assert!(read(&loose, Rule::Secret, 100).unwrap_err().contains("mode 0640 gives group/others access"));
        assert!(read(&loose, Rule::Trusted, 100).is_ok(), "group-readable is fine for a config");
        let writable = file(&dir, "writable", "x", 0o664);
        let error = read(&writable, Rule::Trusted, 100).unwrap_err();
        assert!(error.contains("mode 0664 lets group/others write it"), "{error}");
        let program = file(&dir, "hook", "#!/bin/sh\n", 0o757);
        assert!(check_program(&program).unwrap_err().contains("mode 0757 lets group/others write it"));
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_program(&program).unwrap_err().contains("is not executable"));
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_program(&program).is_ok());
        assert!(read_system(Path::new("/dev/zero"), 100).unwrap_err().contains("not a regular file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
