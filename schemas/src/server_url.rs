//! NATS server URLs as users write them: a comma-separated list, where a URL may carry
//! `user:password@` or `token@` (as nats.go, nats.py and the `nats` CLI accept). async-nats
//! takes credentials only through its options, so they are split off here, and every text
//! meant for people shows the URLs with the secrets replaced.

use url::Url;

/// Written in place of a secret.
const REDACTED: &str = "***";

/// Credentials found in a server URL.
#[derive(Clone, PartialEq, Eq)]
pub enum UrlCredentials {
    /// `nats://user:password@host`
    UserPassword {
        /// The user name.
        user: String,
        /// The password (percent-decoded).
        password: String,
    },
    /// `nats://token@host`
    Token(String),
}

impl std::fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlCredentials::UserPassword { user, .. } => {
                write!(f, "UserPassword {{ user: {user:?}, password: {REDACTED} }}")
            }
            UrlCredentials::Token(_) => write!(f, "Token({REDACTED})"),
        }
    }
}

/// A server list with the credentials taken out of its URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrls {
    /// The URLs without user information, in the given order.
    pub urls: Vec<String>,
    /// The credentials the URLs carried (all of them the same), if any.
    pub credentials: Option<UrlCredentials>,
}

impl ServerUrls {
    /// Parses `nats://a:4222,nats://user:pass@b:4222`. A URL without a scheme gets `nats://`.
    /// Errors never repeat a secret; URLs that carry different credentials are refused.
    pub fn parse(list: &str) -> Result<ServerUrls, String> {
        let mut urls = Vec::new();
        let mut credentials: Option<UrlCredentials> = None;
        for (i, raw) in list.split(',').map(str::trim).enumerate() {
            if raw.is_empty() {
                return Err(format!(
                    "server URL {} of {list_len} is empty",
                    i + 1,
                    list_len = list.split(',').count()
                ));
            }
            let with_scheme = if raw.contains("://") {
                raw.to_string()
            } else {
                format!("nats://{raw}")
            };
            let mut url = Url::parse(&with_scheme).map_err(|e| {
                format!(
                    "server URL {:?} is not a URL: {e}",
                    redact_one(raw).unwrap_or_else(|| "(unreadable)".into())
                )
            })?;
            if url.fragment().is_some()
                || url.query().is_some()
                || (raw.contains('@') && url.username().is_empty() && url.password().is_none())
            {
                return Err(format!(
                    "server URL {:?} has `#`, `?` or `/` inside its user name or password: percent-encode them (`%23`, `%3F`, `%2F`)",
                    redact_one(raw).unwrap_or_default()
                ));
            }
            let found = url_credentials(&url)?;
            if found.is_some() {
                if credentials.is_some() && credentials != found {
                    return Err("the server URLs carry different credentials; give every URL the same ones, or set them once in the configuration".into());
                }
                credentials = found;
            }
            url.set_username("")
                .map_err(|_| "cannot remove the user from a server URL".to_string())?;
            url.set_password(None)
                .map_err(|_| "cannot remove the password from a server URL".to_string())?;
            urls.push(url.to_string().trim_end_matches('/').to_string());
        }
        Ok(ServerUrls { urls, credentials })
    }
}

fn url_credentials(url: &Url) -> Result<Option<UrlCredentials>, String> {
    // Percent-decoding, as in any URL (not form decoding: a `+` stays a `+`).
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = url.username();
    match (user.is_empty(), url.password()) {
        (true, None) => Ok(None),
        (true, Some(_)) => Err("a server URL has a password but no user name".into()),
        (false, Some(password)) => Ok(Some(UrlCredentials::UserPassword {
            user: decode(user),
            password: decode(password),
        })),
        (false, None) => Ok(Some(UrlCredentials::Token(decode(user)))),
    }
}

/// One URL with its password or token replaced. Works on the text, so that even a URL that
/// does not parse (a `#` or `/` in a password that should have been percent-encoded) is
/// shown without its secret: everything up to the last `@` is user information.
fn redact_one(raw: &str) -> Option<String> {
    let (scheme, rest) = match raw.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, raw),
    };
    let redacted = match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let userinfo = match userinfo.split_once(':') {
                Some((user, _)) if !user.contains(['/', '?', '#']) => format!("{user}:{REDACTED}"),
                _ => REDACTED.to_string(),
            };
            format!("{userinfo}@{host}")
        }
        None => rest.to_string(),
    };
    Some(match scheme {
        Some(scheme) => format!("{scheme}://{redacted}"),
        None => redacted,
    })
}

/// The server list with every password and token replaced by `***` (for logs, errors and
/// printed configuration).
pub fn redact_server_urls(list: &str) -> String {
    list.split(',')
        .map(|raw| redact_one(raw.trim()).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_password_and_token_are_taken_out_of_the_urls() {
        let parsed = ServerUrls::parse("nats://alice:s%40cret+x@a:4222, b:4223").unwrap();
        assert_eq!(parsed.urls, ["nats://a:4222", "nats://b:4223"]);
        assert_eq!(
            parsed.credentials,
            Some(UrlCredentials::UserPassword {
                user: "alice".into(),
                password: "s@cret+x".into()
            })
        );
        let parsed = ServerUrls::parse("tls://T0KEN@host:4222").unwrap();
        assert_eq!(parsed.urls, ["tls://host:4222"]);
        assert_eq!(
            parsed.credentials,
            Some(UrlCredentials::Token("T0KEN".into()))
        );
        assert_eq!(ServerUrls::parse("localhost").unwrap().credentials, None);
    }

    #[test]
    fn secrets_never_appear_in_errors_debug_output_or_redacted_text() {
        let error = ServerUrls::parse("nats://u:PASS@a:1,nats://v:OTHER@b:2").unwrap_err();
        assert!(
            !error.contains("PASS") && !error.contains("OTHER"),
            "{error}"
        );
        let error = ServerUrls::parse("nats://u:PASS@[bad:1").unwrap_err();
        assert!(!error.contains("PASS"), "{error}");
        // Characters that should have been percent-encoded end the authority early.
        for raw in [
            "nats://u:pa#SS@h:1",
            "nats://u:pa/SS@h:1",
            "nats://TOK#EN@h:1",
        ] {
            let shown = redact_server_urls(raw);
            assert!(
                !shown.contains("SS") && !shown.contains("EN"),
                "{raw} -> {shown}"
            );
            if let Err(error) = ServerUrls::parse(raw) {
                assert!(!error.contains("SS") && !error.contains("EN"), "{error}");
            }
        }
        let parsed = ServerUrls::parse("nats://u:PASS@a:1").unwrap();
        assert!(!format!("{parsed:?}").contains("PASS"));
        assert_eq!(
            redact_server_urls("nats://u:PASS@a:1,TOKEN@b:2,nats://c:3"),
            "nats://u:***@a:1,***@b:2,nats://c:3"
        );
    }
}
