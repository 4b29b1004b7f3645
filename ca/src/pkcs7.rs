//! The certificates of a certs-only PKCS#7 / CMS SignedData (RFC 5652 §5.1), DER or BER.
//!
//! EST answers (RFC 7030 §4.1.3, §4.2.3) are "degenerate" SignedData holding only certificates.
//! EJBCA and libest encode the envelope in BER with indefinite lengths, which `der` 0.7 refuses
//! (protocols.md §6.1a), so this is a small bounded TLV walker: it follows
//! ContentInfo → [0] → SignedData → [0] certificates and returns each certificate's bytes as
//! they were sent (certificates themselves are DER: their signatures cover DER). Nesting depth,
//! element count and input size are bounded; anything else is an error, never a panic.

/// Deeper nesting than this is refused (a certs-only answer nests about 6 levels).
const MAX_DEPTH: usize = 32;
/// More certificates than this in one answer is refused.
const MAX_CERTIFICATES: usize = 32;
/// More elements than this in one constructed value is refused.
const MAX_ELEMENTS: usize = 4096;

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const INTEGER: u8 = 0x02;
const SET: u8 = 0x31;
/// [0] constructed: ContentInfo's content, and SignedData's certificates.
const CONTEXT_0: u8 = 0xa0;
/// 1.2.840.113549.1.7.2 (id-signedData), as DER content octets.
const SIGNED_DATA: [u8; 9] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];

/// One element: its identifier octet, its content (without an indefinite form's end-of-contents
/// octets) and the whole encoding.
#[derive(Debug, Clone, Copy)]
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    whole: &'a [u8],
    /// Content of indefinite length: children until end-of-contents.
    indefinite: bool,
}

/// The certificates (DER, in the order sent) of a certs-only SignedData. An answer without a
/// certificates field yields an empty list.
pub fn certificates(input: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let (info, rest) = read(input, 0)?;
    if rest.iter().any(|b| *b != 0) {
        return Err("bytes follow the PKCS#7 ContentInfo".into());
    }
    expect(&info, SEQUENCE, "ContentInfo")?;
    let mut fields = children(&info, 1)?.into_iter();
    let content_type = next(&mut fields, OID, "ContentInfo contentType")?;
    if content_type.content != SIGNED_DATA {
        return Err("the PKCS#7 content is not SignedData (1.2.840.113549.1.7.2)".into());
    }
    let explicit = next(&mut fields, CONTEXT_0, "ContentInfo content")?;
    let mut inner = children(&explicit, 2)?.into_iter();
    let signed = next(&mut inner, SEQUENCE, "SignedData")?;
    let mut fields = children(&signed, 3)?.into_iter();
    next(&mut fields, INTEGER, "SignedData version")?;
    next(&mut fields, SET, "SignedData digestAlgorithms")?;
    next(&mut fields, SEQUENCE, "SignedData encapContentInfo")?;
    let Some(certs) = fields.next().filter(|f| f.tag == CONTEXT_0) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    // CertificateChoices: only the plain Certificate (a SEQUENCE) is of use; tagged choices
    // (attribute certificates, other formats) are skipped.
    for cert in children(&certs, 4)?.into_iter().filter(|c| c.tag == SEQUENCE) {
        if cert.indefinite {
            return Err("a certificate in the PKCS#7 answer is BER-encoded (it must be DER)".into());
        }
        if out.len() == MAX_CERTIFICATES {
            return Err(format!("the PKCS#7 answer holds more than {MAX_CERTIFICATES} certificates"));
        }
        out.push(cert.whole.to_vec());
    }
    Ok(out)
}

/// What a signature check needs from a SignedData (RFC 5652 §5.1); the rest (certificates,
/// CRLs) is skipped unread, so the device binary carries no decoder for CMS's CRL and
/// attribute-certificate types (issue 13).
#[derive(Debug)]
pub struct Signed<'a> {
    /// The encapsulated content's octets (segments of a BER OCTET STRING joined), if present.
    pub content: Option<Vec<u8>>,
    /// Each SignerInfo, whole (DER in practice; read with `der` by the caller).
    pub signer_infos: Vec<&'a [u8]>,
}

/// Reads a ContentInfo(SignedData), DER or BER.
pub fn signed(input: &[u8]) -> Result<Signed<'_>, String> {
    let mut fields = signed_data_fields(input)?.into_iter();
    next(&mut fields, INTEGER, "SignedData version")?;
    next(&mut fields, SET, "SignedData digestAlgorithms")?;
    let encapsulated = next(&mut fields, SEQUENCE, "SignedData encapContentInfo")?;
    let mut parts = children(&encapsulated, 3)?.into_iter();
    next(&mut parts, OID, "encapContentInfo eContentType")?;
    let content = match parts.next() {
        None => None,
        Some(explicit) => {
            expect(&explicit, CONTEXT_0, "encapContentInfo eContent")?;
            let octets = children(&explicit, 4)?.into_iter().next().ok_or("eContent: missing")?;
            if octets.tag != OCTET_STRING && octets.tag != OCTET_STRING_ANY {
                return Err(format!("eContent: expected an OCTET STRING, found tag 0x{:02x}", octets.tag));
            }
            Some(octet_string(&octets, 5)?)
        }
    };
    // [0] certificates and [1] crls may come first.
    let signer_infos = fields.find(|f| f.tag == SET).ok_or("SignedData signerInfos: missing")?;
    let signer_infos = children(&signer_infos, 3)?.into_iter().map(|s| s.whole).collect();
    Ok(Signed { content, signer_infos })
}

/// The fields of the SignedData in a ContentInfo, with nothing after the ContentInfo.
fn signed_data_fields(input: &[u8]) -> Result<Vec<Tlv<'_>>, String> {
    let (info, rest) = read(input, 0)?;
    if rest.iter().any(|b| *b != 0) {
        return Err("bytes follow the PKCS#7 ContentInfo".into());
    }
    expect(&info, SEQUENCE, "ContentInfo")?;
    let mut fields = children(&info, 1)?.into_iter();
    if next(&mut fields, OID, "ContentInfo contentType")?.content != SIGNED_DATA {
        return Err("the PKCS#7 content is not SignedData (1.2.840.113549.1.7.2)".into());
    }
    let explicit = next(&mut fields, CONTEXT_0, "ContentInfo content")?;
    let signed = next(&mut children(&explicit, 2)?.into_iter(), SEQUENCE, "SignedData")?;
    children(&signed, 3)
}

/// An OCTET STRING's octets: primitive, or constructed (BER) with its segments joined.
fn octet_string(tlv: &Tlv, depth: usize) -> Result<Vec<u8>, String> {
    if tlv.tag == OCTET_STRING {
        return Ok(tlv.content.to_vec());
    }
    let mut joined = Vec::new();
    for segment in children(tlv, depth)? {
        expect(&segment, OCTET_STRING, "an OCTET STRING segment")?;
        joined.extend_from_slice(segment.content);
    }
    Ok(joined)
}

/// The first SignerInfo's signedAttrs exactly as sent, re-tagged as the SET OF that the
/// signature covers (RFC 5652 §5.4); `None` when there are none. A signer that sends its
/// attributes in another order than DER's has signed those bytes, not a re-sorted encoding.
pub fn signed_attributes(input: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let Some(signer) = signed(input)?.signer_infos.first().copied() else {
        return Ok(None);
    };
    let (signer, _) = read(signer, 4)?;
    // version, sid, digestAlgorithm, then [0] signedAttrs if present.
    let attrs = children(&signer, 5)?.into_iter().nth(3).filter(|f| f.tag == CONTEXT_0);
    Ok(attrs.filter(|a| !a.indefinite).map(|a| {
        let mut set = a.whole.to_vec();
        set[0] = SET;
        set
    }))
}

/// 1.2.840.113549.1.7.3 (id-envelopedData), as DER content octets.
const ENVELOPED_DATA: [u8; 9] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x03];
const OCTET_STRING: u8 = 0x04;
/// A constructed (BER, segmented) OCTET STRING.
const OCTET_STRING_ANY: u8 = 0x24;
/// [0] primitive: EncryptedContentInfo's encryptedContent (IMPLICIT OCTET STRING, RFC 5652 §6.1).
const CONTEXT_0_PRIMITIVE: u8 = 0x80;

/// What a recipient needs from a ContentInfo(EnvelopedData) (RFC 5652 §6.1).
#[derive(Debug)]
pub struct Enveloped<'a> {
    /// The key-transport entries (KeyTransRecipientInfo, untagged SEQUENCEs) of recipientInfos,
    /// each whole (DER in practice; read with `der` by the caller). The other kinds, all tagged
    /// (key agreement, KEK, password, other), are skipped: SCEP transports keys with RSA.
    pub key_transport: Vec<&'a [u8]>,
    /// The contentEncryptionAlgorithm AlgorithmIdentifier, whole.
    pub content_algorithm: &'a [u8],
    /// The encrypted content, its BER segments joined.
    pub encrypted: Vec<u8>,
}

/// Reads an EnvelopedData, DER or BER. Go's CMS code (micromdm's SCEP server) sends the
/// encrypted content as a constructed [0] of OCTET STRING segments, which is BER that `der`
/// refuses, so this walks the envelope and joins the segments.
pub fn enveloped(input: &[u8]) -> Result<Enveloped<'_>, String> {
    let (info, rest) = read(input, 0)?;
    if rest.iter().any(|b| *b != 0) {
        return Err("bytes follow the EnvelopedData ContentInfo".into());
    }
    expect(&info, SEQUENCE, "ContentInfo")?;
    let mut fields = children(&info, 1)?.into_iter();
    if next(&mut fields, OID, "ContentInfo contentType")?.content != ENVELOPED_DATA {
        return Err("the content is not EnvelopedData (1.2.840.113549.1.7.3)".into());
    }
    let explicit = next(&mut fields, CONTEXT_0, "ContentInfo content")?;
    let mut inner = children(&explicit, 2)?.into_iter();
    let enveloped = next(&mut inner, SEQUENCE, "EnvelopedData")?;
    let mut fields = children(&enveloped, 3)?.into_iter();
    next(&mut fields, INTEGER, "EnvelopedData version")?;
    let mut recipients = fields.next().ok_or("EnvelopedData recipientInfos: missing")?;
    if recipients.tag == CONTEXT_0 {
        // originatorInfo [0], which key transport does not use.
        recipients = fields.next().ok_or("EnvelopedData recipientInfos: missing")?;
    }
    expect(&recipients, SET, "EnvelopedData recipientInfos")?;
    let content_info = next(&mut fields, SEQUENCE, "EnvelopedData encryptedContentInfo")?;
    let mut parts = children(&content_info, 4)?.into_iter();
    next(&mut parts, OID, "encryptedContentInfo contentType")?;
    let algorithm = next(&mut parts, SEQUENCE, "encryptedContentInfo contentEncryptionAlgorithm")?;
    let content = parts.next().ok_or("encryptedContentInfo encryptedContent: missing")?;
    let encrypted = match content.tag {
        CONTEXT_0_PRIMITIVE => content.content.to_vec(),
        CONTEXT_0 => octet_string(&content, 5)?,
        other => return Err(format!("encryptedContent: expected tag 0x80 or 0xa0, found 0x{other:02x}")),
    };
    let key_transport =
        children(&recipients, 4)?.into_iter().filter(|r| r.tag == SEQUENCE).map(|r| r.whole).collect();
    Ok(Enveloped { key_transport, content_algorithm: algorithm.whole, encrypted })
}

fn expect(tlv: &Tlv, tag: u8, what: &str) -> Result<(), String> {
    if tlv.tag != tag {
        return Err(format!("{what}: expected tag 0x{tag:02x}, found 0x{:02x}", tlv.tag));
    }
    Ok(())
}

fn next<'a>(fields: &mut impl Iterator<Item = Tlv<'a>>, tag: u8, what: &str) -> Result<Tlv<'a>, String> {
    let tlv = fields.next().ok_or_else(|| format!("{what}: missing"))?;
    expect(&tlv, tag, what)?;
    Ok(tlv)
}

/// The elements inside a constructed value.
fn children<'a>(tlv: &Tlv<'a>, depth: usize) -> Result<Vec<Tlv<'a>>, String> {
    if tlv.tag & 0x20 == 0 {
        return Err(format!("element 0x{:02x} is not constructed", tlv.tag));
    }
    let mut out = Vec::new();
    let mut rest = tlv.content;
    while !rest.is_empty() {
        if out.len() == MAX_ELEMENTS {
            return Err(format!("more than {MAX_ELEMENTS} elements in one value"));
        }
        let (child, after) = read(rest, depth + 1)?;
        out.push(child);
        rest = after;
    }
    Ok(out)
}

/// Reads one element from the front of `input`; answers it and what follows.
fn read(input: &[u8], depth: usize) -> Result<(Tlv<'_>, &[u8]), String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    let truncated = || "the PKCS#7 answer is truncated".to_string();
    let tag = *input.first().ok_or_else(truncated)?;
    if tag & 0x1f == 0x1f {
        return Err(format!("high tag numbers (0x{tag:02x}) do not occur in PKCS#7 certificates"));
    }
    let first = *input.get(1).ok_or_else(truncated)?;
    if first == 0x80 {
        // Indefinite length (BER): constructed only; children up to end-of-contents (00 00).
        if tag & 0x20 == 0 {
            return Err(format!("primitive element 0x{tag:02x} with indefinite length"));
        }
        let start = 2;
        let mut rest = &input[start..];
        let mut count = 0;
        loop {
            match rest {
                [0, 0, ..] => break,
                [] | [_] => return Err(truncated()),
                _ => {}
            }
            if count == MAX_ELEMENTS {
                return Err(format!("more than {MAX_ELEMENTS} elements in one value"));
            }
            let (_, after) = read(rest, depth + 1)?;
            rest = after;
            count += 1;
        }
        let content_len = input.len() - start - rest.len();
        let end = start + content_len + 2;
        let tlv =
            Tlv { tag, content: &input[start..start + content_len], whole: &input[..end], indefinite: true };
        return Ok((tlv, &input[end..]));
    }
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let count = usize::from(first & 0x7f);
        if count > 4 {
            return Err("an element longer than 4 GiB".into());
        }
        let bytes = input.get(2..2 + count).ok_or_else(truncated)?;
        (bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), 2 + count)
    };
    let end = header.checked_add(len).ok_or_else(truncated)?;
    if end > input.len() {
        return Err(truncated());
    }
    let tlv = Tlv { tag, content: &input[header..end], whole: &input[..end], indefinite: false };
    Ok((tlv, &input[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DER TLV with a definite length.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n < 0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    /// BER TLV with an indefinite length.
    fn ber(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag, 0x80];
        out.extend_from_slice(content);
        out.extend([0, 0]);
        out
    }

    /// Stand-ins for certificates: the walker does not look inside them.
    fn fake_cert(n: u8) -> Vec<u8> {
        tlv(SEQUENCE, &tlv(INTEGER, &[n; 200]))
    }

    fn signed_data(wrap: fn(u8, &[u8]) -> Vec<u8>, certs: &[Vec<u8>]) -> Vec<u8> {
        let mut body = tlv(INTEGER, &[1]);
        body.extend(wrap(SET, &[]));
        let id_data = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
        body.extend(wrap(SEQUENCE, &tlv(OID, &id_data)));
        body.extend(wrap(CONTEXT_0, &certs.concat()));
        body.extend(wrap(SET, &[]));
        let mut info = tlv(OID, &SIGNED_DATA);
        info.extend(wrap(CONTEXT_0, &wrap(SEQUENCE, &body)));
        wrap(SEQUENCE, &info)
    }

    #[test]
    fn der_certs_only_yields_the_certificates_in_order() {
        let certs = [fake_cert(1), fake_cert(2)];
        assert_eq!(certificates(&signed_data(tlv, &certs)).unwrap(), certs.to_vec());
    }

    #[test]
    fn ber_with_indefinite_lengths_yields_the_same_certificates() {
        let certs = [fake_cert(1), fake_cert(2), fake_cert(3)];
        assert_eq!(certificates(&signed_data(ber, &certs)).unwrap(), certs.to_vec());
    }

    #[test]
    fn an_answer_with_an_empty_certificates_field_yields_none() {
        let empty = signed_data(tlv, &[]);
        assert_eq!(certificates(&empty).unwrap(), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn truncated_answers_are_errors_at_every_length() {
        for input in [signed_data(tlv, &[fake_cert(1)]), signed_data(ber, &[fake_cert(1)])] {
            for cut in 0..input.len() {
                assert!(certificates(&input[..cut]).is_err(), "cut at {cut} of {}", input.len());
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(certificates(b"").is_err());
        assert!(certificates(b"hello world, not ASN.1").is_err());
        assert!(certificates(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(certificates(&[0x30, 0x80, 0x30, 0x80, 0x30, 0x80]).is_err());
        assert!(certificates(&[0x1f, 0x80, 0, 0]).is_err());
        let mut trailing = signed_data(tlv, &[fake_cert(1)]);
        trailing.push(0x30);
        assert!(certificates(&trailing).is_err());
        // Every single-byte change parses or fails; it never panics.
        let input = signed_data(ber, &[fake_cert(1)]);
        for i in 0..input.len() {
            let mut changed = input.clone();
            changed[i] ^= 0xff;
            let _ = certificates(&changed);
        }
    }

    #[test]
    fn nesting_beyond_the_limit_is_refused() {
        let mut deep = Vec::new();
        for _ in 0..1000 {
            deep.extend([0x30, 0x80]);
        }
        deep.extend([0u8; 2000]);
        assert!(certificates(&deep).unwrap_err().contains("deeper"));
    }

    #[test]
    fn enveloped_content_is_joined_from_ber_segments_or_read_whole() {
        let id_data = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
        let build = |wrap: fn(u8, &[u8]) -> Vec<u8>, content: Vec<u8>| {
            let algorithm = tlv(SEQUENCE, &tlv(OID, &[0x2b, 0x0e, 0x03, 0x02, 0x07]));
            let mut eci = tlv(OID, &id_data);
            eci.extend(&algorithm);
            eci.extend(content);
            let mut body = tlv(INTEGER, &[0]);
            // A key-transport entry, then a key-agreement one ([1]) that is skipped.
            body.extend(tlv(SET, &[tlv(SEQUENCE, &[1, 2, 3]), tlv(0xa1, &[4])].concat()));
            body.extend(wrap(SEQUENCE, &eci));
            let mut info = tlv(OID, &ENVELOPED_DATA);
            info.extend(wrap(CONTEXT_0, &wrap(SEQUENCE, &body)));
            wrap(SEQUENCE, &info)
        };
        let whole = build(tlv, tlv(CONTEXT_0_PRIMITIVE, b"0123456789abcdef"));
        assert_eq!(enveloped(&whole).unwrap().encrypted, b"0123456789abcdef");
        let segments = [tlv(OCTET_STRING, b"01234567"), tlv(OCTET_STRING, b"89abcdef")].concat();
        for wrap in [tlv, ber] {
            let input = build(wrap, wrap(CONTEXT_0, &segments));
            let parts = enveloped(&input).unwrap();
            assert_eq!(parts.encrypted, b"0123456789abcdef");
            assert_eq!(parts.key_transport, [tlv(SEQUENCE, &[1, 2, 3]).as_slice()]);
        }
        let input = build(ber, ber(CONTEXT_0, &segments));
        for cut in 0..input.len() {
            assert!(enveloped(&input[..cut]).is_err(), "cut at {cut}");
        }
        assert!(enveloped(&build(tlv, tlv(CONTEXT_0, &tlv(INTEGER, &[1])))).is_err());
    }

    #[test]
    fn signed_data_is_required() {
        let mut info = tlv(OID, &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01]);
        info.extend(tlv(CONTEXT_0, &tlv(SEQUENCE, &[])));
        assert!(certificates(&tlv(SEQUENCE, &info)).unwrap_err().contains("not SignedData"));
    }
}
