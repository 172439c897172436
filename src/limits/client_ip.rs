//! The client's IP address. The socket peer is the client unless it is a
//! trusted proxy; then the forwarding headers are read right to left and the
//! first address that is not a trusted proxy is the client. Headers from
//! untrusted peers are ignored: anyone can write them.
//!
//! The address keys the per-IP rate limit, which runs before
//! authentication; believing a forged header would let one client pose as
//! many (and dodge the limit) or as another (and use up its budget).

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// Resolves the client IP for rate limiting and logs.
///
/// Each proxy appends the address it received from, so only the entries to
/// the right of the last untrusted hop were written by proxies we trust;
/// anything left of it is whatever the client chose to send. When every
/// hop is trusted (a request from inside the proxies' network), the
/// leftmost entry is the best there is.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(&canonical(*ip)));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut chain: Vec<IpAddr> = forwarded_for(headers);
    if chain.is_empty() {
        chain = x_forwarded_for(headers);
    }
    // Closest hop last; the first untrusted hop from the right is the client.
    for ip in chain.iter().rev() {
        if !is_trusted(ip) {
            return *ip;
        }
    }
    chain.first().copied().unwrap_or(peer)
}

/// IPv4-mapped IPv6 addresses compare as IPv4. A dual-stack listener sees
/// IPv4 peers as `::ffff:a.b.c.d`: without this, a trusted `10.0.0.0/8`
/// would not match them, and one client could count under two keys.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `X-Forwarded-For`, the de facto header (nginx writes it), read only when
/// there is no `Forwarded`. Several header lines are one list, in order.
/// Entries that do not parse are skipped: proxies write addresses, so
/// anything else came from the client and is left of them anyway.
fn x_forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| parse_node(s.trim()))
        .collect()
}

/// RFC 7239 `Forwarded: for=192.0.2.60;proto=http, for="[2001:db8::1]:4711"`.
/// Preferred when present: a proxy that writes the standard header means
/// it. Obfuscated nodes (`for=_hidden`, `for=unknown`) carry no address and
/// are skipped like garbage.
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    headers
        .get_all("forwarded")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                k.trim().eq_ignore_ascii_case("for").then(|| parse_node(v.trim().trim_matches('"'))).flatten()
            })
        })
        .collect()
}

/// An address, optionally with a port; IPv6 in brackets as `Forwarded`
/// writes it (RFC 7239), or bare as `X-Forwarded-For` usually does.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok()).map(canonical);
    }
    s.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok()).map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap_or_else(|_| unreachable!()));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(client_ip(ip("9.9.9.9"), &h, &[]), ip("9.9.9.9"));
    }

    #[test]
    fn trusted_chain_is_walked_from_the_right() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap_or_else(|_| unreachable!())];
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.7")]);
        // 6.6.6.6 was written by the client itself: not trusted as the source.
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        let h = headers(&[("forwarded", r#"for=5.5.5.5;proto=http, for="[2001:db8::1]:4711""#)]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("2001:db8::1"));
        let h = headers(&[("x-forwarded-for", "1.2.3.4:5678")]);
        assert_eq!(client_ip(ip("::ffff:10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        assert_eq!(client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted), ip("10.0.0.1"));
    }
}
