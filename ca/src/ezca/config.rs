//! The `ca` block for Keytos EZCA (protocols.md §2).

use crate::error::{Error, Result};
use crate::fields::Fields;
use crate::secret::Secret;

#[derive(Debug)]
pub struct EzcaSettings {
    pub url: String,
    pub ca_id: String,
    pub template_id: String,
    pub valid_days: u64,
    pub bootstrap: EzcaBootstrap,
    pub renew_auth: RenewAuth,
}

#[derive(Debug)]
pub enum EzcaBootstrap {
    /// A static bearer token installed at the factory.
    Token(Secret),
    /// Entra ID client credentials (protocols.md §2.2).
    Entra { tenant_id: String, client_id: String, client_secret: Secret, authority: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewAuth {
    Certificate,
    Bootstrap,
}

pub fn parse(fields: &mut Fields, allow_http: bool) -> Result<EzcaSettings> {
    let url = fields.url("url", Some("https://portal.ezca.io/"), allow_http)?;
    let ca_id = fields.required_string("ca_id")?;
    let template_id = fields.required_string("template_id")?;
    let valid_days = fields.positive("valid_days")?.unwrap_or(90);
    let renew_auth = match fields.string("renew_auth")?.as_deref() {
        None | Some("certificate") => RenewAuth::Certificate,
        Some("bootstrap") => RenewAuth::Bootstrap,
        Some(other) => {
            return Err(Error::config(format!(
                "ca.renew_auth: {other:?} is not one of \"certificate\", \"bootstrap\""
            )))
        }
    };
    let Some(mut boot) = fields.object("bootstrap")? else {
        return Err(Error::config("ca.bootstrap: missing"));
    };
    let bootstrap = if boot.has("token_file") {
        EzcaBootstrap::Token(boot.secret_file("token_file")?)
    } else if boot.has("client_id") || boot.has("tenant_id") {
        EzcaBootstrap::Entra {
            tenant_id: boot.required_string("tenant_id")?,
            client_id: boot.required_string("client_id")?,
            client_secret: boot.secret_file("client_secret_file")?,
            authority: boot.url("authority", Some("https://login.microsoftonline.com"), allow_http)?,
        }
    } else {
        return Err(Error::config(
            "ca.bootstrap: give token_file, or tenant_id + client_id + client_secret_file",
        ));
    };
    boot.finish()?;
    Ok(EzcaSettings { url, ca_id, template_id, valid_days, bootstrap, renew_auth })
}
