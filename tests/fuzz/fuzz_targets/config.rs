//! The agent's config, from bytes: JSON, then the validated `Settings`. Files it names are read
//! as the agent reads them; the seeds name one secret file that exists (created below, mode
//! 0600), so the fields after a `*_file` are checked too.
#![no_main]

use std::os::unix::fs::PermissionsExt;

use libfuzzer_sys::fuzz_target;

const DIR: &str = "/tmp/enroll-fuzz-config";

fn secret_file() {
    let secret = std::path::Path::new(DIR).join("secret");
    if secret.exists() {
        return;
    }
    std::fs::create_dir_all(DIR).expect("scratch directory");
    std::fs::write(&secret, "s3cret\n").expect("secret file");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("mode 0600");
}

fuzz_target!(|data: &[u8]| {
    secret_file();
    let Ok(value) = enroll_agent::json::parse(data) else {
        return;
    };
    match enroll_agent::config::Settings::from_value(&value) {
        Ok(settings) => drop(format!("{settings:?}")),
        Err(error) => drop(enroll_agent::format_error(&error)),
    }
});
