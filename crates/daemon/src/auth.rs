//! Bearer tokens for the TCP listener. Only hashes are stored (`sha256:<hex>` in the
//! config), so a leaked config does not leak a usable token; a presented token is hashed and
//! compared with every configured hash in constant time, so timing reveals nothing about how
//! much of a hash matched.

use sha2::{Digest, Sha256};

/// A configured token hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "token {0:?} is not `sha256:<64 hex digits>`; hash a token with `patchover serve --hash-token < token-file`"
    )]
    Format(String),
}

impl TokenHash {
    /// Parses `sha256:<64 hex>`.
    pub fn parse(s: &str) -> Result<TokenHash, TokenError> {
        patchover_core::config::parse_token_hash(s)
            .map(TokenHash)
            .ok_or_else(|| TokenError::Format(s.chars().take(80).collect()))
    }

    /// A hash the config loader already parsed.
    pub fn from_bytes(bytes: [u8; 32]) -> TokenHash {
        TokenHash(bytes)
    }

    /// The hash of a clear token.
    pub fn of(token: &str) -> TokenHash {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// The config form, `sha256:<hex>`.
    pub fn to_config(&self) -> String {
        use ct_codecs::Encoder;
        let hex = ct_codecs::Hex::encode_to_string(self.0).expect("hex of 32 bytes fits");
        format!("sha256:{hex}")
    }
}

/// Whether two hashes are equal, looking at every byte whatever the result.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // black_box keeps the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Whether the `Authorization` header value carries one of the tokens. Every configured hash
/// is compared (no early return), so the time does not depend on which one matched.
pub fn authorized(header: Option<&str>, tokens: &[TokenHash]) -> bool {
    let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let presented = TokenHash::of(token.trim());
    let mut ok = false;
    for t in tokens {
        ok |= ct_eq(&presented.0, &t.0);
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_match() {
        assert_eq!(
            TokenHash::of("").to_config(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let h = TokenHash::of("s3cret");
        let parsed = TokenHash::parse(&h.to_config()).unwrap();
        assert_eq!(parsed, h);
        assert!(authorized(
            Some("Bearer s3cret"),
            std::slice::from_ref(&parsed)
        ));
        assert!(!authorized(
            Some("Bearer s3cres"),
            std::slice::from_ref(&parsed)
        ));
        assert!(!authorized(Some("s3cret"), std::slice::from_ref(&parsed)));
        assert!(!authorized(None, &[parsed]));
        assert!(!authorized(Some("Bearer s3cret"), &[]));
    }

    #[test]
    fn malformed_hashes_are_refused() {
        for s in [
            "s3cret",
            "sha256:abcd",
            &format!("sha256:{}", "zz".repeat(32)),
            // u8::from_str_radix took a sign: "+f" was read as 0x0f before ct-codecs.
            &format!("sha256:{}", "+f".repeat(32)),
            &format!("sha256:{}", "ab".repeat(33)),
        ] {
            assert!(TokenHash::parse(s).is_err(), "{s}");
        }
    }
}
