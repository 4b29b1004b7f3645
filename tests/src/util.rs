//! Small helpers shared by the emulators: hashing, hex, randomness, clocks, JSON access,
//! URL decoding. Kept dependency-free apart from ring and serde_json.

use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lowercase hex of `bytes` (EnOS signatures are lowercase hex, protocols.md §1.2).
pub fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Uppercase hex of `bytes` (EZCA `x5t` is an uppercase hex SHA-1, protocols.md §2.3).
pub fn hex_upper(bytes: &[u8]) -> String {
    hex_lower(bytes).to_ascii_uppercase()
}

/// Lowercase hex SHA-256 of the concatenation of `parts`.
pub fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    hex_lower(ctx.finish().as_ref())
}

/// Uppercase hex SHA-1 of a certificate's DER: the EZCA thumbprint.
pub fn thumbprint(der: &[u8]) -> String {
    hex_upper(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref())
}

/// `n` random bytes from the system RNG.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SystemRandom only fails when the OS has no entropy source; nothing can work then.
    SystemRandom::new().fill(&mut v).expect("system RNG failed");
    v
}

/// A random lowercase hex string of `n` bytes.
pub fn random_hex(n: usize) -> String {
    hex_lower(&random_bytes(n))
}

/// A random UUID-v4-shaped string (EnOS `requestId`, EZCA IDs, JWT `jti`).
pub fn uuid_like() -> String {
    let mut b = random_bytes(16);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex_lower(&b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Milliseconds since the Unix epoch (EnOS timestamps).
pub fn now_ms() -> i64 {
    since_epoch(SystemTime::now()).as_millis() as i64
}

/// Seconds since the Unix epoch (JWT `nbf`/`exp`).
pub fn now_s() -> i64 {
    since_epoch(SystemTime::now()).as_secs() as i64
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`, for the `Date` header.
pub fn imf_fixdate(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = since_epoch(t).as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// RFC 3339 / ISO-8601 UTC time with seconds, e.g. `2024-01-23T11:43:43Z` (Securosys
/// `executionTime`, Redtrust `expiration`).
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = since_epoch(t).as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Lowercase hex HMAC-SHA256 of `msg` under `key` (Redtrust partner signature, protocols.md §5).
pub fn hmac_sha256_hex(key: &[u8], msg: &[u8]) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    hex_lower(ring::hmac::sign(&k, msg).as_ref())
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Decodes one `application/x-www-form-urlencoded` component: `%XX` and `+` (space).
/// Invalid escapes are kept literally, as lenient servers do.
pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match hex_pair(b[i + 1], b[i + 2]) {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_pair(a: u8, b: u8) -> Option<u8> {
    let v = |c: u8| (c as char).to_digit(16);
    Some((v(a)? * 16 + v(b)?) as u8)
}

/// Splits a query string / form body into decoded `(key, value)` pairs, in order.
pub fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (url_decode(k), url_decode(v)),
            None => (url_decode(p), String::new()),
        })
        .collect()
}

/// Percent-encodes a query/form component (unreserved characters kept).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (c as char).to_string(),
            _ => format!("%{c:02X}"),
        })
        .collect()
}

/// A string field of a JSON object, if present and a string.
pub fn json_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// An integer field that may arrive as a JSON number or a decimal string
/// (EnOS `timestamp`: the DECADA firmware sends a string, protocols.md §1.2).
pub fn json_int_lenient(v: &Value, key: &str) -> Option<i64> {
    match v.get(key)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixdate_matches_rfc_example() {
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(imf_fixdate(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[test]
    fn rfc3339_and_hmac() {
        let t = UNIX_EPOCH + Duration::from_secs(1_706_010_223);
        assert_eq!(rfc3339_utc(t), "2024-01-23T11:43:43Z");
        // RFC 4231 test case 2.
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn url_decoding() {
        assert_eq!(url_decode("a+b%2Fc%3d%"), "a b/c=%");
        assert_eq!(url_decode("%zz%4"), "%zz%4");
        assert_eq!(
            parse_form("action=apply&orgId=o%201&x"),
            vec![
                ("action".into(), "apply".into()),
                ("orgId".into(), "o 1".into()),
                ("x".into(), String::new())
            ]
        );
    }

    #[test]
    fn uuid_shape() {
        let u = uuid_like();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
