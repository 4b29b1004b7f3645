//! The `ca` block for Securosys TSB (protocols.md §4).

use crate::backend::{parse_polling, Polling};
use crate::error::{Error, Result};
use crate::fields::Fields;
use crate::secret::Secret;

#[derive(Debug)]
pub struct SecurosysSettings {
    pub url: String,
    pub sign_key_name: String,
    pub key_password: Option<Secret>,
    pub signature_algorithm: String,
    pub key_usage: Vec<String>,
    pub extended_key_usage: Vec<String>,
    pub approval: bool,
    pub jwt: Option<Secret>,
    pub api_key: Option<Secret>,
    pub valid_days: u64,
    /// The issuing chain (TSB returns only the leaf), DER, as read from `ca_bundle`.
    pub ca_bundle: Vec<Vec<u8>>,
    pub polling: Polling,
}

pub fn parse(fields: &mut Fields, allow_http: bool) -> Result<SecurosysSettings> {
    let url = fields.url("url", None, allow_http)?;
    let sign_key_name = fields.required_string("sign_key_name")?;
    let key_password = fields.optional_secret_file("key_password_file")?;
    let signature_algorithm =
        fields.string("signature_algorithm")?.unwrap_or_else(|| "SHA256_WITH_RSA".to_string());
    let key_usage = fields.enum_names("key_usage")?.unwrap_or_else(|| vec!["DIGITAL_SIGNATURE".into()]);
    let extended_key_usage =
        fields.enum_names("extended_key_usage")?.unwrap_or_else(|| vec!["CLIENT_AUTH".into()]);
    let approval = fields.boolean("approval")?.unwrap_or(false);
    let jwt = fields.optional_secret_file("jwt_file")?;
    let api_key = fields.optional_secret_file("api_key_file")?;
    if jwt.is_none() && api_key.is_none() {
        return Err(Error::config("ca.jwt_file: missing (give jwt_file, api_key_file, or both)"));
    }
    let valid_days = fields.positive("valid_days")?.unwrap_or(365);
    let ca_bundle = fields.certificate_file("ca_bundle")?;
    Ok(SecurosysSettings {
        url,
        sign_key_name,
        key_password,
        signature_algorithm,
        key_usage,
        extended_key_usage,
        approval,
        jwt,
        api_key,
        valid_days,
        ca_bundle,
        polling: parse_polling(fields, 10, 3_600)?,
    })
}
