//! X.509 names as the agent requests them: subject attributes and subject alternative names.

use std::net::IpAddr;

/// Subject attributes in DER order (most significant first).
#[derive(Debug, Clone, PartialEq)]
pub struct Subject {
    pub attributes: Vec<(SubjectAttribute, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectAttribute {
    C,
    ST,
    L,
    O,
    OU,
    CN,
    SerialNumber,
}

impl SubjectAttribute {
    pub const ALL: [SubjectAttribute; 7] =
        [Self::C, Self::ST, Self::L, Self::O, Self::OU, Self::CN, Self::SerialNumber];

    pub fn key(self) -> &'static str {
        match self {
            Self::C => "C",
            Self::ST => "ST",
            Self::L => "L",
            Self::O => "O",
            Self::OU => "OU",
            Self::CN => "CN",
            Self::SerialNumber => "serialNumber",
        }
    }

    /// Dotted OID (RFC 4519 / X.520).
    pub fn oid(self) -> &'static str {
        match self {
            Self::C => "2.5.4.6",
            Self::ST => "2.5.4.8",
            Self::L => "2.5.4.7",
            Self::O => "2.5.4.10",
            Self::OU => "2.5.4.11",
            Self::CN => "2.5.4.3",
            Self::SerialNumber => "2.5.4.5",
        }
    }
}

impl Subject {
    pub fn common_name(&self) -> &str {
        self.attributes.iter().find(|(a, _)| *a == SubjectAttribute::CN).map_or("", |(_, v)| v)
    }

    /// RFC 4514 string, least significant first (`CN=x,O=y,C=z`).
    pub fn rfc4514(&self) -> String {
        let escape = |v: &str| {
            let mut out = String::new();
            for (i, c) in v.chars().enumerate() {
                let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.chars().count() && c == ' ');
                if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
                    out.push('\\');
                }
                out.push(c);
            }
            out
        };
        let parts: Vec<String> =
            self.attributes.iter().rev().map(|(a, v)| format!("{}={}", a.key(), escape(v))).collect();
        parts.join(",")
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sans {
    pub dns: Vec<String>,
    pub ip: Vec<IpAddr>,
    pub uri: Vec<String>,
    pub email: Vec<String>,
}

impl Sans {
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty() && self.ip.is_empty() && self.uri.is_empty() && self.email.is_empty()
    }
}
