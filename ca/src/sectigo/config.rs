//! The `ca` block for Sectigo Certificate Manager (protocols.md §3).

use crate::backend::{parse_polling, Polling};
use crate::error::Result;
use crate::fields::Fields;
use crate::secret::Secret;

#[derive(Debug)]
pub struct SectigoSettings {
    pub url: String,
    pub customer_uri: String,
    pub login: String,
    pub password: Secret,
    pub org_id: u64,
    pub cert_type: u64,
    pub term: u64,
    pub external_requester: Option<String>,
    pub comments: Option<String>,
    pub polling: Polling,
}

pub fn parse(fields: &mut Fields, allow_http: bool) -> Result<SectigoSettings> {
    Ok(SectigoSettings {
        url: fields.url("url", Some("https://cert-manager.com"), allow_http)?,
        customer_uri: fields.required_string("customer_uri")?,
        login: fields.required_string("login")?,
        password: fields.secret_file("password_file")?,
        org_id: fields.required_positive("org_id")?,
        cert_type: fields.required_positive("cert_type")?,
        term: fields.required_positive("term")?,
        external_requester: fields.string("external_requester")?,
        comments: fields.string("comments")?,
        polling: parse_polling(fields, 60, 86_400)?,
    })
}
