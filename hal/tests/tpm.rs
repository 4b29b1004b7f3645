//! The `tpm` provider against swtpm (a TPM 2.0 simulator, Debian packages swtpm, swtpm-tools) on
//! loopback, one simulator per test in its own temp dir, killed on drop. Signatures are checked by
//! the `openssl` CLI and by ring; leaked transient objects by `tpm2_getcap` (tpm2-tools). Without
//! swtpm/tpm2-tools/openssl a test prints "SKIPPED: …" and returns, or fails when `CI` is set.
#![cfg(feature = "tpm")]

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use enroll_hal::tpm::{TpmConfig, TpmProvider, KEY_URI_FILE, PRIVATE_FILE, PUBLIC_FILE};
use enroll_hal::{Algorithm, DeviceKey, Error, KeyProvider, SignatureScheme};
use ring::signature::{self, UnparsedPublicKey};

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU16 = AtomicU16::new(0);
        let dir = std::env::temp_dir().join(format!(
            "enroll-hal-tpm-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).unwrap();
        TempDir(dir)
    }

    /// `<dir>/slots/<n>`, 0700, as the agent's store makes it.
    fn slot(&self, n: u32) -> PathBuf {
        let slot = self.0.join("slots").join(n.to_string());
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&slot).unwrap();
        slot
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// An swtpm process on two free loopback ports (server P, control P+1); killed on drop.
struct Swtpm {
    child: Child,
    state: PathBuf,
    port: u16,
}

impl Swtpm {
    fn start(state: &Path) -> Result<Swtpm, String> {
        // Ports from a per-process range so parallel test binaries rarely collide; busy ones are skipped.
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let base = 20000 + (std::process::id() % 2000) as u16 * 10;
        fs::create_dir_all(state).map_err(|e| format!("creating {}: {e}", state.display()))?;
        for _ in 0..20 {
            let port = base + NEXT.fetch_add(2, Ordering::Relaxed) % 10_000;
            let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
            if !free(port) || !free(port + 1) {
                continue;
            }
            if let Some(tpm) = Swtpm::spawn(state, port)? {
                return Ok(tpm);
            }
        }
        Err("no free port pair for swtpm".into())
    }

    /// `Ok(None)` when swtpm exited (most likely a port race): try other ports.
    fn spawn(state: &Path, port: u16) -> Result<Option<Swtpm>, String> {
        let mut child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run swtpm ({e}); install the Debian packages swtpm swtpm-tools"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if child.try_wait().ok().flatten().is_some() {
                return Ok(None);
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Some(Swtpm { child, state: state.to_path_buf(), port }));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("swtpm did not listen within 5 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    fn provider(&self) -> TpmProvider {
        TpmProvider::new(TpmConfig { tcti: self.tcti() }).unwrap()
    }

    /// Stops the simulator and starts it again on the same state (a device reboot).
    fn restart(self) -> Swtpm {
        let state = self.state.clone();
        drop(self);
        Swtpm::start(&state).expect("restarting swtpm")
    }

    /// The transient object handles the TPM holds, as tpm2-tools report them.
    fn transient_handles(&self) -> String {
        let out = Command::new("tpm2_getcap")
            .args(["-T", &self.tcti(), "handles-transient"])
            .output()
            .expect("tpm2_getcap");
        assert!(out.status.success(), "tpm2_getcap: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn assert_no_transient_objects(&self) {
        let handles = self.transient_handles();
        assert!(handles.is_empty(), "transient objects left in the TPM: {handles}");
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tests run one at a time. libtss2's swtpm TCTI socket is not close-on-exec: a process spawned by
/// one test thread (swtpm, tpm2_getcap) would inherit another thread's open TPM connection, and
/// swtpm, which serves one connection at a time, would never see it close and hang.
static SERIAL: Mutex<()> = Mutex::new(());

/// The simulator and tools a test needs, or None after saying SKIPPED (a failure under CI).
/// Tests bind `_serial` first, so it drops last: the simulator is gone before the lock is released.
struct Setup {
    dir: TempDir,
    tpm: Swtpm,
    _serial: MutexGuard<'static, ()>,
}

fn setup(name: &str) -> Option<Setup> {
    let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let tools = ["tpm2_getcap", "openssl"]
        .into_iter()
        .find(|tool| Command::new(tool).arg("--version").output().is_err())
        .map(|tool| format!("{tool} is not installed (Debian packages tpm2-tools, openssl)"));
    let dir = TempDir::new(name);
    let started = match tools {
        Some(why) => Err(why),
        None => Swtpm::start(&dir.0.join("tpm-state")),
    };
    match started {
        Ok(tpm) => Some(Setup { dir, tpm, _serial: serial }),
        Err(why) if std::env::var_os("CI").is_some() => panic!("the TPM test {name} cannot run: {why}"),
        Err(why) => {
            eprintln!("SKIPPED: {name}: {why}");
            None
        }
    }
}

const MESSAGE: &[u8] = b"to be signed by a key that never leaves the TPM";

fn schemes(algorithm: Algorithm) -> &'static [SignatureScheme] {
    match algorithm {
        Algorithm::P256 => &[SignatureScheme::EcdsaP256Sha256],
        Algorithm::Rsa2048 => &[SignatureScheme::RsaPkcs1Sha256, SignatureScheme::RsaPssSha256],
    }
}

/// Verifies with the openssl CLI; `sigopts` are passed as `-sigopt` values.
fn openssl_verifies(dir: &Path, spki: &[u8], message: &[u8], sig: &[u8], sigopts: &[&str]) -> bool {
    let public = dir.join("public.pem");
    fs::write(&public, pem::encode(&pem::Pem::new("PUBLIC KEY", spki.to_vec()))).unwrap();
    fs::write(dir.join("message"), message).unwrap();
    fs::write(dir.join("sig"), sig).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir).args(["dgst", "-sha256", "-verify", "public.pem", "-signature", "sig"]);
    for opt in sigopts {
        cmd.args(["-sigopt", opt]);
    }
    let out = cmd.arg("message").output().expect("openssl");
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Verified OK")
}

fn openssl_opts(scheme: SignatureScheme) -> &'static [&'static str] {
    match scheme {
        // Strict: PSS with MGF1-SHA-256 and a salt of exactly 32 bytes, what TLS 1.3 requires.
        SignatureScheme::RsaPssSha256 => {
            &["rsa_padding_mode:pss", "rsa_pss_saltlen:32", "rsa_mgf1_md:sha256"]
        }
        _ => &[],
    }
}

fn ring_verifies(key: &dyn DeviceKey, scheme: SignatureScheme, message: &[u8], sig: &[u8]) -> bool {
    let spki = key.public_key_spki();
    let (alg, public): (&dyn signature::VerificationAlgorithm, &[u8]) = match scheme {
        SignatureScheme::EcdsaP256Sha256 => (&signature::ECDSA_P256_SHA256_ASN1, &spki[26..]),
        // SEQUENCE(4) + AlgorithmIdentifier(15) + BIT STRING header(4) + unused-bits byte.
        SignatureScheme::RsaPkcs1Sha256 => (&signature::RSA_PKCS1_2048_8192_SHA256, &spki[24..]),
        SignatureScheme::RsaPssSha256 => (&signature::RSA_PSS_2048_8192_SHA256, &spki[24..]),
    };
    UnparsedPublicKey::new(alg, public).verify(message, sig).is_ok()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn key_error(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Err(e @ Error::Key { .. }) => e.to_string(),
        other => panic!("expected Error::Key, got {other:?}"),
    }
}

#[test]
fn generated_keys_load_with_the_same_public_key_and_sign_verifiably() {
    let Some(Setup { _serial, dir, tpm }) = setup("generate") else { return };
    let provider = tpm.provider();
    assert_eq!(provider.name(), "tpm");
    for (n, algorithm) in [(1, Algorithm::P256), (2, Algorithm::Rsa2048)] {
        let slot = dir.slot(n);
        let key = provider.generate(algorithm, &slot).unwrap();
        assert_eq!(key.algorithm(), algorithm);
        assert_eq!(mode(&slot.join(PRIVATE_FILE)), 0o600);
        assert_eq!(mode(&slot.join(PUBLIC_FILE)), 0o644);
        assert_eq!(mode(&slot.join(KEY_URI_FILE)), 0o644);
        let uri = fs::read_to_string(slot.join(KEY_URI_FILE)).unwrap();
        assert_eq!(uri.trim_end(), key.uri().unwrap());
        assert!(uri.starts_with(&format!("tpm:blob;alg={};name=000b", algorithm.name())), "{uri}");
        assert_eq!(uri.lines().count(), 1);

        let loaded = provider.load(&slot).unwrap();
        assert_eq!(loaded.public_key_spki(), key.public_key_spki());
        assert_eq!(loaded.uri(), key.uri());
        assert_eq!(loaded.algorithm(), algorithm);

        for &scheme in schemes(algorithm) {
            for signer in [&key, &loaded] {
                let sig = signer.sign(scheme, MESSAGE).unwrap();
                assert!(openssl_verifies(&dir.0, key.public_key_spki(), MESSAGE, &sig, openssl_opts(scheme)));
                assert!(!openssl_verifies(
                    &dir.0,
                    key.public_key_spki(),
                    b"other",
                    &sig,
                    openssl_opts(scheme)
                ));
                assert!(ring_verifies(signer.as_ref(), scheme, MESSAGE, &sig), "ring rejects {scheme:?}");
            }
        }
        let wrong = match algorithm {
            Algorithm::P256 => SignatureScheme::RsaPkcs1Sha256,
            Algorithm::Rsa2048 => SignatureScheme::EcdsaP256Sha256,
        };
        let err = key_error(loaded.sign(wrong, MESSAGE));
        assert!(err.contains("cannot sign with"), "{err}");
    }
    // Two keys, seven signatures, one refusal: every SRK and key handle was flushed.
    tpm.assert_no_transient_objects();
}

/// TLS 1.3 needs PSS with salt length = hash length (32); ring's RSA_PSS_2048_8192_SHA256 accepts
/// only that. TPMs differ: the spec allows the maximum salt, FIPS mode uses the hash length.
#[test]
fn rsa_pss_signatures_use_a_salt_of_hash_length() {
    let Some(Setup { _serial, dir, tpm }) = setup("pss") else { return };
    let key = tpm.provider().generate(Algorithm::Rsa2048, &dir.slot(1)).unwrap();
    let sig = key.sign(SignatureScheme::RsaPssSha256, MESSAGE).unwrap();
    let spki = key.public_key_spki();
    let auto = openssl_verifies(&dir.0, spki, MESSAGE, &sig, &["rsa_padding_mode:pss", "rsa_pss_saltlen:-2"]);
    let salt32 =
        openssl_verifies(&dir.0, spki, MESSAGE, &sig, &["rsa_padding_mode:pss", "rsa_pss_saltlen:32"]);
    let salt_max =
        openssl_verifies(&dir.0, spki, MESSAGE, &sig, &["rsa_padding_mode:pss", "rsa_pss_saltlen:222"]);
    let ring = ring_verifies(key.as_ref(), SignatureScheme::RsaPssSha256, MESSAGE, &sig);
    eprintln!(
        "swtpm RSA-PSS: openssl auto salt {auto}, salt 32 {salt32}, salt 222 (max) {salt_max}, ring {ring}"
    );
    assert!(auto, "openssl does not accept the TPM's PSS signature at all");
    assert!(salt32 && ring, "the TPM's PSS salt is not 32 bytes: TLS 1.3 peers will reject it");
}

#[test]
fn reuse_copies_the_key_and_delete_removes_only_one_slot() {
    let Some(Setup { _serial, dir, tpm }) = setup("reuse") else { return };
    let provider = tpm.provider();
    let (a, b) = (dir.slot(1), dir.slot(2));
    let key = provider.generate(Algorithm::P256, &a).unwrap();
    provider.reuse(&a, &b).unwrap();
    assert_eq!(fs::read(a.join(KEY_URI_FILE)).unwrap(), fs::read(b.join(KEY_URI_FILE)).unwrap());
    assert_eq!(mode(&b.join(PRIVATE_FILE)), 0o600);

    provider.delete(&a).unwrap();
    for name in [KEY_URI_FILE, PRIVATE_FILE, PUBLIC_FILE] {
        assert!(!a.join(name).exists(), "{name} survived delete");
    }
    provider.delete(&a).unwrap(); // idempotent
    assert!(provider.load(&a).is_err());

    // Blobs live only in slots: retain has nothing to destroy and must not disturb live keys.
    provider.retain(&[]).unwrap();
    provider.retain(std::slice::from_ref(&b)).unwrap();
    let reused = provider.load(&b).unwrap();
    assert_eq!(reused.public_key_spki(), key.public_key_spki());
    let sig = reused.sign(SignatureScheme::EcdsaP256Sha256, MESSAGE).unwrap();
    assert!(openssl_verifies(&dir.0, key.public_key_spki(), MESSAGE, &sig, &[]));
    tpm.assert_no_transient_objects();
}

#[test]
fn blobs_survive_a_tpm_restart_and_are_refused_by_another_tpm() {
    let Some(Setup { _serial, dir, tpm }) = setup("restart") else { return };
    let slot = dir.slot(1);
    let key = tpm.provider().generate(Algorithm::Rsa2048, &slot).unwrap();

    // Same TPM after a reboot: the SRK is recreated from the owner seed and the blob loads.
    let tpm = tpm.restart();
    let loaded = tpm.provider().load(&slot).unwrap();
    assert_eq!(loaded.public_key_spki(), key.public_key_spki());
    let sig = loaded.sign(SignatureScheme::RsaPkcs1Sha256, MESSAGE).unwrap();
    assert!(openssl_verifies(&dir.0, key.public_key_spki(), MESSAGE, &sig, &[]));
    tpm.assert_no_transient_objects();

    // Another TPM (another owner seed) cannot unwrap the blob.
    let other = Swtpm::start(&dir.0.join("other-tpm-state")).unwrap();
    let err = key_error(other.provider().load(&slot));
    assert!(err.contains("not made by this TPM") || err.contains("loading"), "{err}");
    eprintln!("load on another TPM: {err}");
    other.assert_no_transient_objects();
}

#[test]
fn damaged_or_mismatched_slot_files_are_errors_that_leak_nothing() {
    let Some(Setup { _serial, dir, tpm }) = setup("damaged") else { return };
    let provider = tpm.provider();
    let (a, b) = (dir.slot(1), dir.slot(2));
    provider.generate(Algorithm::P256, &a).unwrap();
    provider.generate(Algorithm::P256, &b).unwrap();

    // A public blob of another key: the URI's TPM Name does not match.
    fs::copy(b.join(PUBLIC_FILE), a.join(PUBLIC_FILE)).unwrap();
    let err = key_error(provider.load(&a));
    assert!(err.contains("does not hold the key"), "{err}");

    // Flipped bits in the private blob: the TPM's integrity check refuses it.
    fs::copy(b.join(PUBLIC_FILE), a.join(PUBLIC_FILE)).unwrap();
    fs::copy(b.join(KEY_URI_FILE), a.join(KEY_URI_FILE)).unwrap();
    let mut private = fs::read(b.join(PRIVATE_FILE)).unwrap();
    let last = private.len() - 1;
    private[last] ^= 0xff;
    fs::write(a.join(PRIVATE_FILE), &private).unwrap();
    let err = key_error(provider.load(&a));
    eprintln!("damaged private blob: {err}");
    tpm.assert_no_transient_objects();

    // Truncated blob and garbage URI are refused before the TPM is asked.
    fs::write(a.join(PRIVATE_FILE), &private[..10]).unwrap();
    assert!(key_error(provider.load(&a)).contains("TPM2B_PRIVATE"));
    fs::write(a.join(KEY_URI_FILE), "pkcs11:object=x\n").unwrap();
    assert!(key_error(provider.load(&a)).contains("not a tpm:blob URI"));

    // A private blob others can read is refused like a loose key.pem.
    fs::set_permissions(b.join(PRIVATE_FILE), fs::Permissions::from_mode(0o644)).unwrap();
    match provider.load(&b) {
        Err(Error::Permissions { detail, .. }) => assert!(detail.contains("0644"), "{detail}"),
        other => panic!("expected a permissions error, got {other:?}"),
    }
    tpm.assert_no_transient_objects();
}

/// What a process killed between load and flush leaves in a TPM without a resource manager:
/// objects loaded for good. Fills every transient slot with primaries and closes the connection
/// without flushing them (`tr_close` forgets an object on the client side only).
fn leave_objects_loaded(tpm: &Swtpm) -> usize {
    use tss_esapi::interface_types::{algorithm::HashingAlgorithm, ecc::EccCurve};
    use tss_esapi::structures::{EccScheme, HashScheme};
    let tcti = tss_esapi::tcti_ldr::TctiNameConf::from_str(&tpm.tcti()).unwrap();
    let mut ctx = tss_esapi::Context::new(tcti).unwrap();
    // Any primary fills a slot: tss-esapi's stock ECDSA signing template.
    let template = tss_esapi::utils::create_unrestricted_signing_ecc_public(
        EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
        EccCurve::NistP256,
    )
    .unwrap();
    let mut loaded = 0;
    ctx.execute_with_session(
        Some(tss_esapi::interface_types::session_handles::AuthSession::Password),
        |ctx| {
            while let Ok(primary) = ctx.create_primary(
                tss_esapi::interface_types::resource_handles::Hierarchy::Owner,
                template.clone(),
                None,
                None,
                None,
                None,
            ) {
                // ESYS forgets the object (the call succeeds); tss-esapi's own bookkeeping then
                // refuses to mark a flushable handle closed, an error that changes nothing here.
                let mut handle = primary.key_handle.into();
                let _ = ctx.tr_close(&mut handle);
                loaded += 1;
            }
        },
    );
    loaded
}

#[test]
fn objects_a_killed_process_left_loaded_are_flushed_before_use() {
    let Some(Setup { _serial, dir, tpm }) = setup("leftovers") else { return };
    let provider = tpm.provider();
    let slot = dir.slot(1);
    provider.generate(Algorithm::P256, &slot).unwrap();
    let left = leave_objects_loaded(&tpm);
    assert!(left >= 2, "the simulator took {left} objects");
    assert_eq!(tpm.transient_handles().lines().count(), left, "{}", tpm.transient_handles());

    let key = provider.load(&slot).unwrap();
    let sig = key.sign(SignatureScheme::EcdsaP256Sha256, MESSAGE).unwrap();
    assert!(ring_verifies(key.as_ref(), SignatureScheme::EcdsaP256Sha256, MESSAGE, &sig));
    tpm.assert_no_transient_objects();
}

#[test]
fn an_unreachable_tpm_is_a_clear_error() {
    let Some(Setup { _serial, dir, tpm }) = setup("unreachable") else { return };
    let tcti = tpm.tcti();
    drop(tpm);
    let provider = TpmProvider::new(TpmConfig { tcti: tcti.clone() }).unwrap();
    let err = key_error(provider.generate(Algorithm::P256, &dir.slot(1)));
    assert!(err.contains("cannot open the TPM") && err.contains(&tcti), "{err}");
    assert!(!dir.slot(1).join(KEY_URI_FILE).exists());
}

#[test]
fn sign_latency_per_algorithm() {
    let Some(Setup { _serial, dir, tpm }) = setup("latency") else { return };
    let provider = tpm.provider();
    const N: u32 = 50;
    for (n, algorithm) in [(1, Algorithm::P256), (2, Algorithm::Rsa2048)] {
        let started = Instant::now();
        let key: Arc<dyn DeviceKey> = provider.generate(algorithm, &dir.slot(n)).unwrap();
        let generated = started.elapsed();
        let started = Instant::now();
        let loaded = provider.load(&dir.slot(n)).unwrap();
        eprintln!("tpm {}: generate {generated:?}, load {:?}", algorithm.name(), started.elapsed());
        for &scheme in schemes(algorithm) {
            let started = Instant::now();
            for _ in 0..N {
                loaded.sign(scheme, MESSAGE).unwrap();
            }
            let per = started.elapsed() / N;
            eprintln!("tpm {} {scheme:?}: {per:?} per signature (swtpm, {N} signatures)", algorithm.name());
        }
        drop(key);
    }
    let mut log = std::io::stderr();
    let _ = log.flush();
    tpm.assert_no_transient_objects();
}
