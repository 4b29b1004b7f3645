//! enroll-hal: where a device keeps its identity.
//!
//! Two seams and nothing else: [`key::KeyProvider`] / [`key::DeviceKey`] for private keys (software
//! today; PKCS#11, TPM and remote keys later behind cargo features), and [`store::Store`] for the
//! protected on-disk layout of design.md §4. This crate knows nothing of CSRs, TLS or CAs.

mod der;
pub mod error;
pub mod key;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
pub mod remote;
pub mod rsa_keygen;
pub mod soft;
pub mod store;
#[cfg(feature = "tpm")]
pub mod tpm;

pub use error::Error;
pub use key::{Algorithm, DeviceKey, KeyProvider, SignatureScheme};
pub use store::Store;
