//! API keys of the HTTP and gRPC APIs (ticket-publisher's ingress, result-writer's read API and
//! console, dlq-alerter's dead-letter API): each key maps to one tenant, and may carry the
//! `admin` role, which only the dead-letter replay asks for. Only SHA-256 digests are held, and a presented key is compared
//! against every digest in constant time, so neither the configuration nor response timing
//! reveals a key.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Secret, Validate};

/// One API key: the tenant it belongs to and the hex SHA-256 of the key itself. Keys are never
/// stored in clear, so a leaked configuration does not leak them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    pub tenant: String,
    /// `sha256sum` of the key, 64 hex digits.
    pub key_sha256: Secret,
    /// `admin` lets the key replay its tenant's dead letters; absent, it only reads.
    #[serde(default)]
    pub role: Role,
}

/// What a key may do beyond reading its tenant's data.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read the tenant's triages, submit tickets, correct triages.
    #[default]
    Member,
    /// Also replay the tenant's dead letters.
    Admin,
}

/// Who a presented key belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub tenant: Arc<str>,
    pub role: Role,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// API keys given in configuration.
    pub keys: Vec<ApiKeyEntry>,
    /// A secret file with more keys, one `tenant:sha256hex` per line, or `tenant:sha256hex:admin`
    /// for a key with the admin role (`#` starts a comment); e.g. a mounted Kubernetes Secret.
    pub keys_file: Option<PathBuf>,
}

impl Validate for AuthConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        for (index, entry) in self.keys.iter().enumerate() {
            if entry.tenant.trim().is_empty() {
                problems.push(format!("auth.keys[{index}].tenant must not be empty"));
            }
            if parse_sha256(entry.key_sha256.expose()).is_none() {
                problems.push(format!(
                    "auth.keys[{index}].key_sha256 must be 64 hex digits (the SHA-256 of the key)"
                ));
            }
        }
        if let Some(path) = &self.keys_file
            && let Err(error) = read_keys_file(path)
        {
            problems.push(format!("auth.keys_file: {error}"));
        }
    }
}

/// Why the key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: expected `tenant:sha256hex` or `tenant:sha256hex:admin`")]
    Malformed { path: String, line: usize },
}

/// Parses 64 hex digits into a digest.
pub fn parse_sha256(hex_digest: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(hex_digest.trim()).ok()?;
    bytes.try_into().ok()
}

/// Reads `tenant:sha256hex[:admin]` lines; blank lines and `#` comments are skipped. A line
/// without a role is a member key, as every line was before roles existed.
pub fn read_keys_file(path: &Path) -> Result<Vec<(String, [u8; 32], Role)>, KeysFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeysFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut keys = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (line, role) = match line.strip_suffix(":admin") {
            Some(rest) => (rest, Role::Admin),
            None => (line, Role::Member),
        };
        let parsed = line
            .rsplit_once(':')
            .filter(|(tenant, _)| !tenant.trim().is_empty())
            .and_then(|(tenant, digest)| {
                Some((tenant.trim().to_owned(), parse_sha256(digest)?, role))
            });
        match parsed {
            Some(entry) => keys.push(entry),
            None => {
                return Err(KeysFileError::Malformed {
                    path: path.display().to_string(),
                    line: index + 1,
                });
            }
        }
    }
    Ok(keys)
}

/// The tenants' API keys, by digest.
#[derive(Clone, Default)]
pub struct ApiKeys {
    entries: Arc<Vec<(Identity, [u8; 32])>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.entries.len())
    }
}

impl ApiKeys {
    /// Keys from the configuration and the key file. The configuration was validated, so
    /// malformed entries cannot occur here; the file is read again in case it changed since.
    pub fn load(config: &AuthConfig) -> Result<Self, KeysFileError> {
        let identity = |tenant: &str, role: Role| Identity {
            tenant: Arc::from(tenant),
            role,
        };
        let mut entries: Vec<(Identity, [u8; 32])> = config
            .keys
            .iter()
            .filter_map(|entry| {
                parse_sha256(entry.key_sha256.expose())
                    .map(|digest| (identity(&entry.tenant, entry.role), digest))
            })
            .collect();
        if let Some(path) = &config.keys_file {
            entries.extend(
                read_keys_file(path)?
                    .into_iter()
                    .map(|(tenant, digest, role)| (identity(&tenant, role), digest)),
            );
        }
        Ok(ApiKeys {
            entries: Arc::new(entries),
        })
    }

    /// For tests and tools: member keys given in clear.
    pub fn from_plain(keys: &[(&str, &str)]) -> Self {
        let with_roles: Vec<(&str, &str, Role)> = keys
            .iter()
            .map(|(tenant, key)| (*tenant, *key, Role::Member))
            .collect();
        Self::from_plain_with_roles(&with_roles)
    }

    /// For tests and tools: keys given in clear, with their roles.
    pub fn from_plain_with_roles(keys: &[(&str, &str, Role)]) -> Self {
        ApiKeys {
            entries: Arc::new(
                keys.iter()
                    .map(|(tenant, key, role)| {
                        (
                            Identity {
                                tenant: Arc::from(*tenant),
                                role: *role,
                            },
                            sha256(key.as_bytes()),
                        )
                    })
                    .collect(),
            ),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tenant of `presented`, if it is a known key. Every digest is compared, whichever
    /// matches, so the time taken does not depend on which key (if any) matched.
    pub fn tenant_of(&self, presented: &str) -> Option<Arc<str>> {
        self.identify(presented).map(|identity| identity.tenant)
    }

    /// The tenant and role of `presented`, compared in constant time like [`Self::tenant_of`].
    pub fn identify(&self, presented: &str) -> Option<Identity> {
        let digest = sha256(presented.as_bytes());
        let mut found = None;
        for (identity, expected) in self.entries.iter() {
            if bool::from(expected.ct_eq(&digest)) && found.is_none() {
                found = Some(identity.clone());
            }
        }
        found
    }

    /// The identity of a request's key: `Authorization: Bearer <key>` or `X-API-Key`.
    pub fn identify_request(&self, headers: &axum::http::HeaderMap) -> Option<Identity> {
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token);
        let presented = bearer.or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|value| value.to_str().ok())
                .map(str::trim)
                .filter(|key| !key.is_empty())
        })?;
        self.identify(presented)
    }
}

/// The key in an `Authorization: Bearer <key>` value.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_key_names_its_tenant_and_others_none() {
        let keys = ApiKeys::from_plain(&[("acme", "k-acme"), ("globex", "k-globex")]);
        assert_eq!(keys.tenant_of("k-globex").as_deref(), Some("globex"));
        assert_eq!(keys.tenant_of("k-acme").as_deref(), Some("acme"));
        assert_eq!(keys.tenant_of("k-acm"), None);
        assert_eq!(keys.tenant_of(""), None);
    }

    #[test]
    fn keys_file_lines_are_tenant_and_digest() {
        let dir = std::env::temp_dir().join(format!("triage-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        let digest = hex::encode(sha256(b"secret-1"));
        std::fs::write(&path, format!("# tenants\n\nacme:{digest}\n")).unwrap();
        let config = AuthConfig {
            keys: Vec::new(),
            keys_file: Some(path.clone()),
        };
        let keys = ApiKeys::load(&config).unwrap();
        assert_eq!(keys.tenant_of("secret-1").as_deref(), Some("acme"));
        let admin_digest = hex::encode(sha256(b"secret-2"));
        std::fs::write(&path, format!("acme:{digest}\nacme:{admin_digest}:admin\n")).unwrap();
        let keys = ApiKeys::load(&config).unwrap();
        assert_eq!(keys.identify("secret-1").unwrap().role, Role::Member);
        assert_eq!(keys.identify("secret-2").unwrap().role, Role::Admin);
        assert_eq!(keys.tenant_of("secret-2").as_deref(), Some("acme"));
        std::fs::write(&path, "acme:not-hex\n").unwrap();
        let error = read_keys_file(&path).unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
        assert!(!error.to_string().contains("not-hex"), "{error}");
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }
}
