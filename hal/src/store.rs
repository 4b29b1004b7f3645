//! Protected storage (design.md §4).
//!
//! ```text
//! <state_dir>/            0700, owned by us
//!   current  -> slots/<n> swapped with rename(2)
//!   previous -> slots/<m>
//!   slots/<n>/…           cert.pem chain.pem ca.pem key.pem|key.uri
//!   state.json            0600
//! ```
//! Every file is written to a temporary name, fsynced, renamed and its directory fsynced, so a power
//! cut at any instant leaves either the old or the new file. `current` only ever names a complete
//! slot: the slot is finished and synced before the symlink moves.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::Error;

const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
const SLOTS: &str = "slots";
const STATE: &str = "state.json";

/// The state directory, checked for mode and owner when opened.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the state directory, creating it (0700) if missing. A directory with group/other
    /// access or another owner is refused: anyone who can write there can swap our identity.
    pub fn open(root: &Path) -> Result<Store, Error> {
        if !root.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(|e| Error::io("creating state directory", root, e))?;
        }
        let store = Store::existing(root)?;
        create_private_dir(&store.root.join(SLOTS))?;
        Ok(store)
    }

    /// Wraps an existing state directory after checking its mode and owner.
    fn existing(root: &Path) -> Result<Store, Error> {
        check_private_dir(root)?;
        Ok(Store { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The slot `current` names, if any.
    pub fn current(&self) -> Option<PathBuf> {
        self.resolve(CURRENT)
    }

    /// The slot `previous` names, if any.
    pub fn previous(&self) -> Option<PathBuf> {
        self.resolve(PREVIOUS)
    }

    /// `<state_dir>/current`, the path consumers read through.
    pub fn current_link(&self) -> PathBuf {
        self.root.join(CURRENT)
    }

    fn resolve(&self, link: &str) -> Option<PathBuf> {
        let target = fs::read_link(self.root.join(link)).ok()?;
        let slot = self.root.join(target);
        slot.is_dir().then_some(slot)
    }

    /// Creates a fresh, empty slot directory with a number no other slot has used.
    pub fn create_slot(&self) -> Result<PathBuf, Error> {
        let slots = self.root.join(SLOTS);
        create_private_dir(&slots)?;
        let next = self.slot_numbers()?.into_iter().max().map_or(1, |n| n + 1);
        let slot = slots.join(next.to_string());
        fs::DirBuilder::new().mode(0o700).create(&slot).map_err(|e| Error::io("creating slot", &slot, e))?;
        sync_dir(&slots)?;
        Ok(slot)
    }

    fn slot_numbers(&self) -> Result<Vec<u64>, Error> {
        let slots = self.root.join(SLOTS);
        let entries = fs::read_dir(&slots).map_err(|e| Error::io("listing slots", &slots, e))?;
        Ok(entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
    }

    /// Writes one file of a slot (atomically, synced).
    pub fn write_slot_file(&self, slot: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), Error> {
        write_file_atomic(&slot.join(name), bytes, mode)
    }

    /// Makes `slot` current: sync it, swap `current` by rename, sync the state dir, then point
    /// `previous` at the old current and prune every slot that is neither current, previous nor in
    /// `keep` (a pending request's slot). `forget_key` runs before a slot directory is removed, so
    /// a provider can destroy a key that lives outside it (a token object).
    pub fn install(&self, slot: &Path, keep: &[&Path], forget_key: &dyn Fn(&Path)) -> Result<(), Error> {
        sync_dir(slot)?;
        let old = self.current();
        self.swap_link(CURRENT, slot)?;
        if let Some(old) = old.filter(|old| old != slot) {
            self.swap_link(PREVIOUS, &old)?;
        }
        self.prune(keep, forget_key);
        Ok(())
    }

    fn swap_link(&self, name: &str, slot: &Path) -> Result<(), Error> {
        let relative = slot.strip_prefix(&self.root).unwrap_or(slot);
        let temp = self.root.join(format!(".{name}.tmp"));
        let _ = fs::remove_file(&temp);
        std::os::unix::fs::symlink(relative, &temp).map_err(|e| Error::io("creating symlink", &temp, e))?;
        let link = self.root.join(name);
        fs::rename(&temp, &link).map_err(|e| Error::io("swapping symlink", &link, e))?;
        sync_dir(&self.root)
    }

    /// Removes slots nobody refers to (also what a crash between install and pruning left).
    /// Failures only cost disk space, so they are logged.
    pub fn prune(&self, keep: &[&Path], forget_key: &dyn Fn(&Path)) {
        let current = self.current();
        let previous = self.previous();
        let Ok(numbers) = self.slot_numbers() else {
            return;
        };
        for n in numbers {
            let slot = self.root.join(SLOTS).join(n.to_string());
            let used = Some(&slot) == current.as_ref()
                || Some(&slot) == previous.as_ref()
                || keep.iter().any(|k| *k == slot);
            if !used {
                forget_key(&slot);
                if let Err(e) = fs::remove_dir_all(&slot) {
                    log::warn!("could not prune {}: {e}", slot.display());
                }
            }
        }
    }

    /// Deletes one slot directory (an abandoned pending request).
    pub fn remove_slot(&self, slot: &Path) -> Result<(), Error> {
        match fs::remove_dir_all(slot) {
            Ok(()) => sync_dir(&self.root.join(SLOTS)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing slot", slot, e)),
        }
    }

    /// The path of `state.json`.
    pub fn state_path(&self) -> PathBuf {
        self.root.join(STATE)
    }

    /// Reads `state.json`; `None` when there is none yet.
    pub fn read_state(&self) -> Result<Option<Vec<u8>>, Error> {
        let path = self.state_path();
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("reading", &path, e)),
        }
    }

    pub fn write_state(&self, bytes: &[u8]) -> Result<(), Error> {
        write_file_atomic(&self.state_path(), bytes, 0o600)
    }

    /// Moves an unreadable `state.json` aside so it can be inspected, and returns where it went.
    pub fn quarantine_state(&self) -> Result<PathBuf, Error> {
        let from = self.state_path();
        let to = self.root.join("state.json.corrupt");
        fs::rename(&from, &to).map_err(|e| Error::io("moving aside", &from, e))?;
        sync_dir(&self.root)?;
        Ok(to)
    }
}

/// Writes `bytes` to `path` through a synced temporary file and rename(2), then syncs the directory.
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&temp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(|e| Error::io("creating", &temp, e))?;
    // The umask may have narrowed the mode further; never widened. Set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("setting mode of", &temp, e))?;
    file.write_all(bytes).map_err(|e| Error::io("writing", &temp, e))?;
    file.sync_all().map_err(|e| Error::io("syncing", &temp, e))?;
    drop(file);
    fs::rename(&temp, path).map_err(|e| Error::io("renaming into place", path, e))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("syncing directory", dir, e))
}

fn create_private_dir(dir: &Path) -> Result<(), Error> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => check_private_dir(dir),
        Err(e) => Err(Error::io("creating directory", dir, e)),
    }
}

/// A directory must be ours and closed to group and others (0700).
pub fn check_private_dir(path: &Path) -> Result<(), Error> {
    let meta = fs::symlink_metadata(path).map_err(|e| Error::io("inspecting", path, e))?;
    if !meta.is_dir() {
        return Err(Error::Permissions { path: path.to_path_buf(), detail: "is not a directory".into() });
    }
    check_owner_and_mode(path, &meta)
}

/// A secret file (key, token, password) must be ours and readable by nobody else (0600 or 0400).
pub fn check_private_file(path: &Path) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|e| Error::io("inspecting", path, e))?;
    if !meta.is_file() {
        return Err(Error::Permissions { path: path.to_path_buf(), detail: "is not a regular file".into() });
    }
    check_owner_and_mode(path, &meta)
}

fn check_owner_and_mode(path: &Path, meta: &fs::Metadata) -> Result<(), Error> {
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        let detail = format!("owned by uid {}, but the agent runs as uid {uid}", meta.uid());
        return Err(Error::Permissions { path: path.to_path_buf(), detail });
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        let wanted = if meta.is_dir() { "0700" } else { "0600" };
        let detail = format!("mode {mode:04o} gives group/others access; it must be {wanted}");
        return Err(Error::Permissions { path: path.to_path_buf(), detail });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("enroll-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn install_swaps_current_keeps_previous_and_prunes_the_rest() {
        let root = temp_root("install");
        let store = Store::open(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
        assert!(store.current().is_none());
        let mut slots = Vec::new();
        for i in 0..3 {
            let slot = store.create_slot().unwrap();
            store.write_slot_file(&slot, "cert.pem", format!("cert {i}").as_bytes(), 0o644).unwrap();
            store.install(&slot, &[], &|_| {}).unwrap();
            slots.push(slot);
        }
        assert_eq!(store.current().unwrap(), slots[2]);
        assert_eq!(store.previous().unwrap(), slots[1]);
        assert!(!slots[0].exists(), "the oldest slot is pruned");
        assert_eq!(fs::read_to_string(store.current_link().join("cert.pem")).unwrap(), "cert 2");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_pending_slot_survives_pruning_and_numbers_are_never_reused() {
        let root = temp_root("pending");
        let store = Store::open(&root).unwrap();
        let a = store.create_slot().unwrap();
        store.install(&a, &[], &|_| {}).unwrap();
        let pending = store.create_slot().unwrap();
        let b = store.create_slot().unwrap();
        store.install(&b, &[&pending], &|_| {}).unwrap();
        let c = store.create_slot().unwrap();
        store.install(&c, &[&pending], &|_| {}).unwrap();
        assert!(pending.exists());
        assert!(!a.exists());
        assert_ne!(store.create_slot().unwrap(), a);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn loose_state_dir_is_refused_with_its_path() {
        let root = temp_root("loose");
        fs::create_dir_all(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let err = Store::open(&root).unwrap_err().to_string();
        assert!(err.contains(&root.display().to_string()) && err.contains("0755"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn atomic_write_sets_the_exact_mode_and_leaves_no_temp_file() {
        let root = temp_root("atomic");
        let store = Store::open(&root).unwrap();
        store.write_state(b"{}").unwrap();
        assert_eq!(mode(&store.state_path()), 0o600);
        store.write_state(b"{\"a\":1}").unwrap();
        assert_eq!(fs::read(store.state_path()).unwrap(), b"{\"a\":1}");
        let names: Vec<_> = fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(names.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")), "{names:?}");
        fs::remove_dir_all(&root).unwrap();
    }
}
