//! Tests of the SCEP emulator (RFC 8894) in process, with the agent's SCEP message code as the
//! client: what it accepts, and the failInfo of what it must refuse (which the end-to-end
//! suites, driving a correct client, never send).

use std::sync::Arc;

use enroll_ca::pki::Cert;
use enroll_ca::scep::envelope::{self, Cipher};
use enroll_ca::scep::message::{self, Answer, Expected, MessageType, Signer};
use enroll_ca::subject::{Sans, Subject, SubjectAttribute};
use enroll_hal::soft::SoftKey;
use enroll_hal::DeviceKey;

use crate::scep::{
    ScepCipher, BAD_CERT_ID, BAD_MESSAGE_CHECK, BAD_REQUEST, CERT_POLL, PKCS_REQ, RENEWAL_REQ,
};
use crate::server::{Request, Response};
use crate::{Emulator, Fault, Options};

struct Device {
    key: Arc<SoftKey>,
    subject: Subject,
    sans: Sans,
}

impl Device {
    fn new(cn: &str) -> Device {
        let key = SoftKey::from_pkcs8(&crate::pki::rsa_pkcs8(2048).unwrap()).unwrap();
        let subject = Subject {
            attributes: vec![(SubjectAttribute::O, "Acme".into()), (SubjectAttribute::CN, cn.into())],
        };
        let sans = Sans { dns: vec![format!("{cn}.example")], ..Sans::default() };
        Device { key: Arc::new(key), subject, sans }
    }

    fn self_signed(&self) -> Cert {
        let name = enroll_ca::csr::encode_name(&self.subject).unwrap();
        Cert::from_der(&enroll_ca::pki::self_signed(self.key.as_ref(), name, Vec::new(), 3600).unwrap())
            .unwrap()
    }

    fn csr(&self, challenge: Option<&str>) -> Vec<u8> {
        match challenge {
            Some(c) => enroll_ca::csr::build_with_challenge(self.key.as_ref(), &self.subject, &self.sans, c),
            None => enroll_ca::csr::build(self.key.as_ref(), &self.subject, &self.sans),
        }
        .unwrap()
        .der
    }

    fn transaction_id(&self) -> String {
        enroll_ca::scep::transaction_id(self.key.public_key_spki(), None)
    }
}

fn ca(emu: &Emulator) -> Cert {
    Cert::from_der(&emu.scep_ca_der()).unwrap()
}

fn request(method: &str, query: &[(&str, &str)], body: Vec<u8>) -> Request {
    Request {
        method: method.into(),
        path: "/scep".into(),
        query: query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        body,
        ..Request::default()
    }
}

/// Sends a pkiMessage (POST) signed by `signer` and reads the CertRep as the agent does.
fn send(
    emu: &Emulator,
    kind: MessageType,
    tid: &str,
    content: &[u8],
    signer: (&Cert, &dyn DeviceKey),
    cipher: Cipher,
    tamper: impl FnOnce(&mut Vec<u8>),
) -> (Response, Result<Answer, String>) {
    let ca = ca(emu);
    let sealed = envelope::seal(content, &ca, cipher).unwrap();
    let mut outgoing = message::sign(kind, tid, &sealed, &Signer { cert: signer.0, key: signer.1 }).unwrap();
    tamper(&mut outgoing.der);
    let response = emu.handle(&request("POST", &[("operation", "PKIOperation")], outgoing.der));
    let expected = Expected {
        transaction_id: tid,
        sender_nonce: &outgoing.sender_nonce,
        ca_certs: std::slice::from_ref(&ca),
    };
    let answer = message::read_cert_rep(&response.body, &expected).map_err(|e| e.to_string());
    (response, answer)
}

fn failure(answer: Result<Answer, String>) -> Option<u8> {
    match answer {
        Ok(Answer::Failure(info)) => info,
        other => panic!("expected a FAILURE CertRep, got {other:?}"),
    }
}

/// The certificate of a SUCCESS answer, decrypted with `key`.
fn issued(answer: Result<Answer, String>, key: &dyn DeviceKey) -> Cert {
    let Ok(Answer::Success(encrypted)) = answer else { panic!("expected SUCCESS, got {answer:?}") };
    let content = envelope::open(&encrypted, key).unwrap();
    let certs = enroll_ca::pkcs7::certificates(&content).unwrap();
    assert_eq!(certs.len(), 1, "the issued certificate only");
    Cert::from_der(&certs[0]).unwrap()
}

#[test]
fn get_ca_caps_and_get_ca_cert() {
    let emu = Emulator::start(Options::default()).unwrap();
    let caps = emu.handle(&request("GET", &[("operation", "GetCACaps")], Vec::new()));
    assert_eq!(caps.body, b"Renewal\nSHA-256\nAES\nDES3\nPOSTPKIOperation\nSCEPStandard\n");
    emu.set_scep_caps(&["SHA-256", "DES3"]);
    let caps = emu.handle(&request("GET", &[("operation", "GetCACaps")], Vec::new()));
    assert_eq!(caps.body, b"SHA-256\nDES3\n");
    let cert = emu.handle(&request("GET", &[("operation", "GetCACert")], Vec::new()));
    assert_eq!(cert.status, 200);
    assert!(cert.headers.contains(&("Content-Type".into(), "application/x-x509-ca-cert".into())));
    assert_eq!(crate::util::sha256_hex(&[&cert.body]), emu.scep_ca_fingerprint());
    let ca = ca(&emu);
    assert_eq!(
        ca.parsed.tbs_certificate.subject_public_key_info.algorithm.oid.to_string(),
        "1.2.840.113549.1.1.1"
    );
    let body = emu.handle(&request("POST", &[("operation", "PKIOperation")], b"not CMS".to_vec()));
    assert_eq!(body.status, 400);
    assert_eq!(emu.handle(&request("GET", &[], Vec::new())).status, 400);
}

#[test]
fn pkcs_req_in_every_cipher_and_over_get_is_issued_for_the_device_key() {
    let emu = Emulator::start(Options::default()).unwrap();
    let device = Device::new("sensor-1");
    let signer = device.self_signed();
    let csr = device.csr(Some(&emu.scep.challenge));
    for cipher in [Cipher::Des, Cipher::Des3, Cipher::Aes128, Cipher::Aes256] {
        let (response, answer) = send(
            &emu,
            MessageType::PkcsReq,
            &device.transaction_id(),
            &csr,
            (&signer, device.key.as_ref()),
            cipher,
            |_| {},
        );
        assert!(response.headers.contains(&("Content-Type".into(), "application/x-pki-message".into())));
        let cert = issued(answer, device.key.as_ref());
        assert_eq!(cert.spki_der(), device.key.public_key_spki(), "{cipher:?}");
        assert!(cert.is_signed_by(&ca(&emu)));
        assert_eq!(emu.scep_messages().last().unwrap().cipher.map(ScepCipher::name), Some(cipher.name()));
    }
    // The GET form: the same message base64 in `message=`.
    let ca = ca(&emu);
    let sealed = envelope::seal(&csr, &ca, Cipher::Des3).unwrap();
    let outgoing = message::sign(
        MessageType::PkcsReq,
        &device.transaction_id(),
        &sealed,
        &Signer { cert: &signer, key: device.key.as_ref() },
    )
    .unwrap();
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &outgoing.der);
    let response =
        emu.handle(&request("GET", &[("operation", "PKIOperation"), ("message", &b64)], Vec::new()));
    let expected = Expected {
        transaction_id: &device.transaction_id(),
        sender_nonce: &outgoing.sender_nonce,
        ca_certs: std::slice::from_ref(&ca),
    };
    issued(message::read_cert_rep(&response.body, &expected).map_err(|e| e.to_string()), device.key.as_ref());
    assert_eq!(emu.scep_messages().last().unwrap().method, "GET");
    assert_eq!(emu.issued().len(), 5);
}

#[test]
fn what_a_ca_must_refuse_is_answered_with_the_right_fail_info() {
    let emu = Emulator::start(Options::default()).unwrap();
    let device = Device::new("sensor-2");
    let signer = device.self_signed();
    let tid = device.transaction_id();
    let good_csr = device.csr(Some(&emu.scep.challenge));
    let signed_by_device = (&signer, device.key.as_ref() as &dyn DeviceKey);

    // The last byte of the message is the signature's: the signature no longer verifies.
    let (_, answer) =
        send(&emu, MessageType::PkcsReq, &tid, &good_csr, signed_by_device, Cipher::Aes256, |der| {
            *der.last_mut().unwrap() ^= 1
        });
    assert_eq!(failure(answer), Some(BAD_MESSAGE_CHECK));
    // Wrong or missing challenge password.
    for csr in [device.csr(Some("wrong")), device.csr(None)] {
        let (_, answer) =
            send(&emu, MessageType::PkcsReq, &tid, &csr, signed_by_device, Cipher::Aes256, |_| {});
        assert_eq!(failure(answer), Some(BAD_REQUEST));
    }
    // A PKCSReq signed under another key than the CSR's.
    let other = Device::new("sensor-2");
    let other_signer = other.self_signed();
    let (_, answer) = send(
        &emu,
        MessageType::PkcsReq,
        &tid,
        &good_csr,
        (&other_signer, other.key.as_ref()),
        Cipher::Aes256,
        |_| {},
    );
    assert_eq!(failure(answer), Some(BAD_REQUEST));
    // A RenewalReq under a certificate this CA did not issue.
    let (_, answer) =
        send(&emu, MessageType::RenewalReq, &tid, &good_csr, signed_by_device, Cipher::Aes256, |_| {});
    assert_eq!(failure(answer), Some(BAD_CERT_ID));
    // A CertPoll for a transaction the CA does not know.
    let poll = message::issuer_and_subject(&ca(&emu), &enroll_ca::csr::encode_name(&device.subject).unwrap())
        .unwrap();
    let (_, answer) =
        send(&emu, MessageType::CertPoll, &tid, &poll, signed_by_device, Cipher::Aes256, |_| {});
    assert_eq!(failure(answer), Some(BAD_CERT_ID));
    assert!(emu.issued().is_empty());
    let statuses: Vec<(u8, Option<u8>)> =
        emu.scep_messages().iter().map(|m| (m.message_type, m.fail_info)).collect();
    assert_eq!(
        statuses,
        [
            (PKCS_REQ, Some(BAD_MESSAGE_CHECK)),
            (PKCS_REQ, Some(BAD_REQUEST)),
            (PKCS_REQ, Some(BAD_REQUEST)),
            (PKCS_REQ, Some(BAD_REQUEST)),
            (RENEWAL_REQ, Some(BAD_CERT_ID)),
            (CERT_POLL, Some(BAD_CERT_ID)),
        ]
    );
}

#[test]
fn pending_then_cert_poll_then_renewal_under_the_issued_certificate() {
    let mut options = Options::default();
    options.scep.pending_polls = 1;
    let emu = Emulator::start(options).unwrap();
    let device = Device::new("sensor-3");
    let signer = device.self_signed();
    let tid = device.transaction_id();
    let csr = device.csr(Some(&emu.scep.challenge));
    let signed_by_device = (&signer, device.key.as_ref() as &dyn DeviceKey);
    let (_, answer) = send(&emu, MessageType::PkcsReq, &tid, &csr, signed_by_device, Cipher::Aes256, |_| {});
    assert!(matches!(answer, Ok(Answer::Pending)), "{answer:?}");
    let poll = message::issuer_and_subject(&ca(&emu), &enroll_ca::csr::encode_name(&device.subject).unwrap())
        .unwrap();
    // The poll must come from the requesting key.
    let other = Device::new("sensor-3");
    let (_, answer) = send(
        &emu,
        MessageType::CertPoll,
        &tid,
        &poll,
        (&other.self_signed(), other.key.as_ref()),
        Cipher::Aes256,
        |_| {},
    );
    assert_eq!(failure(answer), Some(BAD_CERT_ID));
    let (_, answer) =
        send(&emu, MessageType::CertPoll, &tid, &poll, signed_by_device, Cipher::Aes256, |_| {});
    assert!(matches!(answer, Ok(Answer::Pending)), "one poll answered PENDING: {answer:?}");
    // A new self-signed certificate for the same key is the same requester.
    let (_, answer) = send(
        &emu,
        MessageType::CertPoll,
        &tid,
        &poll,
        (&device.self_signed(), device.key.as_ref()),
        Cipher::Aes256,
        |_| {},
    );
    let cert = issued(answer, device.key.as_ref());
    assert_eq!(cert.spki_der(), device.key.public_key_spki());

    // RenewalReq signed by the issued certificate, for a new key; the answer is encrypted to the
    // signer's (old) key. A wrong-key-cert fault delivers a certificate for another key.
    emu.set_scep_pending_polls(0);
    let new = Device::new("sensor-3");
    let new_csr = new.csr(None);
    let (_, answer) = send(
        &emu,
        MessageType::RenewalReq,
        &new.transaction_id(),
        &new_csr,
        (&cert, device.key.as_ref()),
        Cipher::Aes128,
        |_| {},
    );
    let renewed = issued(answer, device.key.as_ref());
    assert_eq!(renewed.spki_der(), new.key.public_key_spki());
    emu.set_fault(Fault::WrongKeyCert, Some(1));
    let (response, answer) = send(
        &emu,
        MessageType::RenewalReq,
        &new.transaction_id(),
        &new_csr,
        (&cert, device.key.as_ref()),
        Cipher::Aes128,
        |_| {},
    );
    assert!(response.headers.contains(&(crate::emulator::FAULT_HEADER.into(), "wrong-key-cert".into())));
    assert_ne!(issued(answer, device.key.as_ref()).spki_der(), new.key.public_key_spki());
    assert_eq!(emu.issued().len(), 2, "the faulty certificate is not recorded");

    // pending-forever: the transaction stays PENDING whatever pending_polls says later.
    emu.set_fault(Fault::PendingForever, Some(1));
    let (response, answer) = send(
        &emu,
        MessageType::RenewalReq,
        &new.transaction_id(),
        &new_csr,
        (&cert, device.key.as_ref()),
        Cipher::Aes128,
        |_| {},
    );
    assert!(matches!(answer, Ok(Answer::Pending)), "{answer:?}");
    assert!(response.headers.contains(&(crate::emulator::FAULT_HEADER.into(), "pending-forever".into())));
    emu.set_scep_pending_polls(0);
    let poll =
        message::issuer_and_subject(&ca(&emu), &enroll_ca::csr::encode_name(&new.subject).unwrap()).unwrap();
    for _ in 0..2 {
        let (_, answer) = send(
            &emu,
            MessageType::CertPoll,
            &new.transaction_id(),
            &poll,
            (&cert, device.key.as_ref()),
            Cipher::Aes128,
            |_| {},
        );
        assert!(matches!(answer, Ok(Answer::Pending)), "{answer:?}");
    }
    assert_eq!(emu.issued().len(), 2);
}
