//! Protected storage (design.md §4).
//!
//! ```text
//! <state_dir>/            0700, owned by us
//!   current  -> slots/<n> swapped with rename(2)
//!   previous -> slots/<m>
//!   slots/<n>/…           cert.pem chain.pem ca.pem key.pem|key.uri
//!   state.json            0600
//!   .lock                 0600, flock(2)ed by the one run that writes
//! ```
//! Every file is written to a temporary name, fsynced, renamed and its directory fsynced, so a power
//! cut at any instant leaves either the old or the new file. `current` only ever names a complete
//! slot: the slot is finished and synced before the symlink moves.
//!
//! One writer at a time: `enroll`, `renew` and each cycle of `run` hold [`Lock`]; `status` and
//! `check` only read ([`Store::inspect`]). Slot names are `<digits>` and links name exactly
//! `slots/<digits>`: nothing read from disk can make us follow or delete a path outside `slots/`.
//!
//! With a consumer group (`storage.group`), the installed identity is shared read-only with it:
//! the directories on the way 0750 and the certificate files and soft key 0640, all with that
//! group. `state.json`, the lock and a pending slot (its key not yet certified) stay private.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::Error;

const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
const SLOTS: &str = "slots";
const STATE: &str = "state.json";
const LOCK: &str = ".lock";
/// Slot numbers are u64; more digits than that is not a name we made.
const MAX_SLOT_NAME: usize = 20;
/// What consumers read in an installed slot (shared with the group, if one is configured).
const SHARED_FILES: [&str; 5] = ["cert.pem", "chain.pem", "ca.pem", "key.pem", "key.uri"];

/// A slot name we could have made: 1 to 20 ASCII digits. Anything else (`..`, `/`, a path) is
/// refused wherever a slot name is read from disk.
pub fn slot_name_is_valid(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_SLOT_NAME && name.bytes().all(|b| b.is_ascii_digit())
}

/// The state directory, checked for mode and owner when opened.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// The consumers' group (`storage.group`): read access to the installed identity.
    group: Option<u32>,
}

/// The exclusive right to write the state directory, held until dropped (flock(2) on
/// `<state_dir>/.lock`; the kernel releases it if the process dies).
#[derive(Debug)]
pub struct Lock {
    _file: Flock<File>,
}

impl Store {
    /// Opens the state directory for writing, creating it (0700, or 0750 with `group`) if
    /// missing. A directory with more access than that or another owner is refused: anyone who
    /// can write there can swap our identity. Take [`Store::lock`] before writing anything.
    pub fn open(root: &Path, group: Option<u32>) -> Result<Store, Error> {
        if !root.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(|e| Error::io("creating state directory", root, e))?;
        }
        let store = Store::inspect(root, group)?;
        store.share_dir(root)?;
        store.create_dir(&store.root.join(SLOTS))?;
        Ok(store)
    }

    /// Wraps an existing state directory after checking its mode and owner; creates and changes
    /// nothing (`status`, `check`).
    pub fn inspect(root: &Path, group: Option<u32>) -> Result<Store, Error> {
        check_dir(root, group)?;
        Ok(Store { root: root.to_path_buf(), group })
    }

    /// Takes the writer's lock, waiting up to `wait` for another run to finish (polling, so a
    /// holder that never lets go costs a bounded wait, then [`Error::Locked`]). `give_up` is
    /// asked between polls: a service told to stop does not sit out the wait first.
    pub fn lock(&self, wait: Duration, give_up: &dyn Fn() -> bool) -> Result<Lock, Error> {
        let path = self.root.join(LOCK);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io("opening the lock", &path, e))?;
        let started = Instant::now();
        let mut said = false;
        loop {
            file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(held) => return Ok(Lock { _file: held }),
                Err((file, Errno::EWOULDBLOCK)) => file,
                Err((_, errno)) => return Err(Error::io("locking", &path, errno.into())),
            };
            if started.elapsed() >= wait || give_up() {
                return Err(Error::Locked { path, waited_s: started.elapsed().as_secs() });
            }
            if !said {
                log::info!(
                    "another enroll-agent run holds {}; waiting up to {} s for it",
                    path.display(),
                    wait.as_secs()
                );
                said = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What a writer does first, under the lock: remove temporary files a crash left, move aside
    /// `current`/`previous` links that name anything but `slots/<digits>` (`<name>.corrupt`, like
    /// an unreadable state.json), and give the consumer group its access to the installed slots.
    pub fn repair(&self, _lock: &Lock) -> Result<(), Error> {
        if let Ok(entries) = fs::read_dir(&self.root) {
            for name in entries.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
                let ours = [CURRENT, PREVIOUS, STATE].iter().any(|n| name.starts_with(&format!(".{n}.")));
                if ours && name.ends_with(".tmp") {
                    let _ = fs::remove_file(self.root.join(&name));
                }
            }
        }
        for name in [CURRENT, PREVIOUS] {
            let link = self.root.join(name);
            let Ok(target) = fs::read_link(&link) else {
                continue;
            };
            if slot_of_target(&target).is_none() {
                let aside = self.root.join(format!("{name}.corrupt"));
                fs::rename(&link, &aside).map_err(|e| Error::io("moving aside", &link, e))?;
                sync_dir(&self.root)?;
                log::warn!(
                    "{} named {} instead of a slot in slots/; moved it to {}",
                    link.display(),
                    target.display(),
                    aside.display()
                );
            }
        }
        for slot in [self.current(), self.previous()].into_iter().flatten() {
            self.share_slot(&slot)?;
        }
        Ok(())
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

    /// The slot a link names, only if its target is exactly `slots/<digits>` and that is a real
    /// directory (not a symlink out of the state directory).
    fn resolve(&self, link: &str) -> Option<PathBuf> {
        let target = fs::read_link(self.root.join(link)).ok()?;
        let slot = self.slot(slot_of_target(&target)?)?;
        fs::symlink_metadata(&slot).ok()?.is_dir().then_some(slot)
    }

    /// `<state_dir>/slots/<name>`, for a valid slot name only.
    pub fn slot(&self, name: &str) -> Option<PathBuf> {
        slot_name_is_valid(name).then(|| self.root.join(SLOTS).join(name))
    }

    /// Creates a fresh, empty slot directory with a number no other slot has used. It stays
    /// private (0700) until it is installed, whatever the group: its key is not certified yet.
    pub fn create_slot(&self) -> Result<PathBuf, Error> {
        let slots = self.root.join(SLOTS);
        self.create_dir(&slots)?;
        let next = self.slot_numbers()?.into_iter().max().map_or(1, |n| n + 1);
        let slot = slots.join(next.to_string());
        fs::DirBuilder::new().mode(0o700).create(&slot).map_err(|e| Error::io("creating slot", &slot, e))?;
        sync_dir(&slots)?;
        Ok(slot)
    }

    fn slot_numbers(&self) -> Result<Vec<u64>, Error> {
        let slots = self.root.join(SLOTS);
        let entries = fs::read_dir(&slots).map_err(|e| Error::io("listing slots", &slots, e))?;
        Ok(entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| slot_name_is_valid(name))
            .filter_map(|name| name.parse().ok())
            .collect())
    }

    /// Creates `dir` (0700, or 0750 with the group), or checks the existing one.
    fn create_dir(&self, dir: &Path) -> Result<(), Error> {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => self.share_dir(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                check_dir(dir, self.group)?;
                self.share_dir(dir)
            }
            Err(e) => Err(Error::io("creating directory", dir, e)),
        }
    }

    /// With a group: `dir` becomes 0750 and the group's. Without: left as it is (0700).
    fn share_dir(&self, dir: &Path) -> Result<(), Error> {
        let Some(group) = self.group else {
            return Ok(());
        };
        std::os::unix::fs::lchown(dir, None, Some(group))
            .map_err(|e| Error::io("giving the consumer group", dir, e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o750))
            .map_err(|e| Error::io("setting mode of", dir, e))
    }

    /// With a group: the consumer files of an installed slot become 0640 and the group's, then
    /// the slot directory 0750.
    fn share_slot(&self, slot: &Path) -> Result<(), Error> {
        let Some(group) = self.group else {
            return Ok(());
        };
        for name in SHARED_FILES {
            let path = slot.join(name);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_file() => {
                    std::os::unix::fs::lchown(&path, None, Some(group))
                        .map_err(|e| Error::io("giving the consumer group", &path, e))?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o640))
                        .map_err(|e| Error::io("setting mode of", &path, e))?;
                }
                _ => {}
            }
        }
        self.share_dir(slot)
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
        self.share_slot(slot)?;
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
        let temp = temp_path(&self.root, name);
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

    /// Deletes one slot directory (an abandoned pending request). Only ever a `slots/<digits>`
    /// of this state directory: this is a recursive delete.
    pub fn remove_slot(&self, slot: &Path) -> Result<(), Error> {
        let name = slot.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if self.slot(name).as_deref() != Some(slot) {
            let detail = format!("is not a slot of {}; not removing it", self.root.display());
            return Err(Error::Permissions { path: slot.to_path_buf(), detail });
        }
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
    let temp = temp_path(dir, name);
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

/// A temporary name no other process or call uses (pid and a counter), so two writers, or a
/// writer and a metrics update, never write into or remove each other's temporary file.
fn temp_path(dir: &Path, name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// The slot name of a link target that is exactly `slots/<digits>`.
fn slot_of_target(target: &Path) -> Option<&str> {
    let mut parts = target.components();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Component::Normal(dir)), Some(Component::Normal(name)), None) if dir == SLOTS => {
            name.to_str().filter(|n| slot_name_is_valid(n))
        }
        _ => None,
    }
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("syncing directory", dir, e))
}

/// A directory must be ours and closed to group and others (0700).
pub fn check_private_dir(path: &Path) -> Result<(), Error> {
    check_dir(path, None)
}

/// A state directory: ours, 0700; with a consumer group also 0750 (that group may read and
/// enter it, never write; others nothing).
fn check_dir(path: &Path, group: Option<u32>) -> Result<(), Error> {
    let meta = fs::symlink_metadata(path).map_err(|e| Error::io("inspecting", path, e))?;
    if !meta.is_dir() {
        return Err(Error::Permissions { path: path.to_path_buf(), detail: "is not a directory".into() });
    }
    check_owner_and_mode(path, &meta, group)
}

/// A secret file (key, token, password) must be ours and readable by nobody else (0600 or 0400).
pub fn check_private_file(path: &Path) -> Result<(), Error> {
    check_key_file(path, None)
}

/// A key file of an installed slot: like [`check_private_file`], but with a consumer group it
/// may also be 0640 with that group.
pub fn check_key_file(path: &Path, group: Option<u32>) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|e| Error::io("inspecting", path, e))?;
    if !meta.is_file() {
        return Err(Error::Permissions { path: path.to_path_buf(), detail: "is not a regular file".into() });
    }
    check_owner_and_mode(path, &meta, group)
}

fn check_owner_and_mode(path: &Path, meta: &fs::Metadata, group: Option<u32>) -> Result<(), Error> {
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        let detail = format!("owned by uid {}, but the agent runs as uid {uid}", meta.uid());
        return Err(Error::Permissions { path: path.to_path_buf(), detail });
    }
    let mode = meta.mode() & 0o777;
    // The consumer group may read (and enter directories); nobody else gets anything.
    let shared = group.is_some_and(|g| meta.gid() == g) && mode & 0o027 == 0;
    if mode & 0o077 != 0 && !shared {
        let (private, with_group) = if meta.is_dir() { ("0700", "0750") } else { ("0600", "0640") };
        let detail = match group {
            Some(g) => format!(
                "mode {mode:04o} (group {}) gives too much access; it must be {private}, or {with_group} \
                 with the storage.group {g}",
                meta.gid()
            ),
            None if meta.is_dir() => format!(
                "mode {mode:04o} gives group/others access; it must be 0700 (0750 only with storage.group set)"
            ),
            None => format!("mode {mode:04o} gives group/others access; it must be {private}"),
        };
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
        let store = Store::open(&root, None).unwrap();
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
        let store = Store::open(&root, None).unwrap();
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
        let err = Store::open(&root, None).unwrap_err().to_string();
        assert!(err.contains(&root.display().to_string()) && err.contains("0755"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn slot_names_are_digits_and_links_must_name_exactly_slots_digits() {
        for good in ["1", "42", "18446744073709551615"] {
            assert!(slot_name_is_valid(good), "{good}");
        }
        for bad in ["", "..", "../../victim", "/etc", "4/..", "+4", " 4", "4a", "123456789012345678901"] {
            assert!(!slot_name_is_valid(bad), "{bad:?}");
        }
        let root = temp_root("links");
        let store = Store::open(&root, None).unwrap();
        let slot = store.create_slot().unwrap();
        store.install(&slot, &[], &|_| {}).unwrap();
        let outside = root.join("outside");
        fs::create_dir(&outside).unwrap();
        for target in ["../outside", "outside", "slots/../outside", "./slots/1", "slots/1/", "/tmp"] {
            let _ = fs::remove_file(root.join(PREVIOUS));
            std::os::unix::fs::symlink(target, root.join(PREVIOUS)).unwrap();
            let resolved = store.previous();
            assert!(resolved.is_none() || target == "slots/1/", "{target}: {resolved:?}");
        }
        std::os::unix::fs::symlink("../outside", root.join("slots/7")).unwrap();
        std::os::unix::fs::symlink("slots/7", root.join("current.new")).unwrap();
        fs::rename(root.join("current.new"), root.join(CURRENT)).unwrap();
        assert!(store.current().is_none(), "a slot that is a symlink is not followed");
        let lock = store.lock(Duration::ZERO, &|| false).unwrap();
        store.repair(&lock).unwrap();
        assert_eq!(fs::read_link(root.join("previous.corrupt")).unwrap(), Path::new("/tmp"));
        let err = store.remove_slot(&outside).unwrap_err().to_string();
        assert!(err.contains("is not a slot"), "{err}");
        assert!(store.remove_slot(&root.join("slots/../outside")).is_err());
        assert!(outside.exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn one_writer_at_a_time() {
        let root = temp_root("lock");
        let store = Store::open(&root, None).unwrap();
        let held = store.lock(Duration::ZERO, &|| false).unwrap();
        assert_eq!(mode(&root.join(LOCK)), 0o600);
        let started = Instant::now();
        let err = store.lock(Duration::from_millis(300), &|| false).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        assert!(err.to_string().contains("another enroll-agent run holds"), "{err}");
        drop(held);
        store.lock(Duration::ZERO, &|| false).unwrap();
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn temporary_names_are_unique_and_repair_removes_stale_ones() {
        let root = temp_root("temps");
        let store = Store::open(&root, None).unwrap();
        assert_ne!(temp_path(&root, STATE), temp_path(&root, STATE));
        fs::write(root.join(".state.json.tmp"), "old fixed name").unwrap();
        fs::write(root.join(".current.99.3.tmp"), "").unwrap();
        fs::write(root.join(".metrics.prom.tmp"), "not ours").unwrap();
        let lock = store.lock(Duration::ZERO, &|| false).unwrap();
        store.repair(&lock).unwrap();
        assert!(!root.join(".state.json.tmp").exists() && !root.join(".current.99.3.tmp").exists());
        assert!(root.join(".metrics.prom.tmp").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_group_shares_installed_slots_only() {
        let root = temp_root("group");
        let group = nix::unistd::getegid().as_raw();
        let store = Store::open(&root, Some(group)).unwrap();
        assert_eq!(mode(&root), 0o750);
        assert_eq!(mode(&root.join(SLOTS)), 0o750);
        let slot = store.create_slot().unwrap();
        write_file_atomic(&slot.join("key.pem"), b"k", 0o600).unwrap();
        store.write_slot_file(&slot, "cert.pem", b"c", 0o644).unwrap();
        store.write_slot_file(&slot, "request.csr", b"r", 0o600).unwrap();
        assert_eq!(mode(&slot), 0o700, "pending: private");
        store.install(&slot, &[], &|_| {}).unwrap();
        assert_eq!(
            (mode(&slot), mode(&slot.join("key.pem")), mode(&slot.join("cert.pem"))),
            (0o750, 0o640, 0o640)
        );
        assert_eq!(mode(&slot.join("request.csr")), 0o600);
        check_key_file(&slot.join("key.pem"), Some(group)).unwrap();
        assert!(check_key_file(&slot.join("key.pem"), None).is_err());
        assert!(check_private_file(&slot.join("key.pem")).is_err());
        fs::set_permissions(slot.join("key.pem"), fs::Permissions::from_mode(0o660)).unwrap();
        assert!(check_key_file(&slot.join("key.pem"), Some(group)).is_err(), "no group write");
        fs::set_permissions(slot.join("key.pem"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_key_file(&slot.join("key.pem"), Some(group)).is_err(), "nothing for others");
        let err = Store::open(&root, None).unwrap_err().to_string();
        assert!(err.contains("0750") && err.contains("storage.group"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn atomic_write_sets_the_exact_mode_and_leaves_no_temp_file() {
        let root = temp_root("atomic");
        let store = Store::open(&root, None).unwrap();
        store.write_state(b"{}").unwrap();
        assert_eq!(mode(&store.state_path()), 0o600);
        store.write_state(b"{\"a\":1}").unwrap();
        assert_eq!(fs::read(store.state_path()).unwrap(), b"{\"a\":1}");
        let names: Vec<_> = fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(names.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")), "{names:?}");
        fs::remove_dir_all(&root).unwrap();
    }
}
