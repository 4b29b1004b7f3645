//! `state.json`: what survives between runs besides the identity itself (design.md §4).
//! Written atomically with mode 0600; unknown fields are ignored so older agents can read it.

use crate::json::{self, Value};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// An outstanding request and the slot holding its key.
    pub pending: Option<Pending>,
    /// When the current identity should be renewed (jitter drawn once, at install; moved into
    /// the CA's suggested window where the CA suggests one).
    pub renew_at: Option<u64>,
    /// When to ask the CA for its suggested renewal window again (ACME ARI, RFC 9773); `None`:
    /// at the next chance.
    pub window_check_at: Option<u64>,
    /// The CA's handle for the current certificate (EnOS certSN).
    pub ca_ref: Option<String>,
    pub last_success: Option<u64>,
    pub last_install: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    pub hook_error: Option<String>,
    pub renewals: u64,
    /// The last-known-good time (design.md §5 rule 7): only ever moves forward.
    pub clock_floor: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// The CA's request id, once it gave one (asynchronous CAs).
    pub request_id: Option<String>,
    /// The remote key provider's handle for the key being certified (Redtrust requestCode).
    pub key_ref: Option<String>,
    /// Slot directory name under `slots/`.
    pub slot: String,
    pub since: u64,
    pub purpose: Purpose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Enroll,
    Renew,
}

impl Purpose {
    pub fn name(self) -> &'static str {
        match self {
            Purpose::Enroll => "enroll",
            Purpose::Renew => "renew",
        }
    }
}

impl State {
    pub fn to_json(&self) -> String {
        let pending = self.pending.as_ref().map_or(Value::Null, |p| {
            json::object([
                ("request_id", p.request_id.clone().into()),
                ("key_ref", p.key_ref.clone().into()),
                ("slot", p.slot.as_str().into()),
                ("since", p.since.into()),
                ("purpose", p.purpose.name().into()),
            ])
        });
        let mut text = json::object([
            ("pending", pending),
            ("renew_at", self.renew_at.into()),
            ("window_check_at", self.window_check_at.into()),
            ("ca_ref", self.ca_ref.clone().into()),
            ("last_success", self.last_success.into()),
            ("last_install", self.last_install.into()),
            ("last_error", self.last_error.clone().into()),
            ("last_error_at", self.last_error_at.into()),
            ("hook_error", self.hook_error.clone().into()),
            ("renewals", self.renewals.into()),
            ("clock_floor", self.clock_floor.into()),
        ])
        .to_json_pretty();
        text.push('\n');
        text
    }

    /// Parses state.json; `Err` means the file is not ours to trust (it is then set aside).
    pub fn from_json(bytes: &[u8]) -> Result<State, String> {
        let value = json::parse(bytes).map_err(|e| e.to_string())?;
        if !matches!(value, Value::Object(_)) {
            return Err("not a JSON object".into());
        }
        let text = |k: &str| value.get(k).and_then(Value::as_str).map(str::to_string);
        let number = |k: &str| value.get(k).and_then(Value::as_u64);
        let pending = match value.get("pending") {
            None | Some(Value::Null) => None,
            Some(p) => Some(Pending {
                request_id: p.get("request_id").and_then(Value::as_str).map(str::to_string),
                key_ref: p.get("key_ref").and_then(Value::as_str).map(str::to_string),
                slot: match p.get("slot").and_then(Value::as_str) {
                    // A name joined to `slots/`: `../..` would reach outside the state directory.
                    Some(slot) if enroll_hal::store::slot_name_is_valid(slot) => slot.to_string(),
                    Some(slot) => return Err(format!("pending.slot {slot:?} is not a slot number")),
                    None => return Err("pending.slot is missing".into()),
                },
                since: p.get("since").and_then(Value::as_u64).ok_or("pending.since is missing")?,
                purpose: match p.get("purpose").and_then(Value::as_str) {
                    Some("renew") => Purpose::Renew,
                    _ => Purpose::Enroll,
                },
            }),
        };
        Ok(State {
            pending,
            renew_at: number("renew_at"),
            window_check_at: number("window_check_at"),
            ca_ref: text("ca_ref"),
            last_success: number("last_success"),
            last_install: number("last_install"),
            last_error: text("last_error"),
            last_error_at: number("last_error_at"),
            hook_error: text("hook_error"),
            renewals: number("renewals").unwrap_or(0),
            clock_floor: number("clock_floor"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_unknown_fields() {
        let state = State {
            pending: Some(Pending {
                request_id: Some("r-1".into()),
                key_ref: Some("P775W98SSW4Z1774PMZU".into()),
                slot: "4".into(),
                since: 10,
                purpose: Purpose::Renew,
            }),
            renew_at: Some(99),
            window_check_at: Some(120),
            ca_ref: Some("9223372036854775807".into()),
            renewals: 3,
            clock_floor: Some(1_800_000_000),
            ..State::default()
        };
        assert_eq!(State::from_json(state.to_json().as_bytes()).unwrap(), state);
        assert_eq!(State::from_json(br#"{"future_field":1}"#).unwrap(), State::default());
        assert!(State::from_json(b"{\"pending\":{}}").is_err());
        for bad in ["../../victim", "/etc", "4/../../x", "", "..", "4 ", "+4", "123456789012345678901"] {
            let text = format!(r#"{{"pending":{{"slot":{bad:?},"since":1}}}}"#);
            let err = State::from_json(text.as_bytes()).unwrap_err();
            assert!(err.contains("pending.slot"), "{bad:?}: {err}");
        }
        assert!(State::from_json(b"[]").is_err());
    }
}
