//! TLS to PostgreSQL, with libpq's parameters and meanings.
//!
//! Hosted PostgreSQL (RDS, Cloud SQL, Azure, Neon, Supabase) hands out URLs such as
//! `postgres://app@db.example.com/analytics?sslmode=require`, and most of them refuse a
//! connection without TLS. The agent reads the same parameters from `warehouse.url` as
//! `psql` does, and gives them libpq's meaning:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | |
//! | `prefer` (the default, as in libpq) | when the server offers it | not checked, unless `sslrootcert` is given (then as `verify-ca`) |
//! | `require` | always | the same as `prefer` |
//! | `verify-ca` | always | signed by `sslrootcert` |
//! | `verify-full` | always | signed by `sslrootcert`, and made out to the URL's host |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the machine's CA
//! store (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else the distribution's bundle). Unlike
//! libpq, the agent does not look for `~/.postgresql/root.crt` on its own: a daemon's
//! trust is what its config says. `sslcert` and `sslkey` (PEM) present a client
//! certificate, for servers whose `pg_hba.conf` says `cert` or `clientcert=verify-full`.
//! `sslmode=allow` (plain first, TLS if refused) is not offered: it is refused with a
//! pointer to `prefer`. Under `prefer`, a server that offers TLS but fails the
//! handshake (TLS 1.0/1.1 only) is an error, not a plain connection as in libpq.
//!
//! With TLS, password logins use SCRAM with channel binding when the server offers it,
//! which ties the password exchange to this TLS session.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// libpq's `sslmode`, less `allow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Whose certificates the agent trusts for the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    System,
}

impl RootCert {
    fn name(&self) -> String {
        match self {
            RootCert::File(p) => p.display().to_string(),
            RootCert::System => "the system's CAs".into(),
        }
    }
}

/// The TLS parameters of `warehouse.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
    /// `sslcert` and `sslkey`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// The URL without its TLS parameters (what `tokio_postgres` parses), and those.
pub fn split_url(url: &str) -> Result<(String, TlsParams), String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut kept = Vec::new();
    let mut mode = None;
    let mut root_cert = None;
    let mut cert = None;
    let mut key = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || {
            percent_decode(v).ok_or_else(|| {
                format!("warehouse.url: the value of {k} is not valid percent-encoded UTF-8")
            })
        };
        match k {
            "sslmode" => {
                mode = Some(match value()?.as_str() {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    "allow" => return Err(
                        "warehouse.url: sslmode=allow is not supported (it tries without TLS first); use sslmode=prefer or stricter".into(),
                    ),
                    other => return Err(format!(
                        "warehouse.url: sslmode must be disable, prefer, require, verify-ca or verify-full, got {other:?}"
                    )),
                })
            }
            "sslrootcert" => {
                let v = value()?;
                if v.is_empty() {
                    return Err("warehouse.url: sslrootcert is empty".into());
                }
                root_cert = Some(if v == "system" {
                    RootCert::System
                } else {
                    RootCert::File(v.into())
                });
            }
            "sslcert" => cert = Some(PathBuf::from(value()?)),
            "sslkey" => key = Some(PathBuf::from(value()?)),
            // libpq's other TLS knobs: refused by name rather than ignored, since each
            // would change what the connection trusts or offers.
            "sslcrl" | "sslcrldir" | "sslpassword" | "sslsni" | "sslnegotiation"
            | "sslcompression" | "ssl_min_protocol_version" | "ssl_max_protocol_version"
            | "requiressl" | "sslcertmode" | "gssencmode" => {
                return Err(format!("warehouse.url: {k} is not supported by the agent"));
            }
            _ => kept.push(pair),
        }
    }
    let client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => return Err("warehouse.url: sslcert needs sslkey beside it".into()),
        (None, Some(_)) => return Err("warehouse.url: sslkey needs sslcert beside it".into()),
    };
    let mode = mode.unwrap_or(SslMode::Prefer);
    if mode == SslMode::Disable && (root_cert.is_some() || client_cert.is_some()) {
        return Err(
            "warehouse.url: sslmode=disable with sslrootcert, sslcert or sslkey: say which you mean"
                .into(),
        );
    }
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
        return Err(format!(
            "warehouse.url: sslmode={} needs the CA to check the server against: add sslrootcert=/path/to/ca.pem, or sslrootcert=system for the machine's CA store",
            mode.name()
        ));
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((
        url,
        TlsParams {
            mode,
            root_cert,
            client_cert,
        },
    ))
}

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What `tokio_postgres` is told: whether TLS is tried, and whether it must succeed.
    pub fn driver_mode(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

/// A parameter's value as libpq decodes a URI's: `%XX` is a byte and nothing else is
/// special (a `+` stays a `+`, unlike `collector_core::url_parts::form_decode`, which
/// decodes forms: `/etc/ssl/a+b.pem` is a path here). `None` for a `%` not followed by
/// two hex digits, or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

impl TlsParams {
    /// What the connection does, in a few words, for `config check`.
    pub fn describe(&self) -> String {
        let what = match (self.mode, &self.root_cert) {
            (SslMode::Disable, _) => "TLS off".to_string(),
            (SslMode::Prefer, None) => {
                "TLS when the server offers it, certificate not checked".to_string()
            }
            (SslMode::Require, None) => "TLS, certificate not checked".to_string(),
            (SslMode::Prefer, Some(r)) => format!(
                "TLS when the server offers it, certificate checked against {}",
                r.name()
            ),
            (SslMode::VerifyFull, Some(r)) => {
                format!("TLS, certificate and host checked against {}", r.name())
            }
            (_, Some(r)) => format!("TLS, certificate checked against {}", r.name()),
            (_, None) => "TLS".to_string(),
        };
        match &self.client_cert {
            Some((cert, _)) => format!("{what}, client certificate {}", cert.display()),
            None => what,
        }
    }

    /// Reads the files the parameters name and builds the TLS client. Every error
    /// names the parameter and the file.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let roots = match &self.root_cert {
            None => None,
            Some(r) => Some(Arc::new(root_store(r)?)),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (self.mode, roots) {
            (SslMode::VerifyFull, Some(roots)) => webpki(roots, &provider)?,
            (_, roots) => Arc::new(Lenient {
                chain: roots.map(|r| webpki(r, &provider)).transpose()?,
                algorithms,
            }),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match &self.client_cert {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = read_certs(cert, "sslcert")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    format!(
                        "warehouse.url: sslkey {}: no private key read from it ({e})",
                        key.display()
                    )
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("warehouse.url: sslcert and sslkey: {e}"))
            }
        }
    }
}

fn read_certs(path: &Path, param: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("warehouse.url: {param} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "warehouse.url: {param} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn root_store(r: &RootCert) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match r {
        RootCert::File(path) => {
            for cert in read_certs(path, "sslrootcert")? {
                store
                    .add(cert)
                    .map_err(|e| format!("warehouse.url: sslrootcert {}: {e}", path.display()))?;
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(format!(
                    "warehouse.url: sslrootcert=system, but no CA certificate was found on this machine{why}"
                ));
            }
        }
    }
    Ok(store)
}

fn webpki(
    roots: Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| format!("warehouse.url: sslrootcert: {e}"))
}

/// `verify-ca`, and `prefer`/`require`: what is checked of the server's certificate
/// short of `verify-full`. With a CA store (`verify-ca`, or any mode with
/// `sslrootcert`), the chain must lead to a trusted CA and the name is not checked:
/// checking it is webpki's last step, after the chain, so a name error means the chain
/// was good. Without one (`prefer` and `require` alone, libpq's meaning), the
/// certificate is taken as it comes: the connection is safe from a passive listener,
/// not from someone in the middle. The handshake's signatures are checked either way.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_parameters_leave_the_url_and_the_rest_stay() {
        let (url, p) = split_url(
            "postgres://u@h:5432/db?connect_timeout=5&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20bundle.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u@h:5432/db?connect_timeout=5&application_name=x"
        );
        assert_eq!(p.mode, SslMode::VerifyFull);
        assert_eq!(
            p.root_cert,
            Some(RootCert::File("/etc/ca bundle.pem".into()))
        );
        assert_eq!(p.client_cert, None);

        let (url, p) = split_url("postgres://u@h/db").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(p.mode, SslMode::Prefer, "libpq's default");
        let (url, p) = split_url(
            "postgres://u@h/db?sslmode=require&sslrootcert=system&sslcert=c.pem&sslkey=k.pem",
        )
        .unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(p.root_cert, Some(RootCert::System));
        assert_eq!(p.client_cert, Some(("c.pem".into(), "k.pem".into())));
        // A `+` is a `+` in a libpq URI, not a space.
        assert_eq!(
            split_url("postgres://u@h/db?sslrootcert=/etc/a+b%2Bc.pem")
                .unwrap()
                .1
                .root_cert,
            Some(RootCert::File("/etc/a+b+c.pem".into()))
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        for (url, says) in [
            (
                "postgres://u@h/db?sslmode=allow",
                "sslmode=allow is not supported",
            ),
            (
                "postgres://u@h/db?sslmode=on",
                "sslmode must be disable, prefer",
            ),
            (
                "postgres://u@h/db?sslmode=verify-full",
                "sslmode=verify-full needs the CA",
            ),
            (
                "postgres://u@h/db?sslmode=verify-ca",
                "sslmode=verify-ca needs the CA",
            ),
            ("postgres://u@h/db?sslcert=c.pem", "sslcert needs sslkey"),
            ("postgres://u@h/db?sslkey=k.pem", "sslkey needs sslcert"),
            (
                "postgres://u@h/db?sslmode=disable&sslrootcert=system",
                "sslmode=disable with",
            ),
            ("postgres://u@h/db?sslcrl=x.pem", "sslcrl is not supported"),
            ("postgres://u@h/db?sslrootcert=", "sslrootcert is empty"),
            (
                "postgres://u@h/db?sslrootcert=%ZZ",
                "not valid percent-encoded",
            ),
            (
                "postgres://u@h/db?sslrootcert=%+1",
                "not valid percent-encoded",
            ),
        ] {
            let err = split_url(url).unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn config_check_says_what_the_connection_does() {
        let says = |url: &str| split_url(url).unwrap().1.describe();
        assert_eq!(says("postgres://u@h/db?sslmode=disable"), "TLS off");
        assert_eq!(
            says("postgres://u@h/db"),
            "TLS when the server offers it, certificate not checked"
        );
        assert_eq!(
            says("postgres://u@h/db?sslrootcert=ca.pem"),
            "TLS when the server offers it, certificate checked against ca.pem"
        );
        assert_eq!(
            says("postgres://u@h/db?sslmode=require"),
            "TLS, certificate not checked"
        );
        assert_eq!(
            says("postgres://u@h/db?sslmode=verify-ca&sslrootcert=system"),
            "TLS, certificate checked against the system's CAs"
        );
        assert_eq!(
            says("postgres://u@h/db?sslmode=verify-full&sslrootcert=ca.pem&sslcert=c.pem&sslkey=k.pem"),
            "TLS, certificate and host checked against ca.pem, client certificate c.pem"
        );
    }

    #[test]
    fn a_missing_or_empty_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let p = TlsParams {
            mode: SslMode::VerifyFull,
            root_cert: Some(RootCert::File(missing.clone())),
            client_cert: None,
        };
        let err = p.client_config().unwrap_err();
        assert!(
            err.contains("sslrootcert") && err.contains("nope.pem"),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let p = TlsParams {
            root_cert: Some(RootCert::File(empty)),
            ..p
        };
        let err = p.client_config().unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
    }
}
