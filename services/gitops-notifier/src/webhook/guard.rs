//! SSRF guard: webhook URLs come from agent configs, which are not trusted
//! to point at our own network. Checked where the connection is made (the
//! resolver), so a name that resolves to a public address when validated
//! and to 127.0.0.1 when connecting (DNS rebinding) is still refused.
//!
//! Operators open holes with an allowlist (`--webhook-allow`): CIDRs, and
//! host names whose every address is then trusted (an in-cluster Flux
//! receiver). Plain `http://` with a secret token only reaches allowlisted
//! targets, so the token never crosses an untrusted network in clear.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// A webhook target we will not call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("refused webhook URL {url}: scheme {scheme:?} is not http or https")]
    Scheme { url: String, scheme: String },
    #[error("refused webhook URL {url}: no host")]
    NoHost { url: String },
    #[error("refused webhook target {host}: address {addr} is {class}")]
    Address {
        host: String,
        addr: IpAddr,
        class: &'static str,
    },
    #[error(
        "refused webhook target {host}: plain http would send the secret token in clear; \
         use https or allowlist the target (--webhook-allow)"
    )]
    PlainHttpWithSecret { host: String },
}

/// One `--webhook-allow` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    /// Addresses in this network (a bare address is a /32 or /128).
    Net(Cidr),
    /// Exactly this host name (lowercase, no trailing dot).
    Host(String),
    /// `*.example.svc`: any name ending in `.example.svc`, stored with the
    /// leading dot.
    Suffix(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "webhook allowlist entry {0:?} is neither a CIDR (10.0.0.0/8, fd00::/8), \
     an address, nor a host name (receiver.flux-system.svc, *.flux-system.svc)"
)]
pub struct BadAllow(String);

impl FromStr for Allow {
    type Err = BadAllow;

    fn from_str(s: &str) -> Result<Allow, BadAllow> {
        let bad = || BadAllow(s.to_owned());
        let entry = s.trim();
        if let Some((addr, prefix)) = entry.split_once('/') {
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let prefix: u8 = prefix.parse().map_err(|_| bad())?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if prefix > max {
                return Err(bad());
            }
            return Ok(Allow::Net(Cidr { addr, prefix }));
        }
        if let Ok(addr) = entry
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            return Ok(Allow::Net(Cidr { addr, prefix }));
        }
        let name = entry.trim_end_matches('.').to_ascii_lowercase();
        let (suffix, labels) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name.as_str()),
        };
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if labels.len() > 253 || !labels.split('.').all(valid_label) {
            return Err(bad());
        }
        Ok(if suffix {
            Allow::Suffix(format!(".{labels}"))
        } else {
            Allow::Host(labels.to_owned())
        })
    }
}

/// Where a URL may connect, decided before the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Any public address, or an allowlisted one.
    Any,
    /// Only allowlisted addresses (plain http carrying a secret).
    AllowlistedOnly,
}

/// The guard's configuration: what is allowed besides public addresses.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Deprecated `--webhook-allow-private`: every non-public address counts
    /// as allowlisted.
    pub allow_private: bool,
    pub allow: Vec<Allow>,
}

impl Policy {
    pub fn new(allow_private: bool, allow: &[Allow]) -> Policy {
        Policy {
            allow_private,
            allow: allow.to_vec(),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow.iter().any(|a| match a {
            Allow::Host(h) => *h == host,
            Allow::Suffix(s) => host.ends_with(s.as_str()),
            Allow::Net(_) => false,
        })
    }

    fn addr_allowed(&self, addr: IpAddr) -> bool {
        let in_net = self.allow.iter().any(|a| match a {
            Allow::Net(net) => net.contains(addr),
            _ => false,
        });
        in_net || (self.allow_private && classify(addr).is_some())
    }

    /// Checks the scheme, and the address when the host is an IP literal
    /// (the resolver never sees those); names are checked by
    /// [`GuardedResolver`] with the returned route. `secret` says whether
    /// the request carries a secret token.
    pub fn check_url(&self, url: &Url, secret: bool) -> Result<Route, Refused> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refused::Scheme {
                url: redact(url),
                scheme: url.scheme().into(),
            });
        }
        let Some(host) = url.host_str() else {
            return Err(Refused::NoHost { url: redact(url) });
        };
        let route = if secret && url.scheme() == "http" && !self.host_allowed(host) {
            Route::AllowlistedOnly
        } else {
            Route::Any
        };
        // IPv6 literals come bracketed; names do not parse as addresses.
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            self.check_addr(&ip.to_string(), ip, route)?;
        }
        Ok(route)
    }

    fn check_addr(&self, host: &str, addr: IpAddr, route: Route) -> Result<(), Refused> {
        if self.host_allowed(host) || self.addr_allowed(addr) {
            return Ok(());
        }
        match (classify(addr), route) {
            (Some(class), _) => Err(Refused::Address {
                host: host.into(),
                addr,
                class,
            }),
            (None, Route::AllowlistedOnly) => {
                Err(Refused::PlainHttpWithSecret { host: host.into() })
            }
            (None, Route::Any) => Ok(()),
        }
    }
}

/// Scheme, host and port: URLs may hold credentials (user:pass, secret
/// receiver paths).
fn redact(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{}://{host}:{port}", url.scheme()),
        (Some(host), None) => format!("{}://{host}", url.scheme()),
        _ => format!("{}:", url.scheme()),
    }
}

/// Why `ip` is not a public unicast address, if it is not.
pub fn classify(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private (RFC 1918)")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared address space (CGNAT 100.64.0.0/10)")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if a >= 240 {
        Some("reserved (240.0.0.0/4)")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("benchmarking (198.18.0.0/15)")
    } else if (a, b, c) == (192, 0, 0) {
        Some("IETF protocol assignments (192.0.0.0/24)")
    } else if matches!((a, b, c), (192, 0, 2) | (198, 51, 100) | (203, 0, 113)) {
        Some("documentation (TEST-NET)")
    } else if (a, b, c) == (192, 88, 99) {
        Some("6to4 relay anycast (192.88.99.0/24)")
    } else {
        None
    }
}

fn v4_at(seg: &[u16]) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(seg[0]) << 16) | u32::from(seg[1]))
}

fn classify_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // Forms that carry an IPv4 address reach it (or a network that does):
    // judge the address inside.
    if seg[..5] == [0; 5] && seg[5] == 0xffff {
        // IPv4-mapped ::ffff:a.b.c.d
        return classify_v4(v4_at(&seg[6..]));
    }
    if seg[..6] == [0; 6] {
        // IPv4-compatible ::a.b.c.d, deprecated: nothing public lives there.
        return Some(
            classify_v4(v4_at(&seg[6..])).unwrap_or("IPv4-compatible (::/96, deprecated)"),
        );
    }
    if seg[..4] == [0; 4] && seg[4] == 0xffff && seg[5] == 0 {
        // IPv4-translated ::ffff:0:a.b.c.d
        return classify_v4(v4_at(&seg[6..]));
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // Well-known NAT64 prefix 64:ff9b::/96
        return classify_v4(v4_at(&seg[6..]));
    }
    if seg[..3] == [0x64, 0xff9b, 1] {
        // Its address layout is local policy: no telling what it reaches.
        return Some("local-use NAT64 (64:ff9b:1::/48)");
    }
    if seg[0] == 0x2002 {
        // 6to4: the IPv4 address is bits 16..48.
        return classify_v4(v4_at(&seg[1..3]));
    }
    if seg[..2] == [0x2001, 0] {
        return Some("Teredo (2001::/32)");
    }
    if seg[..2] == [0x2001, 0xdb8] || (seg[0] == 0x3fff && seg[1] < 0x1000) {
        return Some("documentation (2001:db8::/32, 3fff::/20)");
    }
    if seg[..3] == [0x2001, 2, 0] {
        return Some("benchmarking (2001:2::/48)");
    }
    if seg[..4] == [0x100, 0, 0, 0] {
        return Some("discard-only (100::/64)");
    }
    if seg[0] & 0xfe00 == 0xfc00 {
        Some("private (unique local fc00::/7)")
    } else if seg[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if seg[0] & 0xffc0 == 0xfec0 {
        Some("site-local (fec0::/10, deprecated)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

/// reqwest's resolver with the guard applied to every answer: blocked
/// addresses are dropped; a name left with none fails with [`Refused`].
/// One per [`Route`]: the route is decided per URL, the resolver per client.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<Policy>,
    route: Route,
}

impl GuardedResolver {
    pub fn new(policy: Arc<Policy>, route: Route) -> GuardedResolver {
        GuardedResolver { policy, route }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let (policy, route) = (self.policy.clone(), self.route);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|sa| match policy.check_addr(&host, sa.ip(), route) {
                    Ok(()) => true,
                    Err(refused) => {
                        first_refusal.get_or_insert(refused);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), first_refusal) {
                (true, Some(refused)) => Err(Box::new(refused) as _),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

/// The guard's refusal inside a reqwest error, if that is what it is.
pub fn refusal_in(err: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<Refused>() {
            return Some(r.clone());
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<&'static str> {
        classify(s.parse().unwrap())
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn allow(entries: &[&str]) -> Policy {
        let allow: Vec<Allow> = entries.iter().map(|e| e.parse().unwrap()).collect();
        Policy::new(false, &allow)
    }

    #[test]
    fn blocks_non_public_addresses() {
        for (ip, want) in [
            ("127.0.0.1", "loopback"),
            ("127.8.9.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("100.64.0.1", "CGNAT"),
            ("100.127.255.254", "CGNAT"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("240.0.0.1", "reserved"),
            ("198.18.0.1", "benchmarking"),
            ("192.0.0.8", "IETF protocol assignments"),
            ("192.0.0.170", "IETF protocol assignments"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("192.88.99.1", "6to4 relay"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("feff::1", "site-local"),
            ("ff02::1", "multicast"),
            // IPv4-mapped
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:7f00:1", "loopback"),
            // IPv4-compatible, with a non-public and a public address inside
            ("::127.0.0.1", "loopback"),
            ("::10.0.0.1", "private"),
            ("::169.254.169.254", "link-local"),
            ("::8.8.8.8", "IPv4-compatible"),
            // IPv4-translated
            ("::ffff:0:127.0.0.1", "loopback"),
            ("::ffff:0:192.168.0.1", "private"),
            // NAT64, well-known and local-use
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("64:ff9b::127.0.0.1", "loopback"),
            ("64:ff9b:1::1", "local-use NAT64"),
            ("64:ff9b:1:ffff::8.8.8.8", "local-use NAT64"),
            // 6to4 of non-public addresses
            ("2002:7f00:1::", "loopback"),
            ("2002:a00:1::1", "private"),
            ("2002:a9fe:a9fe::1", "link-local"),
            ("2002:c0a8:101:1::1", "private"),
            // Teredo
            ("2001::1", "Teredo"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("2001:2::1", "benchmarking"),
            ("100::1", "discard-only"),
        ] {
            let got = class(ip).unwrap_or_else(|| panic!("{ip} allowed"));
            assert!(got.contains(want), "{ip}: {got}");
        }
    }

    #[test]
    fn allows_public_addresses() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "192.169.0.1",
            "192.0.1.1",
            "192.0.3.1",
            "198.51.101.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "64:ff9b:2::1",
            "2002:808:808::1",
            "2001:1::1",
            "2001:4860::8888",
            "2a00:1450::1",
            "fbff::1",
        ] {
            assert_eq!(class(ip), None, "{ip}");
        }
    }

    #[test]
    fn urls() {
        let open = Policy::default();
        assert_eq!(
            open.check_url(&url("https://argocd.example.com/api/webhook"), true),
            Ok(Route::Any)
        );
        assert!(open.check_url(&url("http://8.8.8.8/hook"), false).is_ok());
        let err = open
            .check_url(&url("http://127.0.0.1:9000/hook"), false)
            .unwrap_err();
        assert!(err.to_string().contains("127.0.0.1"), "{err}");
        let err = open
            .check_url(&url("http://[::1]/hook"), false)
            .unwrap_err();
        assert!(err.to_string().contains("::1"), "{err}");
        // Literal forms the URL parser normalises, and bracketed IPv6 forms.
        for target in [
            "http://2130706433/",
            "http://0x7f.0.0.1/",
            "http://127.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::127.0.0.1]/",
            "http://[2002:7f00:1::]/",
            "http://[64:ff9b:1::a00:1]/",
            "http://[2001::1]/",
            "http://[fec0::1]/",
            "http://192.0.0.1/",
        ] {
            assert!(
                matches!(
                    open.check_url(&url(target), false),
                    Err(Refused::Address { .. })
                ),
                "{target}"
            );
        }
        let private = Policy::new(true, &[]);
        assert!(
            private
                .check_url(&url("http://127.0.0.1:9000/hook"), false)
                .is_ok()
        );
        assert!(matches!(
            private.check_url(&url("ftp://example.com/x"), false),
            Err(Refused::Scheme { .. })
        ));
        let err = private
            .check_url(&url("file:///etc/passwd"), false)
            .unwrap_err();
        assert!(matches!(err, Refused::Scheme { .. }));
        // Refusals never repeat the URL's path or credentials.
        let err = open
            .check_url(&url("gopher://u:p@example.com/secret-path"), false)
            .unwrap_err();
        assert!(!err.to_string().contains("secret-path"), "{err}");
        assert!(!err.to_string().contains("u:p"), "{err}");
    }

    #[test]
    fn allowlist_opens_networks_and_hosts_only() {
        let p = allow(&[
            "10.0.0.5",
            "192.168.0.0/16",
            "fd00::/8",
            "notification-controller.flux-system.svc",
            "*.argocd.svc.cluster.local",
        ]);
        for ok in [
            "http://10.0.0.5/hook",
            "http://192.168.3.4:9292/hook",
            "http://[fd00::1]/",
            "http://[::ffff:10.0.0.5]/",
        ] {
            assert!(p.check_url(&url(ok), false).is_ok(), "{ok}");
        }
        for refused in ["http://10.0.0.6/", "http://127.0.0.1/", "http://[fe80::1]/"] {
            assert!(
                matches!(
                    p.check_url(&url(refused), false),
                    Err(Refused::Address { .. })
                ),
                "{refused}"
            );
        }
        // Allowlisted names: any address they resolve to.
        for host in [
            "notification-controller.flux-system.svc",
            "Notification-Controller.flux-system.svc.",
            "argocd-server.argocd.svc.cluster.local",
        ] {
            assert!(p.host_allowed(host), "{host}");
            assert!(
                p.check_addr(host, "10.9.9.9".parse().unwrap(), Route::AllowlistedOnly)
                    .is_ok()
            );
        }
        for host in [
            "evil.flux-system.svc",
            "argocd.svc.cluster.local",
            "xargocd.svc.cluster.local",
            "notification-controller.flux-system.svc.evil.com",
        ] {
            assert!(!p.host_allowed(host), "{host}");
            assert!(
                p.check_addr(host, "10.9.9.9".parse().unwrap(), Route::Any)
                    .is_err()
            );
        }
    }

    #[test]
    fn plain_http_with_a_secret_reaches_only_allowlisted_targets() {
        let p = allow(&["10.0.0.0/8", "receiver.flux-system.svc"]);
        // https, or no secret: the usual rules.
        assert_eq!(
            p.check_url(&url("https://hooks.example.com/x"), true),
            Ok(Route::Any)
        );
        assert_eq!(
            p.check_url(&url("http://hooks.example.com/x"), false),
            Ok(Route::Any)
        );
        // A public address over http with a secret: refused.
        assert!(matches!(
            p.check_url(&url("http://8.8.8.8/x"), true),
            Err(Refused::PlainHttpWithSecret { .. })
        ));
        // Names are judged by what they resolve to, at connection time.
        assert_eq!(
            p.check_url(&url("http://hooks.example.com/x"), true),
            Ok(Route::AllowlistedOnly)
        );
        let public: IpAddr = "8.8.8.8".parse().unwrap();
        assert!(matches!(
            p.check_addr("hooks.example.com", public, Route::AllowlistedOnly),
            Err(Refused::PlainHttpWithSecret { .. })
        ));
        assert!(
            p.check_addr(
                "hooks.internal",
                "10.1.1.1".parse().unwrap(),
                Route::AllowlistedOnly
            )
            .is_ok()
        );
        // Allowlisted: fine over http.
        assert!(p.check_url(&url("http://10.0.0.5/x"), true).is_ok());
        assert_eq!(
            p.check_url(&url("http://receiver.flux-system.svc/hook/abc"), true),
            Ok(Route::Any)
        );
        // The deprecated flag allowlists every non-public address, not public ones.
        let private = Policy::new(true, &[]);
        assert!(private.check_url(&url("http://127.0.0.1/x"), true).is_ok());
        assert!(private.check_url(&url("http://8.8.8.8/x"), true).is_err());
    }

    #[test]
    fn allowlist_entries_parse_or_say_why_not() {
        let net = |s: &str| match s.parse::<Allow>().unwrap() {
            Allow::Net(n) => n.to_string(),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(net("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(net("10.0.0.5"), "10.0.0.5/32");
        assert_eq!(net("::1"), "::1/128");
        assert_eq!(net("[fd00::1]"), "fd00::1/128");
        assert_eq!(net("0.0.0.0/0"), "0.0.0.0/0");
        assert_eq!(
            "Receiver.Flux-System.svc.".parse::<Allow>(),
            Ok(Allow::Host("receiver.flux-system.svc".into()))
        );
        assert_eq!("*.svc".parse::<Allow>(), Ok(Allow::Suffix(".svc".into())));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "a b",
            "http://x",
            "*.",
            "*",
            "a..b",
            "x/8",
            "10.0.0.0/-1",
        ] {
            let err = bad.parse::<Allow>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let p = allow(&["0.0.0.0/0"]);
        assert!(p.addr_allowed("127.0.0.1".parse().unwrap()));
        assert!(!p.addr_allowed("::1".parse().unwrap()));
        let p = allow(&["127.0.0.0/8"]);
        assert!(p.addr_allowed("127.200.0.1".parse().unwrap()));
        assert!(!p.addr_allowed("128.0.0.1".parse().unwrap()));
    }

    #[test]
    fn allow_flag_repeats_and_names_bad_entries() {
        use clap::{Args, FromArgMatches};
        let cmd = super::super::WebhookConfig::augment_args(clap::Command::new("t"));
        let matches = cmd
            .clone()
            .try_get_matches_from([
                "t",
                "--webhook-allow",
                "10.0.0.0/8,fd00::/8",
                "--webhook-allow",
                "notification-controller.flux-system.svc",
            ])
            .unwrap();
        let config = super::super::WebhookConfig::from_arg_matches(&matches).unwrap();
        assert_eq!(config.allow.len(), 3);
        assert_eq!(
            config.allow[2],
            Allow::Host("notification-controller.flux-system.svc".into())
        );
        let err = cmd
            .try_get_matches_from(["t", "--webhook-allow", "10.0.0.0/99"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--webhook-allow") && err.contains("10.0.0.0/99"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn resolver_drops_blocked_answers() {
        let strict = Arc::new(Policy::default());
        let refused = GuardedResolver::new(strict, Route::Any)
            .resolve("localhost".parse().unwrap())
            .await
            .err()
            .expect("localhost must be refused");
        let refusal = refusal_in(refused.as_ref()).expect("a Refused");
        assert!(matches!(
            refusal,
            Refused::Address {
                class: "loopback",
                ..
            }
        ));
        for policy in [
            Policy::new(true, &[]),
            allow(&["127.0.0.0/8", "::1"]),
            allow(&["localhost"]),
        ] {
            let allowed: Vec<_> =
                GuardedResolver::new(Arc::new(policy.clone()), Route::AllowlistedOnly)
                    .resolve("localhost".parse().unwrap())
                    .await
                    .unwrap_or_else(|e| panic!("{policy:?}: {e}"))
                    .collect();
            assert!(!allowed.is_empty(), "{policy:?}");
        }
    }
}
