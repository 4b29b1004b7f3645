//! Records the build time for the clock rule (design.md §5 rule 7): a device whose clock is
//! earlier than this knows its clock is wrong. SOURCE_DATE_EPOCH keeps builds reproducible.
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
}
