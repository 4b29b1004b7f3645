//! Fault injection (design.md §6: "misbehave on demand").
//!
//! A fault is armed for the next N matching calls or until cleared. It only fires on the
//! endpoints it applies to ([`Fault::applies_to`]); other calls neither trigger nor consume it.
//! "Status" faults (`pending-forever`, `approval-rejected`, `request-expired`, `request-failed`,
//! `sectigo-revoked`) are taken on the first poll of an asynchronous request and stay with that
//! request (sticky), whatever is armed later.
//! Faulty answers never change the emulated CA's state: a certificate that was not delivered
//! properly is not recorded as the device's current certificate, so a client may retry.

use std::fmt;
use std::str::FromStr;

/// Which emulated call is being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// EnOS `apim-token-service/v2.0/token/get` and `token/refresh`.
    EnosToken,
    /// EnOS `connect-service/v2.0/certificates` (apply, renew).
    EnosCert,
    /// EZCA `RequestSSLCertificateV2`.
    EzcaIssue,
    /// EZCA `RenewCertificateV3`.
    EzcaRenewV3,
    /// EZCA `RenewCertificateV2`.
    EzcaRenewV2,
    /// Sectigo `POST /api/ssl/v1/enroll` and `POST /api/ssl/v1/renewById/{sslId}` (protocols.md §3.3).
    SectigoRequest,
    /// Sectigo `GET /api/ssl/v1/collect/{sslId}` (and `GET /api/ssl/v1/{sslId}` for status faults).
    SectigoCollect,
    /// Securosys `POST /v1/certificate/synchronous/sign` (protocols.md §4.4).
    SecurosysSyncSign,
    /// Securosys `POST /v1/certificate/sign` (approval flow, §4.4).
    SecurosysSign,
    /// Securosys `GET /v1/request/{id}` (§4.5).
    SecurosysRequest,
    /// Redtrust `GET /authclient/auth/loginrequest` (HMAC partner login, protocols.md §5).
    RedtrustLogin,
    /// Redtrust `/raapi/v1/csr/create` and `/raapi/v2/csr/create`.
    RedtrustCreate,
    /// Redtrust `PUT /raapi/v1/csr/finalize`.
    RedtrustFinalize,
    /// EST `GET /.well-known/est[/label]/cacerts` (RFC 7030 §4.1).
    EstCaCerts,
    /// EST `POST …/simpleenroll` (RFC 7030 §4.2.1).
    EstEnroll,
    /// EST `POST …/simplereenroll` (RFC 7030 §4.2.2).
    EstReenroll,
    /// ACME `new-order` (RFC 8555 §7.4).
    AcmeOrder,
    /// ACME `finalize` (RFC 8555 §7.4), where the certificate is issued.
    AcmeFinalize,
    /// SCEP `PKIOperation` carrying a PKCSReq or RenewalReq (RFC 8894 §3.3.1).
    ScepRequest,
    /// SCEP `PKIOperation` carrying a CertPoll (RFC 8894 §3.3.3).
    ScepCertPoll,
}

impl Endpoint {
    /// Calls that create a request or issue at once: the generic early faults and the
    /// JSON answer faults fire here.
    fn creates_request(self) -> bool {
        use Endpoint::*;
        matches!(
            self,
            EnosCert
                | EzcaIssue
                | EzcaRenewV3
                | EzcaRenewV2
                | SectigoRequest
                | SecurosysSyncSign
                | SecurosysSign
                | RedtrustCreate
                | EstEnroll
                | EstReenroll
                | AcmeOrder
                | ScepRequest
        )
    }

    /// Calls that deliver a certificate: `wrong-key-cert` and `expired-cert` fire here.
    fn delivers_cert(self) -> bool {
        use Endpoint::*;
        matches!(
            self,
            EnosCert
                | EzcaIssue
                | EzcaRenewV3
                | EzcaRenewV2
                | SectigoCollect
                | SecurosysSyncSign
                | SecurosysRequest
                | EstEnroll
                | EstReenroll
                | AcmeFinalize
                | ScepRequest
                | ScepCertPoll
        )
    }
}

/// When in the handling of a request a fault takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before anything is checked (the gateway or server fails).
    Early,
    /// After authentication succeeded (EnOS token expiry).
    Authenticated,
    /// In place of the successful answer (bad body, bad certificate).
    Answer,
}

macro_rules! faults {
    ($($variant:ident = $name:literal, $doc:literal;)*) => {
        /// A misbehaviour, by its command-line / control-endpoint name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Fault { $(#[doc = $doc] $variant,)* }

        impl Fault {
            /// Every fault, in documentation order.
            pub const ALL: &'static [Fault] = &[$(Fault::$variant,)*];

            /// The name used by `--fault` and `POST /_emulator/fault`.
            pub fn name(self) -> &'static str {
                match self { $(Fault::$variant => $name,)* }
            }
        }
    };
}

faults! {
    None = "none", "No fault (clears any armed fault).";
    Http500 = "http500", "HTTP 500 with a short text body.";
    Http503 = "http503", "HTTP 503 with a short text body.";
    Http503RetryAfter = "http503-retry-after", "HTTP 503 with a short text body and `Retry-After: 1` (EST: the configured `retry_after_s`).";
    Http429 = "http429", "HTTP 429 with `Retry-After: 1`.";
    Timeout = "timeout", "Hold the response for the configured delay (default 5 s), then answer 504 without processing.";
    MalformedJson = "malformed-json", "200 with a body that is not JSON (EZCA V2: not PEM; EST: not base64; SCEP: not CMS).";
    TruncatedJson = "truncated-json", "200, complete HTTP message, JSON (or PEM) body cut in half (EST: base64 cut mid-quantum).";
    TruncatedBody = "truncated-body", "Content-Length larger than what is sent, then the connection closes.";
    WrongKeyCert = "wrong-key-cert", "A certificate for another key (same subject and SANs).";
    ExpiredCert = "expired-cert", "A certificate for the right key whose notAfter has passed.";
    RejectAuth = "reject-auth", "EnOS: token/get answers status 1003 and API calls 401; EZCA: 401 text; EST: 401 with `WWW-Authenticate: Basic realm=\"est\"` whatever the credentials; SCEP: a FAILURE CertRep with failInfo badRequest (2).";
    Enos99400 = "enos-99400", "EnOS body code 99400 (invalid argument).";
    Enos11404 = "enos-11404", "EnOS body code 11404 (device cannot be found).";
    Enos11833 = "enos-11833", "EnOS body code 11833 (certificate bound to another device).";
    Enos99500 = "enos-99500", "EnOS body code 99500 (internal error).";
    EnosAnswerLost = "enos-answer-lost", "EnOS apply/renew: the certificate is issued and bound (the previous one superseded, as §1.5 says), then the answer is cut off mid-body: the CA acted and the agent never hears of it.";
    EnosControlChars = "enos-control-chars", "EnOS body code 99400 whose msg and requestId carry ANSI escapes, CR/LF, BEL and bidi controls.";
    AbsurdDate = "absurd-date", "The normal answer, with a Date header of the year 99999999999999.";
    EnosDuplicatedEncryption = "enos-duplicated-encryption", "EnOS token/get answers status 1001 (duplicated encryption), as when another client signed a token request in the same millisecond.";
    EnosTokenExpired = "enos-token-expired", "The next authenticated EnOS API call answers code 1203 and its token is expired for good.";
    Gateway401 = "gateway-401", "EnOS gateway HTTP 401 before the service is reached.";
    Gateway429 = "gateway-429", "EnOS gateway HTTP 429 with `Retry-After: 1`.";
    EzcaV3404 = "ezca-v3-404", "RenewCertificateV3 answers 404 (clients fall back to V2).";
    EzcaWrapped = "ezca-wrapped", "RenewCertificateV3 body JSON-string-wrapped.";
    Oversized = "oversized", "200 with a 2 MiB body.";
    PendingForever = "pending-forever", "Sectigo: the sslId never becomes collectable; Securosys: the request stays PENDING; ACME: the order stays processing; SCEP: PKCSReq/RenewalReq and every CertPoll of that transaction answer PENDING (sticky per request).";
    ApprovalRejected = "approval-rejected", "Sectigo: status Declined, collect 400 -183; Securosys: status REJECTED with rejectedBy (sticky per request).";
    RequestExpired = "request-expired", "Sectigo: status Expired, collect 400 -183; Securosys: status EXPIRED (sticky per request).";
    RequestFailed = "request-failed", "Securosys: status FAILED (sticky per request).";
    SectigoRevoked = "sectigo-revoked", "Sectigo collect answers 400 -110 (revoked, can't be downloaded); sticky per sslId.";
    RedtrustTokenExpired = "redtrust-token-expired", "The next bearer-authenticated Redtrust RA call answers 401 TOKEN_EXPIRED; that access token stays dead.";
    RedtrustFinalize500 = "redtrust-finalize-500", "Redtrust csr/finalize answers HTTP 500 without recording anything.";
    RedtrustFinalizeAnswerLost = "redtrust-finalize-answer-lost", "Redtrust csr/finalize binds the certificate (the request is consumed), then the answer is cut off mid-body: a retry of the same requestCode gets 404 REQUEST_NOT_FOUND.";
    EstPending = "est-pending", "EST enroll/reenroll: 202 Accepted with `Retry-After: <retry_after_s>` after authentication, nothing issued (count = how many 202s; the client resends the identical CSR).";
    EstForbidden = "est-forbidden", "EST enroll/reenroll: authenticated, then 403 with a one-line text body.";
    EstWrap64 = "est-wrap-64", "EST PKCS#7 answers (cacerts too) as base64 wrapped at 64 columns (LF).";
    EstWrap76 = "est-wrap-76", "EST PKCS#7 answers (cacerts too) as base64 wrapped at 76 columns (LF), as MIME does.";
    EstCrlf = "est-crlf", "EST PKCS#7 answers (cacerts too) as base64 wrapped at 76 columns with CRLF line endings.";
    EstBer = "est-ber", "EST PKCS#7 answers (cacerts too) BER-encoded with indefinite lengths (as EJBCA and libest send).";
    EstExtraCerts = "est-extra-certs", "EST enroll/reenroll answer holds root, issuing CA and leaf, in that order (leaf not first).";
    ScepBadSignature = "scep-bad-signature", "SCEP: a SUCCESS CertRep whose CA signature does not verify (one bit of it flipped).";
    ScepWrongNonce = "scep-wrong-nonce", "SCEP: a SUCCESS CertRep, correctly signed, whose recipientNonce is not the request's senderNonce (a replayed answer).";
}

impl Fault {
    /// Whether the fault fires on `ep` (everything "certificate-issuing" unless noted).
    pub fn applies_to(self, ep: Endpoint) -> bool {
        use Fault::*;
        match self {
            None => false,
            RejectAuth => ep.creates_request() || ep == Endpoint::EnosToken || ep == Endpoint::RedtrustLogin,
            EnosDuplicatedEncryption => ep == Endpoint::EnosToken,
            Enos99400 | Enos11404 | Enos11833 | Enos99500 | EnosControlChars | EnosTokenExpired
            | EnosAnswerLost | Gateway401 | Gateway429 => ep == Endpoint::EnosCert,
            EzcaV3404 | EzcaWrapped => ep == Endpoint::EzcaRenewV3,
            WrongKeyCert | ExpiredCert => ep.delivers_cert(),
            PendingForever => matches!(
                ep,
                Endpoint::SectigoCollect
                    | Endpoint::SecurosysRequest
                    | Endpoint::AcmeFinalize
                    | Endpoint::ScepRequest
            ),
            ApprovalRejected | RequestExpired => {
                matches!(ep, Endpoint::SectigoCollect | Endpoint::SecurosysRequest)
            }
            RequestFailed => ep == Endpoint::SecurosysRequest,
            SectigoRevoked => ep == Endpoint::SectigoCollect,
            RedtrustTokenExpired => matches!(ep, Endpoint::RedtrustCreate | Endpoint::RedtrustFinalize),
            RedtrustFinalize500 | RedtrustFinalizeAnswerLost => ep == Endpoint::RedtrustFinalize,
            EstPending | EstForbidden | EstExtraCerts => {
                matches!(ep, Endpoint::EstEnroll | Endpoint::EstReenroll)
            }
            EstWrap64 | EstWrap76 | EstCrlf | EstBer => {
                matches!(ep, Endpoint::EstCaCerts | Endpoint::EstEnroll | Endpoint::EstReenroll)
            }
            ScepBadSignature | ScepWrongNonce => matches!(ep, Endpoint::ScepRequest | Endpoint::ScepCertPoll),
            // Generic early faults (http5xx/429, timeout, oversized) and JSON answer faults.
            _ => ep.creates_request(),
        }
    }

    /// When the fault takes effect while handling a request.
    pub fn phase(self) -> Phase {
        use Fault::*;
        match self {
            // Service-level answers come after the gateway accepted the signature.
            EnosTokenExpired | Enos99400 | Enos11404 | Enos11833 | Enos99500 | EnosControlChars => {
                Phase::Authenticated
            }
            // Request fates are decided on a request's first poll, after authentication.
            PendingForever | ApprovalRejected | RequestExpired | RequestFailed | SectigoRevoked => {
                Phase::Authenticated
            }
            RedtrustTokenExpired | RedtrustFinalize500 => Phase::Authenticated,
            // EST: the server answers 202 / 403 only to a client it has authenticated.
            EstPending | EstForbidden => Phase::Authenticated,
            MalformedJson
            | TruncatedJson
            | TruncatedBody
            | WrongKeyCert
            | ExpiredCert
            | EzcaWrapped
            | EnosAnswerLost
            | RedtrustFinalizeAnswerLost
            | AbsurdDate
            | EstWrap64
            | EstWrap76
            | EstCrlf
            | EstBer
            | EstExtraCerts
            | ScepBadSignature
            | ScepWrongNonce => Phase::Answer,
            _ => Phase::Early,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        Fault::ALL
            .iter()
            .copied()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown fault {s:?}; known: {}", names()))
    }
}

/// All fault names, comma-separated (for usage and error messages).
pub fn names() -> String {
    Fault::ALL.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
}

/// The armed fault and how many more calls it applies to (`None` = until cleared).
#[derive(Clone, Copy, Debug)]
pub struct FaultState {
    fault: Fault,
    remaining: Option<u32>,
}

impl Default for FaultState {
    fn default() -> Self {
        Self { fault: Fault::None, remaining: None }
    }
}

impl FaultState {
    /// Arms `fault` for the next `count` matching calls (`None` = until cleared).
    pub fn set(&mut self, fault: Fault, count: Option<u32>) {
        *self = Self { fault, remaining: count };
        if count == Some(0) {
            self.fault = Fault::None;
        }
    }

    /// The armed fault, if any.
    pub fn current(&self) -> Option<(Fault, Option<u32>)> {
        (self.fault != Fault::None).then_some((self.fault, self.remaining))
    }

    /// Fires (and counts down) the armed fault if it applies to `ep` in `phase`.
    pub fn take(&mut self, ep: Endpoint, phase: Phase) -> Option<Fault> {
        let f = self.fault;
        if f == Fault::None || !f.applies_to(ep) || f.phase() != phase {
            return None;
        }
        if let Some(n) = self.remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.fault = Fault::None;
            }
        }
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>().ok(), Some(*f));
        }
        assert!("nope".parse::<Fault>().is_err());
    }

    #[test]
    fn counts_down_only_on_matching_calls() {
        let mut s = FaultState::default();
        s.set(Fault::EzcaV3404, Some(1));
        assert_eq!(s.take(Endpoint::EnosCert, Phase::Early), None);
        assert_eq!(s.take(Endpoint::EzcaRenewV3, Phase::Answer), None);
        assert_eq!(s.take(Endpoint::EzcaRenewV3, Phase::Early), Some(Fault::EzcaV3404));
        assert_eq!(s.take(Endpoint::EzcaRenewV3, Phase::Early), None);
        s.set(Fault::Http500, None);
        for _ in 0..3 {
            assert_eq!(s.take(Endpoint::EzcaIssue, Phase::Early), Some(Fault::Http500));
        }
        assert_eq!(s.take(Endpoint::EnosToken, Phase::Early), None);
    }

    #[test]
    fn new_vendor_routing() {
        use Endpoint::*;
        // Generic faults: request-creating calls only, never polls or logins.
        for ep in [SectigoRequest, SecurosysSyncSign, SecurosysSign, RedtrustCreate] {
            assert!(Fault::Http500.applies_to(ep) && Fault::MalformedJson.applies_to(ep), "{ep:?}");
        }
        for ep in [SectigoCollect, SecurosysRequest, RedtrustLogin, RedtrustFinalize] {
            assert!(!Fault::Http500.applies_to(ep) && !Fault::TruncatedJson.applies_to(ep), "{ep:?}");
        }
        assert!(Fault::RejectAuth.applies_to(RedtrustLogin) && !Fault::RejectAuth.applies_to(SectigoCollect));
        // Certificates are delivered by collect, sync sign and the EXECUTED request.
        for ep in [SectigoCollect, SecurosysSyncSign, SecurosysRequest, EnosCert] {
            assert!(Fault::WrongKeyCert.applies_to(ep) && Fault::ExpiredCert.applies_to(ep), "{ep:?}");
        }
        assert!(
            !Fault::WrongKeyCert.applies_to(SecurosysSign) && !Fault::WrongKeyCert.applies_to(SectigoRequest)
        );
        assert!(
            Fault::RequestFailed.applies_to(SecurosysRequest)
                && !Fault::RequestFailed.applies_to(SectigoCollect)
        );
        assert!(
            Fault::SectigoRevoked.applies_to(SectigoCollect)
                && !Fault::SectigoRevoked.applies_to(SecurosysRequest)
        );
        assert!(
            Fault::RedtrustFinalize500.applies_to(RedtrustFinalize)
                && !Fault::RedtrustFinalize500.applies_to(RedtrustCreate)
        );
        // EST: delivery and status faults on enroll/reenroll; encoding faults on cacerts too.
        for ep in [EstEnroll, EstReenroll] {
            for f in
                [Fault::Http500, Fault::Timeout, Fault::WrongKeyCert, Fault::EstPending, Fault::RejectAuth]
            {
                assert!(f.applies_to(ep), "{f} on {ep:?}");
            }
        }
        assert!(Fault::EstBer.applies_to(EstCaCerts) && !Fault::EstPending.applies_to(EstCaCerts));
        assert!(!Fault::Http500.applies_to(EstCaCerts) && !Fault::EstBer.applies_to(EnosCert));
        let mut s = FaultState::default();
        s.set(Fault::PendingForever, Some(1));
        assert_eq!(
            s.take(SectigoCollect, Phase::Early),
            None,
            "status faults are taken after authentication"
        );
        assert_eq!(s.take(SecurosysRequest, Phase::Authenticated), Some(Fault::PendingForever));
    }

    #[test]
    fn scep_routing() {
        use Endpoint::{EstEnroll, ScepCertPoll, ScepRequest};
        // Server and body faults hit PKCSReq / RenewalReq, never a CertPoll.
        for f in [Fault::Http500, Fault::Timeout, Fault::MalformedJson, Fault::RejectAuth, Fault::Oversized] {
            assert!(f.applies_to(ScepRequest) && !f.applies_to(ScepCertPoll), "{f}");
        }
        // Whatever delivers a certificate can deliver a bad one or a bad CertRep.
        for f in [Fault::WrongKeyCert, Fault::ExpiredCert, Fault::ScepBadSignature, Fault::ScepWrongNonce] {
            assert!(f.applies_to(ScepRequest) && f.applies_to(ScepCertPoll), "{f}");
        }
        assert!(
            Fault::PendingForever.applies_to(ScepRequest) && !Fault::PendingForever.applies_to(ScepCertPoll)
        );
        assert!(!Fault::ScepBadSignature.applies_to(EstEnroll));
        assert_eq!(Fault::ScepWrongNonce.phase(), Phase::Answer);
    }
}
