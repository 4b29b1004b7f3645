//! A private PostgreSQL cluster for the tests (tooling.md "EST peers and PostgreSQL"): initdb in
//! a temporary directory, trust authentication for user `gw` on 127.0.0.1 only, one cluster per
//! test binary, one fresh database per test. As root it runs as user `postgres` (PostgreSQL
//! refuses root). A watcher process stops the cluster when the test binary exits.
//! Without PostgreSQL these tests say `SKIPPED:` (plain `cargo test` on a fresh machine) and fail
//! under `CI`; scripts/hw-deps.sh installs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    /// Outlives every test of this binary; it ends by itself after the binary exits.
    _watcher: std::process::Child,
}

/// Whether PostgreSQL is installed; outside CI a missing one is a loud skip, in CI a failure.
pub fn installed(test: &str) -> bool {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.filter_map(|e| e.ok()).any(|e| e.path().join("bin/initdb").exists()))
        .unwrap_or(false);
    if !found {
        let why = "PostgreSQL is not installed (apt-get install postgresql; scripts/hw-deps.sh does)";
        assert!(std::env::var_os("CI").is_none(), "{test}: {why}");
        eprintln!("SKIPPED: {test}: {why}");
    }
    found
}

fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().expect(
        "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb): run scripts/hw-deps.sh as root \
         (apt-get install postgresql)",
    )
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs a PostgreSQL tool, as `postgres` when we are root.
fn pg_cmd(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start() -> Cluster {
    let bin = bin_dir();
    let dir = std::env::temp_dir().join(format!("gw-pg-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        let st = Command::new("chown").arg("postgres").arg(&dir).status().unwrap();
        assert!(st.success(), "chown postgres {}", dir.display());
    }
    let data = dir.join("data");
    let out = pg_cmd(&bin, "initdb")
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "gw", "--no-sync"])
        .output()
        .unwrap();
    assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
    let port = free_port();
    let opts = format!(
        "-k {} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
        dir.display()
    );
    let out = pg_cmd(&bin, "pg_ctl")
        .arg("-D")
        .arg(&data)
        .arg("-o")
        .arg(&opts)
        .arg("-l")
        .arg(dir.join("log"))
        .args(["-w", "-t", "60", "start"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_ctl start: {} {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    // Stop the cluster and remove it when this test binary exits, however it exits.
    let stop = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {runas} {ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        runas = if is_root() { "runuser -u postgres --" } else { "" },
        ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display(),
    );
    let watcher = Command::new("sh")
        .args(["-c", &stop])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Cluster { port, dir, bin, _watcher: watcher }
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(start)
}

/// A fresh, empty database on the shared cluster; its URL (no password: trust auth).
pub fn fresh_db() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let c = cluster();
    let name = format!("t{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &c.port.to_string(),
            "-U",
            "gw",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
        ])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "createdb: {}", String::from_utf8_lossy(&out.stderr));
    let _ = &c.bin;
    format!("postgres://gw@127.0.0.1:{}/{name}", c.port)
}
