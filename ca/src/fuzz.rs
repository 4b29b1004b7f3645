//! Entry points for the fuzz targets of `tests/fuzz/` (design.md §11): each feeds bytes to the
//! same functions a client uses on a CA's HTTP answer. Compiled only under `--cfg fuzzing`
//! (cargo-fuzz sets it), so the product never carries it.
//!
//! A vendor answer's input is `[status high byte, status low byte, body…]`: the status decides
//! which of the client's readers run, as it does in the client.

use crate::error::{Error, Result};
use crate::http::Response;
use crate::json;

/// The status and body of an answer input (an input shorter than the status is an empty 200).
fn response(data: &[u8]) -> Response {
    let (status, body) = match data {
        [high, low, body @ ..] => (u16::from_be_bytes([*high, *low]), body),
        _ => (200, data),
    };
    Response {
        status,
        body: body.to_vec(),
        content_type: None,
        location: None,
        retry_after: Some(1),
        replay_nonce: None,
    }
}

/// What a caller does with an error: render it for the log and the gateway.
fn show<T>(result: Result<T>) -> Option<T> {
    result.map_err(|e| render(&e)).ok()
}

fn render(error: &Error) {
    let _ = error.to_string();
    let _ = error.chain_line();
    let _ = (error.kind().exit_code(), error.retry_after(), error.answer());
}

/// EnOS: the token answer, the connect-service answer (`code`/`data`), the certificate in it,
/// and the `action=list` search for a key (the lost-answer recovery).
#[cfg(feature = "enos")]
pub fn enos_answer(data: &[u8]) {
    let response = response(data);
    // A clock at its end: `expire` must saturate, never overflow.
    show(crate::enos::token_answer("fuzz", &response, u64::MAX - 1));
    if let Some(Some(data)) = show(crate::enos::service_answer("fuzz", &response)) {
        show(crate::enos::issued_from(&data));
        show(crate::enos::listed_for_key(&data, b"not the SPKI of any listed certificate"));
    }
}

/// ACME: a problem document, and the JSON objects the client reads (directory, order,
/// authorization with its challenges), and a PEM certificate chain.
#[cfg(feature = "acme")]
pub fn acme_answer(data: &[u8]) {
    use crate::acme;
    let response = response(data);
    render(&acme::problem("fuzz", &response));
    let _ = acme::problem_type(&response);
    if let Ok(value) = json::parse(&response.body) {
        show(acme::read_directory(&value).map(|_| ()));
        render(&acme::invalid("fuzz", &value));
        show(acme::string_list(&value, "authorizations"));
        show(acme::pick_challenge(&value, "http-01").map(|_| ()));
        show(acme::pick_challenge(&value, "dns-01").map(|_| ()));
        show(acme::read_window(&value, response.retry_after));
    }
    show(acme::chain_of(&response));
}

/// EZCA: the JSON and PEM-text issuance answers, and the renewal status check (§2).
#[cfg(feature = "ezca")]
pub fn ezca_answer(data: &[u8]) {
    let response = response(data);
    show(crate::ezca::check_renew_status("fuzz", &response));
    let _ = crate::http::status_error("fuzz", &response);
    show(crate::ezca::issued_from_json("fuzz", &response));
    show(crate::ezca::issued_from_pem_text("fuzz", &response));
}

/// Sectigo: enroll/renewById acceptance, collect delivery, and the `{code, description}` errors.
#[cfg(feature = "sectigo")]
pub fn sectigo_answer(data: &[u8]) {
    let response = response(data);
    show(crate::sectigo::Sectigo::accepted("fuzz", &response));
    if response.is_success() {
        show(crate::sectigo::Sectigo::delivered("1234", &response));
    }
    let _ = crate::sectigo::error_body(&response);
    render(&crate::sectigo::sectigo_error("fuzz", &response));
}

/// Securosys TSB: synchronous sign, the approval id, request status, and `errorCode` errors.
#[cfg(feature = "securosys")]
pub fn securosys_answer(data: &[u8]) {
    use crate::securosys::{
        error_body, issued, request_status, securosys_error, sign_request_id, success_json,
    };
    let response = response(data);
    let _ = error_body(&response);
    render(&securosys_error("fuzz", &response));
    let Some(answer) = show(success_json("fuzz", &response)) else {
        return;
    };
    show(issued("fuzz", &answer, "certificate", &[]));
    show(sign_request_id("fuzz", &answer));
    match request_status("fuzz", "id-1", &answer, &[]) {
        Ok(crate::backend::Poll::Ended(e)) => render(&e),
        other => drop(show(other)),
    }
}

/// Redtrust: the envelope, the tokens, csr/create and csr/finalize data, the login redirect.
#[cfg(feature = "redtrust")]
pub fn redtrust_answer(data: &[u8]) {
    use crate::redtrust::{
        created, envelope_data, envelope_error, envelope_words, finalized, temporal_token,
    };
    let response = response(data);
    let _ = envelope_words(&response);
    render(&envelope_error("fuzz", &response));
    if let Ok(location) = std::str::from_utf8(&response.body) {
        let _ = temporal_token(location);
    }
    let Some(data) = show(envelope_data("fuzz", &response)) else {
        return;
    };
    show(crate::redtrust::tokens_from("fuzz", &data));
    show(created("fuzz", &data));
    show(finalized("fuzz", &data, "0123456789ABCDEF0123456789ABCDEF01234567"));
}

/// EST: a certs-only answer (base64 PKCS#7, RFC 8951); the first byte picks the content type.
#[cfg(feature = "est")]
pub fn est_answer(data: &[u8]) {
    const TYPES: [Option<&str>; 4] = [
        None,
        Some("application/pkcs7-mime"),
        Some("application/pkcs7-mime; smime-type=certs-only"),
        Some("text/html"),
    ];
    let (selector, body) = data.split_first().unwrap_or((&0, &[]));
    let mut response = response(&[]);
    response.content_type = TYPES[usize::from(*selector) % TYPES.len()].map(str::to_string);
    response.body = body.to_vec();
    if let Some(certs) = show(crate::est::certs_of("fuzz", &response)) {
        for cert in certs {
            let _ = (cert.subject(), cert.issuer(), cert.serial_hex(), cert.san_strings(), cert.spki_der());
        }
    }
}

/// SCEP: GetCACaps text, GetCACert (DER or certs-only PKCS#7, pinned), a CertRep's CMS and SCEP
/// attributes (without the signature check, which random input cannot pass), and the
/// EnvelopedData the answer's certificates come in (opened with a fixed RSA key).
#[cfg(feature = "scep")]
pub fn scep_answer(data: &[u8]) {
    use crate::scep;
    let (selector, body) = data.split_first().unwrap_or((&0, &[]));
    match selector % 4 {
        0 => {
            let _ = scep::parse_caps(body);
        }
        1 => {
            // Pinned to the first certificate of the answer, so the RA selection runs too.
            let first = crate::pkcs7::certificates(body).ok().and_then(|c| c.into_iter().next());
            let pin = ring::digest::digest(&ring::digest::SHA256, first.as_deref().unwrap_or(body));
            let pin: [u8; 32] = pin.as_ref().try_into().unwrap_or([0; 32]);
            if let Some(ca) = show(scep::read_ca_certs(body, &pin)) {
                let _ = ca.trusted[ca.recipient].allows_key_encipherment();
            }
        }
        2 => {
            show(scep::message::read_cert_rep_unverified(body));
        }
        _ => {
            if let Some(plain) = show(scep::envelope::open(body, fuzz_rsa_key())) {
                let _ = crate::pkcs7::certificates(&plain);
            }
        }
    }
}

/// A fixed RSA-2048 key (made with `openssl genpkey` for fuzzing only; it guards nothing):
/// generating one at the first input took longer than libFuzzer's per-input timeout.
#[cfg(feature = "scep")]
fn fuzz_rsa_key() -> &'static dyn enroll_hal::DeviceKey {
    static KEY: std::sync::OnceLock<enroll_hal::soft::SoftKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        enroll_hal::soft::SoftKey::from_pkcs8(include_bytes!("../../tests/fuzz/scep-fuzz-key.pk8"))
            .expect("loading the fuzz key")
    })
}

/// Retry-After and Date headers, and RFC 3339 times in answers (Redtrust `expiration`).
pub fn header_values(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::http::parse_retry_after(text, 1_800_000_000);
    if let Some(date) = crate::time::parse_http_date(text) {
        let _ = crate::time::rfc3339(date);
    }
    if let Some(unix) = crate::time::parse_rfc3339(text) {
        // What we write we read back.
        let written = crate::time::rfc3339(unix);
        assert_eq!(crate::time::parse_rfc3339(&written), Some(unix), "{text:?} → {written:?}");
    }
    let _ = crate::http::excerpt(text);
    let _ = json::Value::String(text.to_string()).to_json();
}

/// An HTTP/1.1 response as a CA's socket would deliver it (status line, header fields, every
/// body framing), and the URLs the client is asked to follow (ACME and SCEP take them from answers).
pub fn http_response(data: &[u8]) {
    use crate::http::wire;
    const LIMIT: u64 = 4096;
    let mut input = data;
    if let Ok(head) = wire::read_head(&mut input) {
        assert!(head.status >= 200 && head.status <= 999, "status {}", head.status);
        if let Ok(framing) = wire::framing("GET", &head) {
            let declared = match framing {
                wire::Framing::Length(length) => Some(length),
                _ => None,
            };
            if let Ok(body) = wire::read_body(&mut input, framing, LIMIT) {
                assert!(body.len() as u64 <= LIMIT);
                assert!(declared.map_or(true, |length| length == body.len() as u64));
            }
        }
    }
    if let Ok(url) = std::str::from_utf8(data) {
        if let Ok(target) = crate::http::connect::Target::parse(url) {
            assert!(target.port != 0 && target.path_and_query.starts_with('/') && !target.host.is_empty());
        }
    }
}
