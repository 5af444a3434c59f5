//! SSRF guard: webhook URLs come from agent configs, which are not trusted
//! to point at our own network. Checked where the connection is made (the
//! resolver), so a name that resolves to a public address when validated
//! and to 127.0.0.1 when connecting (DNS rebinding) is still refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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
}

/// Why `ip` is not a public unicast address, if it is not.
pub fn classify(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
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
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<&'static str> {
    // IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::/96) reach the IPv4
    // address inside them.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let seg = ip.segments();
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
        let [.., c, d] = seg;
        return classify_v4(Ipv4Addr::from(((c as u32) << 16) | d as u32));
    }
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if seg[0] & 0xfe00 == 0xfc00 {
        Some("private (unique local fc00::/7)")
    } else if seg[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

/// Checks the scheme, and the address when the host is an IP literal (the
/// resolver never sees those). Names are checked by [`GuardedResolver`].
pub fn check_url(url: &Url, allow_private: bool) -> Result<(), Refused> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refused::Scheme {
            url: url.to_string(),
            scheme: url.scheme().into(),
        });
    }
    let Some(host) = url.host_str() else {
        return Err(Refused::NoHost {
            url: url.to_string(),
        });
    };
    // IPv6 literals come bracketed; names do not parse as addresses.
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(());
    };
    check_addr(&ip.to_string(), ip, allow_private)
}

fn check_addr(host: &str, addr: IpAddr, allow_private: bool) -> Result<(), Refused> {
    match classify(addr) {
        Some(class) if !allow_private => Err(Refused::Address {
            host: host.into(),
            addr,
            class,
        }),
        _ => Ok(()),
    }
}

/// reqwest's resolver with the guard applied to every answer: blocked
/// addresses are dropped; a name left with none fails with [`Refused`].
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|sa| match check_addr(&host, sa.ip(), allow_private) {
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
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
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
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(class(ip), None, "{ip}");
        }
    }

    #[test]
    fn urls() {
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(check_url(&url("https://argocd.example.com/api/webhook"), false).is_ok());
        assert!(check_url(&url("http://8.8.8.8/hook"), false).is_ok());
        let err = check_url(&url("http://127.0.0.1:9000/hook"), false).unwrap_err();
        assert!(err.to_string().contains("127.0.0.1"), "{err}");
        assert!(check_url(&url("http://127.0.0.1:9000/hook"), true).is_ok());
        let err = check_url(&url("http://[::1]/hook"), false).unwrap_err();
        assert!(err.to_string().contains("::1"), "{err}");
        assert!(matches!(
            check_url(&url("ftp://example.com/x"), true),
            Err(Refused::Scheme { .. })
        ));
        assert!(matches!(
            check_url(&url("file:///etc/passwd"), true),
            Err(Refused::Scheme { .. })
        ));
    }

    #[tokio::test]
    async fn resolver_drops_blocked_answers() {
        let refused = GuardedResolver {
            allow_private: false,
        }
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
        let allowed: Vec<_> = GuardedResolver {
            allow_private: true,
        }
        .resolve("localhost".parse().unwrap())
        .await
        .unwrap()
        .collect();
        assert!(!allowed.is_empty());
    }
}
