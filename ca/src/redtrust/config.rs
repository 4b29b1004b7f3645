//! The `key.redtrust` block: Redtrust Certificate Enroll as a remote key service (protocols.md §5).

use crate::error::{Error, Result};
use crate::fields::Fields;
use crate::secret::Secret;

#[derive(Debug)]
pub struct RedtrustSettings {
    /// Root of `/raapi/…` and `/authapi/…`.
    pub url: String,
    /// Root of `/authclient/auth/loginrequest` (defaults to `url`).
    pub auth_url: String,
    /// Partner name, sent uppercase.
    pub partner: String,
    pub hmac_secret: Secret,
    pub domain: Option<String>,
    pub redirect_url: String,
    /// Redtrust's name for the CA that issues (`provider` in csr/create and finalize).
    pub ca_provider: String,
    pub hash_type: String,
}

pub fn parse(key: &mut Fields, allow_http: bool) -> Result<RedtrustSettings> {
    let Some(mut fields) = key.object("redtrust")? else {
        return Err(Error::config("key.redtrust: missing (key.provider \"redtrust\" needs it)"));
    };
    let url = fields.url("url", None, allow_http)?;
    let auth_url = match fields.has("auth_url") {
        true => fields.url("auth_url", None, allow_http)?,
        false => url.clone(),
    };
    let partner = fields.required_string("partner")?;
    if !partner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(Error::config("key.redtrust.partner: use letters, digits, '_' and '-' only"));
    }
    let settings = RedtrustSettings {
        url,
        auth_url,
        partner: partner.to_ascii_uppercase(),
        hmac_secret: fields.secret_file("hmac_secret_file")?,
        domain: fields.string("domain")?,
        redirect_url: {
            let url = fields.required_string("redirect_url")?;
            if !url.starts_with("https://") && !url.starts_with("http://") {
                return Err(Error::config("key.redtrust.redirect_url: must be an absolute http(s) URL"));
            }
            url
        },
        ca_provider: fields.required_string("ca_provider")?,
        hash_type: match fields.string("hash_type")?.as_deref() {
            None => "SHA256".to_string(),
            Some(h @ ("SHA256" | "SHA384" | "SHA512")) => h.to_string(),
            Some(other) => {
                return Err(Error::config(format!(
                    "key.redtrust.hash_type: {other:?} is not one of \"SHA256\", \"SHA384\", \"SHA512\""
                )))
            }
        },
    };
    fields.finish()?;
    Ok(settings)
}
