//! Our CSRs and our TLS client authentication checked by independent implementations: openssl
//! verifies the CSR signatures, and the emulator's rustls server accepts a client certificate
//! whose key signs through the HAL.

mod common;

use std::fs;

use common::{openssl, Ca, Env, Scratch};
use enroll_agent::config::{Sans, Subject, SubjectAttribute};
use enroll_hal::soft::FileKeyProvider;
use enroll_hal::{Algorithm, KeyProvider};
use enroll_tests::Options;

#[test]
fn openssl_verifies_our_csrs_for_both_algorithms() {
    let scratch = Scratch::new("csr");
    let subject = Subject {
        attributes: vec![
            (SubjectAttribute::C, "NL".into()),
            (SubjectAttribute::O, "Acme".into()),
            (SubjectAttribute::CN, "sensor-0042".into()),
        ],
    };
    let sans = Sans {
        dns: vec!["sensor-0042.example".into()],
        ip: vec!["192.0.2.7".parse().unwrap()],
        uri: vec!["urn:acme:sensor:42".into()],
        email: vec!["ops@acme.example".into()],
    };
    for algorithm in [Algorithm::P256, Algorithm::Rsa2048] {
        let slot = scratch.0.join(algorithm.name());
        fs::create_dir(&slot).unwrap();
        let key = FileKeyProvider::default().generate(algorithm, &slot).unwrap();
        let csr = enroll_agent::csr::build(key.as_ref(), &subject, &sans).unwrap();
        let path = slot.join("req.pem");
        fs::write(&path, &csr.pem).unwrap();
        let (ok, text) = openssl(&["req", "-in", path.to_str().unwrap(), "-verify", "-noout", "-text"]);
        assert!(ok, "{algorithm:?}: {text}");
        assert!(
            text.contains("verify OK") || text.contains("Certificate request self-signature verify OK"),
            "{text}"
        );
        assert!(text.contains("C = NL, O = Acme, CN = sensor-0042"), "{text}");
        for san in [
            "DNS:sensor-0042.example",
            "IP Address:192.0.2.7",
            "URI:urn:acme:sensor:42",
            "email:ops@acme.example",
        ] {
            assert!(text.contains(san), "{san} missing: {text}");
        }
    }
}

#[test]
fn tls_client_authentication_signs_with_the_device_key_in_place() {
    for algorithm in ["p256", "rsa2048"] {
        // The emulator asks for (but does not require) client certificates from its own CAs.
        let options = Options { request_client_cert: true, ..Options::default() };
        let env = Env::with_options(Ca::Enos, algorithm, options, |_| {});
        env.expect(&["enroll"], 0);
        let mtls = &env.emu;
        let roots = std::sync::Arc::new(
            enroll_agent::tls::load_roots(Some(&env.dir().join("tls-root.pem"))).unwrap(),
        );
        let slot = fs::canonicalize(env.current()).unwrap();
        let key = FileKeyProvider::default().load(&slot).unwrap();
        let chain =
            enroll_agent::pki::parse_pem_certs(&fs::read_to_string(slot.join("chain.pem")).unwrap()).unwrap();
        let identity =
            enroll_agent::tls::ClientIdentity { chain: chain.into_iter().map(|c| c.der).collect(), key };
        let clock = std::sync::Arc::new(enroll_agent::time::Clock::default());
        let transport = enroll_agent::tls::Transport {
            roots,
            clock_window_s: None,
            timeout_s: 5,
            clock,
            tokens: Default::default(),
        };
        let http = enroll_agent::http::Http::new(transport).unwrap().with_identity(identity).unwrap();
        let response =
            http.send("probe", "GET", &format!("{}/_emulator/log", mtls.url()), &[], None).unwrap();
        assert_eq!(response.status, 200);
        let logged = mtls.log();
        assert!(!logged[0].client_cert, "the enrollment itself went without a client certificate");
        assert!(
            logged.last().unwrap().client_cert,
            "{algorithm}: the server saw no client certificate: {logged:?}"
        );
    }
}
