//! API keys: every endpoint but liveness (`GET /health`, `grpc.health.v1`) needs one of the
//! configured keys, as `Authorization: Bearer KEY` (HTTP header or gRPC metadata; `x-api-key:
//! KEY` is accepted too). Keys are compared in constant time: the presented key and every
//! configured key are hashed with SHA-256 and all digests are compared with `subtle`, so the
//! time taken depends on neither which key matched nor how much of one did.

use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The configured keys (as digests).
#[derive(Clone)]
pub struct ApiKeys {
    digests: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl ApiKeys {
    /// `None` when there are no keys (authentication off). Blank entries are ignored.
    pub fn new<I: IntoIterator<Item = String>>(keys: I) -> Option<Self> {
        let digests: Vec<[u8; 32]> = keys
            .into_iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .map(|k| digest(&k))
            .collect();
        (!digests.is_empty()).then(|| Self {
            digests: Arc::new(digests),
        })
    }

    /// Keys from a file: one per line; blank lines and `#` comments are skipped.
    pub fn read_file(path: &std::path::Path) -> std::io::Result<Vec<String>> {
        Ok(std::fs::read_to_string(path)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect())
    }

    /// Whether `key` is one of the configured keys (constant time in the keys).
    pub fn accepts(&self, key: &str) -> bool {
        let d = digest(key);
        let mut ok = subtle::Choice::from(0u8);
        for k in self.digests.iter() {
            ok |= d.ct_eq(k);
        }
        ok.into()
    }

    /// Checks the `authorization` / `x-api-key` values of a request.
    pub fn check(&self, authorization: Option<&str>, x_api_key: Option<&str>) -> bool {
        let presented = authorization
            .and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")))
            .or(x_api_key);
        presented.is_some_and(|k| self.accepts(k.trim()))
    }

    /// A tonic interceptor that refuses calls without a valid key (UNAUTHENTICATED).
    pub fn interceptor(&self) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
        let keys = self.clone();
        move |req: tonic::Request<()>| {
            let m = req.metadata();
            let auth = m.get("authorization").and_then(|v| v.to_str().ok());
            let x = m.get("x-api-key").and_then(|v| v.to_str().ok());
            if keys.check(auth, x) {
                Ok(req)
            } else {
                Err(tonic::Status::unauthenticated(
                    "a valid API key is required: `authorization: Bearer KEY`",
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(ApiKeys::new(vec![" ".to_string()]).is_none());
        let k = ApiKeys::new(vec!["alpha".into(), "beta-2".into()]).unwrap();
        assert!(k.accepts("alpha") && k.accepts("beta-2"));
        assert!(!k.accepts("alph") && !k.accepts("alphaa") && !k.accepts(""));
        assert!(k.check(Some("Bearer alpha"), None));
        assert!(k.check(None, Some("beta-2")));
        assert!(
            !k.check(Some("alpha"), None),
            "the Bearer scheme is required in authorization"
        );
        assert!(!k.check(Some("Bearer gamma"), Some("gamma")));
        assert!(!k.check(None, None));
    }
}
