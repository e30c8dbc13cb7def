//! Who may read the External Metrics API: the kube-apiserver's aggregation layer, on behalf of a
//! user the API server authenticated and the cluster's RBAC allows.
//!
//! The aggregator proxies each request over TLS with its front-proxy client certificate and names
//! the user it authenticated in request headers (`X-Remote-User`, `X-Remote-Group`,
//! `X-Remote-Extra-*`). Those headers are worth something only when the certificate chains to the
//! request-header CA and its common name is one of the allowed names; anyone else on the network
//! could write them. So, as every aggregated API server built on k8s.io/apiserver does:
//!
//! 1. the TLS layer verifies a client certificate, when one is presented, against the
//!    request-header CA ([`RequestHeaderAuth::tls_config`]);
//! 2. [`authenticate`] answers 401 without a verified certificate, with a common name outside
//!    the allowed names, or without a user header;
//! 3. the user is authorised with a SubjectAccessReview to the API server (delegated
//!    authorisation), answered 403 when denied. A static rule ("the HPA controller may read")
//!    would have to guess the user the aggregator forwards, which depends on how the controller
//!    manager authenticates; the SubjectAccessReview lets the cluster's RBAC decide (the chart
//!    grants `horizontal-pod-autoscaler` in kube-system read access).
//!
//! The CA, the allowed names and the header names come from the `extension-apiserver-authentication`
//! ConfigMap in kube-system (which the API server publishes from its `--requestheader-*` flags), or
//! from a file and configured names.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    middleware::Next,
    response::Response,
};
use axum_server::tls::TlsInfo;
use futures::future::BoxFuture;
use k8s_openapi::{
    api::{
        authorization::v1::{
            NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
        },
        core::v1::ConfigMap,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::{
    config::{AuthMode, ExternalMetricsAuthConfig},
    external_metrics::{API_GROUP, API_VERSION, status},
    kubernetes::{self, KubeError},
};

/// Where the aggregator's identity is published.
pub const AUTHENTICATION_CONFIG_MAP: &str = "extension-apiserver-authentication";
pub const AUTHENTICATION_NAMESPACE: &str = "kube-system";

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    // Boxed: kube's errors are large, and these travel only at start-up.
    #[error(transparent)]
    Kube(Box<KubeError>),
    #[error(
        "cannot read the ConfigMap {AUTHENTICATION_NAMESPACE}/{AUTHENTICATION_CONFIG_MAP}: {0}"
    )]
    ConfigMap(#[source] Box<kube::Error>),
    #[error(
        "the ConfigMap {AUTHENTICATION_NAMESPACE}/{AUTHENTICATION_CONFIG_MAP} has no {key}: is the API server started with --requestheader-client-ca-file?"
    )]
    MissingKey { key: &'static str },
    #[error("{key} of {AUTHENTICATION_CONFIG_MAP} is not a JSON list of strings: {source}")]
    BadList {
        key: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read the request-header CA file {path}: {source}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the request-header CA holds no usable certificate: {0}")]
    Ca(String),
    #[error("cannot read the serving certificate or key: {0}")]
    ServingCertificate(String),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a request was refused; each maps to the `Status` the API server would answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error(
        "no client certificate signed by the request-header CA: only the aggregation layer may call this API"
    )]
    NoClientCertificate,
    #[error(
        "the client certificate's common name {0:?} is not one of the allowed request-header names"
    )]
    NameNotAllowed(String),
    #[error("the client certificate cannot be parsed")]
    BadCertificate,
    #[error("the request names no user in a request header")]
    NoUser,
    #[error("user {user:?} may not {verb} {what}")]
    Forbidden {
        user: String,
        verb: String,
        what: String,
    },
    #[error("the authorisation check failed: {0}")]
    AuthorizerUnavailable(String),
}

impl Refusal {
    fn into_response(self) -> Response {
        let (code, reason) = match &self {
            Refusal::Forbidden { .. } => (StatusCode::FORBIDDEN, "Forbidden"),
            Refusal::AuthorizerUnavailable(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "InternalError")
            }
            _ => (StatusCode::UNAUTHORIZED, "Unauthorized"),
        };
        status(code, reason, self.to_string())
    }
}

/// The request-header authentication settings (what the ConfigMap publishes).
#[derive(Clone, Debug)]
pub struct RequestHeaderSettings {
    /// PEM of the CA that signs the aggregator's client certificate.
    pub client_ca_pem: Vec<u8>,
    /// Common names a client certificate may have; empty: any the CA signed.
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_header_prefixes: Vec<String>,
}

impl RequestHeaderSettings {
    /// From the `extension-apiserver-authentication` ConfigMap's data.
    pub fn from_config_map(data: &BTreeMap<String, String>) -> Result<Self, AuthSetupError> {
        let ca = data
            .get("requestheader-client-ca-file")
            .ok_or(AuthSetupError::MissingKey {
                key: "requestheader-client-ca-file",
            })?;
        let list = |key: &'static str| -> Result<Vec<String>, AuthSetupError> {
            match data.get(key) {
                None => Ok(Vec::new()),
                Some(text) if text.trim().is_empty() => Ok(Vec::new()),
                Some(text) => serde_json::from_str(text)
                    .map_err(|source| AuthSetupError::BadList { key, source }),
            }
        };
        Ok(RequestHeaderSettings {
            client_ca_pem: ca.clone().into_bytes(),
            allowed_names: list("requestheader-allowed-names")?,
            username_headers: list("requestheader-username-headers")?,
            group_headers: list("requestheader-group-headers")?,
            extra_header_prefixes: list("requestheader-extra-headers-prefix")?,
        })
    }
}

/// Who the aggregator says is asking.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What is asked, in the terms of a SubjectAccessReview.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RequestAttributes {
    Resource {
        namespace: String,
        resource: String,
        verb: String,
    },
    NonResource {
        path: String,
        verb: String,
    },
}

impl RequestAttributes {
    /// As k8s.io/apiserver's RequestInfo reads a GET: a metric is a resource of the group, and a
    /// GET without a name is a `list`; discovery paths are non-resource URLs.
    pub fn of_get(path: &str) -> Self {
        let prefix = format!("/apis/{API_GROUP}/{API_VERSION}/namespaces/");
        if let Some(rest) = path.strip_prefix(&prefix) {
            let mut parts = rest.split('/');
            if let (Some(namespace), Some(resource), None) =
                (parts.next(), parts.next(), parts.next())
            {
                return RequestAttributes::Resource {
                    namespace: namespace.to_owned(),
                    resource: resource.to_ascii_lowercase(),
                    verb: "list".into(),
                };
            }
        }
        RequestAttributes::NonResource {
            path: path.to_owned(),
            verb: "get".into(),
        }
    }

    fn verb(&self) -> &str {
        match self {
            RequestAttributes::Resource { verb, .. }
            | RequestAttributes::NonResource { verb, .. } => verb,
        }
    }

    fn describe(&self) -> String {
        match self {
            RequestAttributes::Resource {
                namespace,
                resource,
                ..
            } => format!("{resource}.{API_GROUP} in namespace {namespace}"),
            RequestAttributes::NonResource { path, .. } => path.clone(),
        }
    }
}

/// Decides whether a user may do something.
pub trait Authorizer: Send + Sync {
    fn allowed(
        &self,
        user: &UserInfo,
        attributes: &RequestAttributes,
    ) -> BoxFuture<'_, Result<bool, String>>;
}

/// Delegated authorisation: a SubjectAccessReview per decision, each answer reused for `ttl`
/// (the HPA controller asks the same question every sync period).
pub struct SubjectAccessReviewer {
    client: Client,
    ttl: Duration,
    cache: Mutex<HashMap<(UserInfo, RequestAttributes), (Instant, bool)>>,
}

impl SubjectAccessReviewer {
    pub fn new(client: Client, ttl: Duration) -> Self {
        SubjectAccessReviewer {
            client,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn review(
        &self,
        user: &UserInfo,
        attributes: &RequestAttributes,
    ) -> Result<bool, String> {
        let (resource_attributes, non_resource_attributes) = match attributes {
            RequestAttributes::Resource {
                namespace,
                resource,
                verb,
            } => (
                Some(ResourceAttributes {
                    group: Some(API_GROUP.into()),
                    version: Some(API_VERSION.into()),
                    resource: Some(resource.clone()),
                    namespace: Some(namespace.clone()),
                    verb: Some(verb.clone()),
                    ..Default::default()
                }),
                None,
            ),
            RequestAttributes::NonResource { path, verb } => (
                None,
                Some(NonResourceAttributes {
                    path: Some(path.clone()),
                    verb: Some(verb.clone()),
                }),
            ),
        };
        let review = SubjectAccessReview {
            metadata: ObjectMeta::default(),
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                groups: Some(user.groups.clone()),
                extra: Some(user.extra.clone()),
                resource_attributes,
                non_resource_attributes,
                uid: None,
            },
            status: None,
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("SubjectAccessReview: {e}"))?;
        Ok(answer.status.is_some_and(|status| status.allowed))
    }
}

impl Authorizer for SubjectAccessReviewer {
    fn allowed(
        &self,
        user: &UserInfo,
        attributes: &RequestAttributes,
    ) -> BoxFuture<'_, Result<bool, String>> {
        let key = (user.clone(), attributes.clone());
        Box::pin(async move {
            let now = Instant::now();
            if let Ok(cache) = self.cache.lock()
                && let Some((at, allowed)) = cache.get(&key)
                && now.duration_since(*at) < self.ttl
            {
                return Ok(*allowed);
            }
            let allowed = self.review(&key.0, &key.1).await?;
            if let Ok(mut cache) = self.cache.lock() {
                cache.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
                cache.insert(key, (now, allowed));
            }
            Ok(allowed)
        })
    }
}

/// Request-header authentication plus an authoriser: the state of [`authenticate`].
#[derive(Clone)]
pub struct RequestHeaderAuth {
    settings: Arc<RequestHeaderSettings>,
    authorizer: Arc<dyn Authorizer>,
}

impl RequestHeaderAuth {
    pub fn new(settings: RequestHeaderSettings, authorizer: Arc<dyn Authorizer>) -> Self {
        RequestHeaderAuth {
            settings: Arc::new(settings),
            authorizer,
        }
    }

    /// Loads the settings (the ConfigMap, or the configured CA file and names) and connects the
    /// SubjectAccessReview client. `None` when authentication is off.
    pub async fn from_config(
        config: &ExternalMetricsAuthConfig,
    ) -> Result<Option<Self>, AuthSetupError> {
        if config.mode == AuthMode::None {
            return Ok(None);
        }
        let (client, _) = kubernetes::client(config.kubeconfig.as_deref())
            .await
            .map_err(|error| AuthSetupError::Kube(Box::new(error)))?;
        let settings = match &config.client_ca_file {
            Some(path) => RequestHeaderSettings {
                client_ca_pem: std::fs::read(path).map_err(|source| AuthSetupError::CaFile {
                    path: path.display().to_string(),
                    source,
                })?,
                allowed_names: config.allowed_names.clone(),
                username_headers: vec!["X-Remote-User".into()],
                group_headers: vec!["X-Remote-Group".into()],
                extra_header_prefixes: vec!["X-Remote-Extra-".into()],
            },
            None => {
                let config_maps: Api<ConfigMap> =
                    Api::namespaced(client.clone(), AUTHENTICATION_NAMESPACE);
                let config_map = config_maps
                    .get(AUTHENTICATION_CONFIG_MAP)
                    .await
                    .map_err(|error| AuthSetupError::ConfigMap(Box::new(error)))?;
                RequestHeaderSettings::from_config_map(&config_map.data.unwrap_or_default())?
            }
        };
        tracing::info!(
            allowed_names = ?settings.allowed_names,
            source = if config.client_ca_file.is_some() { "file" } else { AUTHENTICATION_CONFIG_MAP },
            "external metrics api authenticates the aggregation layer"
        );
        let authorizer = Arc::new(SubjectAccessReviewer::new(
            client,
            config.authorization_cache_ttl,
        ));
        Ok(Some(RequestHeaderAuth::new(settings, authorizer)))
    }

    /// A rustls server configuration with the serving certificate that asks for a client
    /// certificate and verifies one against the request-header CA when it is presented. A
    /// connection without one is let through so that it gets a 401 `Status` (what `kubectl` and
    /// operators understand), not a bare handshake failure.
    pub fn tls_config(
        &self,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<ServerConfig, AuthSetupError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.settings.client_ca_pem) {
            let cert = cert.map_err(|e| AuthSetupError::Ca(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| AuthSetupError::Ca(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(AuthSetupError::Ca("no certificate in the PEM".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| AuthSetupError::Ca(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AuthSetupError::ServingCertificate(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| AuthSetupError::ServingCertificate(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The user named by a request whose client certificate the TLS layer verified.
    pub fn user(&self, tls: Option<&TlsInfo>, headers: &HeaderMap) -> Result<UserInfo, Refusal> {
        let leaf = tls
            .and_then(|info| info.peer_certificates.first())
            .ok_or(Refusal::NoClientCertificate)?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|_| Refusal::BadCertificate)?;
        let common_name = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        if !self.settings.allowed_names.is_empty()
            && !self.settings.allowed_names.contains(&common_name)
        {
            return Err(Refusal::NameNotAllowed(common_name));
        }
        let name = self
            .settings
            .username_headers
            .iter()
            .find_map(|header| headers.get(header.as_str())?.to_str().ok())
            .filter(|name| !name.is_empty())
            .ok_or(Refusal::NoUser)?
            .to_owned();
        let groups = self
            .settings
            .group_headers
            .iter()
            .flat_map(|header| headers.get_all(header.as_str()))
            .filter_map(|value| value.to_str().ok())
            .map(str::to_owned)
            .collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (header, value) in headers {
            let header = header.as_str();
            let Some(prefix) = self.settings.extra_header_prefixes.iter().find(|prefix| {
                header.len() > prefix.len() && header[..prefix.len()].eq_ignore_ascii_case(prefix)
            }) else {
                continue;
            };
            let Ok(value) = value.to_str() else { continue };
            // Keys are percent-encoded by the aggregator; the ones Kubernetes uses need no decoding
            // beyond case (header names arrive lower-cased).
            extra
                .entry(header[prefix.len()..].to_ascii_lowercase())
                .or_default()
                .push(value.to_owned());
        }
        Ok(UserInfo {
            name,
            groups,
            extra,
        })
    }
}

/// Middleware: authenticate, then authorise, every request; see the module documentation.
pub async fn authenticate(
    State(auth): State<RequestHeaderAuth>,
    request: Request,
    next: Next,
) -> Response {
    let tls = request.extensions().get::<Arc<TlsInfo>>().cloned();
    let user = match auth.user(tls.as_deref(), request.headers()) {
        Ok(user) => user,
        Err(refusal) => {
            tracing::debug!(reason = %refusal, path = request.uri().path(), "request refused");
            return refusal.into_response();
        }
    };
    let attributes = RequestAttributes::of_get(request.uri().path());
    match auth.authorizer.allowed(&user, &attributes).await {
        Ok(true) => next.run(request).await,
        Ok(false) => {
            let refusal = Refusal::Forbidden {
                user: user.name,
                verb: attributes.verb().to_owned(),
                what: attributes.describe(),
            };
            tracing::debug!(reason = %refusal, "request forbidden");
            refusal.into_response()
        }
        Err(error) => {
            tracing::warn!(error = %error, "cannot authorise an external metrics request");
            Refusal::AuthorizerUnavailable(error).into_response()
        }
    }
}

/// Reads a file for the serving certificate, saying which one failed.
pub fn read_pem(path: &Path) -> Result<Vec<u8>, AuthSetupError> {
    std::fs::read(path)
        .map_err(|e| AuthSetupError::ServingCertificate(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_are_list_of_a_resource_and_discovery_is_non_resource() {
        assert_eq!(
            RequestAttributes::of_get(
                "/apis/external.metrics.k8s.io/v1beta1/namespaces/triage/kafka_consumergroup_lag"
            ),
            RequestAttributes::Resource {
                namespace: "triage".into(),
                resource: "kafka_consumergroup_lag".into(),
                verb: "list".into()
            }
        );
        assert_eq!(
            RequestAttributes::of_get("/apis/external.metrics.k8s.io/v1beta1"),
            RequestAttributes::NonResource {
                path: "/apis/external.metrics.k8s.io/v1beta1".into(),
                verb: "get".into()
            }
        );
    }

    #[test]
    fn the_config_map_lists_are_json() {
        let data: BTreeMap<String, String> = [
            ("requestheader-client-ca-file", "PEM"),
            ("requestheader-allowed-names", "[\"front-proxy-client\"]"),
            ("requestheader-username-headers", "[\"X-Remote-User\"]"),
            ("requestheader-group-headers", "[\"X-Remote-Group\"]"),
            (
                "requestheader-extra-headers-prefix",
                "[\"X-Remote-Extra-\"]",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let settings = RequestHeaderSettings::from_config_map(&data).unwrap();
        assert_eq!(settings.allowed_names, ["front-proxy-client"]);
        assert_eq!(settings.username_headers, ["X-Remote-User"]);
        let mut broken = data.clone();
        broken.insert(
            "requestheader-allowed-names".into(),
            "front-proxy-client".into(),
        );
        assert!(matches!(
            RequestHeaderSettings::from_config_map(&broken),
            Err(AuthSetupError::BadList { .. })
        ));
        broken.remove("requestheader-client-ca-file");
        assert!(matches!(
            RequestHeaderSettings::from_config_map(&broken),
            Err(AuthSetupError::MissingKey { .. })
        ));
    }

    struct AllowAll;
    impl Authorizer for AllowAll {
        fn allowed(
            &self,
            _: &UserInfo,
            _: &RequestAttributes,
        ) -> BoxFuture<'_, Result<bool, String>> {
            Box::pin(async { Ok(true) })
        }
    }

    fn auth(allowed_names: &[&str]) -> (RequestHeaderAuth, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let settings = RequestHeaderSettings {
            client_ca_pem: ca.pem().into_bytes(),
            allowed_names: allowed_names.iter().map(|s| (*s).to_owned()).collect(),
            username_headers: vec!["X-Remote-User".into()],
            group_headers: vec!["X-Remote-Group".into()],
            extra_header_prefixes: vec!["X-Remote-Extra-".into()],
        };
        (
            RequestHeaderAuth::new(settings, Arc::new(AllowAll)),
            rcgen::Issuer::new(params, ca_key),
        )
    }

    fn client_cert(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, cn: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.signed_by(&key, issuer).unwrap().der().to_vec()
    }

    fn tls_with(cert: Vec<u8>) -> TlsInfo {
        let mut info = TlsInfo::default();
        info.peer_certificates = vec![cert];
        info
    }

    #[test]
    fn the_user_comes_from_headers_only_behind_an_allowed_certificate() {
        let (auth, issuer) = auth(&["front-proxy-client"]);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-remote-user",
            "system:serviceaccount:kube-system:horizontal-pod-autoscaler"
                .parse()
                .unwrap(),
        );
        headers.append("x-remote-group", "system:serviceaccounts".parse().unwrap());
        headers.append("x-remote-group", "system:authenticated".parse().unwrap());
        headers.insert("x-remote-extra-scopes", "a".parse().unwrap());

        assert_eq!(auth.user(None, &headers), Err(Refusal::NoClientCertificate));
        let stranger = tls_with(client_cert(&issuer, "someone-else"));
        assert_eq!(
            auth.user(Some(&stranger), &headers),
            Err(Refusal::NameNotAllowed("someone-else".into()))
        );
        let proxy = tls_with(client_cert(&issuer, "front-proxy-client"));
        let user = auth.user(Some(&proxy), &headers).unwrap();
        assert_eq!(
            user.name,
            "system:serviceaccount:kube-system:horizontal-pod-autoscaler"
        );
        assert_eq!(
            user.groups,
            ["system:serviceaccounts", "system:authenticated"]
        );
        assert_eq!(user.extra["scopes"], ["a"]);
        assert_eq!(
            auth.user(Some(&proxy), &HeaderMap::new()),
            Err(Refusal::NoUser)
        );
    }
}
