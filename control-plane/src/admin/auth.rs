//! Admin keys, compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Configured admin keys, kept as digests so every comparison has the same length.
#[derive(Clone)]
pub struct AdminKeys {
    digests: Vec<[u8; 32]>,
}

impl AdminKeys {
    pub fn new(keys: &[String]) -> Self {
        Self {
            digests: keys
                .iter()
                .map(|k| Sha256::digest(k.as_bytes()).into())
                .collect(),
        }
    }

    /// Returns the actor name (`admin:` + digest prefix) if `presented` is a
    /// configured key. Every configured key is compared, match or not.
    pub fn check(&self, presented: &str) -> Option<String> {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = subtle::Choice::from(0u8);
        for k in &self.digests {
            found |= k.ct_eq(&d);
        }
        bool::from(found).then(|| format!("admin:{}", hex::encode(&d[..4])))
    }

    /// Extracts the key from `Authorization: Bearer …` or `x-api-key`.
    pub fn from_headers<'a>(
        authorization: Option<&'a str>,
        x_api_key: Option<&'a str>,
    ) -> Option<&'a str> {
        authorization
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .or(x_api_key.map(str::trim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_keys() {
        let keys = AdminKeys::new(&["alpha".into(), "beta".into()]);
        assert!(keys.check("alpha").is_some());
        assert!(keys.check("beta").is_some());
        assert!(keys.check("gamma").is_none());
        assert!(keys.check("").is_none());
        assert_ne!(keys.check("alpha"), keys.check("beta"));
        assert_eq!(AdminKeys::from_headers(Some("Bearer k1"), None), Some("k1"));
        assert_eq!(
            AdminKeys::from_headers(Some("bearer k1"), Some("k2")),
            Some("k1")
        );
        assert_eq!(
            AdminKeys::from_headers(Some("Basic x"), Some("k2")),
            Some("k2")
        );
        assert_eq!(AdminKeys::from_headers(None, None), None);
    }
}
