//! The few DER encodings the key providers build by hand (SubjectPublicKeyInfo, RSAPublicKey,
//! ECDSA signatures): written once here instead of pulling a DER crate into the HAL.

/// Tag, definite length, content.
pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().iter().copied().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

#[cfg_attr(not(any(feature = "pkcs11", feature = "tpm")), allow(dead_code))]
/// An INTEGER holding the unsigned big-endian number `bytes` (leading zeros dropped, a zero
/// byte added when the top bit is set).
pub(crate) fn uint(bytes: &[u8]) -> Vec<u8> {
    let trimmed = &bytes[bytes.iter().take_while(|b| **b == 0).count()..];
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if !matches!(trimmed.first(), Some(b) if b & 0x80 == 0) {
        content.push(0);
    }
    content.extend_from_slice(trimmed);
    tlv(0x02, &content)
}

/// A SEQUENCE of already encoded elements (the TPM provider's signatures and public keys).
#[cfg_attr(not(feature = "tpm"), allow(dead_code))]
pub(crate) fn sequence(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_integers_encode_as_der() {
        assert_eq!(tlv(0x30, &[0u8; 300])[..4], [0x30, 0x82, 0x01, 0x2c]);
        assert_eq!(tlv(0x04, &[1, 2]), [0x04, 2, 1, 2]);
        assert_eq!(uint(&[0, 0, 0x80]), [0x02, 2, 0, 0x80]);
        assert_eq!(uint(&[0, 0x7f]), [0x02, 1, 0x7f]);
        assert_eq!(uint(&[0]), [0x02, 1, 0]);
        assert_eq!(sequence(&[uint(&[1]), uint(&[2])]), [0x30, 6, 2, 1, 1, 2, 1, 2]);
    }
}
