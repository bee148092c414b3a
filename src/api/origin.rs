//! Which web pages may drive the MCP server through the proxy.
//!
//! A browser sends `Origin` with every cross-site request, and a page can reach a server on the
//! user's machine, or one in a cluster by DNS rebinding, whatever its `Host` says. The MCP
//! specification asks servers to validate `Origin`; the proxy does it for every server behind
//! it and answers 403, as the SDKs do. A request without `Origin` (every client that is not a
//! browser) passes.

use axum::http::HeaderValue;

/// The origins whose pages may send requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AllowedOrigins {
    /// `http` and `https` pages of `localhost`, `127.0.0.1` and `[::1]`, any port: the default.
    #[default]
    Local,
    /// Exactly these (each as `scheme://host[:port]`, default ports omitted, or `null`).
    Listed(Vec<String>),
    /// Every origin (`*`).
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an origin: use scheme://host[:port], `null` or `*`")]
pub struct InvalidOrigin(pub String);

impl AllowedOrigins {
    /// The allow-list of `entries`; none: [`AllowedOrigins::Local`].
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, InvalidOrigin> {
        let entries: Vec<&str> = entries
            .iter()
            .map(|e| e.as_ref().trim())
            .filter(|e| !e.is_empty())
            .collect();
        if entries.is_empty() {
            return Ok(Self::Local);
        }
        if entries.contains(&"*") {
            return Ok(Self::Any);
        }
        entries
            .iter()
            .map(|entry| serialize(entry).ok_or_else(|| InvalidOrigin((*entry).to_owned())))
            .collect::<Result<_, _>>()
            .map(Self::Listed)
    }

    /// May a page of `origin` send requests?
    pub fn allows(&self, origin: &HeaderValue) -> bool {
        let Some(origin) = origin.to_str().ok().and_then(serialize) else {
            return false;
        };
        match self {
            Self::Any => true,
            Self::Listed(listed) => listed.contains(&origin),
            Self::Local => url::Url::parse(&origin).is_ok_and(|url| {
                matches!(url.scheme(), "http" | "https")
                    && matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"))
            }),
        }
    }
}

/// An origin as browsers serialize it (`null` for an opaque one); `None` for what is none.
fn serialize(text: &str) -> Option<String> {
    if text == "null" {
        return Some(text.to_owned());
    }
    let url = url::Url::parse(text).ok()?;
    // An origin has no path, query or fragment ("https://a.example/" is how some write one).
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return None;
    }
    let origin = url.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).expect("header")
    }

    #[test]
    fn by_default_only_local_pages_are_allowed() {
        let local = AllowedOrigins::parse::<&str>(&[]).expect("empty");
        assert_eq!(local, AllowedOrigins::Local);
        for allowed in [
            "http://localhost:6274",
            "http://127.0.0.1",
            "https://localhost",
            "http://[::1]:3000",
        ] {
            assert!(local.allows(&header(allowed)), "{allowed}");
        }
        for refused in [
            "http://evil.example.com",
            "http://localhost.evil.example.com",
            "null",
            "file://",
            "chrome-extension://abc",
            "not an origin",
        ] {
            assert!(!local.allows(&header(refused)), "{refused}");
        }
    }

    #[test]
    fn a_list_allows_exactly_its_origins_as_browsers_write_them() {
        let listed =
            AllowedOrigins::parse(&["https://app.example.com:443", "http://tools.example:8080/"])
                .expect("valid");
        assert!(listed.allows(&header("https://app.example.com")));
        assert!(listed.allows(&header("https://APP.example.com:443")));
        assert!(listed.allows(&header("http://tools.example:8080")));
        assert!(!listed.allows(&header("http://app.example.com")));
        assert!(!listed.allows(&header("http://tools.example")));
        assert!(!listed.allows(&header("http://localhost:6274")));
        assert_eq!(AllowedOrigins::parse(&["*"]), Ok(AllowedOrigins::Any));
        assert!(AllowedOrigins::Any.allows(&header("http://anything.example")));
        let null = AllowedOrigins::parse(&["null"]).expect("null");
        assert!(null.allows(&header("null")));
    }

    #[test]
    fn what_is_no_origin_is_refused_with_its_text() {
        for bad in [
            "app.example.com",
            "https://app.example.com/path",
            "https://app.example.com?q",
            "ftp:",
        ] {
            assert_eq!(
                AllowedOrigins::parse(&[bad]),
                Err(InvalidOrigin(bad.into())),
                "{bad}"
            );
        }
    }
}
