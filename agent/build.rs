//! Records the build time for the clock rule (design.md §5 rule 7): a device whose clock is
//! earlier than this knows its clock is wrong. SOURCE_DATE_EPOCH keeps builds reproducible.
//!
//! In release builds (the profile sets `panic = "abort"`) it also links with
//! `link/no-unwind-tables.ld`: nothing unwinds there, so the unwind tables are dropped (issue 13:
//! about 320 KB of the aarch64 binary), and static musl builds drop RELRO's page padding.
//! `ENROLL_KEEP_UNWIND_TABLES=1` keeps both (for a linker that takes no GNU ld script, such as mold).
fn main() {
    let now =
        std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=ENROLL_AGENT_BUILD_UNIX={now}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    drop_unwind_tables_when_nothing_unwinds();
}

fn drop_unwind_tables_when_nothing_unwinds() {
    for name in ["ENROLL_KEEP_UNWIND_TABLES", "CARGO_PROFILE_RELEASE_PANIC"] {
        println!("cargo:rerun-if-env-changed={name}");
    }
    println!("cargo:rerun-if-changed=link/no-unwind-tables.ld");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    // Build scripts do not see the profile's panic strategy (CARGO_CFG_PANIC is the target's
    // default), so this goes by the profile: release is `panic = "abort"` unless overridden.
    let aborts =
        var("PROFILE") == "release" && matches!(var("CARGO_PROFILE_RELEASE_PANIC").as_str(), "" | "abort");
    let keep = !matches!(var("ENROLL_KEEP_UNWIND_TABLES").as_str(), "" | "0");
    if !aborts || var("CARGO_CFG_TARGET_OS") != "linux" || keep {
        return;
    }
    let script = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("link/no-unwind-tables.ld");
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    // A static musl binary has no dynamic loader, and musl's static start-up does not mprotect
    // the RELRO segment, so RELRO protects nothing there; its alignment padding (up to 64 KiB on
    // aarch64, whose segments align to 64 KiB) is dropped with it.
    if var("CARGO_CFG_TARGET_ENV") == "musl" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,norelro");
    }
}
