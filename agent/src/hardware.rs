//! Opens the hardware key providers (cargo features `pkcs11`, `tpm`) from the validated config.
//! They load system libraries at run time (a PKCS#11 module with dlopen, libtss2), which a fully
//! static binary cannot do, so they are only in the second, dynamically linked build.

#[cfg(any(feature = "pkcs11", feature = "tpm"))]
use enroll_hal::KeyProvider;

#[cfg(any(feature = "pkcs11", feature = "tpm"))]
use crate::error::{Context, Result};

#[cfg(feature = "pkcs11")]
pub fn pkcs11(settings: &crate::config::Pkcs11Settings) -> Result<Box<dyn KeyProvider>> {
    use enroll_hal::pkcs11::{Pkcs11Config, Pkcs11Provider, TokenSelector};
    let token = match &settings.token {
        crate::config::TokenSelector::Label(label) => TokenSelector::Label(label.clone()),
        crate::config::TokenSelector::Slot(slot) => TokenSelector::Slot(*slot),
    };
    let config = Pkcs11Config {
        module: settings.module.clone(),
        token,
        pin: zeroize::Zeroizing::new(settings.pin.expose().to_string()),
        key_label: settings.key_label.clone(),
    };
    let provider = Pkcs11Provider::new(config).context("opening the PKCS#11 token")?;
    Ok(Box::new(provider))
}

#[cfg(feature = "tpm")]
pub fn tpm(settings: &crate::config::TpmSettings) -> Result<Box<dyn KeyProvider>> {
    use enroll_hal::tpm::{TpmConfig, TpmProvider};
    let provider = TpmProvider::new(TpmConfig { tcti: settings.tcti.clone() }).context("opening the TPM")?;
    Ok(Box::new(provider))
}
