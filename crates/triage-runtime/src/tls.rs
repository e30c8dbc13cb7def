//! TLS for the clients of PostgreSQL and Redis, and the one test that tells a certificate the
//! service refused from a network hiccup.
//!
//! Both clients use rustls with the ring provider (as the rest of the workspace does) and verify
//! the server the way `sslmode=verify-full` does: the chain must end at the configured CA and the
//! certificate must name the host the URL names. There is no "encrypt but don't verify" mode: a
//! connection that cannot prove whom it talks to would send the password to anyone on the path.
//!
//! Kafka is the exception: librdkafka does its own TLS with OpenSSL, configured through
//! [`KafkaConfig`](crate::config::KafkaConfig).
//!
//! A refused certificate is not a transient failure: retrying it cannot succeed until an operator
//! fixes a CA or a certificate. [`is_certificate_rejection`] finds one anywhere in an error's
//! source chain, so that the service exits with [`EXIT_CONFIG`](crate::service::EXIT_CONFIG)
//! instead of retrying forever.

use std::{
    error::Error as StdError,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::{Deserialize, Serialize};

use crate::config::{Secret, Validate};

/// TLS towards one server (PostgreSQL or Redis). Off by default; everything is a file, so that a
/// Kubernetes Secret mounted as files is all a deployment needs.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Connect over TLS and verify the server's certificate and host name (verify-full).
    pub enabled: bool,
    /// PEM bundle of the CA certificates the server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that require mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// A client certificate and its private key, as PEM bytes.
pub struct ClientIdentityPem {
    pub certificate: Vec<u8>,
    pub key: Vec<u8>,
}

/// Why the TLS settings cannot be used. Names the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {} holds no PEM {expected}", path.display())]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{what} {} is not usable: {reason}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

impl Validate for TlsConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        // The section's own key is not known here; the service prefixes it (see `validate_at`).
        self.validate_at("tls", problems);
    }
}

impl TlsConfig {
    /// Checks the settings under the config key `key` (`database.tls`): a CA when enabled, a
    /// certificate and a key together, and that every named file can be read.
    pub fn validate_at(&self, key: &str, problems: &mut Vec<String>) {
        if !self.enabled {
            return;
        }
        if self.ca_file.is_none() {
            problems.push(format!(
                "{key}.ca_file is required when {key}.enabled is true"
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push(format!(
                "{key}.cert_file and {key}.key_file must be set together"
            ));
        }
        for (name, path) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if let Some(path) = path
                && let Err(error) = fs::metadata(path)
            {
                problems.push(format!("{key}.{name} {}: {error}", path.display()));
            }
        }
    }

    /// The CA bundle's PEM bytes, if one is configured.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, TlsError> {
        self.ca_file
            .as_deref()
            .map(|path| read("CA file", path))
            .transpose()
    }

    /// The client certificate and key, if mutual TLS is configured.
    pub fn client_identity_pem(&self) -> Result<Option<ClientIdentityPem>, TlsError> {
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Ok(Some(ClientIdentityPem {
                certificate: read("client certificate", cert)?,
                key: read("client key", key)?,
            })),
            _ => Ok(None),
        }
    }

    /// A rustls client configuration that trusts only `ca_file` and presents the client
    /// certificate when one is configured.
    pub fn rustls_client_config(&self) -> Result<ClientConfig, TlsError> {
        let mut roots = RootCertStore::empty();
        if let Some(path) = &self.ca_file {
            let certificates = certificates("CA file", path)?;
            for certificate in certificates {
                roots.add(certificate).map_err(|error| TlsError::Invalid {
                    what: "CA file",
                    path: path.clone(),
                    reason: error.to_string(),
                })?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Invalid {
                what: "TLS provider",
                path: PathBuf::new(),
                reason: error.to_string(),
            })?
            .with_root_certificates(roots);
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates("client certificate", cert)?;
                let private_key =
                    PrivateKeyDer::from_pem_file(key).map_err(|error| TlsError::Invalid {
                        what: "client key",
                        path: key.clone(),
                        reason: error.to_string(),
                    })?;
                builder
                    .with_client_auth_cert(chain, private_key)
                    .map_err(|error| TlsError::Invalid {
                        what: "client certificate",
                        path: cert.clone(),
                        reason: error.to_string(),
                    })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Invalid {
            what,
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            expected: "certificate",
        });
    }
    Ok(certificates)
}

/// Why a Redis client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RedisClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The URL's text is left out: it may hold a password.
    #[error("the Redis URL is not valid: {0}")]
    Url(String),
    #[error("TLS is enabled for Redis, so its URL must start with rediss://")]
    PlainUrlWithTls,
}

/// A Redis client for `url`. With `tls.enabled` the URL must be `rediss://` and the server's
/// certificate must chain to `tls.ca_file` (and name the URL's host); a client certificate is
/// presented when one is configured. A `rediss://` URL without `tls.enabled` trusts the system's
/// CA roots.
pub fn redis_client(url: &Secret, tls: &TlsConfig) -> Result<redis::Client, RedisClientError> {
    let url_error = |error: redis::RedisError| {
        // redis' own message may quote the URL; keep only its kind.
        RedisClientError::Url(format!("{:?}", error.kind()))
    };
    if !tls.enabled {
        return redis::Client::open(url.expose()).map_err(url_error);
    }
    if !url.expose().starts_with("rediss://") {
        return Err(RedisClientError::PlainUrlWithTls);
    }
    let client_tls = tls
        .client_identity_pem()?
        .map(|identity| redis::ClientTlsConfig {
            client_cert: identity.certificate,
            client_key: identity.key,
        });
    let certificates = redis::TlsCertificates {
        client_tls,
        root_cert: tls.ca_pem()?,
    };
    redis::Client::build_with_tls(url.expose(), certificates).map_err(url_error)
}

/// Reads a secret (a password) from a file mounted from a Kubernetes Secret. One trailing newline
/// is dropped, as `echo` and editors add one.
pub fn read_secret_file(what: &'static str, path: &Path) -> Result<Secret, TlsError> {
    let text = fs::read_to_string(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let trimmed = text.strip_suffix('\n').unwrap_or(&text);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
    Ok(Secret::new(trimmed))
}

/// True when `error` or anything in its source chain is a TLS certificate the peer presented
/// and this side refused (unknown CA, wrong host name, expired), or one this side presented and
/// the peer refused. Such a failure repeats on every retry until an operator acts.
pub fn is_certificate_rejection(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if is_rustls_certificate_error(error) {
            return true;
        }
        // `io::Error::source` skips the error it wraps; tokio-rustls reports rustls' error
        // wrapped in one, so look inside.
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && (is_rustls_certificate_error(inner) || is_certificate_rejection(inner))
        {
            return true;
        }
        current = error.source();
    }
    false
}

fn is_rustls_certificate_error(error: &(dyn StdError + 'static)) -> bool {
    use rustls::{AlertDescription, Error};
    matches!(
        error.downcast_ref::<Error>(),
        Some(
            Error::InvalidCertificate(_)
                | Error::NoCertificatesPresented
                | Error::AlertReceived(
                    AlertDescription::BadCertificate
                        | AlertDescription::UnknownCA
                        | AlertDescription::CertificateRequired
                        | AlertDescription::CertificateUnknown
                        | AlertDescription::CertificateExpired
                        | AlertDescription::CertificateRevoked
                        | AlertDescription::UnsupportedCertificate
                )
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_without_a_ca_is_refused_and_names_the_key() {
        let tls = TlsConfig {
            enabled: true,
            cert_file: Some("/nonexistent/client.crt".into()),
            ..Default::default()
        };
        let mut problems = Vec::new();
        tls.validate_at("database.tls", &mut problems);
        assert!(
            problems.iter().any(|p| p.contains("database.tls.ca_file")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("database.tls.key_file")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("/nonexistent/client.crt")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_certificate_error_is_found_inside_an_io_error() {
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error);
        assert!(is_certificate_rejection(&io));
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(!is_certificate_rejection(&refused));
    }

    #[test]
    fn a_secret_file_loses_its_trailing_newline_only() {
        let dir = std::env::temp_dir().join(format!("triage-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("password");
        std::fs::write(&path, " p4ss \n").unwrap();
        assert_eq!(
            read_secret_file("password", &path).unwrap().expose(),
            " p4ss "
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
