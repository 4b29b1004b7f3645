//! The `ca` block for EnOS (protocols.md §1).

use crate::error::{Error, Result};
use crate::fields::Fields;
use crate::secret::Secret;

#[derive(Debug)]
pub struct EnosSettings {
    pub api_gateway: String,
    pub org_id: String,
    pub device: EnosDevice,
    pub app_key: String,
    pub app_secret: Secret,
    pub valid_days: u64,
}

#[derive(Debug, Clone)]
pub enum EnosDevice {
    Asset(String),
    Product { product_key: String, device_key: String },
}

pub fn parse(fields: &mut Fields, allow_http: bool) -> Result<EnosSettings> {
    let api_gateway = fields.url("api_gateway", None, allow_http)?;
    let org_id = fields.required_string("org_id")?;
    let asset_id = fields.string("asset_id")?;
    let product_key = fields.string("product_key")?;
    let device_key = fields.string("device_key")?;
    let device = match (asset_id, product_key, device_key) {
        (Some(asset), None, None) => EnosDevice::Asset(asset),
        (None, Some(product_key), Some(device_key)) => EnosDevice::Product { product_key, device_key },
        (Some(_), _, _) => {
            return Err(Error::config(
                "ca.asset_id: give either asset_id or product_key + device_key, not both",
            ))
        }
        (None, Some(_), None) => {
            return Err(Error::config("ca.device_key: missing (product_key needs device_key)"))
        }
        (None, None, Some(_)) => {
            return Err(Error::config("ca.product_key: missing (device_key needs product_key)"))
        }
        (None, None, None) => {
            return Err(Error::config("ca.asset_id: missing (give asset_id, or product_key + device_key)"))
        }
    };
    Ok(EnosSettings {
        api_gateway,
        org_id,
        device,
        app_key: fields.required_string("app_key")?,
        app_secret: fields.secret_file("app_secret_file")?,
        valid_days: fields.positive("valid_days")?.unwrap_or(730),
    })
}
