//! PEM and certificate parsing with the checks every issued certificate passes: the text is read
//! as a CA's PEM answer (`parse_pem_certs`), sorted as Sectigo's is (`sort_returned`), then
//! verified (`verify_issued`) against the leaf's own key, so the name, validity and chain checks
//! run too. The first byte picks the expected names: the fixed `CN=device-1` /
//! `DNS:device-1.example.com`, or the leaf's own CN and SANs (the path a genuine answer takes).
#![no_main]

use enroll_ca::pki::{self, Cert, Expectation, Issued};
use enroll_ca::subject::{Sans, Subject, SubjectAttribute};
use libfuzzer_sys::fuzz_target;

/// The CN and SANs the certificate carries, as a request would have asked for them.
fn own_names(leaf: &Cert) -> (Subject, Sans) {
    let cn = leaf
        .parsed
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid.to_string() == "2.5.4.3")
        .and_then(|atv| std::str::from_utf8(atv.value.value()).ok())
        .unwrap_or("")
        .to_string();
    let mut sans = Sans::default();
    for san in leaf.san_strings() {
        match san.split_once(':') {
            Some(("DNS", v)) => sans.dns.push(v.to_string()),
            Some(("IP", v)) => sans.ip.extend(v.parse::<std::net::IpAddr>().ok()),
            Some(("URI", v)) => sans.uri.push(v.to_string()),
            Some(("email", v)) => sans.email.push(v.to_string()),
            _ => {}
        }
    }
    (Subject { attributes: vec![(SubjectAttribute::CN, cn)] }, sans)
}

fn check(issued: &Issued, own: bool) {
    let Ok(leaf) = Cert::from_der(&issued.leaf) else {
        return;
    };
    let (subject, sans) = if own {
        own_names(&leaf)
    } else {
        let fixed = Sans { dns: vec!["device-1.example.com".into()], ..Sans::default() };
        (Subject { attributes: vec![(SubjectAttribute::CN, "device-1".into())] }, fixed)
    };
    let spki = leaf.spki_der();
    let known: Vec<Cert> = Vec::new();
    // A minute into the certificate's life: the checks, not the clock, are under test.
    let now = leaf.not_before().saturating_add(60);
    let expect = Expectation { spki: &spki, subject: &subject, sans: &sans, known_ca: &known, now };
    match pki::verify_issued(issued, &expect) {
        Ok(verified) => {
            let _ = (verified.leaf.serial_hex(), verified.leaf.serial_decimal(), verified.chain.len());
            let _ = (verified.leaf.thumbprint_sha1_hex(), verified.leaf.pem(), verified.warnings);
        }
        Err(error) => drop(error.to_string()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((selector, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(certs) = pki::parse_pem_certs(text) else {
        return;
    };
    for cert in &certs {
        let _ = (cert.subject(), cert.issuer(), cert.not_after(), cert.san_strings());
    }
    if let Ok(issued) = pki::sort_returned(certs, None) {
        check(&issued, selector & 1 == 1);
    }
});
